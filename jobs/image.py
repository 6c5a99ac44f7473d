"""``cdvm image build``: the microVM's kernel and initramfs, built reproducibly from Debian packages.

Inputs are two Debian packages, found by their apt index SHA-256 (so apt's signed Release
files anchor them): the kernel (``linux-image-amd64``'s current ABI package) and
``busybox-static``. They are taken from apt's archive directory or the image cache, and
fetched with ``apt-get download`` only when missing and allowed.

The initramfs is a ``newc`` cpio (``Documentation/driver-api/early-userspace/buffer-format.rst``)
written here, not by cpio(1): entries sorted by path, every mtime ``SOURCE_DATE_EPOCH`` (0
when unset), uid/gid 0, inode numbers in entry order, then gzip with mtime 0. It holds
busybox, the guest ``/init`` (:data:`GUEST_INIT`) and the kernel modules the guest needs
(virtio PCI and console, 9p, sev-guest), in dependency order read from each module's
``.modinfo`` ELF section. Same packages and epoch in, same bytes out.

The image digest is ``SHA-256("cdvm-image/1\\nkernel <hex>\\ninitrd <hex>\\ncmdline <hex>\\n")``
over the SHA-256 of the kernel, the initramfs and the kernel command line (UTF-8, no NUL):
the three hashes SEV-SNP's ``kernel-hashes=on`` measures into the launch, so a customer can
recompute it from what the attestation covers. On a TDX host the digest is passed as
MRCONFIGID, on an SEV-SNP host as HOST_DATA (:mod:`jobs.qemu`).

llama.cpp for the guest: QEMU's TCG emulates up to AVX2/FMA/F16C, not AVX-512, so a
host build with native instructions dies of SIGILL in an emulated guest. The build makes
a baseline wheel of the installed llama-cpp-python version (:data:`GUEST_LLAMA_CMAKE_ARGS`),
cached by version and flags, and unpacks it into ``guest-site/``, which the microVM puts
first on the runner's ``PYTHONPATH``. It is not part of the digest (see docs/microvm.md).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dvm.paths import cache_dir
from jobs.errors import JobError

log = logging.getLogger(__name__)

KERNEL_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
APT_ARCHIVES = Path("/var/cache/apt/archives")
DIGEST_DOMAIN = "cdvm-image/1"
KERNEL_CMDLINE = "console=ttyS0 quiet loglevel=3 panic=-1 oops=panic rdinit=/init"
GUEST_MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p", "sev-guest")
"""Modules the guest loads (their dependencies are added): PCI transport, the channel port,
the read-only 9p shares, and the SNP guest device for evidence."""
OPTIONAL_MODULES = frozenset({"sev_guest"})
"""Modules whose device may be absent (``sev-guest`` loads only inside an SEV-SNP guest)."""
GUEST_LLAMA_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
    "-DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF "
    "-DGGML_AVX512_BF16=OFF -DLLAVA_BUILD=OFF"
)
"""The guest's llama.cpp CPU baseline: what ``qemu-system-x86_64 -accel tcg -cpu max`` (7.2+)
exposes (AVX2, FMA, F16C, BMI2; no AVX-512, no AVX-VNNI), so it also runs on any x86-64-v3 host."""
KERNEL_FILE, INITRD_FILE, CMDLINE_FILE, MANIFEST_FILE, GUEST_SITE = (
    "vmlinuz", "initramfs.img", "cmdline", "manifest.json", "guest-site")

GUEST_INIT = r"""#!/cdvm/busybox sh
# cdvm guest init: mount the read-only shares named in /cdvm/run/run.conf, run the one runner
# with stdin/stdout on the virtio-serial port "cdvm.channel", report how it ended, power off.
/cdvm/busybox mkdir -p /cdvm/bin
/cdvm/busybox --install -s /cdvm/bin
export PATH=/cdvm/bin
finish() {
    echo "cdvm-exit rc=$1 oom_kill=${2:-0} pids_max=${3:-0}" >/dev/console
    sync
    poweroff -f
}
fail() { echo "cdvm-init: $*" >/dev/console; finish 125; }
mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs devtmpfs /dev || fail "cannot mount /proc, /sys, /dev"
mount -t configfs configfs /sys/kernel/config 2>/dev/null
while read -r module flag; do
    insmod "/cdvm/modules/$module" 2>/dev/null || [ "$flag" = optional ] || fail "cannot load $module"
done </cdvm/modules/order
mkdir -p /cdvm/run /tmp
mount -t 9p -o trans=virtio,version=9p2000.L,ro cdvm-run /cdvm/run || fail "cannot mount the run share"
port=
for dir in /sys/class/virtio-ports/*; do
    [ "$(cat "$dir/name" 2>/dev/null)" = cdvm.channel ] && port=/dev/${dir##*/}
