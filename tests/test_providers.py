"""Evidence providers against a fake configfs-tsm, recorded-bytes ioctl doubles and a fake
QGS, all replaying real quotes and reports from the shared vectors."""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from attest.errors import ProviderError
from attest.evidence import detect_tee
from attest.providers import (
    QGS_GET_QUOTE_RESP,
    SNP_GET_EXT_REPORT,
    SNP_GET_REPORT,
    TDX_CMD_GET_REPORT0,
    QgsProvider,
    SevGuestProvider,
    SimProvider,
    SnpExtReportReq,
    SnpGuestRequestIoctl,
    SnpReportReq,
    TdxGuestProvider,
    TsmProvider,
    get_evidence_auto,
)
from attest.snp_certs import ARK_GUID, ASK_GUID, VCEK_GUID, CertTableEntry, encode_cert_table, parse_cert_table
from attest.tdx import parse_quote
from attest.verify import load_certificates


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDVM_STATE_DIR", str(tmp_path / "state"))


def _quote(vectors: Path) -> bytes:
    return (vectors / "tee/tdx/dcap-qvl/tdx_quote").read_bytes()


def _report(vectors: Path) -> bytes:
    return (vectors / "tee/snp/virtee-sev/report_milan.bin").read_bytes()


def _cert_table(vectors: Path) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    vcek = (vectors / "tee/snp/virtee-sev/vcek_milan.der").read_bytes()
    ask, ark = (c.public_bytes(Encoding.DER) for c in load_certificates(
        (vectors / "tee/snp/virtee-sev/cert_chain_milan").read_bytes(), "chain"))
    return encode_cert_table([CertTableEntry(VCEK_GUID, vcek), CertTableEntry(ASK_GUID, ask), CertTableEntry(ARK_GUID, ark)])


# --- configfs-tsm ---------------------------------------------------------------------


