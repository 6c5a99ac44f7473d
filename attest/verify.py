"""Top-level verification: evidence in, :class:`attest.verdict.Verdict` out.

Three steps, each failure becoming a readable ``errors`` entry (never an exception for bad
evidence): **parse** (attest.tdx / attest.snp / attest.tdreport) → **verify** the
cryptography against pinned roots (attest.tdx_verify / attest.snp_verify) → **validate**
against the user's policy (attest.policy).

:func:`verify_evidence` is pure: it reads nothing from the network. Certificates come from
the evidence itself (a TDX quote carries its PCK chain; an SNP extended report carries a
certificate table), from the caller (``vcek``, ``cert_chain``), or from ``roots_dir`` (PEM
or DER files; a self-signed certificate there is used only when its SHA-256 is pinned in
attest.roots). :func:`gather_materials` fetches what is missing first (Intel PCS collateral,
AMD KDS certificates), honouring ``offline``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

from attest import sim
from attest.collateral import Collateral, fetch_collateral
from attest.errors import AttestError, CollateralError, ParseError, VerificationError
from attest.evidence import Evidence, load_evidence
from attest.kds import KdsClient, gather_chain
from attest.policy import Policy, validate
from attest.roots import AMD_ARK_SHA256, INTEL_SGX_ROOT_CA_SHA256, certificate_fingerprint
from attest.snp import SigningKey, SnpReport, parse_report
from attest.snp_certs import SnpCertChain, parse_cert_table
from attest.snp_verify import SnpVerification, load_certificate, parse_vek_extensions, verify_report
from attest.tdreport import parse_tdreport
from attest.tdx import TdxQuote, parse_quote
from attest.tdx_verify import TdxVerification, pck_chain, verify_quote
from attest.verdict import Verdict
from attest.x509util import fingerprint, load_der_certificate, parse_pem_chain

SIMULATED_REFUSED = "simulated TEE evidence refused: pass --allow-simulated to accept it for testing; it proves nothing"
TDREPORT_NOT_VERIFIABLE = (
    "a TDREPORT is MAC'd with a key only the local CPU holds: it cannot be verified remotely; "
    "get a quote instead (--provider tsm or qgs)"
)
_TDX_MEASUREMENTS = ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam", "mr_signer_seam",
                     "mr_config_id", "mr_owner", "mr_owner_config")
_SNP_MEASUREMENTS = ("measurement", "host_data", "id_key_digest", "author_key_digest", "family_id", "image_id")


def load_certificates(data: bytes, what: str) -> tuple[x509.Certificate, ...]:
    """Certificates from PEM text (one or more), a DER certificate, or an SNP certificate table."""
    if not isinstance(data, (bytes, bytearray)):
        raise ParseError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    with warnings.catch_warnings():
        # Some AMD certificates carry a non-positive serial number; they are still AMD's.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        if b"-----BEGIN CERTIFICATE-----" in data:
            return parse_pem_chain(data, what)
        if data[:1] == b"\x30":
            return (load_der_certificate(data, what),)
        table = parse_cert_table(data)
        if not table.entries:
            raise ParseError(f"{what}: the certificate table is empty")
        return tuple(load_der_certificate(entry.data, f"{what} {entry.name}") for entry in table.entries)


def load_roots_dir(directory: Path) -> tuple[x509.Certificate, ...]:
    """Every certificate in ``directory`` (PEM or DER files; other files are an error)."""
    try:
        files = sorted(p for p in Path(directory).iterdir() if p.is_file())
    except OSError as error:
        raise AttestError(f"cannot read roots directory {directory}: {error.strerror}") from None
    certificates: list[x509.Certificate] = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise AttestError(f"cannot read {path}: {error.strerror}") from None
        certificates.extend(load_certificates(data, str(path)))
    return tuple(certificates)


def _pinned(cert: x509.Certificate) -> bool:
    fingerprint = certificate_fingerprint(cert)
    return fingerprint == INTEL_SGX_ROOT_CA_SHA256 or fingerprint in AMD_ARK_SHA256.values()


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


@dataclass(frozen=True, slots=True)
class SnpMaterials:
    """Certificates an SNP report may verify against: endorsement keys and CA candidates."""

    veks: tuple[x509.Certificate, ...]
    cas: tuple[x509.Certificate, ...]


def _snp_materials(evidence: Evidence, vcek: bytes | None, cert_chain: bytes | None,
                   roots: tuple[x509.Certificate, ...]) -> SnpMaterials:
    found: list[x509.Certificate] = []
    if vcek is not None:
        found.extend(load_certificates(vcek, "VCEK/VLEK certificate"))
    if cert_chain is not None:
        found.extend(load_certificates(cert_chain, "certificate chain"))
    if evidence.certs:
        found.extend(load_certificates(evidence.certs, "the evidence's certificate table"))
    found.extend(roots)
    veks, cas, seen = [], [], set()
    for cert in found:
        der = _der(cert)
        if der in seen:
            continue
        seen.add(der)
        common_names = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
        if common_names and common_names[0] in ("SEV-VCEK", "SEV-VLEK"):
            veks.append(cert)
        elif not _self_signed(cert) or _pinned(cert):
            cas.append(cert)
    return SnpMaterials(tuple(veks), tuple(cas))


def _snp_chains(report: SnpReport, materials: SnpMaterials) -> list[SnpCertChain]:
    """Every VEK → ASK → pinned-ARK combination the names allow (usually exactly one)."""
    want = "SEV-VLEK" if report.signing_key is SigningKey.VLEK else "SEV-VCEK"
    chains = []
    for vek in materials.veks:
        if vek.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value != want:
            continue
        for ask in materials.cas:
            if ask.subject != vek.issuer or _self_signed(ask):
                continue
            for ark in materials.cas:
                if ark.subject == ask.issuer and _self_signed(ark):
                    chains.append(SnpCertChain(report.signing_key, _der(vek), _der(ask), _der(ark)))
    return chains


def _verify_snp(report: SnpReport, materials: SnpMaterials, now: datetime, crl: bytes | None) -> SnpVerification:
    if report.signing_key is SigningKey.NONE:
        raise VerificationError("the report is unsigned (SIGNING_KEY = 7): it proves nothing")
    key = "VLEK" if report.signing_key is SigningKey.VLEK else "VCEK"
    chains = _snp_chains(report, materials)
    if not chains:
        have = "no " + key if not any(
            c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == f"SEV-{key}" for c in materials.veks
        ) else f"the {key} but no ASK/ARK that issued it (a self-signed ARK must be pinned)"
        raise CollateralError(
            f"cannot verify the SNP report: {have} certificate; give --vcek FILE and --certs FILE or "
            "--roots DIR, or verify online to fetch them from AMD KDS"
        )
    errors: list[AttestError] = []
    for chain in chains:
        try:
            return verify_report(report, chain, now, crl=crl)
        except AttestError as error:
            errors.append(error)
    raise errors[0]


def _tdx_measurements(body: object) -> dict[str, str]:
    measurements = {name: getattr(body, name).hex() for name in _TDX_MEASUREMENTS}
    servicetd = getattr(body, "mr_service_td", None) or getattr(body, "servtd_hash", None)
    if servicetd is not None:
        measurements["mr_servicetd"] = servicetd.hex()
    return measurements


def _tdx_details(quote: TdxQuote, verification: TdxVerification | None) -> dict[str, object]:
    body = quote.body
    details: dict[str, object] = {
        "quote_version": quote.header.version,
        "body_type": quote.body_type,
        "td_attributes": body.td_attributes.hex(),
        "debug": body.debug,
        "sept_ve_disable": body.sept_ve_disable,
        "xfam": body.xfam.hex(),
        "tee_tcb_svn": body.tee_tcb_svn.hex(),
    }
    if body.tee_tcb_svn2 is not None:
        details["tee_tcb_svn2"] = body.tee_tcb_svn2.hex()
    if verification is not None:
        details["fmspc"] = verification.fmspc.hex()
        details["tcb_date"] = None if verification.tcb_date is None else verification.tcb_date.isoformat()
        details["root_fingerprint"] = verification.root_fingerprint
    return details


def _snp_details(report: SnpReport, verification: SnpVerification | None) -> dict[str, object]:
    details: dict[str, object] = {
        "version": report.version,
        "guest_svn": report.guest_svn,
        "policy": f"{report.policy.raw:#x}",
        "debug": report.debug_allowed,
        "vmpl": report.vmpl,
        "signing_key": report.signing_key.name,
        "chip_id": report.chip_id.hex(),
        "reported_tcb": str(report.reported_tcb),
    }
    if verification is not None:
        details["product"] = verification.product
        details["reported_tcb"] = verification.reported_tcb.as_dict()
        details["chip_id_checked"] = verification.chip_id_checked
    return details


def _error(step: str, error: Exception) -> str:
    return f"{step}: {error}"


def verify_evidence(
    evidence: Evidence | bytes,
    *,
    now: datetime,
    collateral: Collateral | None = None,
    vcek: bytes | None = None,
    cert_chain: bytes | None = None,
    roots_dir: Path | None = None,
    crl: bytes | None = None,
    policy: Policy | None = None,
    allow_simulated: bool = False,
    notes: tuple[str, ...] = (),
) -> Verdict:
    """Parse, verify and validate ``evidence`` at ``now``; problems land in the verdict.

    Raises only for misuse (a naive ``now``) and for an unreadable or malformed ``roots_dir``
    (an :class:`AttestError`) — never for bad evidence.
    """
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise TypeError("now must be a timezone-aware datetime")
    policy = policy or Policy.default()
    if not isinstance(evidence, Evidence):
        try:
            evidence = load_evidence(evidence)
        except ParseError as error:
            return _failed("unknown", "file", [_error("parse", error)])
    if evidence.tee == "snp":
        roots = load_roots_dir(roots_dir) if roots_dir is not None else ()
        verdict = _verify_snp_evidence(evidence, now, vcek, cert_chain, roots, crl, policy)
    elif evidence.tee == "tdreport":
        verdict = _verify_tdreport(evidence)
    else:
        simulated = evidence.tee == "sim"
        verdict = _verify_tdx_evidence(evidence, now, collateral, policy, simulated,
                                       allow_simulated or policy.allow_simulated)
    if notes:
        verdict.details["notes"] = list(notes)
    return verdict


def _failed(tee: str, provider: str, errors: list[str], *, report_data: str = "",
            measurements: dict[str, str] | None = None, details: dict[str, object] | None = None) -> Verdict:
    """A verdict for evidence that never reached (or cannot reach) the verify step."""
    return Verdict(tee=tee, verified=False, tcb_status=None, qe_status=None, advisories=(),
                   report_data=report_data, measurements=measurements or {}, policy_violations=(),
                   errors=tuple(errors), confidential=False, provider=provider, details=details or {})


def _simulated_root(quote: TdxQuote) -> str:
    """The root a simulated quote is checked against: the simulated root its own chain ends in.

    Every sandbox may create its own simulated PKI, so there is no fixed root to pin; since
    simulated evidence proves nothing, trusting the chain's own (marked) root loses nothing.
    A chain whose root is not a cdvm simulated root falls back to this machine's sim root.
    """
    try:
        root = pck_chain(quote)[-1]
    except AttestError:
        return sim.sim_root_fingerprint()
    return fingerprint(root) if sim.is_sim_root(root) else sim.sim_root_fingerprint()


def _verify_tdx_evidence(evidence: Evidence, now: datetime, collateral: Collateral | None, policy: Policy,
                         simulated: bool, allow_simulated: bool) -> Verdict:
    try:
        quote = parse_quote(evidence.raw)
    except ParseError as error:
        return _failed(evidence.tee, evidence.provider, [_error("parse", error)])
    report_data, measurements = quote.report_data.hex(), _tdx_measurements(quote.body)
    if simulated and not allow_simulated:
        return _failed("sim", evidence.provider, [SIMULATED_REFUSED], report_data=report_data,
                       measurements=measurements, details=_tdx_details(quote, None))
    errors: list[str] = []
    verification: TdxVerification | None = None
    try:
        if simulated:
            verification = verify_quote(quote, collateral or sim.sim_collateral(), now,
                                        trusted_root=_simulated_root(quote))
        else:
            verification = verify_quote(quote, collateral, now)
    except AttestError as error:
        errors.append(_error("verify", error))
    effective = Policy(allow_simulated=True, tdx=policy.tdx, snp=policy.snp, binding=policy.binding) if simulated else policy
    violations = validate(effective, quote, verification, simulated=simulated)
    verified = not errors and not violations
    return Verdict(
        tee=evidence.tee,
        verified=verified,
        tcb_status=verification.tcb_status if verification else None,
        qe_status=verification.qe_status if verification else None,
        advisories=verification.advisory_ids if verification else (),
        report_data=report_data,
        measurements=measurements,
        policy_violations=tuple(violations),
        errors=tuple(errors),
        confidential=verified and not simulated,
        provider=evidence.provider,
        details=_tdx_details(quote, verification),
    )


def _verify_snp_evidence(evidence: Evidence, now: datetime, vcek: bytes | None, cert_chain: bytes | None,
                         roots: tuple[x509.Certificate, ...], crl: bytes | None, policy: Policy) -> Verdict:
    try:
        report = parse_report(evidence.raw)
    except ParseError as error:
        return _failed("snp", evidence.provider, [_error("parse", error)])
    errors: list[str] = []
    verification: SnpVerification | None = None
    try:
        verification = _verify_snp(report, _snp_materials(evidence, vcek, cert_chain, roots), now, crl)
    except AttestError as error:
        errors.append(_error("verify", error))
    violations = validate(policy, report, verification)
    verified = not errors and not violations
    return Verdict(
        tee="snp",
        verified=verified,
        tcb_status=None,
        qe_status=None,
        advisories=(),
        report_data=report.report_data.hex(),
        measurements={name: getattr(report, name).hex() for name in _SNP_MEASUREMENTS},
        policy_violations=tuple(violations),
        errors=tuple(errors),
        confidential=verified,
        provider=evidence.provider,
        details=_snp_details(report, verification),
    )


def _verify_tdreport(evidence: Evidence) -> Verdict:
    try:
        report = parse_tdreport(evidence.raw)
    except ParseError as error:
        return _failed("tdreport", evidence.provider, [_error("parse", error)])
    return _failed("tdreport", evidence.provider, [TDREPORT_NOT_VERIFIABLE], report_data=report.report_data.hex(),
                   measurements=_tdx_measurements(report),
                   details={"td_attributes": report.td_attributes.hex(), "tee_tcb_svn": report.tee_tcb_svn.hex()})


@dataclass(frozen=True, slots=True)
class Materials:
    """What :func:`gather_materials` found: collateral for TDX, certificates and CRL for SNP, notes."""

    collateral: Collateral | None = None
    vcek: bytes | None = None
    cert_chain: bytes | None = None
    crl: bytes | None = None
    notes: tuple[str, ...] = ()


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)


async def gather_materials(
    evidence: Evidence,
    *,
    now: datetime,
    collateral: Collateral | None = None,
    vcek: bytes | None = None,
    cert_chain: bytes | None = None,
    roots_dir: Path | None = None,
    offline: bool = False,
    pccs_url: str | None = None,
    kds: KdsClient | None = None,
) -> Materials:
    """Fetch (or, ``offline``, read from the cache) what verification still lacks.

    TDX: Intel collateral for the quote's FMSPC. SNP: the VCEK and ASK/ARK from AMD KDS when
    neither the evidence nor the caller supplies a complete chain, and (online only) the
    ARK-signed CRL. A failure becomes a note; verification then reports what is missing.
    """
    notes: list[str] = []
    crl: bytes | None = None
    if evidence.tee == "tdx" and collateral is None:
        try:
            collateral = await fetch_collateral(evidence.raw, pccs_url, offline=offline, now=now)
        except (CollateralError, ParseError) as error:
            notes.append(f"no collateral: {error}")
    elif evidence.tee == "snp":
        client = kds or KdsClient(offline=offline)
        try:
            report = parse_report(evidence.raw)
            roots = load_roots_dir(roots_dir) if roots_dir is not None else ()
            materials = _snp_materials(evidence, vcek, cert_chain, roots)
            chains = _snp_chains(report, materials)
            if not chains:
                table = parse_cert_table(evidence.certs) if evidence.certs else None
                chain = await gather_chain(report, cert_table=table, vek=vcek, client=client)
                vcek, cert_chain = chain.vek, _pem(chain.ask) + _pem(chain.ark)
                chains = [chain]
            if not offline:
                vek = load_certificate(chains[0].vek, report.signing_key.name)
                product = parse_vek_extensions(vek, report.signing_key).product
                crl = await client.crl(product, report.signing_key, now=now)
        except AttestError as error:
            notes.append(f"SNP certificates: {error}")
        finally:
            if kds is None:
                await client.aclose()
    return Materials(collateral=collateral, vcek=vcek, cert_chain=cert_chain, crl=crl, notes=tuple(notes))


async def verify_evidence_online(
    evidence: Evidence,
    *,
    now: datetime,
    collateral: Collateral | None = None,
    vcek: bytes | None = None,
    cert_chain: bytes | None = None,
    roots_dir: Path | None = None,
    policy: Policy | None = None,
    allow_simulated: bool = False,
    offline: bool = False,
    pccs_url: str | None = None,
) -> Verdict:
    """:func:`gather_materials`, then the pure :func:`verify_evidence`."""
    materials = await gather_materials(evidence, now=now, collateral=collateral, vcek=vcek, cert_chain=cert_chain,
                                       roots_dir=roots_dir, offline=offline, pccs_url=pccs_url)
    return verify_evidence(evidence, now=now, collateral=materials.collateral, vcek=materials.vcek,
                           cert_chain=materials.cert_chain, roots_dir=roots_dir, crl=materials.crl,
                           policy=policy, allow_simulated=allow_simulated, notes=materials.notes)
