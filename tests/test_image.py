"""``cdvm image build``: the newc writer (checked with busybox's cpio), module ordering from real
``.modinfo`` sections, apt index parsing, and a reproducible build from the real Debian packages
(same packages in, same bytes and digest out)."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvm.cli import main as cdvm_main
from jobs.image import (
    APT_ARCHIVES,
    BUSYBOX_PACKAGE,
    KERNEL_CMDLINE,
    KERNEL_PACKAGE,
    S_IFDIR,
    S_IFLNK,
    S_IFREG,
    AptPackage,
    CpioEntry,
    Image,
    ImageError,
    apt_package,
    build_image,
    build_initramfs,
    gzip_reproducible,
    image_digest,
    kernel_tee_support,
    locate_deb,
    modinfo,
    module_load_order,
    parse_apt_show,
    write_newc,
)

BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def user_image_cache() -> Path:
    """The image cache of the user who ran .ci/install (tests point CDVM_CACHE_DIR elsewhere)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cdvm" / "image"


def input_debs() -> tuple[Path, Path]:
    """The kernel and busybox packages, offline: apt's archive or the user's image cache (.ci/install fills them)."""
    search = [APT_ARCHIVES, user_image_cache() / "debs"]
    return tuple(locate_deb(apt_package(name), search, search[-1], download=False)  # type: ignore[return-value]
                 for name in (KERNEL_PACKAGE, BUSYBOX_PACKAGE))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Image, Path]:
    """One image built by the library and one by ``cdvm image build --offline``, from the same packages."""
    kernel_deb, busybox_deb = input_debs()
    base = tmp_path_factory.mktemp("images")
    first = build_image(kernel_deb, busybox_deb, base / "a")
    return first, base / "b"


def extract_cpio(archive: bytes, target: Path) -> None:
    target.mkdir()
    subprocess.run([BUSYBOX, "cpio", "-i", "-d", "-m"], input=archive, cwd=target, check=True, capture_output=True)


# ---- newc ------------------------------------------------------------------------------------


