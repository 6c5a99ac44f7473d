"""QEMU command lines for the microVM sandbox (sans-I/O): plain (TCG or KVM), TDX and SEV-SNP.

Every VM: ``-nodefaults -no-user-config``, no display, no network device (``-nic none``),
no reboot (a guest reset ends QEMU), direct kernel boot of the ``cdvm image build`` image,
a virtio-serial port named ``cdvm.channel`` on QEMU's stdin/stdout (the channel), the
guest's serial console on a file (QEMU's stderr by default), and read-only virtio-9p
shares (``-fsdev local,...,readonly=on``).

Confidential launches follow QEMU's documentation:

* **TDX** (docs/system/i386/tdx.rst, QEMU >= 10.1 with a TDX-enabled KVM): ``-accel kvm
  -cpu host``, ``-object tdx-guest`` (``sept-ve-disable=on``, which Linux TDs need;
  ``mrconfigid`` = the image digest followed by 16 zero bytes, base64 — TDX's MRCONFIGID is
  48 bytes; ``quote-generation-socket`` to the host's QGS over vsock so the guest's
  GetQuote works), ``-machine q35,kernel-irqchip=split,confidential-guest-support=tdx0``
  and TDVF as ``-bios`` (TDX has no read-only memslots, so no pflash).
* **SEV-SNP** (docs/system/i386/amd-memory-encryption.rst and the ``sev-snp-guest`` QOM
  properties, QEMU >= 9.1): ``-accel kvm``, ``-object sev-snp-guest`` with ``cbitpos``,
  ``reduced-phys-bits``, ``kernel-hashes=on`` (OVMF's hash table of kernel, initrd and
  command line is part of the launch measurement) and ``host-data`` = the image digest
  (32 bytes, base64; reported as HOST_DATA), ``-machine q35,confidential-guest-support=sev0,
  memory-backend=ram1`` with ``-object memory-backend-memfd,id=ram1,size=<RAM>,share=true``,
  and an SNP-capable OVMF (the AmdSev build for kernel hashes) as ``-bios``.

Virtio devices of confidential guests get ``iommu_platform=on`` so the guest bounces their
DMA through shared memory.
"""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jobs.sandbox_errors import SandboxStartError

Accel = Literal["tcg", "kvm"]
Tee = Literal["none", "tdx", "snp"]

MIN_QEMU: dict[str, tuple[int, int]] = {"tdx": (10, 1), "snp": (9, 1)}
CHANNEL_PORT = "cdvm.channel"
QGS_VSOCK_PORT = 4050
"""The TDX Quote Generation Service's vsock port on the host (CID 2)."""
_TAG = re.compile(r"[A-Za-z0-9_-]{1,31}")
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Share:
    """A host directory the guest mounts read-only by ``tag`` (9p mount tags: 1-31 of ``[A-Za-z0-9_-]``)."""

    tag: str
    path: Path

    def __post_init__(self) -> None:
        if not _TAG.fullmatch(self.tag):
            raise SandboxStartError(f"9p mount tag {self.tag!r} must be 1-31 characters of A-Z a-z 0-9 _ -")
        if not Path(self.path).is_absolute() or "," in str(self.path):
            raise SandboxStartError(f"share {self.tag}: {self.path} must be an absolute path without ','")


@dataclass(frozen=True)
class VmLaunch:
    """Everything a QEMU command line depends on; ``cpu`` defaults to ``max`` (TCG) or ``host``
    (KVM); an SNP launch may name a fixed model (``EPYC-v4``) so its measurement is portable."""

    kernel: Path
    initrd: Path
    cmdline: str
    memory_mib: int
    vcpus: int = 1
    accel: Accel = "tcg"
    cpu: str | None = None
    tee: Tee = "none"
    shares: tuple[Share, ...] = ()
    console: Path = Path("/dev/fd/2")
    firmware: Path | None = None
    image_digest: str | None = None
    cbitpos: int = 51
    reduced_phys_bits: int = 1
    qgs_cid: int = 2

    def __post_init__(self) -> None:
        if self.memory_mib < 64 or self.vcpus < 1:
            raise SandboxStartError(f"a microVM needs at least 64 MiB and 1 vCPU (got {self.memory_mib} MiB, {self.vcpus})")
        if self.accel not in ("tcg", "kvm"):
            raise SandboxStartError(f"accelerator {self.accel!r} is not tcg or kvm")
        if self.tee not in ("none", "tdx", "snp"):
            raise SandboxStartError(f"TEE {self.tee!r} is not none, tdx or snp")
        for path in (self.kernel, self.initrd, self.console, *([self.firmware] if self.firmware else [])):
            if "," in str(path):
                raise SandboxStartError(f"{path}: QEMU option values here must not contain ','")
        if self.tee != "none":
            if self.accel != "kvm":
                raise SandboxStartError(f"a {self.tee.upper()} guest needs KVM, not {self.accel}")
            if self.firmware is None:
                raise SandboxStartError(f"a {self.tee.upper()} guest needs its firmware (OVMF/TDVF) as -bios")
            if self.image_digest is None or not _DIGEST.fullmatch(self.image_digest):
                raise SandboxStartError("a confidential launch needs the image digest (64 hex characters) to measure")
        if len({s.tag for s in self.shares}) != len(self.shares):
            raise SandboxStartError("9p mount tags must be unique")


