"""Intel TDX quote verification: a pure function of (quote, collateral, trusted root, now).

Order as Intel's QVL and dcap-qvl: header → PCK certificate chain to the pinned Intel SGX
Root CA (validity at ``now``, PCK CRL and root CA CRL) → QE report signature by the PCK
key → QE REPORTDATA = SHA-256(attestation key ‖ QE auth data) ‖ 32 zero bytes → quote
signature by the attestation key over header+body → TCB Info and QE Identity signatures
(TCB signing chain to the same root) and validity windows → FMSPC / PCE-ID match → TCB
level (first level whose SGX comp SVNs, PCESVN and TDX comp SVNs are all ≤ the platform's)
and TDX module identity (TCB Info v3 ``tdxModuleIdentities``, Intel's TdxModuleCheck) →
QE identity (MRSIGNER, ISVPRODID, masked MISCSELECT/ATTRIBUTES, ISVSVN → QE TCB status).

Whether a status is acceptable is the policy's decision; "Revoked" and "no matching TCB
level" fail here, as in dcap-qvl. Verified chains, CRLs and collateral signatures are
cached by content; validity windows are checked against ``now`` on every call.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from attest.collateral import (
    TCB_STATUSES,
    Collateral,
    QeIdentity,
    TcbInfo,
    TcbLevel,
    parse_qe_identity,
    parse_tcb_info,
)
from attest.errors import CollateralError, VerificationError
from attest.pck import PckExtension, pck_extension
from attest.roots import INTEL_SGX_ROOT_CA_SHA256
from attest.tdx import ATT_KEY_TYPE_ECDSA_P256, TEE_TYPE_TDX, TdxQuote, parse_quote
from attest.x509util import iso, load_crl, parse_pem_chain, public_key_p256, raw_ecdsa_to_der, verify_chain

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


class QuoteHeaderError(VerificationError):
    """The quote's header names a version, key type or TEE this verifier does not accept."""


class CertificateChainError(VerificationError):
    """A certificate chain (PCK, TCB signing, CRL issuer) does not verify to the trusted root."""


class SignatureError(VerificationError):
    """A signature in the quote or the collateral does not verify."""


class CollateralExpiredError(VerificationError):
    """TCB Info or QE Identity is outside its issueDate..nextUpdate window."""


class CollateralMismatchError(VerificationError):
    """The collateral is for another platform (FMSPC, PCE-ID) or another TEE."""


class TcbLevelError(VerificationError):
    """No TCB level matches the platform, or the matched level is Revoked."""


class QeIdentityError(VerificationError):
    """The Quoting Enclave does not match Intel's QE Identity."""


@dataclass(frozen=True, slots=True)
class TdxVerification:
    """An authentic TDX quote and what the collateral says about its platform.

    ``tcb_status`` is the platform TCB status (with the TDX module's folded in), ``qe_status``
    the Quoting Enclave's, ``status`` both converged as Intel's QVL does. All three are None
    when verified without collateral (signatures and chain only): the TCB status is unknown.
    """

    quote: TdxQuote
    pck: PckExtension
    fmspc: bytes
    tcb_status: str | None
    qe_status: str | None
    status: str | None
    advisory_ids: tuple[str, ...]
    tcb_date: datetime | None
    root_fingerprint: str

    @property
    def tcb_known(self) -> bool:
        """False when verified with ``collateral=None``: nothing is known about the TCB."""
        return self.status is not None


def _now(now: datetime | int | float) -> datetime:
    if isinstance(now, datetime):
        if now.tzinfo is None:
            raise TypeError("now must be timezone-aware")
        return now.astimezone(timezone.utc)
    return datetime.fromtimestamp(now, timezone.utc)


@lru_cache(maxsize=128)
def _chain(pem: bytes | str, what: str) -> tuple[x509.Certificate, ...]:
    return parse_pem_chain(pem if isinstance(pem, bytes) else pem.encode("ascii", "replace"), what)


@lru_cache(maxsize=64)
def _crl(der: bytes, what: str) -> x509.CertificateRevocationList:
    return load_crl(der, what)


_pck_extension = lru_cache(maxsize=128)(pck_extension)


@lru_cache(maxsize=256)
def _attestation_key(x_y: bytes) -> ec.EllipticCurvePublicKey:
    return public_key_p256(x_y, "quote attestation key")


