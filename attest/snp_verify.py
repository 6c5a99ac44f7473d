"""SEV-SNP report verification: V(C|L)EK → ASK/ASVK → pinned ARK, then the report signature.

A pure function of (report, certificates, CRL, now), following AMD's KDS specification
(57230: certificate profiles and the VCEK/VLEK X.509 extensions) and the SNP ABI
specification (56860: report signature), with the checks google/go-sev-guest and
virtee/sev make:

1. The ARK's SHA-256 is pinned (:data:`attest.roots.AMD_ARK_SHA256`); it names the product
   (Milan, Genoa, Turin). The ARK is self-signed; the ASK (or the ASVK, for a VLEK) is signed
   by it; the VCEK (or VLEK) by the ASK/ASVK. Every signature is RSASSA-PSS with SHA-384,
   MGF1-SHA-384 and a 48-byte salt, checked with exactly those parameters.
2. Names, CA constraints and CRL distribution points are AMD's: ``ARK-<product>``,
   ``SEV-<product>`` / ``SEV-VLEK-<product>``, ``SEV-VCEK`` / ``SEV-VLEK``, all under
   ``OU=Engineering, C=US, L=Santa Clara, ST=CA, O=Advanced Micro Devices``.
3. Every certificate is valid at ``now``; with a CRL (from the KDS ``crl`` endpoint), the CRL
   is signed by the ARK, current at ``now``, and does not revoke the ASK/ASVK.
4. The V(C|L)EK is an ECDSA P-384 key whose KDS extensions parse strictly: productName of
   the chain's product, SPLs (1.3.6.1.4.1.3704.1.3.x), hwID (1.3.6.1.4.1.3704.1.4: 64 bytes,
   8 on Turin) on a VCEK, cspID (…1.5) and no hwID on a VLEK; no other extension but the
   authority key identifier.
5. The report's SIGNING_KEY matches the certificate kind, its CPUID product (v3+) matches
   the chain's (Turin requires v3+), REPORTED_TCB equals the certified TCB byte for byte, and
   a VCEK's hwID equals CHIP_ID (Turin: the first 8 bytes, the rest zero) unless CHIP_ID is
   masked (all zero), as go-sev-guest's ``validate`` allows.
6. The ECDSA P-384 signature (r, s little-endian at 0x2A0) verifies over SHA-384 of
   bytes [0x000, 0x2A0).

Verified chains are cached by the SHA-256 of their DER bytes and pinned roots, so many
reports from one chip cost one ECDSA verification each; validity windows and the CRL are
re-checked against ``now`` on every call.
"""
from __future__ import annotations

import hashlib
import re
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, NameOID, SignatureAlgorithmOID

from attest.errors import ParseError, VerificationError
from attest.roots import AMD_ARK_SHA256
from attest.snp import SigningKey, SnpReport, TcbParts, TcbVersion, parse_report
from attest.snp_certs import SnpCertChain
from attest.x509util import fingerprint, iso, load_crl, load_der_certificate

KDS_OID_PREFIX = "1.3.6.1.4.1.3704.1."
OID_STRUCT_VERSION = KDS_OID_PREFIX + "1"
OID_PRODUCT_NAME = KDS_OID_PREFIX + "2"
OID_BL_SPL = KDS_OID_PREFIX + "3.1"
OID_TEE_SPL = KDS_OID_PREFIX + "3.2"
OID_SNP_SPL = KDS_OID_PREFIX + "3.3"
OID_SPL4 = KDS_OID_PREFIX + "3.4"
OID_SPL5 = KDS_OID_PREFIX + "3.5"
OID_SPL6 = KDS_OID_PREFIX + "3.6"
OID_SPL7 = KDS_OID_PREFIX + "3.7"
OID_UCODE_SPL = KDS_OID_PREFIX + "3.8"
OID_FMC_SPL = KDS_OID_PREFIX + "3.9"
OID_HWID = KDS_OID_PREFIX + "4"
OID_CSP_ID = KDS_OID_PREFIX + "5"
_KDS_OIDS = {OID_STRUCT_VERSION, OID_PRODUCT_NAME, OID_BL_SPL, OID_TEE_SPL, OID_SNP_SPL, OID_SPL4, OID_SPL5,
             OID_SPL6, OID_SPL7, OID_UCODE_SPL, OID_FMC_SPL, OID_HWID, OID_CSP_ID}

