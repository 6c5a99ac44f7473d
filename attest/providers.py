"""Evidence providers: get a quote or report carrying 64 chosen REPORTDATA bytes.

Every provider has ``name`` and ``get_evidence(report_data) -> Evidence``, and checks that
the evidence it returns really carries the requested REPORTDATA.

* ``tsm``       Linux configfs-tsm (Documentation/ABI/testing/configfs-tsm-report): one
                interface for TDX quotes and SNP reports (+ the SNP certificate table).
* ``sev-guest`` ``/dev/sev-guest`` ioctls SNP_GET_REPORT / SNP_GET_EXT_REPORT
                (include/uapi/linux/sev-guest.h; SEV-SNP ABI MSG_REPORT_RSP).
* ``qgs``       TDX quote from the host's Quote Generation Service over vsock (CID 2, port
                4050): a TDREPORT from ``/dev/tdx_guest`` sent in a GET_QUOTE_REQ (Intel DCAP
                qgs_msg_lib.h) behind a 4-byte big-endian length.
* ``tdx-guest`` ``/dev/tdx_guest`` TDX_CMD_GET_REPORT0: a TDREPORT, MAC'd with a key only this
                CPU knows — useful locally, NOT remotely verifiable; never chosen by ``auto``.
* ``aa``        the Confidential Containers attestation agent inside a CoCo pod's VM, through
                its REST API (``GET http://127.0.0.1:8006/aa/evidence?runtime_data=...``).
                The API takes ``runtime_data`` as text of at most 64 bytes, so the 64 binary
                REPORTDATA bytes travel as :func:`aa_runtime_data` (base64url of their
                SHA-384): the quote's REPORTDATA is then attest.binding.attestation_agent_report_data(REPORTDATA).
* ``sim``       the simulated TEE (attest.sim): testing only, proves nothing.

Device access (open, ioctl, mkdir/rmdir in configfs, the vsock connection) is injectable so
tests replay recorded real evidence through the real request/response code.
"""
from __future__ import annotations

import base64
import binascii
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import secrets
import socket
import struct
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from attest import sim
from attest.binding import attestation_agent_report_data
from attest.errors import ParseError, ProviderError
from attest.evidence import SNP_REPORT_LEN, TDREPORT_LEN, Evidence, detect_tee
from attest.snp_certs import encode_cert_table, parse_cert_table
from attest.tdx import parse_quote

log = logging.getLogger(__name__)

REPORT_DATA_LEN = 64
TSM_REPORT_DIR = Path("/sys/kernel/config/tsm/report")
SEV_GUEST_DEVICE = Path("/dev/sev-guest")
TDX_GUEST_DEVICE = Path("/dev/tdx_guest")
QGS_VSOCK_CID = 2
QGS_VSOCK_PORT = 4050
AA_URL = "http://127.0.0.1:8006"
PROVIDER_NAMES = ("auto", "tsm", "qgs", "sev-guest", "tdx-guest", "aa", "sim")

IoctlFn = Callable[[int, int, object], int]


def _ioctl(fd: int, request: int, arg: object) -> int:
    return fcntl.ioctl(fd, request, arg, True)


def _require_report_data(report_data: object) -> bytes:
    if not isinstance(report_data, (bytes, bytearray, memoryview)) or len(report_data) != REPORT_DATA_LEN:
        raise ProviderError(f"REPORTDATA must be exactly {REPORT_DATA_LEN} bytes")
    return bytes(report_data)


def evidence_report_data(tee: str, raw: bytes) -> bytes:
    """The REPORTDATA inside raw evidence (TDX/sim quote, SNP report at 0x50, TDREPORT at 128)."""
    if tee in ("tdx", "sim"):
        return parse_quote(raw).report_data
    if tee == "snp":
        return raw[0x50:0x90]
    return raw[128:192]


def detect_tee_safe(raw: bytes) -> str | None:
    """detect_tee, or None for unrecognised bytes."""
    try:
        return detect_tee(raw)
    except ParseError:
        return None


def _checked(evidence: Evidence, report_data: bytes) -> Evidence:
    try:
        carried = evidence_report_data(evidence.tee, evidence.raw)
    except ParseError as error:
        raise ProviderError(f"{evidence.provider}: the TEE returned malformed evidence: {error}") from None
    if carried != report_data:
        raise ProviderError(
            f"{evidence.provider}: the evidence carries REPORTDATA {carried.hex()}, not the requested "
            f"{report_data.hex()}"
        )
    return evidence


