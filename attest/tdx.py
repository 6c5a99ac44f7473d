"""Intel TDX quote parser (quote format v4 and v5), no cryptography.

Layouts follow Intel's "TDX DCAP Quoting Library API" (appendix: Quote Format) and the
SGX ECDSA quote format: a 48-byte header, a TD report body (v4: 584-byte TDX 1.0 body at
offset 48; v5: body type u16 + body size u32 at 48, then a TDX 1.0 (type 2, 584 bytes) or
TDX 1.5 (type 3, 648 bytes) body), then a u32 signature-data length and the ECDSA
signature data: quote signature (r‖s), attestation key (x‖y), certification data type 6
(QE report certification data: 384-byte SGX QE report, its signature, QE authentication
data, and certification data type 5 = PEM PCK certificate chain).

All integers are little-endian. Bytes after the signature data are ignored. Nested lengths
must add up exactly (as Intel's QVL requires); anything else is a :class:`ParseError`
naming the field, its offset and the expected length.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntFlag

from attest.errors import ParseError

HEADER_LEN = 48
TD10_BODY_LEN = 584
TD15_BODY_LEN = 648
ENCLAVE_REPORT_LEN = 384
ECDSA_SIG_LEN = 64
ATTESTATION_KEY_LEN = 64

TEE_TYPE_TDX = 0x81
ATT_KEY_TYPE_ECDSA_P256 = 2
CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6
BODY_TYPE_TD10 = 2
BODY_TYPE_TD15 = 3


class TdAttributes(IntFlag):
    """TDATTRIBUTES bits (Intel TDX Module ABI, TD_PARAMS.ATTRIBUTES)."""

    DEBUG = 1 << 0
    SEPT_VE_DISABLE = 1 << 28
    PKS = 1 << 30
    KL = 1 << 31
    PERFMON = 1 << 63


_KNOWN_TD_ATTRIBUTES = int(TdAttributes.DEBUG | TdAttributes.SEPT_VE_DISABLE | TdAttributes.PKS | TdAttributes.KL | TdAttributes.PERFMON)
_RESERVED_TD_ATTRIBUTES = 0xFE | 0x0FFF_FF00 | (1 << 29) | (0x7FFF_FFFF << 32)
"""TUD bits 1..7, SEC bits 8..27 and 29, OTHER bits 32..62 (Intel TDX Module ABI, ATTRIBUTES)."""


class _Reader:
    """Bounds-checked little-endian reader that names the field on failure."""

    __slots__ = ("data", "end")

    def __init__(self, data: bytes, end: int | None = None) -> None:
        self.data = data
        self.end = len(data) if end is None else end

    def take(self, offset: int, length: int, field: str) -> bytes:
        if offset < 0 or offset + length > self.end:
            raise ParseError(
                f"TDX quote truncated: {field} needs {length} bytes at offset {offset}, "
                f"only {max(0, self.end - offset)} available"
            )
        return self.data[offset : offset + length]

    def u16(self, offset: int, field: str) -> int:
        return struct.unpack("<H", self.take(offset, 2, field))[0]

    def u32(self, offset: int, field: str) -> int:
        return struct.unpack("<I", self.take(offset, 4, field))[0]


@dataclass(frozen=True, slots=True)
class QuoteHeader:
    """The 48-byte quote header (v4/v5)."""

    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True, slots=True)
class TdReportBody:
    """The TD report body: TDX 1.0 fields, plus TEE_TCB_SVN2 and MRSERVICETD for TDX 1.5."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes | None = None

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def td_attributes_value(self) -> int:
        """TDATTRIBUTES as a 64-bit integer (the field is little-endian)."""
        return int.from_bytes(self.td_attributes, "little")

    @property
    def attributes(self) -> TdAttributes:
        return TdAttributes(self.td_attributes_value & _KNOWN_TD_ATTRIBUTES)

    @property
    def debug(self) -> bool:
        """TDATTRIBUTES.DEBUG (bit 0): the host can read and modify the TD."""
        return bool(self.td_attributes_value & TdAttributes.DEBUG)

    @property
    def sept_ve_disable(self) -> bool:
        """TDATTRIBUTES.SEPT_VE_DISABLE (bit 28): EPT violations do not become #VE."""
        return bool(self.td_attributes_value & TdAttributes.SEPT_VE_DISABLE)

    @property
    def pks(self) -> bool:
        return bool(self.td_attributes_value & TdAttributes.PKS)

    @property
    def key_locker(self) -> bool:
        return bool(self.td_attributes_value & TdAttributes.KL)

    @property
    def perfmon(self) -> bool:
        return bool(self.td_attributes_value & TdAttributes.PERFMON)

    @property
    def td_attributes_reserved_bits(self) -> int:
        """The reserved TDATTRIBUTES bits that are set (zero for a well-behaved TD)."""
        return self.td_attributes_value & _RESERVED_TD_ATTRIBUTES

    @property
    def is_td15(self) -> bool:
        return self.tee_tcb_svn2 is not None


