"""Evidence kinds from bytes alone, and the JSON envelope."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from attest import sim
from attest.errors import ParseError
from attest.evidence import Evidence, detect_tee, load_evidence

KINDS = {
    "tdx/dcap-qvl/tdx_quote": "tdx",
    "tdx/dcap-qvl/tdx_quote_outdated": "tdx",
    "tdx/go-tdx-guest/tdx_prod_quote_SPR_E4.dat": "tdx",
    "tdx/go-tdx-guest/quote_v5_sample.dat": "tdx",
    "tdx/trustee/tdx_quote_4.dat": "tdx",
    "tdx/trustee/tdx_quote_5.dat": "tdx",
    "tdx/intel-dcap_tdreport_for_test.dat": "tdreport",
    "snp/go-sev-guest/attestation.bin": "snp",
    "snp/virtee-sev/report_milan.bin": "snp",
    "snp/trustee/test-report.bin": "snp",
    "snp/trustee/test-vlek-report.bin": "snp",
}


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDVM_STATE_DIR", str(tmp_path / "state"))


@pytest.mark.parametrize(("name", "kind"), sorted(KINDS.items()))
def test_detects_every_real_vector(vectors: Path, name: str, kind: str) -> None:
    raw = (vectors / "tee" / name).read_bytes()
    assert detect_tee(raw) == kind
    assert load_evidence(raw).tee == kind


def test_detects_simulated_quotes() -> None:
    raw = sim.make_quote(bytes(range(64)))
    assert detect_tee(raw) == "sim"


@pytest.mark.parametrize("name", ["tdx/dcap-qvl/tdx-quote.hex", "tdx/dcap-qvl/quote-from-tappd.hex", "snp/virtee-sev/report_milan.hex"])
def test_hex_files_load(vectors: Path, name: str) -> None:
    evidence = load_evidence((vectors / "tee" / name).read_bytes())
    binary = (vectors / "tee" / name).with_suffix(".bin").read_bytes()
    assert evidence.raw == binary


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x04\x00", bytes(1184), bytes(1024), b"\x02" + bytes(1183), b"hello world", bytes(5000)],
)
def test_garbage_is_a_parse_error(raw: bytes) -> None:
    with pytest.raises(ParseError, match="unrecognised evidence"):
        detect_tee(raw)


def test_envelope_round_trip_with_certs(vectors: Path) -> None:
    raw = (vectors / "tee/snp/virtee-sev/report_milan.bin").read_bytes()
    evidence = Evidence("snp", raw, certs=b"\x01\x02", provider="tsm")
    text = evidence.to_json()
    assert json.loads(text)["cdvm_evidence"] == 1
    assert Evidence.from_json(text) == evidence
    assert load_evidence(text.encode()) == evidence


def _envelope(**fields: object) -> str:
    return json.dumps({"cdvm_evidence": 1, "tee": "tdx", "provider": "x", "raw": "", "certs": None, **fields})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        (_envelope(cdvm_evidence=2), "version is 2"),
        (_envelope(extra=1), "unknown field"),
        (_envelope(raw=None), "lacks the 'raw' field"),
        (_envelope(raw="!!"), "'raw' is not valid base64"),
        (_envelope(raw=5), "'raw' must be a base64 string"),
        (_envelope(provider=3), "'provider' must be a string"),
        (_envelope(raw=base64.b64encode(b"junk").decode()), "unrecognised evidence"),
    ],
)
def test_bad_envelopes(text: str, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        Evidence.from_json(text)


def test_envelope_tee_must_match_bytes(vectors: Path) -> None:
    raw = (vectors / "tee/snp/trustee/test-report.bin").read_bytes()
    with pytest.raises(ParseError, match="says tee 'tdx' but its bytes are 'snp'"):
        Evidence.from_json(_envelope(raw=base64.b64encode(raw).decode()))


def test_unknown_kind_and_non_bytes() -> None:
    with pytest.raises(ParseError, match="unknown TEE kind"):
        Evidence("sgx", b"")
    with pytest.raises(ParseError, match="must be bytes"):
        detect_tee("text")  # type: ignore[arg-type]
    with pytest.raises(ParseError, match="must be bytes"):
        load_evidence(None)  # type: ignore[arg-type]
