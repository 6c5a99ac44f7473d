"""Flipping any single byte that verification depends on must make verification fail."""
from __future__ import annotations

import random
import re
from datetime import datetime, timezone

import pytest

from attest.collateral import collateral_from_json
from attest.errors import AttestError
from attest.tdx import parse_quote
from attest.tdx_verify import verify_quote

UTC = timezone.utc
CASES = [
    ("dcap-qvl/tdx_quote", "dcap-qvl/tdx_quote_collateral.json", datetime(2025, 7, 19, 10, 0, 34, tzinfo=UTC)),
    ("go-tdx-guest/quote_v5_sample.dat", None, datetime(2026, 2, 3, 1, tzinfo=UTC)),
    ("trustee/tdx_quote_5.dat", None, datetime(2025, 11, 1, tzinfo=UTC)),
]


def _regions(raw: bytes) -> dict[str, range]:
    q = parse_quote(raw)
    sig = q.signed_length + 4
    cert = sig + 128 + 6
    auth = cert + 384 + 64 + 2
    return {
        "header+body": range(0, q.signed_length),
        "quote signature": range(sig, sig + 64),
        "attestation key": range(sig + 64, sig + 128),
        "QE report": range(cert, cert + 384),
        "QE report signature": range(cert + 384, cert + 448),
        "QE auth data": range(auth, auth + len(q.signature_data.certification.qe_auth_data)),
    }


def _rejected(raw: bytes, collateral, now) -> bool:
    try:
        verify_quote(raw, collateral, now)
    except AttestError:
        return True
    return False


@pytest.mark.parametrize("quote,collateral,now", CASES)
def test_every_byte_of_signed_regions(vectors, quote, collateral, now):
    raw = (vectors / "tee" / "tdx" / quote).read_bytes()
    col = collateral_from_json((vectors / "tee" / "tdx" / collateral).read_text()) if collateral else None
    verify_quote(raw, col, now)
    rng = random.Random(quote)
    for name, region in _regions(raw).items():
        for pos in region:
            bad = bytearray(raw)
            bad[pos] ^= rng.randrange(1, 256)
            assert _rejected(bytes(bad), col, now), f"{quote}: flipped {name} byte at offset {pos} was accepted"


@pytest.mark.parametrize("quote,collateral,now", CASES)
def test_sampled_bytes_of_pck_certificates(vectors, quote, collateral, now):
    raw = (vectors / "tee" / "tdx" / quote).read_bytes()
    col = collateral_from_json((vectors / "tee" / "tdx" / collateral).read_text()) if collateral else None
    q = parse_quote(raw)
    chain = q.signature_data.certification.pck_cert_chain
    start = len(raw) - q.trailing_bytes - len(chain)
    positions = [start + m.start() for m in re.finditer(rb"[^\s\0]", chain)]
    rng = random.Random(quote)
    for pos in rng.sample(positions, 400):
        bad = bytearray(raw)
        bad[pos] ^= rng.randrange(1, 256)
        assert _rejected(bytes(bad), col, now), f"{quote}: flipped certificate byte at offset {pos} was accepted"