CHIP_ID_LEN = 64
TURIN_HWID_LEN = 8
KDS_CRL_URL = "https://kdsintf.amd.com/{kind}/v1/{product}/crl"
_PSS_SHA384_ALGORITHMS = (
    # AlgorithmIdentifier{rsassaPss, {SHA-384, MGF1(SHA-384), saltLength 48}}, with and without
    # the explicit default trailerField: AMD's ARK/ASK/VCEK use the first, VLEKs and Turin VCEKs
    # the second.
    bytes.fromhex("304606092a864886f70d01010a3039a00f300d06096086480165030402020500a11c301a06092a86"
                  "4886f70d010108300d06096086480165030402020500a203020130a303020101"),
    bytes.fromhex("304106092a864886f70d01010a3034a00f300d06096086480165030402020500a11c301a06092a86"
                  "4886f70d010108300d06096086480165030402020500a203020130"),
)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_SHA384 = hashes.SHA384()
_ECDSA_SHA384 = ec.ECDSA(hashes.SHA384())
_AMD_NAME = {
    NameOID.ORGANIZATIONAL_UNIT_NAME: "Engineering",
    NameOID.COUNTRY_NAME: "US",
    NameOID.LOCALITY_NAME: "Santa Clara",
    NameOID.STATE_OR_PROVINCE_NAME: "CA",
    NameOID.ORGANIZATION_NAME: "Advanced Micro Devices",
}
_NAME_LABELS = {NameOID.ORGANIZATIONAL_UNIT_NAME: "OU", NameOID.COUNTRY_NAME: "C", NameOID.LOCALITY_NAME: "L",
                NameOID.STATE_OR_PROVINCE_NAME: "ST", NameOID.ORGANIZATION_NAME: "O", NameOID.COMMON_NAME: "CN"}
_PRODUCT_NAME = re.compile(r"(Milan|Genoa|Turin)(?:-([A-Z][0-9]))?")
_CACHE_LIMIT = 256
_T = TypeVar("_T")


class SnpVerificationError(VerificationError):
    """An SEV-SNP report or its certificates did not verify."""


class UntrustedRootError(SnpVerificationError):
    """The chain does not end at a pinned AMD Root Key."""


class CertificateChainError(SnpVerificationError):
    """A certificate is not what AMD issues, or is not signed by its issuer."""


class CertificateValidityError(SnpVerificationError):
    """A certificate or the CRL is not valid at the verification time."""


class RevokedError(SnpVerificationError):
    """AMD's CRL revokes the ASK/ASVK."""


class SigningKeyMismatchError(SnpVerificationError):
    """The report's SIGNING_KEY does not name the kind of certificate supplied."""


class ProductMismatchError(SnpVerificationError):
    """The report's CPUID product differs from the certificate chain's product."""


class TcbMismatchError(SnpVerificationError):
    """REPORTED_TCB differs from the TCB the V(C|L)EK certifies."""


class ChipIdMismatchError(SnpVerificationError):
    """CHIP_ID differs from the VCEK's hwID."""


class ReportSignatureError(SnpVerificationError):
    """The report signature does not verify with the V(C|L)EK."""


@dataclass(frozen=True, slots=True)
class VekExtensions:
    """The KDS extensions of a VCEK or VLEK certificate (KDS spec, "VCEK Certificate")."""

    struct_version: int
    product_name: str
    product: str
    tcb: TcbParts
    hwid: bytes | None
    csp_id: str | None

    @property
    def stepping(self) -> str | None:
        """The silicon stepping in productName ("B0" in "Milan-B0"), if present."""
        match = _PRODUCT_NAME.fullmatch(self.product_name)
        return match.group(2) if match else None


@dataclass(frozen=True, slots=True)
class VerifiedChain:
    """A V(C|L)EK chain that verified: its product, key kind and extensions."""

    product: str
    signing_key: str
    extensions: VekExtensions
    public_key: ec.EllipticCurvePublicKey = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class SnpVerification:
    """A report whose signature and certificate chain verified at a given time.

    ``chip_id_checked`` is False when CHIP_ID was masked (all zero) so that the VCEK's hwID
    could not be compared, and for VLEK-signed reports (a VLEK has no hwID).
    """

    product: str
    signing_key: str
    reported_tcb: TcbParts
    report: SnpReport
    extensions: VekExtensions
    chip_id_checked: bool


