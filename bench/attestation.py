"""Suite ``attest``: TDX quote and SEV-SNP report verification on recorded real evidence.

* TDX: dcap-qvl's sample quote with its collateral at the instant it is valid
  (2025-07-19T10:00:34Z), ``attest.tdx_verify.verify_quote`` against
  ``dcap_qvl.verify(quote, collateral, now_secs)`` (Phala's Rust verifier, no caches),
  interleaved. *Cold*: every verification cache of ours is emptied before each call (the
  cost of the first quote from a platform). *Warm*: the same platform again (chains, CRLs,
  collateral signatures and the QE report cached; the quote's own signature and the TCB
  evaluation run every time).
* SEV-SNP: virtee's Milan report with its VCEK and ASK/ARK at 2025-06-01, warm and cold,
  interleaved with the bare ECDSA-P384 check of the report signature (the floor).

Needs the shared vectors (``$CDVM_VECTORS`` or ``../shared/vectors``); without them the
suite is skipped.
"""
from __future__ import annotations

import importlib
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from attest.collateral import collateral_from_json
from attest.kds import parse_cert_chain
from attest.snp import SigningKey, parse_report
from attest.snp_certs import SnpCertChain
from attest.snp_verify import load_certificate, verify_report
from attest.tdx_verify import verify_quote
from bench.harness import BenchError, Context, Skip, suite

TDX_QUOTE = "tee/tdx/dcap-qvl/tdx_quote"
TDX_COLLATERAL = "tee/tdx/dcap-qvl/tdx_quote_collateral.json"
TDX_NOW = datetime(2025, 7, 19, 10, 0, 34, tzinfo=timezone.utc)
SNP_REPORT = "tee/snp/virtee-sev/report_milan.bin"
SNP_VCEK = "tee/snp/virtee-sev/vcek_milan.der"
SNP_CA = "tee/snp/virtee-sev/cert_chain_milan"
SNP_NOW = datetime(2025, 6, 1, tzinfo=timezone.utc)

_LRU_MODULES = ("attest.tdx_verify", "attest.x509util", "attest.snp_verify", "attest.pck")
_DICT_CACHES = (("attest.x509util", "_cache"), ("attest.x509util", "_digests"),
                ("attest.snp_verify", "_chains"), ("attest.snp_verify", "_crls"))
_MISSING = "dcap-qvl is not installed (test-only: pip install dcap-qvl==0.7.0); comparison skipped"


def clear_verification_caches() -> int:
    """Empty every cache of the attest verifiers (functools caches and the chain/CRL memos)
    so the next verification is cold; returns how many caches were cleared."""
    cleared = 0
    for name in _LRU_MODULES:
        for value in vars(importlib.import_module(name)).values():
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()
                cleared += 1
    for module, attribute in _DICT_CACHES:
        cache = getattr(importlib.import_module(module), attribute, None)
        if not isinstance(cache, dict):
            raise BenchError(f"{module}.{attribute} is no longer a cache dict: update bench/attestation.py "
                             "so that cold verification really starts cold")
        cache.clear()
        cleared += 1
    return cleared


def _dcap_qvl() -> ModuleType | None:
    try:
        import dcap_qvl
    except ImportError:
        return None
    return dcap_qvl


def _read(vectors: Path, relative: str) -> bytes:
    try:
        return (vectors / relative).read_bytes()
    except OSError as error:
        raise Skip(f"attestation vector {relative} unreadable under {vectors}: {error.strerror}") from None


@suite("attest", "TDX quote and SEV-SNP report verification vs dcap-qvl (recorded real evidence)")
def run(ctx: Context) -> None:
    """Measure and record the attestation metrics (see the module docstring)."""
    if ctx.vectors is None:
        raise Skip("shared vectors not found: set CDVM_VECTORS or place shared/vectors beside the repository")
    _tdx(ctx, ctx.vectors)
    _snp(ctx, ctx.vectors)