done
[ -n "$port" ] || fail "no virtio-serial port named cdvm.channel"
set --
cpu=0 pids=0 mem=0
while IFS= read -r line; do
    kind=${line%% *} value=${line#* }
    case $kind in
    share) tag=${value%% *} path=${value#* }
        mkdir -p "$path" && mount -t 9p -o "trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144" "$tag" "$path" \
            || fail "cannot mount share $tag" ;;
    link) ln -s "${value%% *}" "${value#* }" || fail "cannot link ${value#* }" ;;
    tmpfs) mount -t tmpfs -o "size=$value,mode=1777,nosuid,nodev" tmpfs /tmp || fail "cannot mount /tmp" ;;
    cpu) cpu=$value ;;
    pids) pids=$value ;;
    memory) mem=$value ;;
    env|arg) set -- "$@" "$value" ;;
    *) fail "unknown run.conf line kind $kind" ;;
    esac
done </cdvm/run/run.conf
cg=/sys/fs/cgroup
mount -t cgroup2 cgroup2 $cg && echo "+memory +pids" >$cg/cgroup.subtree_control && mkdir $cg/job \
    && echo "$mem" >$cg/job/memory.max && echo "$pids" >$cg/job/pids.max || fail "cannot set up the job cgroup"
echo 0 >$cg/job/memory.swap.max 2>/dev/null
# The runner reads the port directly; its writes go through a pipe and cat, because a
# virtio port takes at most 32 KiB per write(2) and cat completes short writes.
exec 3<>"$port"
(
    echo 0 >$cg/job/cgroup.procs || exit 125
    ulimit -c 0 && ulimit -t "$cpu" || exit 125
    cd /tmp && env -i "$@" <&3 3<&-
    echo $? >/cdvm/rc
) 2>/dev/console | cat >&3
echo 1 >$cg/job/cgroup.kill 2>/dev/null
rc=$(cat /cdvm/rc 2>/dev/null || echo 125)
oom=$(sed -n 's/^oom_kill //p' $cg/job/memory.events)
hits=$(sed -n 's/^max //p' $cg/job/pids.events)
finish "$rc" "$oom" "$hits"
"""


class ImageError(JobError):
    """The microVM image cannot be built or read: missing package, bad input, corrupt image."""


# ---- newc cpio and gzip (sans-I/O) ---------------------------------------------------------

S_IFDIR, S_IFREG, S_IFLNK = 0o040000, 0o100000, 0o120000


@dataclass(frozen=True)
class CpioEntry:
    """One initramfs member: ``path`` relative, without a leading slash; ``data`` is the
    file's bytes or a symlink's target."""

    path: str
    mode: int
    data: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not self.path or self.path.startswith("/") or "\0" in self.path or ".." in self.path.split("/"):
            raise ImageError(f"initramfs path {self.path!r} must be relative, without NUL or '..'")
        if self.mode & 0o170000 not in (S_IFDIR, S_IFREG, S_IFLNK):
            raise ImageError(f"initramfs entry {self.path}: only directories, files and symlinks are supported")


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def write_newc(entries: Iterable[CpioEntry], *, mtime: int = 0) -> bytes:
    """A ``newc`` (070701) archive of ``entries``, sorted by path, every parent directory
    before its children, uid/gid 0, nlink 1 (2 for directories), inodes numbered in order."""
    by_path: dict[str, CpioEntry] = {}
    for entry in entries:
        if entry.path in by_path:
            raise ImageError(f"initramfs path {entry.path} appears twice")
        by_path[entry.path] = entry
    for path in list(by_path):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            by_path.setdefault(parent, CpioEntry(parent, S_IFDIR | 0o755))
            if by_path[parent].mode & 0o170000 != S_IFDIR:
                raise ImageError(f"initramfs path {parent} is both a directory and a file")
    out = bytearray()
    ordered = [by_path[p] for p in sorted(by_path, key=lambda p: p.split("/"))]
    for inode, entry in enumerate([*ordered, CpioEntry("TRAILER!!!", S_IFREG)], start=1):
        name = entry.path.encode() + b"\0"
        is_dir = entry.mode & 0o170000 == S_IFDIR
        fields = (inode, entry.mode, 0, 0, 2 if is_dir else 1, mtime, len(entry.data), 0, 0, 0, 0, len(name), 0)
        header = b"070701" + b"".join(b"%08x" % value for value in fields)
        out += header + name + _pad4(len(header) + len(name)) + entry.data + _pad4(len(entry.data))
    return bytes(out)


def gzip_reproducible(data: bytes) -> bytes:
    """gzip with mtime 0 and no file name (RFC 1952 header fields fixed)."""
    return gzip.compress(data, compresslevel=9, mtime=0)


# ---- kernel modules (sans-I/O) ---------------------------------------------------------------


def module_name(filename: str) -> str:
    """The kernel's name for a module file (``sev-guest.ko`` → ``sev_guest``)."""
    return filename.removesuffix(".ko").replace("-", "_")


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF64 little-endian module's ``.modinfo`` section."""
    try:
        if ko[:4] != b"\x7fELF" or ko[4] != 2 or ko[5] != 1:
            raise ImageError("kernel module is not a 64-bit little-endian ELF file")
        shoff, = struct.unpack_from("<Q", ko, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)
        if shentsize < 40 or shoff + shnum * shentsize > len(ko):
            raise ImageError("kernel module's section headers lie outside the file")
        sections = [struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize) for i in range(shnum)]
        names_offset = sections[shstrndx][4]
        for name_offset, _type, _flags, _addr, offset, size in sections:
            if offset + size > len(ko):
                raise ImageError("kernel module has a section outside the file")
            end = ko.index(b"\0", names_offset + name_offset)
            if ko[names_offset + name_offset:end] == b".modinfo":
                info: dict[str, list[str]] = {}
                for item in ko[offset:offset + size].split(b"\0"):
                    key, sep, value = item.decode("utf-8", "replace").partition("=")
                    if sep:
                        info.setdefault(key, []).append(value)
                return info
    except (struct.error, IndexError, ValueError, OverflowError):
        raise ImageError("kernel module has a truncated or corrupt ELF header") from None
    raise ImageError("kernel module has no .modinfo section")


