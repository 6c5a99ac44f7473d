"""The SGX extension of real PCK certificates, cross-checked with dcap-qvl's decoder."""
from __future__ import annotations

import json

import dcap_qvl
import pytest
from hypothesis import given, settings, strategies as st

from attest.errors import ParseError
from attest.pck import parse_sgx_extension, pck_ca_type, pck_extension
from attest.sim import sgx_extension_der
from attest.tdx import parse_quote
from attest.x509util import parse_pem_chain

QUOTES = ["dcap-qvl/tdx_quote", "dcap-qvl/tdx_quote_outdated", "dcap-qvl/tdx-quote.bin",
          "go-tdx-guest/tdx_prod_quote_SPR_E4.dat", "go-tdx-guest/quote_v5_sample.dat",
          "trustee/tdx_quote_4.dat", "trustee/tdx_quote_5.dat"]


def _leaf(vectors, name):
    raw = (vectors / "tee" / "tdx" / name).read_bytes()
    return raw, parse_pem_chain(parse_quote(raw).signature_data.certification.pck_cert_chain, "chain")[0]


@pytest.mark.parametrize("name", QUOTES)
def test_extension_matches_dcap_qvl_and_expected(vectors, name):
    raw, leaf = _leaf(vectors, name)
    ext = pck_extension(leaf)
    theirs = dcap_qvl.parse_quote(raw).pck_extension()
    assert ext.fmspc == theirs.fmspc and ext.pce_id == theirs.pce_id and ext.ppid == theirs.ppid
    assert ext.pce_svn == theirs.pce_svn and ext.cpu_svn == theirs.cpu_svn and ext.sgx_type == theirs.sgx_type
    assert ext.platform_instance_id == theirs.platform_instance_id
    assert bytes(ext.sgx_tcb_comp_svns) == ext.cpu_svn
    expected = json.loads((vectors / "tee" / "EXPECTED.json").read_text())
    for exp in expected.values():
        if exp.get("file") == f"tdx/{name}":
            assert ext.fmspc.hex() == exp["fmspc"] and ext.pce_svn == exp["pcesvn"]
    assert pck_ca_type(leaf) == "platform"
    assert ext.dynamic_platform is not None and ext.cached_keys is not None and ext.smt_enabled is not None


def test_outdated_platform_sgx_component_8(vectors):
    _, leaf = _leaf(vectors, "dcap-qvl/tdx_quote_outdated")
    assert pck_extension(leaf).sgx_tcb_comp_svns[7] == 3


def test_roundtrip_of_generated_extension():
    der = sgx_extension_der(bytes(range(16)), tuple(range(16)), 300, b"\x00\x01", bytes.fromhex("00c0de000000"))
    ext = parse_sgx_extension(der)
    assert ext.sgx_tcb_comp_svns == tuple(range(16)) and ext.pce_svn == 300 and ext.pce_id == b"\x00\x01"
    assert ext.platform_instance_id is None and ext.dynamic_platform is None


def test_every_truncation_and_corruption_raises_parse_error(vectors):
    _, leaf = _leaf(vectors, "dcap-qvl/tdx_quote")
    from cryptography import x509

    der = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.2.840.113741.1.13.1")).value.value
    for cut in range(len(der)):
        with pytest.raises(ParseError):
            parse_sgx_extension(der[:cut])
    with pytest.raises(ParseError):
        parse_sgx_extension(der + b"\0")


def test_missing_extension(vectors):
    _, leaf = _leaf(vectors, "dcap-qvl/tdx_quote")
    root = parse_pem_chain(parse_quote((vectors / "tee/tdx/dcap-qvl/tdx_quote").read_bytes())
                           .signature_data.certification.pck_cert_chain, "c")[-1]
    with pytest.raises(ParseError, match="no SGX extension"):
        pck_extension(root)
    with pytest.raises(ParseError, match="neither"):
        pck_ca_type(root)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_extension_only_raises_parse_error(data):
    for blob in (data, b"\x30" + bytes([len(data) & 0x7F]) + data):
        try:
            parse_sgx_extension(blob)
        except ParseError:
            pass
