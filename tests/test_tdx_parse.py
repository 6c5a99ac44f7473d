"""TDX quote parsing against every TDX vector in EXPECTED.json, and malformed input."""
from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings, strategies as st

from attest.errors import ParseError
from attest.tdx import TdAttributes, parse_quote


def _tdx_expected(vectors):
    expected = json.loads((vectors / "tee" / "EXPECTED.json").read_text())
    return {k: v for k, v in expected.items() if v.get("file", "").startswith("tdx/")}


def _load(vectors, name: str) -> bytes:
    return (vectors / "tee" / "tdx" / name).read_bytes()


def test_every_tdx_vector_parses_to_expected_fields(vectors):
    cases = _tdx_expected(vectors)
    assert len(cases) >= 8
    for name, exp in cases.items():
        raw = (vectors / "tee" / exp["file"]).read_bytes()
        q = parse_quote(raw)
        b = q.body
        assert q.header.version == exp["quote_version"], name
        assert q.body_type == exp["body_type"], name
        assert q.trailing_bytes == exp["trailing_bytes"], name
        assert len(raw) == exp["size"], name
        for field, value in (
            ("tee_tcb_svn", b.tee_tcb_svn), ("mr_seam", b.mr_seam), ("mr_signer_seam", b.mr_signer_seam),
            ("seam_attributes", b.seam_attributes), ("td_attributes", b.td_attributes), ("xfam", b.xfam),
            ("mr_td", b.mr_td), ("mr_config_id", b.mr_config_id), ("mr_owner", b.mr_owner),
            ("mr_owner_config", b.mr_owner_config), ("rtmr0", b.rtmr0), ("rtmr1", b.rtmr1),
            ("rtmr2", b.rtmr2), ("rtmr3", b.rtmr3), ("report_data", b.report_data),
        ):
            assert value.hex() == exp[field], (name, field)
        assert b.debug == exp["debug_td"], name
        assert q.signature_data.certification.qe_report.isv_svn == exp["qe_isv_svn"], name
        if exp["body_type"] == 3:
            assert b.tee_tcb_svn2.hex() == exp["tee_tcb_svn2"], name
            assert b.mr_service_td.hex() == exp["mr_servicetd"], name
        else:
            assert b.tee_tcb_svn2 is None and b.mr_service_td is None
        assert q.signed_length == {(4, 2): 632, (5, 2): 638, (5, 3): 702}[(q.header.version, q.body_type)]
        assert q.signed_bytes == raw[: q.signed_length]


def test_certification_data_structure(vectors):
    q = parse_quote(_load(vectors, "dcap-qvl/tdx_quote"))
    cert = q.signature_data.certification
    assert len(q.signature_data.signature) == 64 and len(q.signature_data.attestation_key) == 64
    assert len(cert.qe_report.raw) == 384 and len(cert.qe_report_signature) == 64
    assert len(cert.qe_auth_data) == 32
    assert cert.pck_cert_chain_type == 5
    assert cert.pck_cert_chain.count(b"-----BEGIN CERTIFICATE-----") == 3
    assert q.header.tee_type == 0x81 and q.header.attestation_key_type == 2


def test_td_attribute_helpers(vectors):
    debug = parse_quote(_load(vectors, "trustee/tdx_quote_4.dat")).body
    assert debug.debug and debug.sept_ve_disable and TdAttributes.DEBUG in debug.attributes
    normal = parse_quote(_load(vectors, "dcap-qvl/tdx_quote")).body
    assert not normal.debug and normal.sept_ve_disable and not normal.pks and not normal.key_locker
    assert normal.td_attributes_reserved_bits == 0
    spr = parse_quote(_load(vectors, "go-tdx-guest/tdx_prod_quote_SPR_E4.dat")).body
    assert spr.pks and not spr.sept_ve_disable
    servicetd = parse_quote(_load(vectors, "trustee/tdx_quote_5.dat")).body
    assert servicetd.is_td15 and any(servicetd.mr_service_td)


def test_trailing_bytes_are_ignored(vectors):
    raw = _load(vectors, "go-tdx-guest/tdx_prod_quote_SPR_E4.dat")
    q = parse_quote(raw)
    assert q.trailing_bytes == 39
    assert parse_quote(raw + b"more garbage").body == q.body


@pytest.mark.parametrize("name", ["dcap-qvl/tdx_quote", "dcap-qvl/tdx_quote_outdated"])
def test_every_truncation_raises_parse_error(vectors, name):
    raw = _load(vectors, name)
    end = len(raw) - parse_quote(raw).trailing_bytes
    for cut in range(0, end, 7):
        with pytest.raises(ParseError):
            parse_quote(raw[:cut])
    with pytest.raises(ParseError, match="truncated"):
        parse_quote(raw[:end - 1])


def test_malformed_headers_and_lengths(vectors):
    raw = bytearray(_load(vectors, "dcap-qvl/tdx_quote_outdated"))
    with pytest.raises(ParseError, match="version 6"):
        parse_quote(struct.pack("<H", 6) + raw[2:])
    with pytest.raises(ParseError, match="not a TDX quote"):
        parse_quote(raw[:4] + struct.pack("<I", 0) + raw[8:])
    with pytest.raises(ParseError, match="body type 9"):
        parse_quote(raw[:48] + struct.pack("<H", 9) + raw[50:])
    with pytest.raises(ParseError, match="must be 648 bytes"):
        parse_quote(raw[:50] + struct.pack("<I", 600) + raw[54:])
    bad = bytearray(raw)
    struct.pack_into("<H", bad, 702 + 4 + 128, 5)
    with pytest.raises(ParseError, match="certification data type is 5"):
        parse_quote(bytes(bad))
    bad = bytearray(raw)
    struct.pack_into("<I", bad, 702, struct.unpack_from("<I", raw, 702)[0] - 1)
    with pytest.raises(ParseError):
        parse_quote(bytes(bad))
    with pytest.raises(ParseError, match="must be bytes"):
        parse_quote("not bytes")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.integers(0, 4000))
def test_garbage_only_raises_parse_error(data, splice):
    prefix = struct.pack("<HHI", 4, 2, 0x81)
    for blob in (data, prefix + data, (prefix + bytes(40) + data)[:splice]):
        try:
            parse_quote(blob)
        except ParseError:
            pass