class EvidenceProvider(Protocol):
    name: str

    def get_evidence(self, report_data: bytes) -> Evidence: ...


# --- configfs-tsm -------------------------------------------------------------------------


@dataclass
class TsmProvider:
    """configfs-tsm: mkdir a report entry, write ``inblob``, read ``outblob``/``auxblob``.

    ``generation`` is read before writing and after reading: it must have advanced by exactly
    one (our write), otherwise another writer raced us and the outblob may not be ours.
    """

    base_dir: Path = TSM_REPORT_DIR
    attempts: int = 3
    make_dir: Callable[[Path], None] = os.mkdir
    remove_dir: Callable[[Path], None] = os.rmdir
    name: str = "tsm"

    _TEE_BY_PROVIDER = {"tdx_guest": "tdx", "sev_guest": "snp"}

    def unavailable(self) -> str | None:
        if not self.base_dir.is_dir():
            return f"{self.base_dir} does not exist (kernel without configfs-tsm, or configfs not mounted)"
        return None

    @staticmethod
    def _read(path: Path) -> bytes:
        with open(path, "rb", buffering=0) as handle:
            return handle.read()

    def _generation(self, entry: Path) -> int:
        text = self._read(entry / "generation").strip()
        try:
            return int(text)
        except ValueError:
            raise ProviderError(f"configfs-tsm: {entry / 'generation'} holds {text[:20]!r}, not a number") from None

    def _once(self, entry: Path, report_data: bytes) -> tuple[int, int, bytes, bytes | None, str]:
        before = self._generation(entry)
        fd = os.open(entry / "inblob", os.O_WRONLY)
        try:
            if os.write(fd, report_data) != len(report_data):
                raise ProviderError("configfs-tsm: short write to inblob")
        finally:
            os.close(fd)
        outblob = self._read(entry / "outblob")
        try:
            auxblob: bytes | None = self._read(entry / "auxblob") or None
        except FileNotFoundError:
            auxblob = None
        provider = self._read(entry / "provider").decode("ascii", "replace").strip()
        after = self._generation(entry)
        return before, after, outblob, auxblob, provider

    def get_evidence(self, report_data: bytes) -> Evidence:
        report_data = _require_report_data(report_data)
        for attempt in range(1, self.attempts + 1):
            entry = self.base_dir / f"cdvm-{os.getpid()}-{secrets.token_hex(6)}"
            try:
                self.make_dir(entry)
            except OSError as error:
                raise ProviderError(f"configfs-tsm: cannot create {entry}: {error.strerror}") from None
            try:
                before, after, outblob, auxblob, provider = self._once(entry, report_data)
            except OSError as error:
                raise ProviderError(
                    f"configfs-tsm: {error.filename or entry}: {error.strerror} (is the TEE's quote "
                    "service available?)"
                ) from None
            finally:
                try:
                    self.remove_dir(entry)
                except OSError as error:
                    log.warning("configfs-tsm: could not remove %s: %s", entry, error.strerror)
            if after != before + 1:
                log.info("configfs-tsm: generation went %d -> %d (concurrent writer), attempt %d of %d",
                         before, after, attempt, self.attempts)
                continue
            tee = self._TEE_BY_PROVIDER.get(provider)
            if tee is None:
                raise ProviderError(f"configfs-tsm: unsupported TSM provider {provider!r} (supported: "
                                    f"{', '.join(self._TEE_BY_PROVIDER)})")
            try:
                detected = detect_tee(outblob)
            except ParseError as error:
                raise ProviderError(f"configfs-tsm ({provider}) returned unrecognised evidence: {error}") from None
            if detected != tee:
                raise ProviderError(f"configfs-tsm provider {provider} returned {detected} evidence")
            return _checked(Evidence(tee=tee, raw=outblob, certs=auxblob, provider=self.name), report_data)
        raise ProviderError(
            f"configfs-tsm: another process kept writing the report entry ({self.attempts} attempts); "
            "the outblob could not be tied to our REPORTDATA"
        )


# --- /dev/sev-guest -------------------------------------------------------------------------

SNP_GET_REPORT = 0xC0205300
SNP_GET_EXT_REPORT = 0xC0205302
SNP_MSG_VERSION = 1
SNP_RESPONSE_LEN = 4000
SNP_REPORT_OFFSET = 32
SNP_VMM_ERR_INVALID_LEN = 1
PAGE_SIZE = 4096
SEV_FW_BLOB_MAX_SIZE = 0x4000