@dataclass(frozen=True, slots=True)
class _Window:
    role: str
    subject: str
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True, slots=True)
class _ChainFacts:
    verified: VerifiedChain
    windows: tuple[_Window, ...]
    ark_subject: x509.Name
    ark_key: rsa.RSAPublicKey
    ark_fingerprint: str
    intermediate_serial: int
    intermediate_role: str


@dataclass(frozen=True, slots=True)
class _CrlFacts:
    this_update: datetime
    next_update: datetime
    revoked: frozenset[int]


_chains: dict[bytes, _ChainFacts] = {}
_crls: dict[bytes, _CrlFacts] = {}
_lock = threading.Lock()


def load_certificate(der: bytes, role: str) -> x509.Certificate:
    """Parse one strict-DER AMD certificate; ``role`` names it in errors."""
    if not isinstance(der, (bytes, bytearray)):
        raise ParseError(f"the {role} certificate must be DER bytes, got {type(der).__name__}")
    with warnings.catch_warnings():
        # AMD issues every VCEK/VLEK with serial number 0, which RFC 5280 disallows; malformed
        # names warn too. Neither may reach the user's terminal: errors below say what is wrong.
        warnings.simplefilter("ignore")
        try:
            cert = load_der_certificate(bytes(der), f"{role} certificate")
            # cryptography decodes these fields lazily; decode them now so that a malformed
            # field is a ParseError here and not an untyped exception later.
            cert.version, cert.serial_number, cert.subject, cert.issuer  # noqa: B018
            cert.not_valid_before_utc, cert.not_valid_after_utc  # noqa: B018
            cert.signature_hash_algorithm, cert.public_key()  # noqa: B018
        except (ValueError, x509.InvalidVersion, x509.DuplicateExtension, UnsupportedAlgorithm) as error:
            raise ParseError(f"{role} certificate is malformed: {error}") from None
    return cert


def _der_element(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """(value start, end) of the DER element at ``pos``."""
    if pos + 2 > len(data):
        raise CertificateChainError(f"{what}: truncated DER")
    length, start = data[pos + 1], pos + 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or start + count > len(data):
            raise CertificateChainError(f"{what}: bad DER length")
        length, start = int.from_bytes(data[start:start + count], "big"), start + count
    if start + length > len(data):
        raise CertificateChainError(f"{what}: DER element overruns its container")
    return start, start + length


def _check_signature_algorithm(cert: x509.Certificate, role: str) -> None:
    """Both AlgorithmIdentifiers (the certificate's and the one inside tbsCertificate) are
    exactly RSASSA-PSS with SHA-384, MGF1-SHA-384, salt 48, as AMD encodes them, and the
    signature BIT STRING has no unused bits."""
    der = cert.public_bytes(Encoding.DER)
    tbs = cert.tbs_certificate_bytes
    body, _ = _der_element(der, 0, role)
    outer_start = body + len(tbs)
    outer_end = _der_element(der, outer_start, role)[1]
    outer = der[outer_start:outer_end]
    bits_start, bits_end = _der_element(der, outer_end, role)
    if der[outer_end] != 0x03 or bits_end != len(der) or der[bits_start:bits_start + 1] != b"\x00":
        raise CertificateChainError(f"{role} certificate signature is not a whole-octet BIT STRING")
    tbs_body, _ = _der_element(tbs, 0, role)
    if tbs[tbs_body:tbs_body + 1] != b"\xa0":
        raise CertificateChainError(f"{role} certificate is not X.509 v3")
    serial_start = _der_element(tbs, tbs_body, role)[1]
    inner_start = _der_element(tbs, serial_start, role)[1]
    inner = tbs[inner_start:_der_element(tbs, inner_start, role)[1]]
    if outer not in _PSS_SHA384_ALGORITHMS or inner != outer:
        raise CertificateChainError(
            f"{role} certificate signature algorithm is {cert.signature_algorithm_oid.dotted_string} "
            f"({outer.hex()}); AMD certificates use RSASSA-PSS with SHA-384, MGF1-SHA-384 and a 48-byte salt")


def _check_pss(cert: x509.Certificate, issuer_key: object, role: str, issuer_role: str) -> None:
    """``cert`` is signed by ``issuer_key`` with RSASSA-PSS/SHA-384/MGF1-SHA-384/salt 48."""
    _check_signature_algorithm(cert, role)
    if not isinstance(issuer_key, rsa.RSAPublicKey):
        raise CertificateChainError(f"{issuer_role} key is not RSA; AMD signs certificates with RSA keys")
    try:
        issuer_key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, _SHA384)
    except InvalidSignature:
        raise CertificateChainError(
            f"{role} certificate signature does not verify with the {issuer_role} key "
            "(RSASSA-PSS, SHA-384, salt 48)") from None