def module_load_order(wanted: Sequence[str], depends: Callable[[str], Sequence[str] | None]) -> list[str]:
    """``wanted`` and their dependencies, each after everything it depends on; ``depends(name)``
    lists a module's dependencies, or is None for a module the kernel package lacks."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ImageError(f"kernel module dependency cycle through {name}")
        needs = depends(name)
        if needs is None:
            raise ImageError(f"kernel module {name} is not in the kernel package")
        visiting.add(name)
        for dependency in needs:
            visit(module_name(dependency))
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(module_name(name))
    return order


# ---- image digest and manifest ---------------------------------------------------------------


def image_digest(kernel_sha256: str, initrd_sha256: str, cmdline: str) -> str:
    """The image digest a customer pins: SHA-256 over the three component hashes (module docstring)."""
    cmdline_sha256 = hashlib.sha256(cmdline.encode()).hexdigest()
    text = f"{DIGEST_DOMAIN}\nkernel {kernel_sha256}\ninitrd {initrd_sha256}\ncmdline {cmdline_sha256}\n"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Image:
    """A built image directory (``manifest.json`` beside the kernel, initramfs and cmdline)."""

    directory: Path
    digest: str
    kernel_version: str
    cmdline: str
    tee_support: tuple[str, ...]
    inputs: Mapping[str, str]

    @property
    def kernel(self) -> Path:
        return self.directory / KERNEL_FILE

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD_FILE

    @property
    def guest_site(self) -> Path | None:
        site = self.directory / GUEST_SITE
        return site if site.is_dir() else None

    @classmethod
    def load(cls, directory: Path) -> Image:
        """Read an image directory and check its files against the manifest's digest."""
        try:
            manifest = json.loads((directory / MANIFEST_FILE).read_text())
            cmdline = (directory / CMDLINE_FILE).read_text()
            kernel = hashlib.sha256((directory / KERNEL_FILE).read_bytes()).hexdigest()
            initrd = hashlib.sha256((directory / INITRD_FILE).read_bytes()).hexdigest()
            digest = str(manifest["digest"])
            image = cls(directory, digest, str(manifest["kernel_version"]), cmdline,
                        tuple(manifest["tee_support"]), dict(manifest["inputs"]))
        except FileNotFoundError as error:
            raise ImageError(f"no microVM image at {directory} ({Path(error.filename).name} missing): "
                             "run `cdvm image build`") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ImageError(f"the microVM image at {directory} is unreadable: {error}") from None
        if image_digest(kernel, initrd, cmdline) != digest:
            raise ImageError(f"the microVM image at {directory} does not match its manifest digest: rebuild it")
        return image


def default_image_dir() -> Path:
    """Where ``cdvm image build`` writes and the microVM backend reads by default."""
    return cache_dir() / "image"


