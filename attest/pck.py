"""The Intel SGX extension of PCK certificates (OID 1.2.840.113741.1.13.1).

Structure per Intel's "SGX PCK Certificate and Certificate Revocation List Profile
Specification" §1.3.5: a SEQUENCE of (OID, value) pairs — PPID (.1, OCTET STRING 16),
TCB (.2, a SEQUENCE of 16 SGX TCB comp SVNs .2.1-.2.16 INTEGER, PCESVN .2.17 INTEGER,
CPUSVN .2.18 OCTET STRING 16), PCE-ID (.3, OCTET STRING 2), FMSPC (.4, OCTET STRING 6),
SGX Type (.5, ENUMERATED), and for platform CA certificates optionally Platform Instance ID
(.6, OCTET STRING 16) and Configuration (.7: dynamic platform .7.1, cached keys .7.2,
SMT enabled .7.3, BOOLEANs). Decoded with a small strict DER reader.
"""
from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from attest.errors import ParseError

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_OID = x509.ObjectIdentifier(SGX_EXTENSION_OID)

_SEQUENCE, _OCTET_STRING, _INTEGER, _ENUMERATED, _BOOLEAN, _OID_TAG = 0x30, 0x04, 0x02, 0x0A, 0x01, 0x06


@dataclass(frozen=True, slots=True)
class PckExtension:
    """Decoded SGX extension of a PCK certificate."""

    ppid: bytes
    sgx_tcb_comp_svns: tuple[int, ...]
    pce_svn: int
    cpu_svn: bytes
    pce_id: bytes
    fmspc: bytes
    sgx_type: int
    platform_instance_id: bytes | None = None
    dynamic_platform: bool | None = None
    cached_keys: bool | None = None
    smt_enabled: bool | None = None


def _read_tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """Read one DER TLV at ``pos``; return (tag, value, next position)."""
    if pos + 2 > len(data):
        raise ParseError(f"SGX extension truncated at offset {pos}")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ParseError(f"SGX extension has a bad DER length at offset {pos - 1}")
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise ParseError(f"SGX extension has a non-minimal DER length at offset {pos - 1}")
        pos += count
    if pos + length > len(data):
        raise ParseError(f"SGX extension element at offset {pos} needs {length} bytes, {len(data) - pos} left")
    return tag, data[pos : pos + length], pos + length