@dataclass(frozen=True, slots=True)
class EnclaveReport:
    """The SGX enclave REPORT body (384 bytes) — here: the Quoting Enclave's report."""

    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes
    raw: bytes


@dataclass(frozen=True, slots=True)
class QeReportCertificationData:
    """Certification data type 6: the QE report, its PCK signature, QE auth data, PCK chain."""

    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_cert_chain_type: int
    pck_cert_chain: bytes


@dataclass(frozen=True, slots=True)
class QuoteSignatureData:
    """The ECDSA-P256 quote signature data."""

    signature: bytes
    attestation_key: bytes
    certification: QeReportCertificationData


@dataclass(frozen=True, slots=True)
class TdxQuote:
    """A parsed TDX quote; ``raw`` is the whole input, ``signed_bytes`` what the attestation key signs."""

    header: QuoteHeader
    body_type: int
    body: TdReportBody
    signature_data: QuoteSignatureData
    signed_length: int
    trailing_bytes: int
    raw: bytes

    @property
    def signed_bytes(self) -> bytes:
        """Header and body: [0,632) for v4, [0,638) v5 type 2, [0,702) v5 type 3."""
        return self.raw[: self.signed_length]

    @property
    def report_data(self) -> bytes:
        return self.body.report_data


def parse_header(data: bytes) -> QuoteHeader:
    """Parse the 48-byte quote header."""
    r = _Reader(data)
    return QuoteHeader(
        version=r.u16(0, "header.version"),
        attestation_key_type=r.u16(2, "header.attestation_key_type"),
        tee_type=r.u32(4, "header.tee_type"),
        qe_svn=r.u16(8, "header.qe_svn"),
        pce_svn=r.u16(10, "header.pce_svn"),
        qe_vendor_id=r.take(12, 16, "header.qe_vendor_id"),
        user_data=r.take(28, 20, "header.user_data"),
    )


def _parse_body(r: _Reader, offset: int, body_type: int) -> TdReportBody:
    fields = {}
    pos = offset
    for name, size in (
        ("tee_tcb_svn", 16), ("mr_seam", 48), ("mr_signer_seam", 48), ("seam_attributes", 8),
        ("td_attributes", 8), ("xfam", 8), ("mr_td", 48), ("mr_config_id", 48), ("mr_owner", 48),
        ("mr_owner_config", 48), ("rtmr0", 48), ("rtmr1", 48), ("rtmr2", 48), ("rtmr3", 48),
        ("report_data", 64),
    ):
        fields[name] = r.take(pos, size, f"td_report.{name}")
        pos += size
    if body_type == BODY_TYPE_TD15:
        fields["tee_tcb_svn2"] = r.take(pos, 16, "td_report.tee_tcb_svn2")
        fields["mr_service_td"] = r.take(pos + 16, 48, "td_report.mr_service_td")
    return TdReportBody(**fields)


def parse_enclave_report(data: bytes) -> EnclaveReport:
    """Parse a 384-byte SGX enclave REPORT body (SDM vol. 3D, REPORT structure)."""
    if len(data) != ENCLAVE_REPORT_LEN:
        raise ParseError(f"SGX enclave report must be {ENCLAVE_REPORT_LEN} bytes, got {len(data)}")
    misc_select, = struct.unpack_from("<I", data, 16)
    isv_prod_id, isv_svn = struct.unpack_from("<HH", data, 256)
    return EnclaveReport(
        cpu_svn=data[0:16],
        misc_select=misc_select,
        attributes=data[48:64],
        mr_enclave=data[64:96],
        mr_signer=data[128:160],
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        report_data=data[320:384],
        raw=data,
    )