def _check_amd_name(name: x509.Name, common_name: str, what: str) -> None:
    expected = {**_AMD_NAME, NameOID.COMMON_NAME: common_name}
    seen = [attribute.oid for attribute in name]
    if sorted(o.dotted_string for o in seen) != sorted(o.dotted_string for o in expected):
        raise CertificateChainError(
            f"{what} is {name.rfc4514_string()!r}; AMD uses CN={common_name} under "
            "OU=Engineering, C=US, L=Santa Clara, ST=CA, O=Advanced Micro Devices")
    for oid, value in expected.items():
        if name.get_attributes_for_oid(oid)[0].value != value:
            raise CertificateChainError(
                f"{what} is {name.rfc4514_string()!r}; expected {_NAME_LABELS[oid]}={value}")


def _check_ca(cert: x509.Certificate, role: str, *, crl_sign: bool, crl_url: str) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound as exc:
        raise CertificateChainError(f"{role} certificate lacks extension {exc.oid.dotted_string}") from None
    if not constraints.ca or (role != "ARK" and constraints.path_length not in (None, 0)):
        raise CertificateChainError(f"{role} certificate is not a CA certificate of AMD's profile ({constraints})")
    if not usage.key_cert_sign or (crl_sign and not usage.crl_sign):
        raise CertificateChainError(f"{role} certificate key usage does not allow signing certificates/CRLs")
    urls = [name.value for point in points for name in (point.full_name or ())]
    if urls != [crl_url]:
        raise CertificateChainError(f"{role} certificate CRL distribution points are {urls}, expected [{crl_url}]")


def _der_u8(value: bytes, what: str) -> int:
    """A DER INTEGER in 0..255 (KDS SPL extensions)."""
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2 or value[1] > 2:
        raise CertificateChainError(f"{what} extension is not a small DER INTEGER: {value.hex()}")
    body = value[2:]
    if body[0] & 0x80 or (len(body) == 2 and (body[0] != 0 or not body[1] & 0x80)):
        raise CertificateChainError(f"{what} extension is not a minimal non-negative INTEGER: {value.hex()}")
    return int.from_bytes(body, "big")


def _der_ia5(value: bytes, what: str) -> str:
    if len(value) < 2 or value[0] != 0x16 or value[1] != len(value) - 2 or value[1] > 0x7F:
        raise CertificateChainError(f"{what} extension is not a DER IA5String: {value.hex()}")
    text = value[2:]
    if not all(0x20 <= b < 0x7F for b in text):
        raise CertificateChainError(f"{what} extension holds non-printable characters")
    return text.decode("ascii")


def _hwid(value: bytes, size: int) -> bytes:
    """hwID: KDS stores the raw bytes (no DER tag); accept a DER OCTET STRING as well."""
    if len(value) == size:
        return value
    if len(value) == size + 2 and value[0] == 0x04 and value[1] == size:
        return value[2:]
    raise CertificateChainError(f"hwID extension is {len(value)} bytes, expected {size}")