def _items(data: bytes, what: str) -> list[tuple[int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        tag, value, pos = _read_tlv(data, pos)
        out.append((tag, value))
    return out


def _decode_oid(value: bytes) -> str:
    if not value:
        raise ParseError("SGX extension has an empty OID")
    parts: list[int] = []
    acc = 0
    for i, byte in enumerate(value):
        if acc == 0 and byte == 0x80:
            raise ParseError("SGX extension has a non-minimal OID encoding")
        acc = (acc << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(acc)
            acc = 0
        elif i == len(value) - 1:
            raise ParseError("SGX extension has a truncated OID")
    first = min(parts[0] // 40, 2)
    return ".".join(str(n) for n in [first, parts[0] - 40 * first, *parts[1:]])


def _pairs(data: bytes, what: str) -> dict[str, tuple[int, bytes]]:
    """Decode a SEQUENCE OF SEQUENCE { OID, value } into {oid: (tag, value)}."""
    out: dict[str, tuple[int, bytes]] = {}
    for tag, body in _items(data, what):
        if tag != _SEQUENCE:
            raise ParseError(f"{what}: expected a SEQUENCE entry, got tag {tag:#x}")
        entry = _items(body, what)
        if len(entry) != 2 or entry[0][0] != _OID_TAG:
            raise ParseError(f"{what}: entry is not an (OID, value) pair")
        oid = _decode_oid(entry[0][1])
        if oid in out:
            raise ParseError(f"{what}: OID {oid} appears twice")
        out[oid] = entry[1]
    return out


def _uint(tag_value: tuple[int, bytes], expected_tag: int, field: str, limit: int) -> int:
    tag, value = tag_value
    if tag != expected_tag or not value or value[0] & 0x80 or (len(value) > 1 and value[0] == 0 and not value[1] & 0x80):
        raise ParseError(f"SGX extension {field} is not a non-negative minimal DER integer")
    number = int.from_bytes(value, "big")
    if number > limit:
        raise ParseError(f"SGX extension {field} = {number} exceeds {limit}")
    return number


def _octets(pairs: dict[str, tuple[int, bytes]], oid: str, field: str, size: int) -> bytes:
    if oid not in pairs:
        raise ParseError(f"SGX extension lacks {field} ({oid})")
    tag, value = pairs[oid]
    if tag != _OCTET_STRING or len(value) != size:
        raise ParseError(f"SGX extension {field} must be a {size}-byte OCTET STRING")
    return value


def _boolean(pairs: dict[str, tuple[int, bytes]], oid: str, field: str) -> bool | None:
    if oid not in pairs:
        return None
    tag, value = pairs[oid]
    if tag != _BOOLEAN or value not in (b"\x00", b"\xff"):
        raise ParseError(f"SGX extension {field} must be a DER BOOLEAN")
    return value == b"\xff"


def parse_sgx_extension(der: bytes) -> PckExtension:
    """Decode the DER value of the SGX extension."""
    tag, body, end = _read_tlv(der, 0)
    if tag != _SEQUENCE or end != len(der):
        raise ParseError("SGX extension must be a single DER SEQUENCE")
    top = _pairs(body, "SGX extension")
    base = SGX_EXTENSION_OID
    if f"{base}.2" not in top or top[f"{base}.2"][0] != _SEQUENCE:
        raise ParseError(f"SGX extension lacks the TCB SEQUENCE ({base}.2)")
    tcb = _pairs(top[f"{base}.2"][1], "SGX extension TCB")
    comps = []
    for i in range(1, 17):
        oid = f"{base}.2.{i}"
        if oid not in tcb:
            raise ParseError(f"SGX extension lacks SGX TCB comp {i:02d} SVN ({oid})")
        comps.append(_uint(tcb[oid], _INTEGER, f"SGX TCB comp {i:02d} SVN", 255))
    if f"{base}.2.17" not in tcb:
        raise ParseError(f"SGX extension lacks PCESVN ({base}.2.17)")
    pce_svn = _uint(tcb[f"{base}.2.17"], _INTEGER, "PCESVN", 65535)
    cpu_svn = _octets(tcb, f"{base}.2.18", "CPUSVN", 16)
    if f"{base}.5" not in top:
        raise ParseError(f"SGX extension lacks SGX Type ({base}.5)")
    sgx_type = _uint(top[f"{base}.5"], _ENUMERATED, "SGX Type", 255)
    config = top.get(f"{base}.7")
    config_pairs: dict[str, tuple[int, bytes]] = {}
    if config is not None:
        if config[0] != _SEQUENCE:
            raise ParseError(f"SGX extension Configuration ({base}.7) must be a SEQUENCE")
        config_pairs = _pairs(config[1], "SGX extension Configuration")
    return PckExtension(
        ppid=_octets(top, f"{base}.1", "PPID", 16),
        sgx_tcb_comp_svns=tuple(comps),
        pce_svn=pce_svn,
        cpu_svn=cpu_svn,
        pce_id=_octets(top, f"{base}.3", "PCE-ID", 2),
        fmspc=_octets(top, f"{base}.4", "FMSPC", 6),
        sgx_type=sgx_type,
        platform_instance_id=_octets(top, f"{base}.6", "Platform Instance ID", 16) if f"{base}.6" in top else None,
        dynamic_platform=_boolean(config_pairs, f"{base}.7.1", "Dynamic Platform"),
        cached_keys=_boolean(config_pairs, f"{base}.7.2", "Cached Keys"),
        smt_enabled=_boolean(config_pairs, f"{base}.7.3", "SMT Enabled"),
    )


def pck_extension(cert: x509.Certificate) -> PckExtension:
    """Return the decoded SGX extension of a PCK certificate."""
    try:
        ext = cert.extensions.get_extension_for_oid(_OID)
    except x509.ExtensionNotFound:
        raise ParseError(f"certificate {cert.subject.rfc4514_string()} has no SGX extension ({SGX_EXTENSION_OID})") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise ParseError("SGX extension was decoded unexpectedly by the X.509 library")
    return parse_sgx_extension(value.value)


def pck_ca_type(cert: x509.Certificate) -> str:
    """``"platform"`` or ``"processor"``: which PCK CA issued ``cert`` (selects the PCK CRL)."""
    issuer = cert.issuer.rfc4514_string()
    if "Intel SGX PCK Platform CA" in issuer:
        return "platform"
    if "Intel SGX PCK Processor CA" in issuer:
        return "processor"
    raise ParseError(f"PCK certificate issuer {issuer} is neither the Intel SGX PCK Platform CA nor the Processor CA")
