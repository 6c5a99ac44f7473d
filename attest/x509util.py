"""Certificate-chain and CRL checks shared by the TDX and SEV-SNP verifiers.

``verify_chain`` checks a leaf-first chain ending in a self-signed root whose SHA-256 is
pinned (RFC 5280 §6.1, reduced to what vendor attestation PKIs use): issuer/subject
linkage and signature of every link, CA basic constraints and path length, key usage
``keyCertSign`` where present, every certificate's validity at ``now``, and revocation
against the supplied CRLs (each CRL's issuer signature and thisUpdate/nextUpdate window).

Expensive work is cached by content hash: a chain and CRL set that verified once is
remembered with the time window in which the verdict holds, and only that window is
checked against ``now`` on later calls.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from attest.errors import ParseError, VerificationError

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]*?)-----END CERTIFICATE-----")
_WHITESPACE = re.compile(rb"\s+")
_CACHE_LIMIT = 256
_SHA256 = hashes.SHA256()
_JUST_BEFORE = timedelta(microseconds=1)
"""A CRL is stale from its nextUpdate on (as rustls-webpki, used by dcap-qvl); certificates
are valid through their notAfter (RFC 5280 §4.1.2.5)."""


def iso(moment: datetime) -> str:
    """``2025-07-19T10:00:35Z``: the form used in every time-related error message."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_pem_chain(data: bytes, what: str) -> tuple[x509.Certificate, ...]:
    """Parse concatenated PEM certificates strictly: only PEM blocks, whitespace and trailing
    NUL bytes are allowed, and each body must be canonical base64 of a DER certificate."""
    if isinstance(data, str):
        data = data.encode("ascii", "replace")
    certs: list[x509.Certificate] = []
    pos = 0
    for match in _PEM_BLOCK.finditer(data):
        if data[pos : match.start()].strip():
            raise ParseError(f"{what}: unexpected bytes before certificate {len(certs) + 1} at offset {pos}")
        body = _WHITESPACE.sub(b"", match.group(1))
        try:
            der = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ParseError(f"{what}: certificate {len(certs) + 1} is not valid base64: {exc}") from None
        if base64.b64encode(der) != body:
            raise ParseError(f"{what}: certificate {len(certs) + 1} is not canonical base64")
        certs.append(load_der_certificate(der, f"{what} certificate {len(certs) + 1}"))
        pos = match.end()
    if data[pos:].rstrip(b"\0").strip():
        raise ParseError(f"{what}: unexpected bytes after the last certificate at offset {pos}")
    if not certs:
        raise ParseError(f"{what}: no PEM certificate found")
    return tuple(certs)


def load_der_certificate(der: bytes, what: str) -> x509.Certificate:
    """Parse one DER certificate, re-encoding it to reject non-DER (BER) input."""
    try:
        cert = x509.load_der_x509_certificate(der)
        if cert.public_bytes(Encoding.DER) != der:
            raise ValueError("not DER-encoded")
        # cryptography parses lazily: force every field now so later use cannot fail.
        cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), cert.extensions, cert.public_key()
        cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion, x509.DuplicateExtension) as exc:
        raise ParseError(f"{what} is not a valid DER X.509 certificate: {exc}") from None
    return cert