class SnpGuestRequestIoctl(ctypes.Structure):
    """struct snp_guest_request_ioctl (32 bytes)."""

    _fields_ = [("msg_version", ctypes.c_uint8), ("req_data", ctypes.c_uint64),
                ("resp_data", ctypes.c_uint64), ("exitinfo2", ctypes.c_uint64)]


class SnpReportReq(ctypes.Structure):
    """struct snp_report_req (96 bytes)."""

    _fields_ = [("user_data", ctypes.c_uint8 * 64), ("vmpl", ctypes.c_uint32), ("rsvd", ctypes.c_uint8 * 28)]


class SnpExtReportReq(ctypes.Structure):
    """struct snp_ext_report_req (112 bytes)."""

    _fields_ = [("data", SnpReportReq), ("certs_address", ctypes.c_uint64), ("certs_len", ctypes.c_uint32)]


SnpReportResp = ctypes.c_uint8 * SNP_RESPONSE_LEN
"""struct snp_report_resp: MSG_REPORT_RSP = status u32, report_size u32, 24 reserved, report."""


def parse_snp_report_response(resp: bytes) -> bytes:
    """The ATTESTATION_REPORT inside a MSG_REPORT_RSP (SEV-SNP ABI, table "MSG_REPORT_RSP")."""
    status, size = struct.unpack_from("<II", resp, 0)
    if status != 0:
        raise ProviderError(f"sev-guest: the SNP firmware refused the report request (status {status:#x})")
    if size != SNP_REPORT_LEN:
        raise ProviderError(f"sev-guest: firmware says the report is {size} bytes, expected {SNP_REPORT_LEN}")
    return bytes(resp[SNP_REPORT_OFFSET:SNP_REPORT_OFFSET + size])


def _cert_table(buffer: bytes) -> bytes | None:
    """The host's certificate table, re-encoded without the buffer's slack; None when empty."""
    try:
        table = parse_cert_table(buffer)
    except ParseError as error:
        raise ProviderError(f"sev-guest: the host returned a malformed certificate table: {error}") from None
    return encode_cert_table(table.entries) if table.entries else None


@dataclass
class SevGuestProvider:
    """``/dev/sev-guest``: SNP_GET_EXT_REPORT (report + certificate table) or SNP_GET_REPORT."""

    device: Path = SEV_GUEST_DEVICE
    vmpl: int = 0
    extended: bool = True
    ioctl: IoctlFn = _ioctl
    attempts: int = 3
    name: str = "sev-guest"

    def unavailable(self) -> str | None:
        return None if self.device.exists() else f"{self.device} does not exist (not an SEV-SNP guest)"

    def _request(self, fd: int, code: int, req: ctypes.Structure) -> tuple[bytes, SnpGuestRequestIoctl]:
        resp = SnpReportResp()
        guest = SnpGuestRequestIoctl(msg_version=SNP_MSG_VERSION, req_data=ctypes.addressof(req),
                                     resp_data=ctypes.addressof(resp), exitinfo2=0)
        try:
            self.ioctl(fd, code, guest)
        except OSError as error:
            if guest.exitinfo2 >> 32 == SNP_VMM_ERR_INVALID_LEN:
                return b"", guest
            raise ProviderError(
                f"sev-guest: ioctl {code:#x} failed: {error.strerror} (firmware error "
                f"{guest.exitinfo2 & 0xFFFFFFFF:#x}, VMM error {guest.exitinfo2 >> 32:#x})"
            ) from None
        return bytes(resp), guest

    def get_evidence(self, report_data: bytes) -> Evidence:
        report_data = _require_report_data(report_data)
        try:
            fd = os.open(self.device, os.O_RDWR)
        except OSError as error:
            raise ProviderError(f"sev-guest: cannot open {self.device}: {error.strerror}") from None
        try:
            base = SnpReportReq(vmpl=self.vmpl)
            ctypes.memmove(base.user_data, report_data, REPORT_DATA_LEN)
            if not self.extended:
                resp, _ = self._request(fd, SNP_GET_REPORT, base)
                return _checked(Evidence("snp", parse_snp_report_response(resp), None, self.name), report_data)
            certs_len = 2 * PAGE_SIZE
            for _ in range(self.attempts):
                certs = (ctypes.c_uint8 * certs_len)()
                req = SnpExtReportReq(data=base, certs_address=ctypes.addressof(certs), certs_len=certs_len)
                resp, guest = self._request(fd, SNP_GET_EXT_REPORT, req)
                if resp:
                    report = parse_snp_report_response(resp)
                    return _checked(Evidence("snp", report, _cert_table(bytes(certs)), self.name), report_data)
                wanted = req.certs_len
                if wanted <= certs_len or wanted > SEV_FW_BLOB_MAX_SIZE or wanted % PAGE_SIZE:
                    raise ProviderError(f"sev-guest: the host asks for a {wanted}-byte certificate buffer")
                certs_len = wanted
            raise ProviderError("sev-guest: the certificate buffer size kept changing")
        finally:
            os.close(fd)