def parse_vek_extensions(cert: x509.Certificate, signing_key: SigningKey) -> VekExtensions:
    """The KDS extensions of a VCEK/VLEK certificate, strictly (go-sev-guest ``kds`` rules)."""
    role = signing_key.name
    values: dict[str, bytes] = {}
    for extension in cert.extensions:
        oid = extension.oid.dotted_string
        if extension.oid == ExtensionOID.AUTHORITY_KEY_IDENTIFIER:
            continue
        if oid not in _KDS_OIDS or not isinstance(extension.value, x509.UnrecognizedExtension):
            raise CertificateChainError(f"{role} certificate has an unexpected extension {oid}")
        values[oid] = extension.value.value

    def spl(oid: str, name: str) -> int:
        if oid not in values:
            raise CertificateChainError(f"{role} certificate lacks the {name} extension ({oid})")
        return _der_u8(values[oid], name)

    product_name = _der_ia5(values.get(OID_PRODUCT_NAME, b""), "productName")
    match = _PRODUCT_NAME.fullmatch(product_name)
    if match is None:
        raise CertificateChainError(f"{role} certificate productName {product_name!r} is not a known SEV-SNP product")
    product = match.group(1)
    turin = product == "Turin"
    reserved = bytes(spl(oid, f"SPL{n}") for n, oid in ((5, OID_SPL5), (6, OID_SPL6), (7, OID_SPL7)))
    if not turin:
        reserved = bytes([spl(OID_SPL4, "SPL4")]) + reserved
    tcb = TcbParts(
        product=product,
        bootloader=spl(OID_BL_SPL, "blSPL"),
        tee=spl(OID_TEE_SPL, "teeSPL"),
        snp=spl(OID_SNP_SPL, "snpSPL"),
        microcode=spl(OID_UCODE_SPL, "ucodeSPL"),
        fmc=spl(OID_FMC_SPL, "fmcSPL") if turin else None,
        reserved=reserved,
    )
    hwid = _hwid(values[OID_HWID], TURIN_HWID_LEN if turin else CHIP_ID_LEN) if OID_HWID in values else None
    csp_id = _der_ia5(values[OID_CSP_ID], "cspID") if OID_CSP_ID in values else None
    if signing_key is SigningKey.VCEK and (hwid is None or csp_id is not None):
        raise CertificateChainError("VCEK certificate must carry a hwID extension and no cspID")
    if signing_key is SigningKey.VLEK and (csp_id is None or hwid is not None):
        raise CertificateChainError("VLEK certificate must carry a cspID extension and no hwID")
    return VekExtensions(
        struct_version=spl(OID_STRUCT_VERSION, "structVersion"),
        product_name=product_name,
        product=product,
        tcb=tcb,
        hwid=hwid,
        csp_id=csp_id,
    )


def _verify_chain_uncached(chain: SnpCertChain, ark_fingerprints: Mapping[str, str]) -> _ChainFacts:
    kind = chain.signing_key
    if kind not in (SigningKey.VCEK, SigningKey.VLEK):
        raise SigningKeyMismatchError(f"a certificate chain is for a VCEK or a VLEK, not {kind.name}")
    vlek = kind is SigningKey.VLEK
    intermediate_role = "ASVK" if vlek else "ASK"
    vek = load_certificate(chain.vek, kind.name)
    ask = load_certificate(chain.ask, intermediate_role)
    ark = load_certificate(chain.ark, "ARK")

    ark_fp = fingerprint(ark)
    product = next((name for name, pinned in ark_fingerprints.items() if pinned == ark_fp), None)
    if product is None:
        raise UntrustedRootError(
            f"the ARK {ark.subject.rfc4514_string()!r} (SHA-256 {ark_fp}) is not a pinned AMD root; "
            "pinned: " + ", ".join(f"{name} {pinned[:16]}…" for name, pinned in ark_fingerprints.items()))
    ark_key = ark.public_key()
    if not isinstance(ark_key, rsa.RSAPublicKey):
        raise CertificateChainError("ARK key is not RSA")
    _check_amd_name(ark.subject, f"ARK-{product}", "ARK subject")
    if ark.issuer != ark.subject:
        raise CertificateChainError("ARK certificate is not self-issued")
    _check_pss(ark, ark_key, "ARK", "ARK")
    _check_ca(ark, "ARK", crl_sign=True, crl_url=KDS_CRL_URL.format(kind="vcek", product=product))

    intermediate_cn = f"SEV-VLEK-{product}" if vlek else f"SEV-{product}"
    _check_amd_name(ask.subject, intermediate_cn, f"{intermediate_role} subject")
    if ask.issuer != ark.subject:
        raise CertificateChainError(f"{intermediate_role} issuer {ask.issuer.rfc4514_string()!r} is not the ARK")
    _check_pss(ask, ark_key, intermediate_role, "ARK")
    _check_ca(ask, intermediate_role, crl_sign=False,
              crl_url=KDS_CRL_URL.format(kind="vlek" if vlek else "vcek", product=product))

    if vek.version is not x509.Version.v3:
        raise CertificateChainError(f"{kind.name} certificate is X.509 {vek.version.name}, expected v3")
    _check_amd_name(vek.subject, f"SEV-{kind.name}", f"{kind.name} subject")
    if vek.issuer != ask.subject:
        raise CertificateChainError(
            f"{kind.name} issuer {vek.issuer.rfc4514_string()!r} is not the {intermediate_role} "
            f"{ask.subject.rfc4514_string()!r}")
    _check_pss(vek, ask.public_key(), kind.name, intermediate_role)
    public_key = vek.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP384R1):
        raise CertificateChainError(f"{kind.name} key is not an ECDSA P-384 key")
    extensions = parse_vek_extensions(vek, kind)
    if extensions.product != product:
        raise ProductMismatchError(
            f"{kind.name} productName {extensions.product_name!r} does not belong to the {product} chain")

    windows = tuple(
        _Window(role, cert.subject.rfc4514_string(), cert.not_valid_before_utc, cert.not_valid_after_utc)
        for role, cert in ((kind.name, vek), (intermediate_role, ask), ("ARK", ark)))
    return _ChainFacts(
        verified=VerifiedChain(product, kind.name, extensions, public_key),
        windows=windows,
        ark_subject=ark.subject,
        ark_key=ark_key,
        ark_fingerprint=ark_fp,
        intermediate_serial=ask.serial_number,
        intermediate_role=intermediate_role,
    )