# ---- Debian packages (adapters) --------------------------------------------------------------


@dataclass(frozen=True)
class AptPackage:
    """One package version as apt's index describes it (``apt-cache show``)."""

    name: str
    version: str
    sha256: str
    architecture: str

    @property
    def deb_name(self) -> str:
        """The file name ``apt-get download`` and apt's archive give it (an epoch's ``:`` as ``%3a``)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


def parse_apt_show(text: str) -> AptPackage:
    """The first stanza of ``apt-cache show --no-all-versions`` output."""
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(": ")
        if sep and not line.startswith(" "):
            fields[key] = value.strip()
    missing = [k for k in ("Package", "Version", "SHA256", "Architecture") if k not in fields]
    if missing:
        raise ImageError(f"apt's index entry lacks {', '.join(missing)}")
    if not re.fullmatch(r"[0-9a-f]{64}", fields["SHA256"]):
        raise ImageError(f"apt's index gives {fields['Package']} a malformed SHA256")
    return AptPackage(fields["Package"], fields["Version"], fields["SHA256"], fields["Architecture"])


def _run(argv: list[str], *, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ImageError(f"could not run {argv[0]}: {error}") from None
    if done.returncode != 0:
        raise ImageError(f"{' '.join(argv[:3])} failed: {done.stderr.strip()[-500:] or done.returncode}")
    return done.stdout


def apt_package(name: str) -> AptPackage:
    """The candidate version of ``name``; a metapackage (``linux-image-amd64``) resolves to
    the ABI package it depends on."""
    package = parse_apt_show(_run(["apt-cache", "show", "--no-all-versions", name]))
    if name == KERNEL_PACKAGE:
        depends = re.findall(r"Depends: (linux-image-\d\S*)", _run(["apt-cache", "depends", name]))
        if not depends:
            raise ImageError(f"apt cannot tell which kernel {name} depends on")
        package = parse_apt_show(_run(["apt-cache", "show", "--no-all-versions", depends[0]]))
    return package


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def locate_deb(package: AptPackage, search: Sequence[Path], download_dir: Path, *, download: bool) -> Path:
    """The ``.deb`` of ``package`` with apt's SHA-256: from ``search``, else ``apt-get download``."""
    for directory in (*search, download_dir):
        candidate = directory / package.deb_name
        if candidate.is_file() and _sha256_file(candidate) == package.sha256:
            return candidate
    if not download:
        raise ImageError(f"{package.deb_name} is not in {', '.join(map(str, search))}; run .ci/install "
                         f"(or `cdvm image build` without --offline) to fetch it")
    download_dir.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", "-q", f"{package.name}={package.version}"], cwd=download_dir)
    path = download_dir / package.deb_name
    if not path.is_file() or _sha256_file(path) != package.sha256:
        raise ImageError(f"apt-get download gave a {package.deb_name} that does not match apt's SHA256")
    return path


# ---- guest llama.cpp -------------------------------------------------------------------------