def _ecdsa_ok(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(raw_ecdsa_to_der(signature), data, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


@lru_cache(maxsize=256)
def _qe_report_signed_by(leaf: x509.Certificate, report: bytes, signature: bytes) -> bool:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return False
    return _ecdsa_ok(key, signature, report)


@lru_cache(maxsize=64)
def _signed_collateral(body: str, signature: bytes, leaf: x509.Certificate) -> bool:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    return _ecdsa_ok(key, signature, body.encode("utf-8"))


@lru_cache(maxsize=64)
def _tcb_info(raw: str) -> TcbInfo:
    return parse_tcb_info(raw)


@lru_cache(maxsize=64)
def _qe_identity(raw: str) -> QeIdentity:
    return parse_qe_identity(raw)


def _rank(status: str) -> int:
    return TCB_STATUSES.index(status)


def converge_status(platform: str, other: str) -> str:
    """Combine the platform status with a QE or TDX module status (Intel QVL
    ``convergeTcbStatusWithQeTcbStatus``): OutOfDate on a ConfigurationNeeded platform
    gives OutOfDateConfigurationNeeded, otherwise the worse of the two."""
    if other == "OutOfDate" and platform in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
        return "OutOfDateConfigurationNeeded"
    return platform if _rank(platform) >= _rank(other) else other


def verify_quote(
    quote: bytes | TdxQuote,
    collateral: Collateral | None,
    now: datetime | int | float,
    *,
    trusted_root: str = INTEL_SGX_ROOT_CA_SHA256,
) -> TdxVerification:
    """Verify a TDX quote; ``collateral=None`` checks only the chain and signatures.

    ``trusted_root`` is the SHA-256 fingerprint of the one root to trust (default: the
    pinned Intel SGX Root CA; only the simulated TEE passes its own).
    """
    moment = _now(now)
    parsed = quote if isinstance(quote, TdxQuote) else parse_quote(quote)
    header = parsed.header
    if header.version not in (4, 5):
        raise QuoteHeaderError(f"TDX quote version {header.version} is not supported (4 or 5)")
    if header.attestation_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise QuoteHeaderError(
            f"TDX quote attestation key type {header.attestation_key_type} is not supported (2 = ECDSA-P256)")
    if header.tee_type != TEE_TYPE_TDX:
        raise QuoteHeaderError(f"quote TEE type {header.tee_type:#x} is not TDX (0x81)")
    roots = (trusted_root,)
    cert_data = parsed.signature_data.certification

    # PCK certificate chain, with both CRLs when collateral is given.
    pck_chain = _chain(cert_data.pck_cert_chain, "PCK certificate chain in the quote")
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    if collateral is not None:
        crls = (_crl(collateral.root_ca_crl, "root CA CRL"), _crl(collateral.pck_crl, "PCK CRL"))
    try:
        verdict = verify_chain(pck_chain, roots, moment, crls, require_crl=collateral is not None,
                               what="PCK certificate chain")
    except VerificationError as exc:
        raise CertificateChainError(_root_hint(str(exc), trusted_root)) from None
    pck = _pck_extension(pck_chain[0])

    # QE report signed by the PCK key; QE REPORTDATA binds the attestation key.
    qe_report = cert_data.qe_report
    if not _qe_report_signed_by(pck_chain[0], qe_report.raw, cert_data.qe_report_signature):
        raise SignatureError("QE report signature does not verify with the PCK certificate's key")
    expected = hashlib.sha256(parsed.signature_data.attestation_key + cert_data.qe_auth_data).digest() + bytes(32)
    if qe_report.report_data != expected:
        raise SignatureError("QE report REPORTDATA is not SHA-256(attestation key ‖ QE auth data) ‖ 32 zero bytes")

    # The quote itself, signed by the attestation key.
    key = _attestation_key(parsed.signature_data.attestation_key)
    if not _ecdsa_ok(key, parsed.signature_data.signature, parsed.signed_bytes):
        raise SignatureError("quote signature does not verify with the attestation key")

    if collateral is None:
        return TdxVerification(
            quote=parsed, pck=pck, fmspc=pck.fmspc, tcb_status=None, qe_status=None, status=None,
            advisory_ids=(), tcb_date=None, root_fingerprint=verdict.root_fingerprint,
        )

    if verify_chain(_chain(collateral.pck_crl_issuer_chain, "PCK CRL issuer chain"), roots, moment, crls[:1],
                    require_crl=True, what="PCK CRL issuer chain").root_fingerprint != verdict.root_fingerprint:
        raise CertificateChainError("PCK CRL issuer chain ends at another root")
    tcb_info = _verified_tcb_info(collateral, roots, moment, crls[:1])
    qe_identity = _verified_qe_identity(collateral, roots, moment, crls[:1])

    if tcb_info.id != "TDX" or tcb_info.version < 3:
        raise CollateralMismatchError(f"TCB Info is {tcb_info.id} v{tcb_info.version}; a TDX quote needs TDX TCB Info v3")
    if pck.fmspc != tcb_info.fmspc:
        raise CollateralMismatchError(
            f"TCB Info is for FMSPC {tcb_info.fmspc.hex().upper()}, the PCK certificate for {pck.fmspc.hex().upper()}")
    if pck.pce_id != tcb_info.pce_id:
        raise CollateralMismatchError(
            f"TCB Info is for PCE-ID {tcb_info.pce_id.hex()}, the PCK certificate for {pck.pce_id.hex()}")

    level = _match_tcb_level(tcb_info, pck, parsed)
    platform_status = level.tcb_status
    advisories = list(level.advisory_ids)
    module = _tdx_module_status(tcb_info, parsed)
    if module is not None:
        platform_status = converge_status(platform_status, module[0])
        advisories += [a for a in module[1] if a not in advisories]
    qe_status, qe_advisories = _qe_identity_status(qe_identity, parsed)
    status = converge_status(platform_status, qe_status)
    advisories += [a for a in qe_advisories if a not in advisories]
    if status == "Revoked":
        raise TcbLevelError(
            f"TCB status is Revoked (platform {platform_status}, QE {qe_status}; advisories {', '.join(advisories) or 'none'})")
    return TdxVerification(
        quote=parsed, pck=pck, fmspc=pck.fmspc, tcb_status=platform_status, qe_status=qe_status, status=status,
        advisory_ids=tuple(advisories), tcb_date=level.tcb_date, root_fingerprint=verdict.root_fingerprint,
    )


def _root_hint(message: str, trusted_root: str) -> str:
    if "does not end at a pinned root" in message and trusted_root == INTEL_SGX_ROOT_CA_SHA256:
        return message.replace("does not end at a pinned root:", "does not end at the pinned Intel SGX Root CA:")
    return message


def _check_window(issue: datetime, next_update: datetime, now: datetime, what: str) -> None:
    if now < issue:
        raise CollateralExpiredError(f"{what} is not valid before its issueDate {iso(issue)} (now {iso(now)})")
    if now > next_update:
        raise CollateralExpiredError(f"{what} expired at {iso(next_update)} (now {iso(now)})")


def _verified_signed_json(body: str, signature: bytes, chain_pem: str, roots: tuple[str, ...], now: datetime,
                          crls: tuple[x509.CertificateRevocationList, ...], what: str) -> str:
    chain = _chain(chain_pem, f"{what} issuer chain")
    try:
        verify_chain(chain, roots, now, crls, require_crl=True, what=f"{what} issuer chain")
    except VerificationError as exc:
        raise CertificateChainError(str(exc)) from None
    if not _signed_collateral(body, signature, chain[0]):
        raise SignatureError(f"{what} signature does not verify with {chain[0].subject.rfc4514_string()}")
    return body


def _verified_tcb_info(collateral: Collateral, roots: tuple[str, ...], now: datetime,
                       crls: tuple[x509.CertificateRevocationList, ...]) -> TcbInfo:
    tcb_info = _tcb_info(collateral.tcb_info)
    _check_window(tcb_info.issue_date, tcb_info.next_update, now, "TCB Info")
    _verified_signed_json(collateral.tcb_info, collateral.tcb_info_signature, collateral.tcb_info_issuer_chain,
                          roots, now, crls, "TCB Info")
    return tcb_info


def _verified_qe_identity(collateral: Collateral, roots: tuple[str, ...], now: datetime,
                          crls: tuple[x509.CertificateRevocationList, ...]) -> QeIdentity:
    qe_identity = _qe_identity(collateral.qe_identity)
    _check_window(qe_identity.issue_date, qe_identity.next_update, now, "QE Identity")
    _verified_signed_json(collateral.qe_identity, collateral.qe_identity_signature,
                          collateral.qe_identity_issuer_chain, roots, now, crls, "QE Identity")
    if qe_identity.id != "TD_QE" or qe_identity.version not in (2, 3):
        raise CollateralMismatchError(
            f"QE Identity is {qe_identity.id} v{qe_identity.version}; a TDX quote needs TD_QE v2")
    return qe_identity


def _match_tcb_level(tcb_info: TcbInfo, pck: PckExtension, quote: TdxQuote) -> TcbLevel:
    """The first TCB level whose SGX comp SVNs and PCESVN (from the PCK certificate) and TDX
    comp SVNs (TEE_TCB_SVN) are all met (Intel PCS "TDX TCB Info" §TCB status algorithm)."""
    tee_tcb_svn = quote.body.tee_tcb_svn
    for level in tcb_info.tcb_levels:
        if pck.pce_svn < level.pce_svn:
            continue
        if any(have < need for have, need in zip(pck.sgx_tcb_comp_svns, level.sgx_components)):
            continue
        if not level.tdx_components:
            raise CollateralError("TCB Info level has no tdxtcbcomponents")
        if any(have < need for have, need in zip(tee_tcb_svn, level.tdx_components)):
            continue
        return level
    raise TcbLevelError(
        f"no TCB level in the TCB Info (FMSPC {tcb_info.fmspc.hex().upper()}) matches this platform: "
        f"SGX comp SVNs {list(pck.sgx_tcb_comp_svns)}, PCESVN {pck.pce_svn}, TEE_TCB_SVN {tee_tcb_svn.hex()}")


def _masked_equal(value: bytes, expected: bytes, mask: bytes) -> bool:
    return all((v & m) == (e & m) for v, e, m in zip(value, expected, mask))


def _tdx_module_status(tcb_info: TcbInfo, quote: TdxQuote) -> tuple[str, tuple[str, ...]] | None:
    """Intel's TDX module check: MRSIGNERSEAM and masked SEAMATTRIBUTES against ``tdxModule``
    (module major version TEE_TCB_SVN[1] = 0) or ``tdxModuleIdentities["TDX_%02X"]``, whose
    first level with ISVSVN ≤ TEE_TCB_SVN[0] gives the module's status."""
    body = quote.body
    isv_svn, version = body.tee_tcb_svn[0], body.tee_tcb_svn[1]
    if version == 0 or not tcb_info.tdx_module_identities:
        module = tcb_info.tdx_module
        if module is None:
            return None
        if module.mrsigner != body.mr_signer_seam or not _masked_equal(
                body.seam_attributes, module.attributes, module.attributes_mask):
            raise TcbLevelError("TDX module MRSIGNERSEAM / SEAMATTRIBUTES do not match the TCB Info's tdxModule")
        return None
    wanted = f"TDX_{version:02X}"
    identity = next((m for m in tcb_info.tdx_module_identities if (m.id or "").upper() == wanted), None)
    if identity is None:
        raise TcbLevelError(f"TCB Info has no TDX module identity {wanted} for this TDX module (TEE_TCB_SVN[1] = {version})")
    if identity.mrsigner != body.mr_signer_seam or not _masked_equal(
            body.seam_attributes, identity.attributes, identity.attributes_mask):
        raise TcbLevelError(f"TDX module MRSIGNERSEAM / SEAMATTRIBUTES do not match TCB Info identity {wanted}")
    for level in identity.tcb_levels:
        if isv_svn >= level.isv_svn:
            return level.tcb_status, level.advisory_ids
    raise TcbLevelError(f"TDX module {wanted} SVN {isv_svn} is below every TCB level in the TCB Info")


def _qe_identity_status(identity: QeIdentity, quote: TdxQuote) -> tuple[str, tuple[str, ...]]:
    """Match the QE report against Intel's QE Identity; its ISVSVN selects the QE TCB level."""
    report = quote.signature_data.certification.qe_report
    if report.mr_signer != identity.mrsigner:
        raise QeIdentityError(
            f"QE MRSIGNER {report.mr_signer.hex()} is not Intel's TD QE signer {identity.mrsigner.hex()}")
    if report.isv_prod_id != identity.isv_prod_id:
        raise QeIdentityError(f"QE ISVPRODID {report.isv_prod_id} is not {identity.isv_prod_id}")
    if (report.misc_select & identity.miscselect_mask) != (identity.miscselect & identity.miscselect_mask):
        raise QeIdentityError(f"QE MISCSELECT {report.misc_select:#010x} does not match the QE Identity under its mask")
    if not _masked_equal(report.attributes, identity.attributes, identity.attributes_mask):
        raise QeIdentityError(f"QE ATTRIBUTES {report.attributes.hex()} do not match the QE Identity under its mask")
    if report.attributes[0] & 0x02:
        raise QeIdentityError("the Quoting Enclave runs in debug mode")
    for level in identity.tcb_levels:
        if report.isv_svn >= level.isv_svn:
            return level.tcb_status, level.advisory_ids
    raise QeIdentityError(f"QE ISVSVN {report.isv_svn} is below every TCB level of the QE Identity")


def pck_chain(quote: TdxQuote) -> tuple[x509.Certificate, ...]:
    """The quote's PCK certificate chain (leaf first), parsed strictly."""
    return _chain(quote.signature_data.certification.pck_cert_chain, "PCK certificate chain in the quote")