def test_newc_round_trips_through_busybox_cpio(tmp_path: Path) -> None:
    entries = [
        CpioEntry("init", S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
        CpioEntry("a/b/c.txt", S_IFREG | 0o640, b"x" * 1001),
        CpioEntry("a/link", S_IFLNK | 0o777, b"b/c.txt"),
        CpioEntry("empty", S_IFDIR | 0o700),
    ]
    extract_cpio(write_newc(entries, mtime=1_700_000_000), tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((out / "init").stat().st_mode) == 0o755
    assert (out / "a/b/c.txt").read_bytes() == b"x" * 1001 and stat.S_IMODE((out / "a/b/c.txt").stat().st_mode) == 0o640
    assert os.readlink(out / "a/link") == "b/c.txt"
    assert (out / "empty").is_dir() and (out / "a/b").is_dir(), "missing parents are added"
    assert int((out / "init").stat().st_mtime) == 1_700_000_000


def test_newc_is_sorted_with_fixed_owner_and_time() -> None:
    entries = [CpioEntry("z", S_IFREG | 0o644, b"1"), CpioEntry("a/x", S_IFREG | 0o644, b"22"),
               CpioEntry("a-b", S_IFREG | 0o644)]
    archive = write_newc(entries, mtime=42)
    assert archive == write_newc(list(reversed(entries)), mtime=42), "input order does not matter"
    names, offset = [], 0
    while True:
        header = archive[offset:offset + 110]
        assert header[:6] == b"070701"
        values = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        name_size, file_size = values[11], values[6]
        name = archive[offset + 110:offset + 110 + name_size - 1].decode()
        if name == "TRAILER!!!":
            break
        names.append(name)
        assert values[2] == values[3] == 0 and values[5] == 42, "uid, gid 0 and the fixed mtime"
        offset += 110 + name_size
        offset += -offset % 4
        offset += file_size + (-file_size % 4)
    assert names == ["a", "a/x", "a-b", "z"], "parents first, then by path component"
    assert len(archive) % 4 == 0


@pytest.mark.parametrize("entries, message", [
    ([CpioEntry("x", S_IFREG), CpioEntry("x", S_IFREG)], "twice"),
    ([CpioEntry("x", S_IFREG), CpioEntry("x/y", S_IFREG)], "both a directory and a file"),
])
def test_newc_rejects_conflicts(entries: list[CpioEntry], message: str) -> None:
    with pytest.raises(ImageError, match=message):
        write_newc(entries)


@pytest.mark.parametrize("path, mode", [("/abs", S_IFREG), ("a/../b", S_IFREG), ("", S_IFREG), ("a\0b", S_IFREG),
                                        ("dev/null", 0o020666)])
def test_bad_entries_are_refused(path: str, mode: int) -> None:
    with pytest.raises(ImageError):
        CpioEntry(path, mode)


def test_gzip_has_no_timestamp_or_name() -> None:
    packed = gzip_reproducible(b"data" * 100)
    assert packed[3] == 0, "no FNAME/FEXTRA/FCOMMENT flags"
    assert packed[4:8] == b"\0\0\0\0", "MTIME 0 (RFC 1952 2.3.1)"
    assert gzip.decompress(packed) == b"data" * 100
    assert packed == gzip_reproducible(b"data" * 100)


# ---- modules, apt, kernel config ---------------------------------------------------------------


def test_module_order_puts_dependencies_first() -> None:
    graph = {"9p": ["9pnet", "netfs"], "9pnet": [], "netfs": ["fscache"], "fscache": [], "sev_guest": []}
    order = module_load_order(["9p", "sev-guest"], graph.get)
    assert order == ["9pnet", "fscache", "netfs", "9p", "sev_guest"]
    with pytest.raises(ImageError, match="not in the kernel package"):
        module_load_order(["nope"], graph.get)
    with pytest.raises(ImageError, match="cycle"):
        module_load_order(["a"], {"a": ["b"], "b": ["a"]}.get)


@pytest.mark.parametrize("data", [b"", b"\x7fELF", b"\x7fELF\x02\x01" + b"\xff" * 60, b"MZ" + bytes(100),
                                  b"\x7fELF\x02\x01" + bytes(200)])
def test_modinfo_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ImageError):
        modinfo(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_modinfo_fails_only_with_image_error(tail: bytes) -> None:
    try:
        modinfo(b"\x7fELF\x02\x01" + tail)
    except ImageError:
        pass


APT_SHOW = """Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
Architecture: amd64
Description: Standalone rescue shell
 with tons of builtin utilities
Filename: pool/main/b/busybox/busybox-static_1.35.0-4+deb12u1+b1_amd64.deb
SHA256: 3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744

Package: busybox-static
Version: 1:1.30.1-6
"""


def test_parse_apt_show() -> None:
    package = parse_apt_show(APT_SHOW)
    assert package == AptPackage("busybox-static", "1:1.35.0-4+deb12u1+b1",
                                 "3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744", "amd64")
    assert package.deb_name == "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
    with pytest.raises(ImageError, match="SHA256"):
        parse_apt_show("Package: x\nVersion: 1\nArchitecture: amd64\n")
    with pytest.raises(ImageError, match="malformed"):
        parse_apt_show("Package: x\nVersion: 1\nArchitecture: amd64\nSHA256: zz\n")


def test_locate_deb_checks_apt_hash_and_never_downloads_offline(tmp_path: Path) -> None:
    package = AptPackage("demo", "1.0", hashlib.sha256(b"real").hexdigest(), "all")
    (tmp_path / package.deb_name).write_bytes(b"tampered")
    with pytest.raises(ImageError, match=r"\.ci/install"):
        locate_deb(package, [tmp_path], tmp_path / "dl", download=False)
    (tmp_path / package.deb_name).write_bytes(b"real")
    assert locate_deb(package, [tmp_path], tmp_path / "dl", download=False) == tmp_path / package.deb_name


def test_kernel_tee_support() -> None:
    assert kernel_tee_support("CONFIG_AMD_MEM_ENCRYPT=y\nCONFIG_SEV_GUEST=m\n# CONFIG_INTEL_TDX_GUEST is not set\n") == ("snp",)
    assert kernel_tee_support("CONFIG_INTEL_TDX_GUEST=y\nCONFIG_TDX_GUEST_DRIVER=m\n") == ("tdx",)
    assert kernel_tee_support("CONFIG_SEV_GUEST=m\n") == ()


# ---- the real build ------------------------------------------------------------------------------


def test_build_is_reproducible_and_prints_the_digest(images: tuple[Image, Path], capsys: pytest.CaptureFixture[str]) -> None:
    first, second_dir = images
    kernel_deb, busybox_deb = input_debs()
    assert cdvm_main(["image", "build", "--offline", "--no-llama", "--output", str(second_dir),
                      "--kernel-deb", str(kernel_deb), "--busybox-deb", str(busybox_deb)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == first.digest
    for name in ("vmlinuz", "initramfs.img", "cmdline", "manifest.json"):
        assert (first.directory / name).read_bytes() == (second_dir / name).read_bytes(), name
    assert Image.load(second_dir).digest == first.digest


def test_digest_is_recomputable_from_the_measured_components(images: tuple[Image, Path]) -> None:
    image = images[0]
    manifest = json.loads((image.directory / "manifest.json").read_text())
    kernel = hashlib.sha256(image.kernel.read_bytes()).hexdigest()
    initrd = hashlib.sha256(image.initrd.read_bytes()).hexdigest()
    assert manifest["components"] == {"kernel": kernel, "initrd": initrd,
                                      "cmdline": hashlib.sha256(KERNEL_CMDLINE.encode()).hexdigest()}
    assert image.digest == manifest["digest"] == image_digest(kernel, initrd, KERNEL_CMDLINE)
    assert image.cmdline == KERNEL_CMDLINE and "snp" in image.tee_support
    assert set(image.inputs) == {p.name for p in input_debs()}


def test_initramfs_holds_init_busybox_and_ordered_modules(images: tuple[Image, Path], tmp_path: Path) -> None:
    extract_cpio(gzip.decompress(images[0].initrd.read_bytes()), tmp_path / "root")
    root = tmp_path / "root"
    assert (root / "init").read_text().startswith("#!/cdvm/busybox sh")
    assert os.access(root / "cdvm/busybox", os.X_OK)
    order = [line.split()[0] for line in (root / "cdvm/modules/order").read_text().splitlines()]
    assert "sev-guest.ko optional" in (root / "cdvm/modules/order").read_text()
    for name in order:
        depends = modinfo((root / "cdvm/modules" / name).read_bytes()).get("depends", [""])[0]
        for dependency in filter(None, depends.split(",")):
            loaded = [n.removesuffix(".ko").replace("-", "_") for n in order[:order.index(name)]]
            assert dependency.replace("-", "_") in loaded, f"{name} needs {dependency} first"
    assert {"virtio_pci.ko", "virtio_console.ko", "9p.ko", "9pnet_virtio.ko"} <= set(order)


def test_epoch_changes_the_initramfs_bytes(images: tuple[Image, Path], tmp_path: Path) -> None:
    extract_cpio(gzip.decompress(images[0].initrd.read_bytes()), tmp_path / "root")
    busybox = (tmp_path / "root/cdvm/busybox").read_bytes()
    assert build_initramfs(busybox, [], mtime=0) == build_initramfs(busybox, [], mtime=0)
    assert build_initramfs(busybox, [], mtime=0) != build_initramfs(busybox, [], mtime=1)


def test_tampered_or_missing_image_is_refused(images: tuple[Image, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(images[0].directory, copy)
    data = bytearray((copy / "initramfs.img").read_bytes())
    data[-1] ^= 1
    (copy / "initramfs.img").write_bytes(bytes(data))
    with pytest.raises(ImageError, match="does not match"):
        Image.load(copy)
    with pytest.raises(ImageError, match="cdvm image build"):
        Image.load(tmp_path / "nothing")
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ImageError, match="unreadable"):
        Image.load(copy)