# --- /dev/tdx_guest -----------------------------------------------------------------------

TDX_CMD_GET_REPORT0 = 0xC4405401


@dataclass
class TdxGuestProvider:
    """``/dev/tdx_guest`` TDX_CMD_GET_REPORT0 → struct tdx_report_req {reportdata[64]; tdreport[1024]}.

    A TDREPORT is MAC'd, not signed: only this CPU can check it. It is not remotely verifiable.
    """

    device: Path = TDX_GUEST_DEVICE
    ioctl: IoctlFn = _ioctl
    name: str = "tdx-guest"

    def unavailable(self) -> str | None:
        return None if self.device.exists() else f"{self.device} does not exist (not a TDX guest)"

    def tdreport(self, report_data: bytes) -> bytes:
        report_data = _require_report_data(report_data)
        request = (ctypes.c_uint8 * (REPORT_DATA_LEN + TDREPORT_LEN))()
        ctypes.memmove(request, report_data, REPORT_DATA_LEN)
        try:
            fd = os.open(self.device, os.O_RDWR)
        except OSError as error:
            raise ProviderError(f"tdx-guest: cannot open {self.device}: {error.strerror}") from None
        try:
            self.ioctl(fd, TDX_CMD_GET_REPORT0, request)
        except OSError as error:
            raise ProviderError(f"tdx-guest: TDX_CMD_GET_REPORT0 failed: {error.strerror}") from None
        finally:
            os.close(fd)
        return bytes(request)[REPORT_DATA_LEN:]

    def get_evidence(self, report_data: bytes) -> Evidence:
        raw = self.tdreport(report_data)
        if detect_tee_safe(raw) != "tdreport":
            raise ProviderError("tdx-guest: the device returned something that is not a TDREPORT")
        return _checked(Evidence("tdreport", raw, None, self.name), bytes(report_data))


# --- QGS over vsock -------------------------------------------------------------------------

QGS_MSG_MAJOR = 1
QGS_MSG_MINOR = 1
QGS_GET_QUOTE_REQ = 0
QGS_GET_QUOTE_RESP = 1
_QGS_HEADER = struct.Struct("<HHIII")
_QGS_MAX_MESSAGE = 1 << 20


def build_qgs_get_quote_request(tdreport: bytes) -> bytes:
    """GET_QUOTE_REQ for one TDREPORT and no id list, behind the 4-byte big-endian length."""
    size = _QGS_HEADER.size + 8 + len(tdreport)
    message = (_QGS_HEADER.pack(QGS_MSG_MAJOR, QGS_MSG_MINOR, QGS_GET_QUOTE_REQ, size, 0)
               + struct.pack("<II", len(tdreport), 0) + tdreport)
    return struct.pack(">I", size) + message


def parse_qgs_get_quote_response(message: bytes) -> bytes:
    """The quote inside a GET_QUOTE_RESP (without the length prefix)."""
    if len(message) < _QGS_HEADER.size + 8:
        raise ProviderError(f"qgs: response of {len(message)} bytes is shorter than its header")
    major, _minor, kind, size, error_code = _QGS_HEADER.unpack_from(message, 0)
    if major != QGS_MSG_MAJOR:
        raise ProviderError(f"qgs: response message version {major}, expected {QGS_MSG_MAJOR}")
    if kind != QGS_GET_QUOTE_RESP:
        raise ProviderError(f"qgs: response type {kind}, expected GET_QUOTE_RESP ({QGS_GET_QUOTE_RESP})")
    if size != len(message):
        raise ProviderError(f"qgs: response header says {size} bytes, received {len(message)}")
    if error_code:
        raise ProviderError(f"qgs: the Quote Generation Service failed with error {error_code:#x}")
    id_size, quote_size = struct.unpack_from("<II", message, _QGS_HEADER.size)
    start = _QGS_HEADER.size + 8 + id_size
    if start + quote_size != size or quote_size == 0:
        raise ProviderError("qgs: response sizes do not add up")
    return bytes(message[start:start + quote_size])