def _parse_signature_data(r: _Reader, start: int, length: int) -> QuoteSignatureData:
    end = start + length
    inner = _Reader(r.data, end)
    signature = inner.take(start, ECDSA_SIG_LEN, "signature_data.quote_signature")
    attestation_key = inner.take(start + 64, ATTESTATION_KEY_LEN, "signature_data.attestation_key")
    cert_type = inner.u16(start + 128, "signature_data.certification_data_type")
    cert_size = inner.u32(start + 130, "signature_data.certification_data_size")
    if cert_type != CERT_TYPE_QE_REPORT:
        raise ParseError(
            f"TDX quote certification data type is {cert_type}; only type {CERT_TYPE_QE_REPORT} "
            "(QE report certification data) is supported"
        )
    cert_start = start + 134
    if cert_start + cert_size != end:
        raise ParseError(
            f"TDX quote certification data size {cert_size} at offset {start + 130} does not match "
            f"the signature data length {length} (expected {end - cert_start})"
        )
    qe_report = parse_enclave_report(inner.take(cert_start, ENCLAVE_REPORT_LEN, "qe_report"))
    pos = cert_start + ENCLAVE_REPORT_LEN
    qe_report_signature = inner.take(pos, ECDSA_SIG_LEN, "qe_report_signature")
    pos += ECDSA_SIG_LEN
    auth_len = inner.u16(pos, "qe_auth_data.size")
    qe_auth_data = inner.take(pos + 2, auth_len, "qe_auth_data.data")
    pos += 2 + auth_len
    chain_type = inner.u16(pos, "pck_cert_chain.type")
    chain_size = inner.u32(pos + 2, "pck_cert_chain.size")
    if chain_type != CERT_TYPE_PCK_CHAIN:
        raise ParseError(
            f"TDX quote inner certification data type is {chain_type} at offset {pos}; only type "
            f"{CERT_TYPE_PCK_CHAIN} (PEM PCK certificate chain) is supported"
        )
    chain = inner.take(pos + 6, chain_size, "pck_cert_chain.data")
    if pos + 6 + chain_size != end:
        raise ParseError(
            f"TDX quote PCK certificate chain ends at offset {pos + 6 + chain_size} but the "
            f"certification data ends at {end}"
        )
    return QuoteSignatureData(
        signature=signature,
        attestation_key=attestation_key,
        certification=QeReportCertificationData(
            qe_report=qe_report,
            qe_report_signature=qe_report_signature,
            qe_auth_data=qe_auth_data,
            pck_cert_chain_type=chain_type,
            pck_cert_chain=chain,
        ),
    )


def parse_quote(data: bytes) -> TdxQuote:
    """Parse a TDX quote (v4, or v5 with body type 2 or 3); trailing bytes are ignored."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError(f"TDX quote must be bytes, got {type(data).__name__}")
    data = bytes(data)
    r = _Reader(data)
    header = parse_header(data)
    if header.tee_type != TEE_TYPE_TDX:
        raise ParseError(f"not a TDX quote: header.tee_type is {header.tee_type:#x}, expected {TEE_TYPE_TDX:#x}")
    if header.version == 4:
        body_type, body_offset, body_len = BODY_TYPE_TD10, HEADER_LEN, TD10_BODY_LEN
    elif header.version == 5:
        body_type = r.u16(HEADER_LEN, "v5 body.type")
        body_len = r.u32(HEADER_LEN + 2, "v5 body.size")
        body_offset = HEADER_LEN + 6
        expected = {BODY_TYPE_TD10: TD10_BODY_LEN, BODY_TYPE_TD15: TD15_BODY_LEN}.get(body_type)
        if expected is None:
            raise ParseError(
                f"unsupported TDX quote v5 body type {body_type} at offset {HEADER_LEN} "
                "(supported: 2 = TDX 1.0 report, 3 = TDX 1.5 report)"
            )
        if body_len != expected:
            raise ParseError(
                f"TDX quote v5 body type {body_type} must be {expected} bytes, size field at "
                f"offset {HEADER_LEN + 2} says {body_len}"
            )
    else:
        raise ParseError(f"unsupported TDX quote version {header.version} (supported: 4, 5)")
    body = _parse_body(r, body_offset, body_type)
    signed_length = body_offset + body_len
    sig_len = r.u32(signed_length, "signature_data.length")
    sig_start = signed_length + 4
    r.take(sig_start, sig_len, "signature_data")
    signature_data = _parse_signature_data(r, sig_start, sig_len)
    return TdxQuote(
        header=header,
        body_type=body_type,
        body=body,
        signature_data=signature_data,
        signed_length=signed_length,
        trailing_bytes=len(data) - (sig_start + sig_len),
        raw=data,
    )