def _cached(cache: dict[bytes, _T], key: bytes) -> _T | None:
    with _lock:
        return cache.get(key)


def _remember(cache: dict[bytes, _T], key: bytes, value: _T) -> None:
    with _lock:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[key] = value


def _chain_key(chain: SnpCertChain, ark_fingerprints: Mapping[str, str]) -> bytes:
    digest = hashlib.sha256(bytes([chain.signing_key]))
    for part in (chain.vek, chain.ask, chain.ark):
        digest.update(len(part).to_bytes(4, "big") + hashlib.sha256(part).digest())
    for product, pinned in sorted(ark_fingerprints.items()):
        digest.update(f"{product}={pinned};".encode())
    return digest.digest()


def _check_time(now: datetime) -> None:
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise SnpVerificationError(f"verification time must be a timezone-aware datetime, got {now!r}")


def _verify_crl(parsed: x509.CertificateRevocationList, facts: _ChainFacts) -> _CrlFacts:
    """The CRL is issued and RSASSA-PSS-signed by the ARK and has a nextUpdate."""
    try:
        if parsed.issuer != facts.ark_subject:
            raise CertificateChainError(f"the CRL is issued by {parsed.issuer.rfc4514_string()!r}, not by the ARK")
        if parsed.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
            raise CertificateChainError("the CRL is not signed with RSASSA-PSS")
        try:
            facts.ark_key.verify(parsed.signature, parsed.tbs_certlist_bytes, _PSS, _SHA384)
        except InvalidSignature:
            raise CertificateChainError("the CRL signature does not verify with the ARK key") from None
        if parsed.next_update_utc is None:
            raise CertificateChainError("the CRL has no nextUpdate")
        return _CrlFacts(parsed.last_update_utc, parsed.next_update_utc,
                         frozenset(entry.serial_number for entry in parsed))
    except (ValueError, UnsupportedAlgorithm) as error:
        raise ParseError(f"the AMD CRL is malformed: {error}") from None


def _check_crl(crl: bytes, facts: _ChainFacts, now: datetime) -> None:
    if not isinstance(crl, (bytes, bytearray)):
        raise ParseError(f"the AMD CRL must be DER bytes, got {type(crl).__name__}")
    key = hashlib.sha256(facts.ark_fingerprint.encode() + bytes(crl)).digest()
    crl_facts = _cached(_crls, key)
    if crl_facts is None:
        crl_facts = _verify_crl(load_crl(bytes(crl), "AMD CRL"), facts)
        _remember(_crls, key, crl_facts)
    if now < crl_facts.this_update:
        raise CertificateValidityError(f"the AMD CRL is not valid before {iso(crl_facts.this_update)} (now {iso(now)})")
    if now > crl_facts.next_update:
        raise CertificateValidityError(
            f"the AMD CRL expired at {iso(crl_facts.next_update)} (now {iso(now)}); fetch a fresh one from the KDS")
    if facts.intermediate_serial in crl_facts.revoked:
        raise RevokedError(
            f"the AMD CRL revokes the {facts.intermediate_role} (serial {facts.intermediate_serial:#x})")


