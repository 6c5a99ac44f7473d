"""QEMU command lines of the microVM: the options QEMU's documentation requires for TDX
(docs/system/i386/tdx.rst) and SEV-SNP (docs/system/i386/amd-memory-encryption.rst, the
``sev-snp-guest`` QOM properties), checked option by option since neither can run here;
the plain TCG line is checked by the installed QEMU itself."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from jobs.qemu import (
    CHANNEL_PORT,
    Share,
    VmLaunch,
    check_qemu_version,
    parse_qemu_version,
    qemu_argv,
    snp_host_data,
    tdx_mrconfigid,
)
from jobs.sandbox_errors import SandboxStartError

DIGEST = "012672f65f140e1ac6139fbd15f049745448eb5f026610e368a091b458e4b6b2"
KERNEL, INITRD, OVMF = Path("/img/vmlinuz"), Path("/img/initramfs.img"), Path("/usr/share/ovmf/OVMF.fd")


def launch(**overrides: object) -> VmLaunch:
    fields: dict[str, object] = dict(kernel=KERNEL, initrd=INITRD, cmdline="console=ttyS0 quiet", memory_mib=2048,
                                     vcpus=2, shares=(Share("cdvm-run", Path("/state/run")), Share("cdvm-0", Path("/usr"))))
    fields.update(overrides)
    return VmLaunch(**fields)  # type: ignore[arg-type]


def options(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, item in enumerate(argv) if item == flag]


def keyval(text: str) -> tuple[str, dict[str, str]]:
    """QEMU's ``driver,key=value,...`` option syntax."""
    head, *rest = text.split(",")
    pairs = dict(item.split("=", 1) for item in rest)
    if "=" in head:
        key, value = head.split("=", 1)
        return "", {key: value, **pairs}
    return head, pairs


def objects(argv: list[str]) -> dict[str, dict[str, object]]:
    """``-object`` options by qom-type, whether written as JSON or as keyval."""
    found: dict[str, dict[str, object]] = {}
    for text in options(argv, "-object"):
        if text.startswith("{"):
            obj = json.loads(text)
            found[obj.pop("qom-type")] = obj
        else:
            kind, props = keyval(text)
            found[kind] = dict(props)
    return found


def machine(argv: list[str]) -> tuple[str, dict[str, str]]:
    (text,) = options(argv, "-machine")
    return keyval(text)


def assert_isolated(argv: list[str]) -> None:
    """Every microVM: no defaults, no network, no display, no monitor, no reboot, the channel on stdio."""
    assert {"-nodefaults", "-no-user-config", "-no-reboot"} <= set(argv)
    assert options(argv, "-nic") == ["none"]
    assert options(argv, "-display") == ["none"]
    assert not {"-netdev", "-net", "-monitor", "-qmp", "-vnc", "-spice", "-nographic"} & set(argv)
    devices = [keyval(d) for d in options(argv, "-device")]
    assert not [d for d, _ in devices if "net" in d or "vsock" in d], "no network or vsock device"
    chardevs = {props.get("id"): kind for kind, props in map(keyval, options(argv, "-chardev"))}
    assert chardevs["channel"] == "stdio"
    port = next(props for kind, props in devices if kind == "virtserialport")
    assert port["chardev"] == "channel" and port["name"] == CHANNEL_PORT
    assert options(argv, "-serial") == ["chardev:console"]
    for fsdev in options(argv, "-fsdev"):
        assert keyval(fsdev)[1]["readonly"] == "on", "every share is read-only"


def test_plain_tcg_line() -> None:
    argv = qemu_argv("qemu-system-x86_64", launch())
    assert_isolated(argv)
    assert options(argv, "-accel") == ["tcg"] and options(argv, "-cpu") == ["max"]
    assert machine(argv) == ("q35", {})
    assert options(argv, "-kernel") == [str(KERNEL)] and options(argv, "-initrd") == [str(INITRD)]
    assert options(argv, "-m") == ["2048M"] and options(argv, "-smp") == ["2"]
    tags = [keyval(d)[1]["mount_tag"] for d in options(argv, "-device") if d.startswith("virtio-9p-pci")]
    assert tags == ["cdvm-run", "cdvm-0"]
    assert not objects(argv) and "-bios" not in argv