def load_crl(data: bytes, what: str) -> x509.CertificateRevocationList:
    """Parse a DER (or PEM) CRL, every field and revoked entry at once."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
        # cryptography parses lazily: force every field now so later use cannot fail.
        crl.issuer.rfc4514_string(), crl.last_update_utc, crl.next_update_utc, crl.extensions
        crl.signature_hash_algorithm
        for revoked in crl:
            revoked.serial_number, revoked.revocation_date_utc, revoked.extensions
    except (ValueError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.InvalidVersion) as exc:
        raise ParseError(f"{what} is not a valid X.509 CRL: {exc}") from None
    return crl


def fingerprint(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the DER encoding."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainVerdict:
    """What a verified chain proved, and when that holds (inclusive window)."""

    root_fingerprint: str
    not_before: datetime
    not_after: datetime


_cache: dict[bytes, ChainVerdict] = {}
_lock = threading.Lock()


_digests: dict[int, tuple[object, bytes]] = {}


def _digest(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    """SHA-256 of a parsed certificate or CRL, memoized per object (the object is kept alive
    in the memo, so its id cannot be reused while the entry exists)."""
    entry = _digests.get(id(obj))
    if entry is not None and entry[0] is obj:
        return entry[1]
    digest = obj.fingerprint(_SHA256)
    if len(_digests) >= 4 * _CACHE_LIMIT:
        _digests.clear()
    _digests[id(obj)] = (obj, digest)
    return digest


def _cache_key(chain: Sequence[x509.Certificate], roots: Collection[str],
               crls: Sequence[x509.CertificateRevocationList], require_crl: bool) -> bytes:
    h = hashlib.sha256()
    for cert in chain:
        h.update(b"C" + _digest(cert))
    for crl in crls:
        h.update(b"R" + _digest(crl))
    for root in sorted(roots):
        h.update(b"P" + root.encode())
    h.update(b"1" if require_crl else b"0")
    return h.digest()


def _verify_signed_by(subject: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    try:
        subject.verify_directly_issued_by(issuer)
    except (ValueError, TypeError) as exc:
        raise VerificationError(f"{what}: {exc}") from None
    except (InvalidSignature, UnsupportedAlgorithm):
        raise VerificationError(f"{what}: signature does not verify with the issuer's key") from None


def _check_ca(cert: x509.Certificate, below: int, what: str) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise VerificationError(f"{what} has no BasicConstraints extension but issues certificates") from None
    if not bc.ca:
        raise VerificationError(f"{what} is not a CA (BasicConstraints cA=false) but issues certificates")
    if bc.path_length is not None and below > bc.path_length:
        raise VerificationError(f"{what} allows path length {bc.path_length} but has {below} CA certificate(s) below it")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not ku.key_cert_sign:
        raise VerificationError(f"{what} key usage does not allow keyCertSign")


def _check_crl(crl: x509.CertificateRevocationList, issuer: x509.Certificate, what: str) -> tuple[datetime, datetime]:
    try:
        valid = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise VerificationError(f"{what}: CRL signature does not verify with {issuer.subject.rfc4514_string()}")
    if crl.next_update_utc is None:
        raise VerificationError(f"{what}: CRL has no nextUpdate")
    return crl.last_update_utc, crl.next_update_utc - _JUST_BEFORE


def verify_chain(
    chain: Sequence[x509.Certificate],
    trusted_roots: Collection[str],
    now: datetime,
    crls: Sequence[x509.CertificateRevocationList] = (),
    *,
    require_crl: bool = False,
    what: str = "certificate chain",
) -> ChainVerdict:
    """Verify ``chain`` (leaf first, root last) against pinned root fingerprints at ``now``.

    With ``require_crl`` every certificate (the root included) must be covered by a CRL
    from ``crls`` issued by its issuer, as Intel's QVL requires for PCK chains.
    """
    if now.tzinfo is None:
        raise TypeError("now must be timezone-aware")
    if len(chain) < 2:
        raise VerificationError(f"{what} has {len(chain)} certificate(s); a leaf and its root are required")
    key = _cache_key(chain, trusted_roots, crls, require_crl)
    with _lock:
        verdict = _cache.get(key)
    if verdict is None:
        verdict = _verify_uncached(chain, trusted_roots, crls, require_crl, what)
        with _lock:
            if len(_cache) >= _CACHE_LIMIT:
                _cache.clear()
            _cache[key] = verdict
    _check_window(chain, crls, verdict, now, what)
    return verdict


def _check_window(chain: Sequence[x509.Certificate], crls: Sequence[x509.CertificateRevocationList],
                  verdict: ChainVerdict, now: datetime, what: str) -> None:
    if verdict.not_before <= now <= verdict.not_after:
        return
    for cert in chain:
        if now < cert.not_valid_before_utc:
            raise VerificationError(
                f"{what}: certificate {cert.subject.rfc4514_string()} is not valid before "
                f"{iso(cert.not_valid_before_utc)} (now {iso(now)})")
        if now > cert.not_valid_after_utc:
            raise VerificationError(
                f"{what}: certificate {cert.subject.rfc4514_string()} expired at "
                f"{iso(cert.not_valid_after_utc)} (now {iso(now)})")
    for crl in crls:
        if now < crl.last_update_utc:
            raise VerificationError(
                f"{what}: CRL from {crl.issuer.rfc4514_string()} is not valid before "
                f"{iso(crl.last_update_utc)} (now {iso(now)})")
        if crl.next_update_utc is not None and now >= crl.next_update_utc:
            raise VerificationError(
                f"{what}: CRL from {crl.issuer.rfc4514_string()} expired at "
                f"{iso(crl.next_update_utc)} (now {iso(now)})")
    raise VerificationError(f"{what} is not valid at {iso(now)}")


def _verify_uncached(chain: Sequence[x509.Certificate], trusted_roots: Collection[str],
                     crls: Sequence[x509.CertificateRevocationList], require_crl: bool, what: str) -> ChainVerdict:
    root = chain[-1]
    root_fp = fingerprint(root)
    if root_fp not in trusted_roots:
        raise VerificationError(
            f"{what} does not end at a pinned root: its last certificate "
            f"{root.subject.rfc4514_string()} has SHA-256 {root_fp}")
    _verify_signed_by(root, root, f"{what}: root {root.subject.rfc4514_string()} is not self-signed")
    starts = [c.not_valid_before_utc for c in chain]
    ends = [c.not_valid_after_utc for c in chain]
    for depth, cert in enumerate(chain[:-1]):
        issuer = chain[depth + 1]
        name = cert.subject.rfc4514_string()
        _verify_signed_by(cert, issuer, f"{what}: {name} is not issued by {issuer.subject.rfc4514_string()}")
        _check_ca(issuer, depth, f"{what}: {issuer.subject.rfc4514_string()}")
    by_issuer: dict[bytes, list[x509.CertificateRevocationList]] = {}
    for crl in crls:
        by_issuer.setdefault(crl.issuer.public_bytes(), []).append(crl)
    used: set[int] = set()
    for depth, cert in enumerate(chain):
        issuer = chain[min(depth + 1, len(chain) - 1)]
        candidates = by_issuer.get(cert.issuer.public_bytes(), [])
        if not candidates and require_crl:
            raise VerificationError(
                f"{what}: no CRL from {cert.issuer.rfc4514_string()} to check {cert.subject.rfc4514_string()}")
        for crl in candidates:
            if id(crl) not in used:
                start, end = _check_crl(crl, issuer, what)
                starts.append(start)
                ends.append(end)
                used.add(id(crl))
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                raise VerificationError(
                    f"{what}: certificate {cert.subject.rfc4514_string()} (serial {cert.serial_number:#x}) "
                    f"is revoked by the CRL of {crl.issuer.rfc4514_string()}")
    return ChainVerdict(root_fingerprint=root_fp, not_before=max(starts), not_after=min(ends))


def public_key_p256(x_y: bytes, what: str) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from its 64-byte raw x‖y encoding."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x_y)
    except ValueError:
        raise VerificationError(f"{what} is not a valid P-256 point") from None


def raw_ecdsa_to_der(signature: bytes) -> bytes:
    """Convert a fixed-size r‖s ECDSA signature to DER (for cryptography's verify)."""
    half = len(signature) // 2
    return encode_dss_signature(int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big"))

