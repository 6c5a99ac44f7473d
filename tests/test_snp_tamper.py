"""Tampering: any single-byte change to a real report's signed region or signature, or to
any of its certificates, must make verification fail with a typed error."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from attest.errors import AttestError, ParseError, VerificationError
from attest.snp import REPORT_LEN, SIGNED_LEN, SigningKey
from attest.snp_certs import (
    ARK_GUID,
    ASK_GUID,
    VCEK_GUID,
    VLEK_GUID,
    CertTableEntry,
    SnpCertChain,
    chain_from_table,
    encode_cert_table,
    parse_cert_table,
)
from attest.snp_verify import verify_report
from attest.x509util import parse_pem_chain

UTC = timezone.utc
CASES = {
    "go-sev-guest": ("go-sev-guest/attestation.bin", "go-sev-guest/vcek.testcer", "go-sev-guest_ask_ark_milan.pem",
                     SigningKey.VCEK, datetime(2022, 9, 24, 1, tzinfo=UTC)),
    "virtee": ("virtee-sev/report_milan.bin", "virtee-sev/vcek_milan.der", "go-sev-guest_ask_ark_milan.pem",
               SigningKey.VCEK, datetime(2025, 6, 1, tzinfo=UTC)),
    "trustee-vlek": ("trustee/test-vlek-report.bin", "trustee/test-vlek.der", "go-sev-guest_ask_ark_milan_vlek.pem",
                     SigningKey.VLEK, datetime(2025, 6, 1, tzinfo=UTC)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest, vectors: Path) -> tuple[bytes, SnpCertChain, datetime]:
    report, vek, roots, kind, now = CASES[request.param]
    snp = vectors / "tee" / "snp"
    ask, ark = (c.public_bytes(Encoding.DER) for c in
                parse_pem_chain((vectors / "tee" / "roots" / "amd" / roots).read_bytes(), roots))
    chain = SnpCertChain(kind, (snp / vek).read_bytes(), ask, ark)
    raw = (snp / report).read_bytes()
    verify_report(raw, chain, now)
    return raw, chain, now


def _flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


def _rejected(raw: bytes, chain: SnpCertChain, now: datetime) -> type[AttestError]:
    try:
        verify_report(raw, chain, now)
    except (ParseError, VerificationError) as error:
        return type(error)
    raise AssertionError("tampered evidence verified")


def test_every_byte_of_the_signed_region(case: tuple[bytes, SnpCertChain, datetime]) -> None:
    raw, chain, now = case
    for index in range(SIGNED_LEN):
        for mask in (0x01, 0x80):
            try:
                _rejected(_flip(raw, index, mask), chain, now)
            except AssertionError:
                pytest.fail(f"flipping bit mask {mask:#x} of byte {index:#x} went unnoticed")


def test_every_byte_of_the_signature(case: tuple[bytes, SnpCertChain, datetime]) -> None:
    raw, chain, now = case
    for index in range(SIGNED_LEN, REPORT_LEN):
        for mask in (0x01, 0x80):
            try:
                _rejected(_flip(raw, index, mask), chain, now)
            except AssertionError:
                pytest.fail(f"flipping bit mask {mask:#x} of signature byte {index - SIGNED_LEN:#x} went unnoticed")


@pytest.mark.parametrize(("name", "role"), [("virtee", "vek"), ("virtee", "ask"), ("virtee", "ark"),
                                            ("trustee-vlek", "vek"), ("trustee-vlek", "ask")])
def test_every_byte_of_each_certificate(vectors: Path, name: str, role: str) -> None:
    report, vek, roots, kind, now = CASES[name]
    snp = vectors / "tee" / "snp"
    ask, ark = (c.public_bytes(Encoding.DER) for c in
                parse_pem_chain((vectors / "tee" / "roots" / "amd" / roots).read_bytes(), roots))
    chain = SnpCertChain(kind, (snp / vek).read_bytes(), ask, ark)
    raw = (snp / report).read_bytes()
    der: bytes = getattr(chain, role)
    for index in range(len(der)):
        mutated = SnpCertChain(chain.signing_key, **{
            part: _flip(der, index) if part == role else getattr(chain, part) for part in ("vek", "ask", "ark")})
        try:
            _rejected(raw, mutated, now)
        except AssertionError:
            pytest.fail(f"flipping byte {index} of the {role} certificate went unnoticed")


def test_swapped_signature_components_fail(case: tuple[bytes, SnpCertChain, datetime]) -> None:
    raw, chain, now = case
    swapped = raw[:SIGNED_LEN] + raw[SIGNED_LEN + 72:SIGNED_LEN + 144] + raw[SIGNED_LEN:SIGNED_LEN + 72] + raw[
        SIGNED_LEN + 144:]
    _rejected(swapped, chain, now)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_random_multi_byte_tampering(case: tuple[bytes, SnpCertChain, datetime], data: st.DataObject) -> None:
    raw, chain, now = case
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        index = data.draw(st.integers(0, SIGNED_LEN + 143))
        mutated[index] = data.draw(st.integers(0, 255).filter(lambda value, i=index: value != raw[i]))
    _rejected(bytes(mutated), chain, now)


def test_tampered_certificate_table_blob(case: tuple[bytes, SnpCertChain, datetime]) -> None:
    """A certificate table whose bytes were altered either fails to parse or yields a chain
    that does not verify; it never yields a verified report."""
    raw, chain, now = case
    vek_guid = VLEK_GUID if chain.signing_key is SigningKey.VLEK else VCEK_GUID
    blob = encode_cert_table([CertTableEntry(vek_guid, chain.vek), CertTableEntry(ASK_GUID, chain.ask),
                              CertTableEntry(ARK_GUID, chain.ark)])
    for index in range(0, len(blob), 7):
        try:
            table = parse_cert_table(_flip(blob, index))
        except ParseError:
            continue
        mutated = chain_from_table(table, chain.signing_key)
        if mutated is None:
            continue
        _rejected(raw, mutated, now)