def test_tdx_line_has_what_tdx_rst_requires() -> None:
    argv = qemu_argv("qemu-system-x86_64", launch(accel="kvm", tee="tdx", firmware=OVMF, image_digest=DIGEST))
    assert_isolated(argv)
    # tdx.rst "Launching a TD": -accel kvm, -cpu host, -object tdx-guest, confidential-guest-support, -bios OVMF.fd
    assert options(argv, "-accel") == ["kvm"] and options(argv, "-cpu") == ["host"]
    tdx = objects(argv)["tdx-guest"]
    kind, props = machine(argv)
    assert kind == "q35" and props["confidential-guest-support"] == tdx["id"]
    assert props["kernel-irqchip"] == "split", "tdx.rst: kernel-irqchip must be split"
    assert options(argv, "-bios") == [str(OVMF)]
    assert not any("pflash" in d for d in options(argv, "-drive")), "TDX has no read-only memslots: TDVF via -bios"
    assert tdx["sept-ve-disable"] is True, "Linux TDs refuse to boot without sept-ve-disable"
    mrconfigid = base64.b64decode(str(tdx["mrconfigid"]), validate=True)
    assert len(mrconfigid) == 48 and mrconfigid == bytes.fromhex(DIGEST) + bytes(16)
    assert tdx["quote-generation-socket"] == {"type": "vsock", "cid": "2", "port": "4050"}
    assert set(tdx) <= {"id", "attributes", "sept-ve-disable", "mrconfigid", "mrowner", "mrownerconfig",
                        "quote-generation-socket"}, "only TdxGuestProperties members"
    for device in options(argv, "-device"):
        if device.startswith("virtio"):
            assert keyval(device)[1]["iommu_platform"] == "on"


def test_snp_line_has_what_amd_memory_encryption_rst_requires() -> None:
    argv = qemu_argv("qemu-system-x86_64", launch(accel="kvm", tee="snp", firmware=OVMF, image_digest=DIGEST))
    assert_isolated(argv)
    found = objects(argv)
    snp, ram = found["sev-snp-guest"], found["memory-backend-memfd"]
    kind, props = machine(argv)
    assert kind == "q35" and props["confidential-guest-support"] == snp["id"] == "sev0"
    assert props["memory-backend"] == ram["id"] == "ram1"
    assert ram["share"] == "true" and ram["size"] == options(argv, "-m")[0], "the memfd backend holds all guest RAM"
    assert snp["cbitpos"] == "51" and snp["reduced-phys-bits"] == "1"
    assert snp["kernel-hashes"] == "on", "kernel, initrd and cmdline hashes go into the launch measurement"
    assert base64.b64decode(str(snp["host-data"]), validate=True) == bytes.fromhex(DIGEST)
    assert set(snp) <= {"id", "cbitpos", "reduced-phys-bits", "kernel-hashes", "sev-device", "policy", "init-flags",
                        "id-block", "id-auth", "author-key-enabled", "host-data", "guest-visible-workarounds",
                        "vcek-disabled"}, "only SevCommonProperties / SevSnpGuestProperties members"
    assert options(argv, "-accel") == ["kvm"] and options(argv, "-bios") == [str(OVMF)]
    assert options(argv, "-kernel") and options(argv, "-initrd") and options(argv, "-append"), "kernel-hashes needs direct boot"


def test_snp_cpu_model_can_be_pinned() -> None:
    argv = qemu_argv("q", launch(accel="kvm", tee="snp", firmware=OVMF, image_digest=DIGEST, cpu="EPYC-v4"))
    assert options(argv, "-cpu") == ["EPYC-v4"]