class FakeTsmKernel:
    """Plays the kernel's configfs-tsm: mkdir creates the attributes; reading ``outblob``
    (a FIFO) gets the evidence once ``inblob`` was written, and bumps ``generation``."""

    def __init__(self, provider: str, outblob: bytes, auxblob: bytes = b"", extra_writes: int = 0) -> None:
        self.provider, self.outblob, self.auxblob = provider, outblob, auxblob
        self.extra_writes = extra_writes  # another process writing in the same entry
        self.inblobs: list[bytes] = []
        self.created: list[Path] = []
        self.threads: list[threading.Thread] = []

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)
        self.created.append(path)
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("7\n")
        (path / "inblob").write_bytes(b"")
        if self.auxblob:
            (path / "auxblob").write_bytes(self.auxblob)
        os.mkfifo(path / "outblob")
        thread = threading.Thread(target=self._serve, args=(path,), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _serve(self, path: Path) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                fd = os.open(path / "outblob", os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as error:
                if error.errno != errno.ENXIO or time.monotonic() > deadline:
                    return
                time.sleep(0.001)
        self.inblobs.append((path / "inblob").read_bytes())
        generation = int((path / "generation").read_text()) + 1 + self.extra_writes
        (path / "generation").write_text(f"{generation}\n")
        os.set_blocking(fd, True)
        os.write(fd, self.outblob)
        os.close(fd)

    def rmdir(self, path: Path) -> None:
        for child in path.iterdir():
            child.unlink()
        os.rmdir(path)


def test_tsm_tdx_quote(vectors: Path, tmp_path: Path) -> None:
    quote = _quote(vectors)
    report_data = parse_quote(quote).report_data
    kernel = FakeTsmKernel("tdx_guest", quote)
    provider = TsmProvider(tmp_path, make_dir=kernel.mkdir, remove_dir=kernel.rmdir)
    evidence = provider.get_evidence(report_data)
    assert (evidence.tee, evidence.raw, evidence.certs, evidence.provider) == ("tdx", quote, None, "tsm")
    assert kernel.inblobs == [report_data]
    assert list(tmp_path.iterdir()) == []  # the report entry was removed


def test_tsm_snp_report_with_cert_table(vectors: Path, tmp_path: Path) -> None:
    report, table = _report(vectors), _cert_table(vectors)
    kernel = FakeTsmKernel("sev_guest", report, table)
    evidence = TsmProvider(tmp_path, make_dir=kernel.mkdir, remove_dir=kernel.rmdir).get_evidence(report[0x50:0x90])
    assert (evidence.tee, evidence.raw, evidence.certs) == ("snp", report, table)
    assert parse_cert_table(evidence.certs).vcek == (vectors / "tee/snp/virtee-sev/vcek_milan.der").read_bytes()


def test_tsm_retries_then_gives_up_on_a_concurrent_writer(vectors: Path, tmp_path: Path) -> None:
    quote = _quote(vectors)
    kernel = FakeTsmKernel("tdx_guest", quote, extra_writes=1)
    provider = TsmProvider(tmp_path, attempts=3, make_dir=kernel.mkdir, remove_dir=kernel.rmdir)
    with pytest.raises(ProviderError, match="another process kept writing"):
        provider.get_evidence(parse_quote(quote).report_data)
    assert len(kernel.created) == 3 and list(tmp_path.iterdir()) == []


def test_tsm_rejects_evidence_for_other_report_data(vectors: Path, tmp_path: Path) -> None:
    kernel = FakeTsmKernel("tdx_guest", _quote(vectors))
    with pytest.raises(ProviderError, match="not the requested"):
        TsmProvider(tmp_path, make_dir=kernel.mkdir, remove_dir=kernel.rmdir).get_evidence(bytes(64))


def test_tsm_rejects_an_unknown_provider_and_a_missing_dir(vectors: Path, tmp_path: Path) -> None:
    kernel = FakeTsmKernel("arm_cca_guest", _quote(vectors))
    with pytest.raises(ProviderError, match="unsupported TSM provider 'arm_cca_guest'"):
        TsmProvider(tmp_path, make_dir=kernel.mkdir, remove_dir=kernel.rmdir).get_evidence(
            parse_quote(_quote(vectors)).report_data)
    missing = TsmProvider(tmp_path / "absent")
    assert "does not exist" in missing.unavailable()
    with pytest.raises(ProviderError, match="cannot create"):
        missing.get_evidence(bytes(64))


# --- /dev/sev-guest -----------------------------------------------------------------------


class SevGuestDouble:
    """Replays a recorded report through the real ioctl structures: reads the request the way
    the kernel does (through the pointers), writes MSG_REPORT_RSP and the certificate table."""

    def __init__(self, report: bytes, table: bytes, min_certs_len: int = 0) -> None:
        self.report, self.table, self.min_certs_len = report, table, min_certs_len
        self.calls: list[tuple[int, int, bytes, int]] = []

    def __call__(self, fd: int, request: int, arg: object) -> int:
        assert isinstance(arg, SnpGuestRequestIoctl) and ctypes.sizeof(arg) == 32
        assert arg.msg_version == 1 and arg.req_data and arg.resp_data
        if request == SNP_GET_EXT_REPORT:
            req = SnpExtReportReq.from_buffer_copy(ctypes.string_at(arg.req_data, ctypes.sizeof(SnpExtReportReq)))
            assert ctypes.sizeof(SnpExtReportReq) == 112
            self.calls.append((request, req.data.vmpl, bytes(req.data.user_data), req.certs_len))
            assert req.certs_len % 4096 == 0 and req.certs_address
            if req.certs_len < self.min_certs_len:
                req.certs_len = self.min_certs_len
                ctypes.memmove(arg.req_data, ctypes.addressof(req), ctypes.sizeof(req))
                arg.exitinfo2 = 1 << 32
                raise OSError(errno.EIO, "Input/output error")
            ctypes.memmove(req.certs_address, self.table, len(self.table))
        else:
            assert request == SNP_GET_REPORT
            req = SnpReportReq.from_buffer_copy(ctypes.string_at(arg.req_data, ctypes.sizeof(SnpReportReq)))
            self.calls.append((request, req.vmpl, bytes(req.user_data), 0))
        response = struct.pack("<II", 0, len(self.report)) + bytes(24) + self.report
        ctypes.memmove(arg.resp_data, response, len(response))
        return 0


def test_sev_guest_extended_report_grows_the_cert_buffer(vectors: Path, tmp_path: Path) -> None:
    report, table = _report(vectors), _cert_table(vectors)
    double = SevGuestDouble(report, table, min_certs_len=3 * 4096)
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    evidence = SevGuestProvider(device=device, ioctl=double).get_evidence(report[0x50:0x90])
    assert (evidence.tee, evidence.raw, evidence.provider) == ("snp", report, "sev-guest")
    assert evidence.certs == table
    assert [(c[0], c[1], c[3]) for c in double.calls] == [(SNP_GET_EXT_REPORT, 0, 8192), (SNP_GET_EXT_REPORT, 0, 12288)]
    assert double.calls[0][2] == report[0x50:0x90]


def test_sev_guest_plain_report(vectors: Path, tmp_path: Path) -> None:
    report = _report(vectors)
    double = SevGuestDouble(report, b"")
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    evidence = SevGuestProvider(device=device, ioctl=double, extended=False, vmpl=2).get_evidence(report[0x50:0x90])
    assert evidence.raw == report and evidence.certs is None
    assert double.calls == [(SNP_GET_REPORT, 2, report[0x50:0x90], 0)]


def test_sev_guest_firmware_errors(vectors: Path, tmp_path: Path) -> None:
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")

    def failing(fd: int, request: int, arg: SnpGuestRequestIoctl) -> int:
        arg.exitinfo2 = 0x16
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(ProviderError, match="firmware error 0x16"):
        SevGuestProvider(device=device, ioctl=failing).get_evidence(bytes(64))

    def refusing(fd: int, request: int, arg: SnpGuestRequestIoctl) -> int:
        ctypes.memmove(arg.resp_data, struct.pack("<II", 0x16, 0), 8)
        return 0

    with pytest.raises(ProviderError, match="refused the report request"):
        SevGuestProvider(device=device, ioctl=refusing, extended=False).get_evidence(bytes(64))
    with pytest.raises(ProviderError, match="cannot open"):
        SevGuestProvider(device=tmp_path / "absent").get_evidence(bytes(64))
    with pytest.raises(ProviderError, match="exactly 64 bytes"):
        SevGuestProvider(device=device).get_evidence(bytes(63))


# --- /dev/tdx_guest and QGS ---------------------------------------------------------------


class TdxGuestDouble:
    """TDX_CMD_GET_REPORT0 on struct tdx_report_req: the recorded TDREPORT with the caller's
    REPORTDATA at 128..192, where the TDX module puts it."""

    def __init__(self, tdreport: bytes) -> None:
        self.tdreport = tdreport
        self.requests: list[bytes] = []

    def __call__(self, fd: int, request: int, arg: object) -> int:
        assert request == TDX_CMD_GET_REPORT0 and ctypes.sizeof(arg) == 64 + 1024
        report_data = bytes(arg)[:64]
        self.requests.append(report_data)
        out = self.tdreport[:128] + report_data + self.tdreport[192:]
        ctypes.memmove(ctypes.addressof(arg) + 64, out, 1024)
        return 0


def _tdx_guest(vectors: Path, tmp_path: Path) -> TdxGuestProvider:
    device = tmp_path / "tdx_guest"
    device.write_bytes(b"")
    return TdxGuestProvider(device=device, ioctl=TdxGuestDouble((vectors / "tee/tdx/intel-dcap_tdreport_for_test.dat").read_bytes()))


def test_tdx_guest_tdreport(vectors: Path, tmp_path: Path) -> None:
    provider = _tdx_guest(vectors, tmp_path)
    report_data = bytes(range(64))
    evidence = provider.get_evidence(report_data)
    assert evidence.tee == "tdreport" and evidence.raw[128:192] == report_data and len(evidence.raw) == 1024
    assert detect_tee(evidence.raw) == "tdreport"
    assert provider.ioctl.requests == [report_data]


class FakeQgs:
    """A Quote Generation Service on a socket pair: checks GET_QUOTE_REQ, answers a real quote."""

    def __init__(self, quote: bytes, error_code: int = 0) -> None:
        self.quote, self.error_code = quote, error_code
        self.requests: list[tuple[tuple[int, ...], bytes, int]] = []

    def connect(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        threading.Thread(target=self._serve, args=(theirs,), daemon=True).start()
        return ours

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            length = struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))[0]
            message = sock.recv(length, socket.MSG_WAITALL)
            header = struct.unpack_from("<HHIII", message)
            report_size, id_size = struct.unpack_from("<II", message, 16)
            self.requests.append((header + (report_size, id_size), message[24:24 + report_size], length))
            quote = b"" if self.error_code else self.quote
            body = struct.pack("<II", 0, len(quote)) + quote
            reply = struct.pack("<HHIII", 1, 1, QGS_GET_QUOTE_RESP, 16 + len(body), self.error_code) + body
            sock.sendall(struct.pack(">I", len(reply)) + reply)


def test_qgs_quote(vectors: Path, tmp_path: Path) -> None:
    quote = _quote(vectors)
    report_data = parse_quote(quote).report_data
    qgs = FakeQgs(quote)
    evidence = QgsProvider(tdx_guest=_tdx_guest(vectors, tmp_path), connect=qgs.connect).get_evidence(report_data)
    assert (evidence.tee, evidence.raw, evidence.provider) == ("tdx", quote, "qgs")
    (fields, tdreport, length), = qgs.requests
    assert fields == (1, 1, 0, 24 + 1024, 0, 1024, 0) and length == 24 + 1024
    assert tdreport[128:192] == report_data and tdreport[:4] == b"\x81\x00\x00\x00"


def test_qgs_errors(vectors: Path, tmp_path: Path) -> None:
    quote = _quote(vectors)
    with pytest.raises(ProviderError, match="failed with error 0x12001"):
        QgsProvider(tdx_guest=_tdx_guest(vectors, tmp_path), connect=FakeQgs(quote, 0x12001).connect).get_evidence(bytes(64))

    def unreachable() -> socket.socket:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    with pytest.raises(ProviderError, match="cannot reach the Quote Generation Service"):
        QgsProvider(tdx_guest=_tdx_guest(vectors, tmp_path), connect=unreachable).get_evidence(bytes(64))
    with pytest.raises(ProviderError, match="not the requested"):
        QgsProvider(tdx_guest=_tdx_guest(vectors, tmp_path), connect=FakeQgs(quote).connect).get_evidence(bytes(64))


# --- sim and auto -------------------------------------------------------------------------


def test_sim_provider() -> None:
    evidence = SimProvider().get_evidence(bytes([9]) * 64)
    assert evidence.tee == "sim" and detect_tee(evidence.raw) == "sim"


def test_auto_skips_missing_devices_and_uses_sim_only_when_allowed(tmp_path: Path) -> None:
    absent = [TsmProvider(tmp_path / "tsm"), SevGuestProvider(device=tmp_path / "sev-guest"),
              QgsProvider(tdx_guest=TdxGuestProvider(device=tmp_path / "tdx_guest"))]
    with pytest.raises(ProviderError) as caught:
        get_evidence_auto(bytes(64), candidates=absent)
    message = str(caught.value)
    assert "tsm:" in message and "sev-guest:" in message and "qgs:" in message and "sim: not tried" in message
    evidence = get_evidence_auto(bytes(64), allow_sim=True, candidates=[*absent, SimProvider()])
    assert evidence.tee == "sim"


def test_auto_takes_the_first_working_provider(vectors: Path, tmp_path: Path) -> None:
    report = _report(vectors)
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    chosen = get_evidence_auto(report[0x50:0x90], candidates=[
        TsmProvider(tmp_path / "tsm"), SevGuestProvider(device=device, ioctl=SevGuestDouble(report, b"")), SimProvider()])
    assert chosen.provider == "sev-guest"