def guest_llama_wheel(wheel_root: Path, *, version: str | None = None, cmake_args: str = GUEST_LLAMA_CMAKE_ARGS,
                      build: bool = True, python: str | None = None) -> Path:
    """The baseline llama-cpp-python wheel for the guest, built once per version and flags.

    Built with ``pip wheel --no-cache-dir --no-binary llama-cpp-python`` so pip's wheel cache
    cannot hand back the host's native build; about 15 minutes on 2 cores.
    """
    try:
        version = version or importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise ImageError("llama-cpp-python is not installed; the guest build follows its version") from None
    key = hashlib.sha256(f"llama-cpp-python=={version}\n{cmake_args}".encode()).hexdigest()[:16]
    directory = wheel_root / f"llama-cpp-python-{version}-{key}"
    wheels = sorted(directory.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[0]
    if not build:
        raise ImageError(f"no baseline llama-cpp-python {version} wheel in {directory}; run `cdvm image build`")
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_ARGS": cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    log.warning("building llama-cpp-python %s for the guest's baseline CPU (AVX2, no AVX-512): ~15 min", version)
    argv = [python or sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir",
            "--no-binary", "llama-cpp-python", "-w", str(directory), f"llama-cpp-python=={version}"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wheels = sorted(directory.glob("llama_cpp_python-*.whl"))
    if done.returncode != 0 or not wheels:
        raise ImageError(f"building the guest's llama-cpp-python failed: {done.stderr.strip()[-800:]}")
    return wheels[0]


def unpack_wheel(wheel: Path, target: Path) -> None:
    """Install a wheel's files (purelib/platlib layout) into ``target``, replacing it."""
    staging = Path(tempfile.mkdtemp(prefix=".guest-site-", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(staging)
        for lib in staging.glob("*.so*"):
            lib.chmod(0o755)
        shutil.rmtree(target, ignore_errors=True)
        staging.replace(target)
    except (OSError, zipfile.BadZipFile) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise ImageError(f"cannot unpack {wheel.name}: {error}") from None


# ---- the build ---------------------------------------------------------------------------------


def kernel_tee_support(config: str) -> tuple[str, ...]:
    """Which confidential guests a kernel config supports (guest drivers for evidence)."""
    options = set(re.findall(r"^(CONFIG_\w+)=[ym]$", config, re.MULTILINE))
    tees = []
    if {"CONFIG_AMD_MEM_ENCRYPT", "CONFIG_SEV_GUEST"} <= options:
        tees.append("snp")
    if {"CONFIG_INTEL_TDX_GUEST", "CONFIG_TDX_GUEST_DRIVER"} <= options:
        tees.append("tdx")
    return tuple(tees)


def build_initramfs(busybox: bytes, modules: Sequence[tuple[str, bytes]], *, mtime: int) -> bytes:
    """The gzip'd initramfs: busybox, /init, the modules in load order, empty mount points."""
    entries = [
        CpioEntry("init", S_IFREG | 0o755, GUEST_INIT.encode()),
        CpioEntry("cdvm/busybox", S_IFREG | 0o755, busybox),
        CpioEntry("cdvm/modules/order", S_IFREG | 0o644, "".join(
            f"{name} optional\n" if module_name(name) in OPTIONAL_MODULES else f"{name}\n" for name, _ in modules).encode()),
        *(CpioEntry(f"cdvm/modules/{name}", S_IFREG | 0o644, data) for name, data in modules),
        *(CpioEntry(d, S_IFDIR | 0o755) for d in ("proc", "sys", "dev", "root", "tmp", "etc")),
    ]
    return gzip_reproducible(write_newc(entries, mtime=mtime))


def build_image(kernel_deb: Path, busybox_deb: Path, output: Path, *, mtime: int | None = None,
                llama_wheel: Path | None = None) -> Image:
    """Build the image from the two ``.deb`` files into ``output``; return it with its digest."""
    if mtime is None:
        mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cdvm-image-") as tmp:
        root = Path(tmp)
        for deb in (kernel_deb, busybox_deb):
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        kernels = sorted(root.glob("boot/vmlinuz-*"))
        busybox = root / "bin" / "busybox"
        if len(kernels) != 1 or not busybox.is_file():
            raise ImageError(f"{kernel_deb.name} / {busybox_deb.name}: expected one kernel and bin/busybox")
        version = kernels[0].name.removeprefix("vmlinuz-")
        tees = kernel_tee_support((root / "boot" / f"config-{version}").read_text())
        files = {module_name(p.name): p for p in (root / "lib" / "modules" / version).rglob("*.ko")}

        def depends(name: str) -> list[str] | None:
            if name not in files:
                return None
            return [d for d in modinfo(files[name].read_bytes()).get("depends", [""])[0].split(",") if d]

        order = module_load_order(GUEST_MODULES, depends)
        modules = [(files[name].name, files[name].read_bytes()) for name in order]
        initrd = build_initramfs(busybox.read_bytes(), modules, mtime=mtime)
        kernel = kernels[0].read_bytes()
    kernel_sha, initrd_sha = hashlib.sha256(kernel).hexdigest(), hashlib.sha256(initrd).hexdigest()
    digest = image_digest(kernel_sha, initrd_sha, KERNEL_CMDLINE)
    inputs = {deb.name: _sha256_file(deb) for deb in (kernel_deb, busybox_deb)}
    (output / KERNEL_FILE).write_bytes(kernel)
    (output / INITRD_FILE).write_bytes(initrd)
    (output / CMDLINE_FILE).write_text(KERNEL_CMDLINE)
    if llama_wheel is not None:
        unpack_wheel(llama_wheel, output / GUEST_SITE)
        inputs[llama_wheel.name] = _sha256_file(llama_wheel)
    manifest = {
        "digest": digest, "kernel_version": version, "cmdline": KERNEL_CMDLINE, "source_date_epoch": mtime,
        "components": {"kernel": kernel_sha, "initrd": initrd_sha,
                       "cmdline": hashlib.sha256(KERNEL_CMDLINE.encode()).hexdigest()},
        "modules": [name for name, _ in modules], "tee_support": list(tees), "inputs": inputs,
    }
    (output / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Image(output, digest, version, KERNEL_CMDLINE, tees, inputs)