def _tdx(ctx: Context, vectors: Path) -> None:
    quote = _read(vectors, TDX_QUOTE)
    collateral_json = _read(vectors, TDX_COLLATERAL).decode("utf-8")
    collateral = collateral_from_json(collateral_json)

    def ours() -> str | None:
        return verify_quote(quote, collateral, TDX_NOW).status

    clear_verification_caches()
    status = ours()
    if status != "UpToDate":
        raise BenchError(f"the dcap-qvl sample quote verifies as {status}, expected UpToDate")
    rounds = ctx.n(full=150, quick=30)
    dcap_qvl = _dcap_qvl()
    ctx.note("TDX: verify_quote(quote, collateral, now) against dcap_qvl.verify(quote, collateral, now_secs); "
             "cold = every attest cache emptied before each call (untimed), warm = repeated quotes from the "
             "same platform")
    if dcap_qvl is None:
        ctx.note(_MISSING)
        ctx.record("tdx_verify_warm_ms", ctx.measure(ours, rounds, label="TDX verify warm"), unit="ms")
        ctx.record("tdx_verify_cold_ms", ctx.measure(ours, rounds, setup=clear_verification_caches,
                                                     label="TDX verify cold"), unit="ms")
        ctx.record("tdx_verify_cold_ratio_vs_dcap_qvl", None, unit="x", note=_MISSING)
        ctx.record("tdx_verify_warm_ratio_vs_dcap_qvl", None, 1.0, unit="x", note=_MISSING)
        return
    theirs_collateral = dcap_qvl.QuoteCollateralV3.from_json(collateral_json)
    now_secs = int(TDX_NOW.timestamp())

    def theirs() -> str:
        return str(dcap_qvl.verify(quote, theirs_collateral, now_secs).status)

    if theirs() != status:
        raise BenchError(f"dcap-qvl says {theirs()} for its sample quote, we say {status}")
    warm = ctx.interleaved(ours, theirs, rounds, label="TDX verify warm", names=("cdvm", "dcap-qvl"))
    cold = ctx.interleaved(ours, theirs, rounds, setup_a=clear_verification_caches, label="TDX verify cold",
                           names=("cdvm", "dcap-qvl"))
    ctx.record("tdx_verify_cold_ratio_vs_dcap_qvl", cold.ratio, unit="x",
               note="first quote of a platform: chains, CRLs, collateral signatures verified from scratch")
    ctx.record("tdx_verify_warm_ratio_vs_dcap_qvl", warm.ratio, 1.0, unit="x")
    ctx.record("tdx_verify_cold_ms", cold.a, unit="ms")
    ctx.record("tdx_verify_warm_ms", warm.a, unit="ms")
    ctx.record("tdx_verify_dcap_qvl_ms", warm.b, unit="ms", note="dcap-qvl has no caches: cold = warm")


def _snp(ctx: Context, vectors: Path) -> None:
    report_bytes = _read(vectors, SNP_REPORT)
    vcek = _read(vectors, SNP_VCEK)
    ask, ark = parse_cert_chain(_read(vectors, SNP_CA))
    chain = SnpCertChain(SigningKey.VCEK, vcek, ask, ark)
    report = parse_report(report_bytes)
    vcek_key = load_certificate(vcek, "VCEK").public_key()
    if not isinstance(vcek_key, ec.EllipticCurvePublicKey):
        raise BenchError(f"{SNP_VCEK} does not hold an ECDSA key")
    signature = encode_dss_signature(report.signature_r, report.signature_s)
    signed = report.signed_bytes
    algorithm = ec.ECDSA(hashes.SHA384())

    def ours() -> str:
        return verify_report(report_bytes, chain, SNP_NOW).product

    def p384() -> None:
        vcek_key.verify(signature, signed, algorithm)

    clear_verification_caches()
    if ours() != "Milan":
        raise BenchError("virtee's Milan report does not verify as Milan")
    rounds = ctx.n(full=150, quick=30)
    ctx.note("SEV-SNP: verify_report(report bytes, VCEK→ASK→ARK chain, now) on virtee's Milan report, "
             "against the bare ECDSA-P384/SHA-384 report signature check alone")
    warm = ctx.interleaved(ours, p384, rounds, label="SNP verify warm", names=("cdvm", "bare P-384 verify"))
    cold = ctx.interleaved(ours, p384, rounds, setup_a=clear_verification_caches, label="SNP verify cold",
                           names=("cdvm", "bare P-384 verify"))
    ctx.record("snp_verify_ms", warm.a, unit="ms", note="warm: chain verified once, report parsed and checked")
    ctx.record("snp_verify_cold_ms", cold.a, unit="ms", note="cold: RSA-PSS chain to the pinned ARK each time")
    ctx.record("snp_verify_warm_ratio_vs_p384_verify", warm.ratio, unit="x")
    ctx.record("snp_verify_cold_ratio_vs_p384_verify", cold.ratio, unit="x")
