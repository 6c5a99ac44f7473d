"""Attestation evidence as it travels: the raw quote or report, its certificates, its origin.

:func:`detect_tee` tells the kind of evidence from its bytes alone:

* ``tdx``      — a TDX quote: header version 4 or 5, attestation key type 2 (ECDSA-P256),
  TEE type 0x81 (Intel TDX DCAP Quote Generation Library, "Quote Format");
* ``sim``      — a quote in the TDX layout whose PCK chain ends in cdvm's simulated root;
* ``snp``      — an SEV-SNP ATTESTATION_REPORT: 1184 bytes, version 2, 3 or 5, signature
  algorithm 1 = ECDSA-P384/SHA-384 (AMD SEV-SNP ABI, "ATTESTATION_REPORT Structure");
* ``tdreport`` — a 1024-byte TDREPORT (TDX_CMD_GET_REPORT0): REPORTMACSTRUCT.REPORTTYPE
  type 0x81, subtype 0, version 0 or 1 (Intel TDX Module ABI, REPORTTYPE).

Evidence ships in files and DMs as a small JSON envelope (:meth:`Evidence.to_json`):
``{"cdvm_evidence": 1, "tee", "provider", "raw" (base64), "certs" (base64 or null)}``.
:func:`load_evidence` accepts that envelope, raw quote/report bytes, or their hex text.
"""
from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass

from cryptography import x509

from attest import sim
from attest.errors import ParseError
from attest.tdx import ATT_KEY_TYPE_ECDSA_P256, TEE_TYPE_TDX, parse_quote

ENVELOPE_VERSION = 1
TEE_KINDS = ("tdx", "snp", "tdreport", "sim")
SNP_REPORT_LEN = 1184
SNP_VERSIONS = (2, 3, 5)
SNP_SIG_ALGO_ECDSA_P384_SHA384 = 1
TDREPORT_LEN = 1024
_MAX_EVIDENCE = 1 << 20


@dataclass(frozen=True, slots=True)
class Evidence:
    """One piece of TEE evidence: ``raw`` quote/report, optional ``certs`` (SNP cert table or
    VCEK chain), and the ``provider`` that produced it."""

    tee: str
    raw: bytes
    certs: bytes | None = None
    provider: str = "file"

    def __post_init__(self) -> None:
        if self.tee not in TEE_KINDS:
            raise ParseError(f"unknown TEE kind {self.tee!r} (known: {', '.join(TEE_KINDS)})")

    def to_json(self) -> str:
        """The JSON envelope (base64 fields) used in files and DMs."""
        return json.dumps(
            {
                "cdvm_evidence": ENVELOPE_VERSION,
                "tee": self.tee,
                "provider": self.provider,
                "raw": base64.b64encode(self.raw).decode("ascii"),
                "certs": None if self.certs is None else base64.b64encode(self.certs).decode("ascii"),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Evidence:
        """Parse an envelope; the stated ``tee`` must agree with what the bytes are."""
        try:
            obj = json.loads(text)
        except (ValueError, UnicodeDecodeError) as error:
            raise ParseError(f"evidence envelope is not valid JSON: {error}") from None
        except RecursionError:
            raise ParseError("evidence envelope is not valid JSON: it nests too deeply") from None
        if not isinstance(obj, dict):
            raise ParseError("evidence envelope must be a JSON object")
        version = obj.get("cdvm_evidence")
        if version != ENVELOPE_VERSION:
            raise ParseError(
                f"evidence envelope version is {repr(version)[:40]}; this cdvm reads version {ENVELOPE_VERSION}"
            )
        unknown = set(obj) - {"cdvm_evidence", "tee", "provider", "raw", "certs"}
        if unknown:
            raise ParseError(f"evidence envelope has unknown field(s): {', '.join(sorted(unknown))[:200]}")
        raw = _b64_field(obj, "raw")
        if raw is None:
            raise ParseError("evidence envelope lacks the 'raw' field")
        certs = _b64_field(obj, "certs")
        provider = obj.get("provider", "file")
        if not isinstance(provider, str):
            raise ParseError("evidence envelope field 'provider' must be a string")
        detected = detect_tee(raw)
        stated = obj.get("tee", detected)
        if stated != detected:
            raise ParseError(f"evidence envelope says tee {repr(stated)[:40]} but its bytes are {detected!r} evidence")
        return cls(tee=detected, raw=raw, certs=certs, provider=provider)


def _b64_field(obj: dict, name: str) -> bytes | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ParseError(f"evidence envelope field {name!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError(f"evidence envelope field {name!r} is not valid base64") from None


def _looks_like_tdx_quote(raw: bytes) -> bool:
    if len(raw) < 8:
        return False
    version, key_type, tee_type = struct.unpack_from("<HHI", raw, 0)
    return version in (4, 5) and key_type == ATT_KEY_TYPE_ECDSA_P256 and tee_type == TEE_TYPE_TDX


def _looks_like_snp_report(raw: bytes) -> bool:
    if len(raw) != SNP_REPORT_LEN:
        return False
    version, = struct.unpack_from("<I", raw, 0)
    sig_algo, = struct.unpack_from("<I", raw, 0x34)
    return version in SNP_VERSIONS and sig_algo == SNP_SIG_ALGO_ECDSA_P384_SHA384


def _looks_like_tdreport(raw: bytes) -> bool:
    return len(raw) == TDREPORT_LEN and raw[0] == TEE_TYPE_TDX and raw[1] == 0 and raw[2] in (0, 1)


def _is_simulated_quote(raw: bytes) -> bool:
    """True when the quote's PCK chain ends in the simulated TEE's root."""
    try:
        chain = parse_quote(raw).signature_data.certification.pck_cert_chain
        certificates = x509.load_pem_x509_certificates(chain)
    except (ParseError, ValueError):
        return False
    return bool(certificates) and sim.is_sim_root(certificates[-1])


def detect_tee(raw: bytes) -> str:
    """Return "tdx", "sim", "snp" or "tdreport" from the evidence bytes, or raise ParseError."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ParseError(f"evidence must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if _looks_like_tdx_quote(raw):
        return "sim" if _is_simulated_quote(raw) else "tdx"
    if _looks_like_snp_report(raw):
        return "snp"
    if _looks_like_tdreport(raw):
        return "tdreport"
    raise ParseError(
        f"unrecognised evidence ({len(raw)} bytes): not a TDX quote (v4/v5, TEE type 0x81), "
        "an SEV-SNP report (1184 bytes, version 2/3/5), a TDREPORT (1024 bytes) or a cdvm evidence envelope"
    )


def _maybe_hex(data: bytes) -> bytes | None:
    text = data.strip()
    if text[:2] in (b"0x", b"0X"):
        text = text[2:]
    if not text or len(text) % 2 or any(c not in b"0123456789abcdefABCDEF" for c in text):
        return None
    return bytes.fromhex(text.decode("ascii"))


def load_evidence(data: bytes, *, provider: str = "file") -> Evidence:
    """Evidence from file contents: a JSON envelope, raw quote/report bytes, or their hex."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError(f"evidence must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > _MAX_EVIDENCE:
        raise ParseError(f"evidence is {len(data)} bytes; no quote or report is larger than {_MAX_EVIDENCE}")
    if data.lstrip()[:1] == b"{":
        return Evidence.from_json(data)
    decoded = _maybe_hex(data)
    raw = decoded if decoded is not None else data
    return Evidence(tee=detect_tee(raw), raw=raw, provider=provider)
