"""TDREPORT parsing with Intel's recorded TDX_CMD_GET_REPORT0 output."""
from __future__ import annotations

import hashlib

import pytest

from attest.errors import ParseError
from attest.tdreport import parse_tdreport


def test_intel_tdreport_vector(vectors):
    raw = (vectors / "tee" / "tdx" / "intel-dcap_tdreport_for_test.dat").read_bytes()
    r = parse_tdreport(raw)
    assert r.report_type == 0x81
    assert r.report_data == raw[128:192]
    assert r.tee_tcb_svn.hex() == "04000500000000000000000000000000"
    assert r.xfam.hex() == "e702060000000000"
    # The MAC'd hashes bind TEE_TCB_INFO (239 bytes) and TDINFO (512 bytes): layout check.
    assert hashlib.sha384(raw[256:256 + 239]).digest() == r.tee_tcb_info_hash
    assert hashlib.sha384(raw[512:1024]).digest() == r.tee_info_hash
    assert len(r.rtmrs) == 4 and all(len(m) == 48 for m in r.rtmrs)


def test_malformed_tdreport(vectors):
    raw = (vectors / "tee" / "tdx" / "intel-dcap_tdreport_for_test.dat").read_bytes()
    for bad in (raw[:-1], raw + b"\0", b""):
        with pytest.raises(ParseError, match="1024 bytes"):
            parse_tdreport(bad)
    with pytest.raises(ParseError, match="0x81"):
        parse_tdreport(b"\x00" + raw[1:])
    with pytest.raises(ParseError):
        parse_tdreport(None)  # type: ignore[arg-type]
