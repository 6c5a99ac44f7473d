"""Differential testing against dcap-qvl (Phala's Rust DCAP verifier, pinned 0.7.0).

For the TDX vectors with collateral and thousands of deterministic mutations (byte flips in
the signed regions, the QE report, its signature, auth data, attestation key, quote
signature; truncations), our verdict and TCB statuses must equal ``dcap_qvl.verify``'s.
dcap-qvl folds three policy checks into verification (debug TD, SEPT_VE_DISABLE and
reserved TDATTRIBUTES bits, non-zero MRSERVICETD); cdvm leaves those to attest.policy, so
the comparison applies them on top of our verdict.

Two unsigned structural fields are checked more strictly than dcap-qvl does, as Intel's QVL
does: the signature-data length must equal the nested structure's size, and the outer
certification data type must be 6. dcap-qvl tolerates changes there; we must reject them.
"""
from __future__ import annotations

import json
import random
from datetime import datetime, timezone

import dcap_qvl
import pytest

from attest.collateral import collateral_from_json, collateral_to_json
from attest.errors import AttestError
from attest.tdx import parse_quote
from attest.tdx_verify import TdxVerification, verify_quote

UTC = timezone.utc
CASES = [
    ("dcap-qvl/tdx_quote", "dcap-qvl/tdx_quote_collateral.json", [
        "2025-06-19T10:32:26Z", "2025-06-19T10:32:27Z", "2025-07-01T00:00:00Z",
        "2025-07-19T10:00:34Z", "2025-07-19T10:00:35Z", "2025-07-19T10:00:36Z", "2030-01-01T00:00:00Z"]),
    ("dcap-qvl/tdx_quote_outdated", "dcap-qvl/tdx_quote_outdated_collateral.json", [
        "2026-03-01T00:00:00Z", "2026-03-20T10:41:14Z", "2026-03-20T10:41:16Z"]),
]
MUTATIONS_PER_QUOTE = 2500


def _ours(raw: bytes, collateral, now: datetime) -> tuple[str, ...] | None:
    try:
        result: TdxVerification = verify_quote(raw, collateral, now)
    except AttestError:
        return None
    body = result.quote.body
    if body.debug or not body.sept_ve_disable or body.td_attributes_reserved_bits or (
            body.mr_service_td is not None and any(body.mr_service_td)):
        return None
    return (result.status, result.tcb_status, result.qe_status, *sorted(result.advisory_ids))


def _theirs(raw: bytes, collateral, now: datetime) -> tuple[str, ...] | None:
    try:
        report = dcap_qvl.verify(raw, collateral, int(now.timestamp()))
    except ValueError:
        return None
    obj = json.loads(report.to_json())
    return (report.status, obj["platform_status"]["status"], obj["qe_status"]["status"], *sorted(report.advisory_ids))


def _mutations(raw: bytes, seed: str, count: int):
    q = parse_quote(raw)
    sig = q.signed_length + 4
    cert = sig + 134
    hot = [range(0, q.signed_length), range(sig - 4, sig + 128), range(cert - 6, cert + 384 + 64 + 2 + 32 + 6)]
    rng = random.Random(seed)
    end = len(raw) - q.trailing_bytes
    for i in range(count):
        bad = bytearray(raw)
        kind = i % 10
        if kind == 9:
            yield raw[: rng.randrange(0, len(raw))]
            continue
        region = hot[kind % 3]
        for _ in range(1 + (kind == 8) * rng.randrange(1, 4)):
            bad[rng.choice(region)] ^= rng.randrange(1, 256)
        if kind == 7:
            bad[rng.randrange(0, end)] ^= rng.randrange(1, 256)
        yield bytes(bad)


@pytest.mark.parametrize("quote,collateral,times", CASES)
def test_vectors_agree_with_dcap_qvl(vectors, quote, collateral, times):
    raw = (vectors / "tee" / "tdx" / quote).read_bytes()
    text = (vectors / "tee" / "tdx" / collateral).read_text()
    ours, theirs = collateral_from_json(text), dcap_qvl.QuoteCollateralV3.from_json(text)
    assert dcap_qvl.QuoteCollateralV3.from_json(collateral_to_json(ours)).tcb_info == theirs.tcb_info
    verdicts = []
    for stamp in times:
        now = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        mine, reference = _ours(raw, ours, now), _theirs(raw, theirs, now)
        assert mine == reference, (quote, stamp, mine, reference)
        verdicts.append(mine)
    if quote == "dcap-qvl/tdx_quote":
        assert ("UpToDate", "UpToDate", "UpToDate") in verdicts and None in verdicts


def _touches_strict_fields(raw: bytes, mutated: bytes) -> bool:
    """True when ``mutated`` changed the signature-data length or the certification data type."""
    sig = parse_quote(raw).signed_length + 4
    fields = [*range(sig - 4, sig), sig + 128, sig + 129]
    return len(mutated) > fields[-1] and any(mutated[i] != raw[i] for i in fields)


@pytest.mark.parametrize("quote,collateral,times", CASES)
def test_mutated_quotes_agree_with_dcap_qvl(vectors, quote, collateral, times):
    raw = (vectors / "tee" / "tdx" / quote).read_bytes()
    text = (vectors / "tee" / "tdx" / collateral).read_text()
    ours, theirs = collateral_from_json(text), dcap_qvl.QuoteCollateralV3.from_json(text)
    now = datetime.fromisoformat(times[1 if quote.endswith("outdated") else 3].replace("Z", "+00:00"))
    accepted = 0
    for i, mutated in enumerate(_mutations(raw, quote, MUTATIONS_PER_QUOTE)):
        mine = _ours(mutated, ours, now)
        if _touches_strict_fields(raw, mutated):
            assert mine is None, (quote, i)
            continue
        reference = _theirs(mutated, theirs, now)
        assert mine == reference, (quote, i, mine, reference)
        accepted += mine is not None
    # Truncations inside the trailing bytes keep the quote valid; everything else is rejected.
    assert accepted < MUTATIONS_PER_QUOTE // 10