def tdx_mrconfigid(image_digest: str) -> str:
    """MRCONFIGID (48 bytes, base64) carrying the 32-byte image digest, zero-padded."""
    return base64.b64encode(bytes.fromhex(image_digest) + bytes(16)).decode()


def snp_host_data(image_digest: str) -> str:
    """HOST_DATA (32 bytes, base64): the image digest."""
    return base64.b64encode(bytes.fromhex(image_digest)).decode()


def qemu_argv(qemu: str, launch: VmLaunch) -> list[str]:
    """The full QEMU command line of one microVM."""
    confidential = launch.tee != "none"
    virtio_opts = ",iommu_platform=on,disable-legacy=on" if confidential else ""
    argv = [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-nic", "none",
            "-accel", launch.accel, "-cpu", launch.cpu or ("max" if launch.accel == "tcg" else "host"),
            "-smp", str(launch.vcpus), "-m", f"{launch.memory_mib}M"]
    if launch.tee == "tdx":
        assert launch.image_digest is not None
        tdx = {"qom-type": "tdx-guest", "id": "tdx0", "sept-ve-disable": True,
               "mrconfigid": tdx_mrconfigid(launch.image_digest),
               "quote-generation-socket": {"type": "vsock", "cid": str(launch.qgs_cid), "port": str(QGS_VSOCK_PORT)}}
        argv += ["-object", json.dumps(tdx, separators=(",", ":")),
                 "-machine", "q35,kernel-irqchip=split,confidential-guest-support=tdx0",
                 "-bios", str(launch.firmware)]
    elif launch.tee == "snp":
        assert launch.image_digest is not None
        argv += ["-object", f"memory-backend-memfd,id=ram1,size={launch.memory_mib}M,share=true,prealloc=false",
                 "-object", (f"sev-snp-guest,id=sev0,cbitpos={launch.cbitpos},reduced-phys-bits="
                             f"{launch.reduced_phys_bits},kernel-hashes=on,host-data={snp_host_data(launch.image_digest)}"),
                 "-machine", "q35,confidential-guest-support=sev0,memory-backend=ram1",
                 "-bios", str(launch.firmware)]
    else:
        argv += ["-machine", "q35"]
    argv += ["-kernel", str(launch.kernel), "-initrd", str(launch.initrd), "-append", launch.cmdline,
             "-chardev", f"file,id=console,path={launch.console}", "-serial", "chardev:console",
             "-chardev", "stdio,id=channel,signal=off",
             "-device", f"virtio-serial-pci,id=vser0{virtio_opts}",
             "-device", f"virtserialport,bus=vser0.0,chardev=channel,name={CHANNEL_PORT}"]
    for index, share in enumerate(launch.shares):
        argv += ["-fsdev", f"local,id=fs{index},path={share.path},security_model=none,readonly=on",
                 "-device", f"virtio-9p-pci,fsdev=fs{index},mount_tag={share.tag}{virtio_opts}"]
    return argv


def parse_qemu_version(text: str) -> tuple[int, int, int]:
    """``QEMU emulator version 7.2.22 (Debian ...)`` → ``(7, 2, 22)``."""
    match = re.search(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise SandboxStartError("cannot read QEMU's version from `qemu-system-x86_64 --version`")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def check_qemu_version(version: tuple[int, int, int], tee: Tee) -> None:
    """A TDX launch needs QEMU >= 10.1, an SEV-SNP launch QEMU >= 9.1."""
    needed = MIN_QEMU.get(tee)
    if needed is not None and version[:2] < needed:
        raise SandboxStartError(f"a {tee.upper()} guest needs QEMU >= {needed[0]}.{needed[1]}; this one is "
                                f"{'.'.join(map(str, version))}")