def verify_vek_chain(
    chain: SnpCertChain,
    now: datetime,
    *,
    crl: bytes | None = None,
    ark_fingerprints: Mapping[str, str] = AMD_ARK_SHA256,
) -> VerifiedChain:
    """Verify a VCEK/VLEK → ASK/ASVK → ARK chain at ``now`` (see the module docstring)."""
    _check_time(now)
    if not isinstance(chain, SnpCertChain) or not isinstance(chain.signing_key, SigningKey):
        raise ParseError(f"expected an SnpCertChain, got {chain!r:.80}")
    for role, der in (("V(C|L)EK", chain.vek), ("ASK/ASVK", chain.ask), ("ARK", chain.ark)):
        if not isinstance(der, (bytes, bytearray)):
            raise ParseError(f"the {role} certificate must be DER bytes, got {type(der).__name__}")
    key = _chain_key(chain, ark_fingerprints)
    facts = _cached(_chains, key)
    if facts is None:
        facts = _verify_chain_uncached(chain, ark_fingerprints)
        _remember(_chains, key, facts)
    for window in facts.windows:
        if now < window.not_before:
            raise CertificateValidityError(
                f"the {window.role} certificate ({window.subject}) is not valid before "
                f"{iso(window.not_before)} (now {iso(now)})")
        if now > window.not_after:
            raise CertificateValidityError(
                f"the {window.role} certificate ({window.subject}) expired at {iso(window.not_after)} (now {iso(now)})")
    if crl is not None:
        _check_crl(crl, facts, now)
    return facts.verified


def _check_chip_id(report: SnpReport, extensions: VekExtensions) -> bool:
    """CHIP_ID against the VCEK hwID; False when CHIP_ID is masked and cannot be compared."""
    if report.chip_id_masked:
        return False
    hwid = extensions.hwid or b""
    if extensions.product == "Turin":
        matches = report.chip_id[:TURIN_HWID_LEN] == hwid and not any(report.chip_id[TURIN_HWID_LEN:])
    else:
        matches = report.chip_id == hwid
    if not matches:
        raise ChipIdMismatchError(
            f"report CHIP_ID {report.chip_id.hex()} is not the VCEK's hwID {hwid.hex()}: "
            "the VCEK belongs to another chip")
    return True


def verify_report(
    report: SnpReport | bytes,
    chain: SnpCertChain,
    now: datetime,
    *,
    crl: bytes | None = None,
    ark_fingerprints: Mapping[str, str] = AMD_ARK_SHA256,
) -> SnpVerification:
    """Verify an SEV-SNP report against its certificate chain at ``now``."""
    if not isinstance(report, SnpReport):
        report = parse_report(report)
    _check_time(now)
    if report.signing_key is SigningKey.NONE:
        raise ReportSignatureError("the report is unsigned (SIGNING_KEY = 7, no endorsement key)")
    if not isinstance(chain, SnpCertChain):
        raise ParseError(f"expected an SnpCertChain, got {type(chain).__name__}")
    if report.signing_key is not chain.signing_key:
        raise SigningKeyMismatchError(
            f"the report is signed by its {report.signing_key.name} but a {chain.signing_key.name} "
            "certificate chain was supplied")
    verified = verify_vek_chain(chain, now, crl=crl, ark_fingerprints=ark_fingerprints)
    product = verified.product
    if report.version >= 3 and report.product != product:
        raise ProductMismatchError(
            f"the report's CPUID family/model {report.cpuid_fam_id:#x}/{report.cpuid_mod_id:#x} "
            f"is {report.product or 'not a known SEV-SNP product'}, but the certificates are for {product}")
    if product == "Turin" and report.version < 3:
        raise ProductMismatchError(f"a Turin chain cannot sign a version {report.version} report")
    reported = report.reported_tcb.decode(product)
    certified = verified.extensions.tcb
    if report.reported_tcb != TcbVersion.compose(certified):
        raise TcbMismatchError(
            f"REPORTED_TCB {report.reported_tcb} ({reported}) differs from the TCB the "
            f"{verified.signing_key} certifies ({certified}); fetch the {verified.signing_key} for this TCB")
    chip_id_checked = verified.signing_key == "VCEK" and _check_chip_id(report, verified.extensions)
    try:
        verified.public_key.verify(
            encode_dss_signature(report.signature_r, report.signature_s), report.signed_bytes, _ECDSA_SHA384)
    except InvalidSignature:
        raise ReportSignatureError(
            f"the report signature does not verify with the {verified.signing_key} key: "
            "the report was altered or signed by another key") from None
    return SnpVerification(
        product=product,
        signing_key=verified.signing_key,
        reported_tcb=reported,
        report=report,
        extensions=verified.extensions,
        chip_id_checked=chip_id_checked,
    )