def _recv_exact(sock: socket.socket, length: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < length:
        chunk = sock.recv(min(65536, length - len(chunks)))
        if not chunk:
            raise ProviderError(f"qgs: connection closed after {len(chunks)} of {length} bytes")
        chunks += chunk
    return bytes(chunks)


def _vsock_connect() -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.settimeout(60)
        sock.connect((QGS_VSOCK_CID, QGS_VSOCK_PORT))
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class QgsProvider:
    """A TDX quote: TDREPORT from ``/dev/tdx_guest``, signed by the host's QGS over vsock."""

    tdx_guest: TdxGuestProvider = field(default_factory=TdxGuestProvider)
    connect: Callable[[], socket.socket] = _vsock_connect
    name: str = "qgs"

    def unavailable(self) -> str | None:
        return self.tdx_guest.unavailable()

    def get_evidence(self, report_data: bytes) -> Evidence:
        tdreport = self.tdx_guest.tdreport(report_data)
        try:
            sock = self.connect()
        except OSError as error:
            raise ProviderError(
                f"qgs: cannot reach the Quote Generation Service at vsock {QGS_VSOCK_CID}:{QGS_VSOCK_PORT}: "
                f"{error.strerror or error}"
            ) from None
        try:
            sock.sendall(build_qgs_get_quote_request(tdreport))
            length, = struct.unpack(">I", _recv_exact(sock, 4))
            if not 0 < length <= _QGS_MAX_MESSAGE:
                raise ProviderError(f"qgs: response length {length} is out of range")
            quote = parse_qgs_get_quote_response(_recv_exact(sock, length))
        except OSError as error:
            raise ProviderError(f"qgs: {error.strerror or error}") from None
        finally:
            sock.close()
        if detect_tee_safe(quote) != "tdx":
            raise ProviderError("qgs: the service returned something that is not a TDX quote")
        return _checked(Evidence("tdx", quote, None, self.name), bytes(report_data))


# --- Confidential Containers attestation agent (REST) ------------------------------------------


def aa_runtime_data(report_data: bytes) -> str:
    """The ``runtime_data`` text the attestation agent is given for 64 REPORTDATA bytes
    (attest.binding.attestation_agent_report_data explains the encoding)."""
    return attestation_agent_report_data(_require_report_data(report_data)).decode("ascii")


_MAX_AA_RESPONSE = 4 << 20


def _http_get(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read(_MAX_AA_RESPONSE + 1)
    except urllib.error.HTTPError as error:
        detail = error.read(512).decode("utf-8", errors="replace").strip()
        raise ProviderError(f"aa: the attestation agent answered HTTP {error.code}: {detail or error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ProviderError(f"aa: cannot reach the attestation agent at {url.split('?')[0]}: {reason}") from None


def _aa_entries(body: bytes) -> list[tuple[str, object]]:
    """The (tee, evidence object) pairs of an agent response: a JSON list of ``[tee, evidence
    JSON text]`` (several attesters), or one attester's evidence object (older agents)."""
    if len(body) > _MAX_AA_RESPONSE:
        raise ProviderError("aa: the attestation agent's response is larger than 4 MiB")
    try:
        document = json.loads(body)
        if isinstance(document, dict):
            return [("", document)]
        if not isinstance(document, list):
            raise ValueError("neither an object nor a list")
        entries = []
        for entry in document:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise ValueError("a list entry is not [tee, evidence]")
            evidence = json.loads(entry[1]) if isinstance(entry[1], str) else entry[1]
            entries.append((entry[0].lower(), evidence))
        return entries
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ProviderError(f"aa: the attestation agent returned unreadable evidence: {error}") from None


def parse_aa_evidence(body: bytes) -> Evidence:
    """Evidence from an agent response. TDX evidence is ``{"quote": base64, "cc_eventlog": ...}``;
    SEV-SNP evidence holds the report as a serde structure of the Rust ``sev`` crate, not its
    signed bytes, and the ``sample`` attester (``kata-qemu-coco-dev``) proves nothing: both
    are refused with the reason."""
    reasons = []
    for tee, evidence in _aa_entries(body):
        if not isinstance(evidence, dict):
            reasons.append(f"{tee or 'evidence'}: not a JSON object")
        elif isinstance(evidence.get("quote"), str):
            try:
                raw = base64.b64decode(evidence["quote"], validate=True)
            except (binascii.Error, ValueError):
                reasons.append(f"{tee or 'tdx'}: the quote is not base64")
                continue
            if detect_tee_safe(raw) != "tdx":
                reasons.append(f"{tee or 'tdx'}: the quote is not a TDX quote")
                continue
            return Evidence("tdx", raw, None, "aa")
        elif "attestation_report" in evidence:
            reasons.append("snp: the agent returns the SEV-SNP report as a sev-crate structure, not its signed bytes; "
                           "expose configfs-tsm or /dev/sev-guest to the runner (provider tsm or sev-guest)")
        elif "report_data" in evidence and "svn" in evidence:
            reasons.append("sample: the agent runs without a TEE (kata-qemu-coco-dev); its evidence proves nothing")
        else:
            reasons.append(f"{tee or 'evidence'}: unknown evidence layout with fields {', '.join(sorted(evidence))}")
    raise ProviderError("aa: no usable evidence from the attestation agent: " + "; ".join(reasons or ["empty list"]))


@dataclass
class AaProvider:
    """The CoCo attestation agent's REST API inside a confidential pod (see the module docstring)."""

    url: str = AA_URL
    timeout: float = 60.0
    fetch: Callable[[str, float], bytes] = _http_get
    name: str = "aa"

    def unavailable(self) -> str | None:
        parts = urllib.parse.urlsplit(self.url)
        try:
            with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=0.5):
                return None
        except OSError as error:
            return f"no attestation agent listens at {self.url} ({error.strerror or error}; not a CoCo pod)"

    def get_evidence(self, report_data: bytes) -> Evidence:
        query = urllib.parse.urlencode({"runtime_data": aa_runtime_data(report_data)})
        body = self.fetch(f"{self.url.rstrip('/')}/aa/evidence?{query}", self.timeout)
        return _checked(parse_aa_evidence(body), attestation_agent_report_data(report_data))


# --- simulated TEE --------------------------------------------------------------------------


@dataclass
class SimProvider:
    """The simulated TEE: a TDX-layout quote under a local root. Proves nothing."""

    name: str = "sim"

    def unavailable(self) -> str | None:
        return None

    def get_evidence(self, report_data: bytes) -> Evidence:
        report_data = _require_report_data(report_data)
        return _checked(Evidence("sim", sim.make_quote(report_data), None, self.name), report_data)


# --- selection ------------------------------------------------------------------------------


def make_provider(name: str) -> EvidenceProvider:
    """The provider called ``name`` (one of PROVIDER_NAMES other than "auto")."""
    factories: dict[str, Callable[[], EvidenceProvider]] = {
        "tsm": TsmProvider, "sev-guest": SevGuestProvider, "tdx-guest": TdxGuestProvider,
        "qgs": QgsProvider, "sim": SimProvider, "aa": AaProvider,
    }
    if name not in factories:
        raise ProviderError(f"unknown evidence provider {name!r} (known: {', '.join(PROVIDER_NAMES)})")
    return factories[name]()


def get_evidence_auto(
    report_data: bytes,
    *,
    allow_sim: bool = False,
    candidates: list[EvidenceProvider] | None = None,
) -> Evidence:
    """Try tsm, sev-guest, qgs (never tdx-guest), aa when its agent listens, then sim only when ``allow_sim``.

    Each skipped or failed provider is logged at info with the reason; when none works,
    ProviderError lists every reason.
    """
    if candidates is None:
        candidates = [TsmProvider(), SevGuestProvider(), QgsProvider(), AaProvider()]
        if allow_sim:
            candidates.append(SimProvider())
    reasons = []
    for provider in candidates:
        reason = provider.unavailable()  # type: ignore[attr-defined]
        if reason is None:
            try:
                evidence = provider.get_evidence(report_data)
            except ProviderError as error:
                reason = str(error)
            else:
                log.info("evidence provider %s produced %s evidence", provider.name, evidence.tee)
                return evidence
        log.info("evidence provider %s skipped: %s", provider.name, reason)
        reasons.append(f"{provider.name}: {reason}")
    if not allow_sim:
        reasons.append("sim: not tried (pass --provider sim or allow_sim for the simulated TEE)")
    raise ProviderError("no TEE evidence provider worked: " + "; ".join(reasons))


def get_evidence(report_data: bytes, provider: str = "auto", *, allow_sim: bool = False) -> Evidence:
    """Evidence from the named provider, or the first working one for "auto"."""
    if provider == "auto":
        return get_evidence_auto(report_data, allow_sim=allow_sim)
    return make_provider(provider).get_evidence(report_data)