def test_measured_values_encode_the_digest() -> None:
    assert base64.b64decode(tdx_mrconfigid(DIGEST)) == bytes.fromhex(DIGEST) + bytes(16)
    assert base64.b64decode(snp_host_data(DIGEST)) == bytes.fromhex(DIGEST)


@pytest.mark.parametrize("overrides, message", [
    (dict(tee="tdx", accel="tcg", firmware=OVMF, image_digest=DIGEST), "needs KVM"),
    (dict(tee="snp", accel="kvm", image_digest=DIGEST), "firmware"),
    (dict(tee="tdx", accel="kvm", firmware=OVMF), "image digest"),
    (dict(tee="snp", accel="kvm", firmware=OVMF, image_digest="AB" * 32), "image digest"),
    (dict(memory_mib=16), "64 MiB"),
    (dict(accel="hvf"), "tcg or kvm"),
    (dict(tee="sgx"), "none, tdx or snp"),
    (dict(kernel=Path("/a,b")), "','"),
    (dict(shares=(Share("t", Path("/a")), Share("t", Path("/b")))), "unique"),
])
def test_invalid_launches_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(SandboxStartError, match=message):
        launch(**overrides)


@pytest.mark.parametrize("tag, path", [("", "/a"), ("x" * 32, "/a"), ("a b", "/a"), ("t", "relative"), ("t", "/a,b")])
def test_invalid_shares_are_refused(tag: str, path: str) -> None:
    with pytest.raises(SandboxStartError):
        Share(tag, Path(path))


@pytest.mark.parametrize("version, tee, ok", [
    ((7, 2, 22), "none", True), ((7, 2, 22), "snp", False), ((9, 0, 0), "snp", False), ((9, 1, 0), "snp", True),
    ((10, 0, 2), "tdx", False), ((10, 1, 0), "tdx", True), ((11, 0, 0), "tdx", True),
])
def test_qemu_version_gate(version: tuple[int, int, int], tee: str, ok: bool) -> None:
    if ok:
        check_qemu_version(version, tee)  # type: ignore[arg-type]
    else:
        with pytest.raises(SandboxStartError, match=f"QEMU >= {'10.1' if tee == 'tdx' else '9.1'}"):
            check_qemu_version(version, tee)  # type: ignore[arg-type]


def test_parse_qemu_version() -> None:
    assert parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n") == (7, 2, 22)
    assert parse_qemu_version("QEMU emulator version 10.1.0\n") == (10, 1, 0)
    with pytest.raises(SandboxStartError):
        parse_qemu_version("bash: qemu: command not found")


def minimal_bzimage() -> bytes:
    """A bzImage header QEMU's loader accepts (Documentation/arch/x86/boot.rst): 4 setup
    sectors, "HdrS", boot protocol 2.15, LOADED_HIGH, initrd_addr_max; never executed (-S)."""
    image = bytearray(16 * 1024)
    image[0x1F1] = 4
    image[0x202:0x206] = b"HdrS"
    image[0x206:0x208] = (0x020F).to_bytes(2, "little")
    image[0x211] = 0x01
    image[0x22C:0x230] = (0x7FFFFFFF).to_bytes(4, "little")
    return bytes(image)


def test_installed_qemu_accepts_the_plain_line(tmp_path: Path) -> None:
    """The real QEMU parses the line and starts the (paused) machine with every device."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86 is installed by .ci/install"
    (tmp_path / "vmlinuz").write_bytes(minimal_bzimage())
    (tmp_path / "initramfs.img").write_bytes(b"\0" * 512)
    (tmp_path / "share").mkdir()
    argv = qemu_argv(qemu, launch(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initramfs.img", memory_mib=128,
                                  console=tmp_path / "console.log", shares=(Share("cdvm-0", tmp_path / "share"),)))
    proc = subprocess.Popen([*argv, "-S"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(3)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait(10)
