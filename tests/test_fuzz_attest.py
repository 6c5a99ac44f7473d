"""Hostile input to attestation, fuzzed: TDX quotes, TDREPORTs, SEV-SNP reports and certificate
tables, X.509 certificates and PEM chains, evidence envelopes, Intel collateral JSON, policy
TOML, and the whole ``verify_evidence`` pipeline.

Seeds are the real vectors (quotes and reports from real hardware, Intel's collateral, AMD's
certificates). Every input ends in a result or a typed :class:`attest.errors.AttestError`;
``verify_evidence`` never raises for bad evidence. Accepted inputs keep the promises that
matter: a mutated quote or report verifies only if every signed byte is the original's.
"""
from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import example, given
from hypothesis import strategies as st

from attest import sim
from attest.collateral import (
    Collateral,
    collateral_from_json,
    collateral_to_json,
    parse_qe_identity,
    parse_tcb_info,
    split_signed_body,
)
from attest.errors import AttestError
from attest.evidence import Evidence, detect_tee, load_evidence
from attest.policy import Policy, validate
from attest.snp import REPORT_LEN, parse_report
from attest.snp_certs import ARK_GUID, ASK_GUID, VCEK_GUID, CertTableEntry, encode_cert_table, parse_cert_table
from attest.tdreport import parse_tdreport
from attest.tdx import parse_quote
from attest.tdx_verify import verify_quote
from attest.verdict import Verdict
from attest.verify import verify_evidence
from attest.x509util import load_der_certificate, parse_pem_chain
from fuzzing import (
    attempt,
    deep_json,
    dumps,
    fuzz_settings,
    json_values,
    long_strings,
    mutated_bytes,
    mutated_json,
    mutated_json_text,
    mutated_text,
    ok,
    toml_document,
    vector_bytes,
    vector_text,
)

UTC = timezone.utc
AT_TDX = datetime(2025, 7, 19, 10, 0, 34, tzinfo=UTC)
AT_SNP = datetime(2023, 6, 1, tzinfo=UTC)
TDX_QUOTES = ("tee/tdx/dcap-qvl/tdx_quote", "tee/tdx/dcap-qvl/tdx_quote_outdated", "tee/tdx/dcap-qvl/tdx-quote.bin",
              "tee/tdx/go-tdx-guest/tdx_prod_quote_SPR_E4.dat", "tee/tdx/go-tdx-guest/quote_v5_sample.dat",
              "tee/tdx/trustee/tdx_quote_5.dat")
SNP_REPORTS = ("tee/snp/virtee-sev/report_milan.bin", "tee/snp/go-sev-guest/attestation.bin",
               "tee/snp/trustee/test-report.bin", "tee/snp/trustee/test-vlek-report.bin")
DER_CERTS = ("tee/snp/virtee-sev/vcek_milan.der", "tee/snp/virtee-sev/vcek_turin.der", "tee/snp/trustee/test-vlek.der",
             "tee/snp/go-sev-guest/vcek.testcer")
PEM_CHAINS = ("tee/roots/amd/go-sev-guest_ask_ark_milan.pem", "tee/roots/intel/go-tdx-guest_trusted_root.pem",
              "tee/snp/virtee-sev/cert_chain_milan")


@pytest.fixture(autouse=True)
def _needs_vectors(vectors: Path) -> None:
    """The seeds are real evidence: fail clearly when the vectors are missing."""


def _tdx_hot(relative: str) -> list[int]:
    """Offsets of a quote's version, type and length fields (where a uniform flip rarely lands)."""
    quote = parse_quote(vector_bytes(relative))
    sig = quote.signed_length + 4
    cert = sig + 134
    auth = cert + 384 + 64
    chain = auth + 2 + len(quote.signature_data.certification.qe_auth_data)
    return [0, 2, 4, 48, 50, 52, quote.signed_length, quote.signed_length + 2, sig + 128, sig + 130, sig + 132, auth,
            auth + 1, chain, chain + 2, chain + 4, chain + 6, chain + 40, cert + 16, cert + 48, cert + 256]


def _mutated_quote(relative: str) -> st.SearchStrategy[bytes]:
    return mutated_bytes(lambda: vector_bytes(relative), hot=lambda: _tdx_hot(relative))


# ---------------------------------------------------------------------------- TDX quotes and TDREPORT


@fuzz_settings(400)
@given(raw=st.sampled_from(TDX_QUOTES).flatmap(_mutated_quote) | st.binary(max_size=800))
@example(raw=b"")
def test_tdx_parse_quote(raw: bytes) -> None:
    quote = attempt(parse_quote, raw)
    if ok(quote):
        assert quote.raw == raw and quote.signed_length in (632, 638, 702) and quote.trailing_bytes >= 0
        assert parse_quote(raw[:len(raw) - quote.trailing_bytes]).trailing_bytes == 0


@cache
def _dcap_collateral() -> Collateral:
    return collateral_from_json(vector_bytes("tee/tdx/dcap-qvl/tdx_quote_collateral.json"))


def _quote_with_pem_padding_changed() -> bytes:
    """The real quote with the PCK chain's trailing NUL turned into a space: nothing signs the PEM
    text, only the certificates in it, so this still verifies (the long run found it: an invariant
    that demanded byte-equal certification data was too strict)."""
    raw = bytearray(vector_bytes("tee/tdx/dcap-qvl/tdx_quote"))
    raw[raw.rindex(b"-----END CERTIFICATE-----\n\x00") + 26] = 0x20
    return bytes(raw)


@fuzz_settings(300)
@given(raw=_mutated_quote("tee/tdx/dcap-qvl/tdx_quote"))
@example(raw=_quote_with_pem_padding_changed)
def test_tdx_verify_mutated_quote(raw: bytes | Any) -> None:
    raw = raw() if callable(raw) else raw
    original = parse_quote(vector_bytes("tee/tdx/dcap-qvl/tdx_quote"))
    verified = attempt(verify_quote, raw, _dcap_collateral(), AT_TDX)
    if ok(verified):
        # Only what nothing vouches for may differ: trailing data, PEM whitespace and padding.
        mine, real = verified.quote.signature_data, original.signature_data
        assert verified.quote.signed_bytes == original.signed_bytes
        assert (mine.signature, mine.attestation_key) == (real.signature, real.attestation_key)
        assert replace(mine.certification, pck_cert_chain=b"") == replace(real.certification, pck_cert_chain=b"")
        assert parse_pem_chain(mine.certification.pck_cert_chain, "x") == parse_pem_chain(
            real.certification.pck_cert_chain, "x")
        assert verified.status == "UpToDate"


@fuzz_settings(150)
@given(raw=_mutated_quote("tee/tdx/go-tdx-guest/quote_v5_sample.dat"))
def test_tdx_verify_mutated_quote_without_collateral(raw: bytes) -> None:
    original = parse_quote(vector_bytes("tee/tdx/go-tdx-guest/quote_v5_sample.dat"))
    verified = attempt(verify_quote, raw, None, datetime(2026, 2, 3, 1, tzinfo=UTC))
    if ok(verified):
        assert verified.quote.signed_bytes == original.signed_bytes and verified.status is None


@fuzz_settings(150)
@given(raw=mutated_bytes(lambda: vector_bytes("tee/tdx/intel-dcap_tdreport_for_test.dat"), hot=(0, 1, 2))
       | st.binary(min_size=1020, max_size=1030) | st.binary(max_size=64))
def test_tdreport(raw: bytes) -> None:
    report = attempt(parse_tdreport, raw)
    if ok(report):
        assert len(raw) == 1024 and report.report_data == raw[128:192]


# ---------------------------------------------------------------------------- SEV-SNP


_SNP_HOT = (0x00, 0x04, 0x08, 0x0A, 0x30, 0x34, 0x38, 0x40, 0x48, 0x4C, 0x188, 0x189, 0x18B, 0x1EB, 0x1EF, 0x1F8, 0x208,
            0x2A0 + 47, 0x2A0 + 48, 0x2A0 + 72 + 48, 0x2A0 + 144)


@fuzz_settings(300)
@given(raw=st.sampled_from(SNP_REPORTS).flatmap(lambda r: mutated_bytes(lambda: vector_bytes(r), hot=_SNP_HOT))
       | st.binary(min_size=REPORT_LEN, max_size=REPORT_LEN) | st.binary(max_size=64))
def test_snp_parse_report(raw: bytes) -> None:
    report = attempt(parse_report, raw)
    if ok(report):
        assert len(raw) == REPORT_LEN and report.version in (2, 3, 5) and report.signed_bytes == raw[:0x2A0]


@cache
def _milan_table() -> bytes:
    ask, ark = (c.public_bytes(Encoding.DER) for c in parse_pem_chain(
        vector_bytes("tee/snp/virtee-sev/cert_chain_milan"), "chain"))
    return encode_cert_table([CertTableEntry(VCEK_GUID, vector_bytes("tee/snp/virtee-sev/vcek_milan.der")),
                              CertTableEntry(ASK_GUID, ask), CertTableEntry(ARK_GUID, ark)])


_TABLE_HOT = tuple(range(16, 24)) + tuple(range(40, 48)) + tuple(range(64, 72)) + (72, 88, 96)


@fuzz_settings(250)
@given(data=mutated_bytes(_milan_table, hot=_TABLE_HOT) | st.binary(max_size=200))
@example(data=bytes(24))
def test_snp_cert_table(data: bytes) -> None:
    table = attempt(parse_cert_table, data)
    if ok(table):
        assert all(entry.data and entry.data in data for entry in table.entries)
        assert len({entry.guid for entry in table.entries}) == len(table.entries)


# ---------------------------------------------------------------------------- certificates


@fuzz_settings(300)
@given(der=st.sampled_from(DER_CERTS).flatmap(lambda p: mutated_bytes(lambda: vector_bytes(p), hot=(0, 1, 2, 3, 4, 5, 6)))
       | st.binary(max_size=200))
def test_der_certificate(der: bytes) -> None:
    cert = attempt(load_der_certificate, der, "fuzzed certificate")
    if ok(cert):
        assert cert.public_bytes(Encoding.DER) == der
        cert.subject.rfc4514_string()
        cert.public_key()


def _pck_chain_text() -> str:
    return parse_quote(vector_bytes("tee/tdx/dcap-qvl/tdx_quote")).signature_data.certification.pck_cert_chain.decode()


@fuzz_settings(200)
@given(pem=st.sampled_from(PEM_CHAINS).flatmap(lambda p: mutated_text(lambda: vector_text(p)))
       | mutated_text(_pck_chain_text) | st.text(max_size=200).map(lambda t: f"-----BEGIN CERTIFICATE-----{t}"))
def test_pem_chain(pem: str) -> None:
    chain = attempt(parse_pem_chain, pem.encode("utf-8", "surrogatepass"), "fuzzed chain")
    if ok(chain):
        assert chain and all(c.public_bytes(Encoding.PEM).decode() for c in chain)


# ---------------------------------------------------------------------------- evidence envelopes


@cache
def _envelopes() -> tuple[dict[str, Any], ...]:
    snp = Evidence("snp", vector_bytes(SNP_REPORTS[0]), certs=_milan_table(), provider="tsm")
    tdx = Evidence("tdx", vector_bytes(TDX_QUOTES[0]), provider="qgs")
    simulated = Evidence("sim", sim.make_quote(bytes(range(64))), provider="sim")
    return tuple(json.loads(e.to_json()) for e in (snp, tdx, simulated))


@fuzz_settings(250)
@given(text=st.integers(0, 2).flatmap(lambda i: mutated_json_text(lambda: _envelopes()[i])) | st.text(max_size=100))
@example(text=deep_json())
@example(text='{"cdvm_evidence": 1, "raw": "AAAA", "tee": ["tdx"]}')
def test_evidence_envelope(text: str) -> None:
    evidence = attempt(Evidence.from_json, text)
    if ok(evidence):
        assert detect_tee(evidence.raw) == evidence.tee


@fuzz_settings(250)
@given(data=st.sampled_from(TDX_QUOTES[:1] + SNP_REPORTS[:1] + ("tee/tdx/intel-dcap_tdreport_for_test.dat",
                                                                 "tee/tdx/dcap-qvl/tdx-quote.hex")).flatmap(
    lambda p: mutated_bytes(lambda: vector_bytes(p), max_ops=2))
    | st.integers(0, 2).flatmap(lambda i: mutated_json_text(lambda: _envelopes()[i])).map(
        lambda t: t.encode("utf-8", "surrogatepass")))
@example(data=b"0x" + b"0" * 2048)
def test_load_evidence(data: bytes) -> None:
    evidence = attempt(load_evidence, data)
    if ok(evidence):
        assert detect_tee(evidence.raw) == evidence.tee


# ---------------------------------------------------------------------------- collateral


@fuzz_settings(200)
@given(text=mutated_json_text(lambda: json.loads(vector_bytes("tee/tdx/dcap-qvl/tdx_quote_collateral.json")))
       | st.text(max_size=100))
@example(text=deep_json())
def test_collateral_json(text: str) -> None:
    collateral = attempt(collateral_from_json, text)
    if ok(collateral):
        assert collateral_from_json(collateral_to_json(collateral)) == collateral
        verified = attempt(verify_quote, vector_bytes(TDX_QUOTES[0]), collateral, AT_TDX)
        if ok(verified):
            assert verified.status == "UpToDate"


def _tcb_info_seed() -> Any:
    return json.loads(_dcap_collateral().tcb_info)


def _qe_identity_seed() -> Any:
    return json.loads(_dcap_collateral().qe_identity)


@fuzz_settings(300)
@given(raw=mutated_json(_tcb_info_seed).map(dumps) | mutated_json(
           lambda: json.loads(vector_bytes("tee/tdx/trustee/tcbInfo.json"))["tcbInfo"]).map(dumps)
       | json_values.map(dumps))
@example(raw="5")
@example(raw="null")
@example(raw='{"tdxModuleIdentities": 5}')
@example(raw=deep_json())
def test_tcb_info(raw: str) -> None:
    info = attempt(parse_tcb_info, raw)
    if ok(info):
        assert info.issue_date.tzinfo is not None and len(info.fmspc) == 6
        assert all(len(level.sgx_components) == 16 for level in info.tcb_levels)


@fuzz_settings(250)
@given(raw=mutated_json(_qe_identity_seed).map(dumps) | json_values.map(dumps))
@example(raw='{"id": "TD_QE", "version": 2, "issueDate": "0001-01-01T00:00:00+01:00"}')
@example(raw='{"id": "TD_QE", "version": 2, "issueDate": "9999-12-31T23:59:59-01:00"}')
def test_qe_identity(raw: str) -> None:
    identity = attempt(parse_qe_identity, raw)
    if ok(identity):
        assert identity.issue_date.tzinfo is not None and len(identity.mrsigner) == 32


_PCS_BODIES = {"tee/tdx/go-tdx-guest/sample_tcbInfo_response": "tcbInfo", "tee/tdx/trustee/tcbInfo.json": "tcbInfo",
               "tee/tdx/go-tdx-guest/sample_qeIdentity_response": "enclaveIdentity",
               "tee/tdx/trustee/enclaveIdentity.json": "enclaveIdentity"}


@fuzz_settings(150)
@given(body=st.sampled_from(sorted(_PCS_BODIES)).flatmap(
    lambda p: st.tuples(st.just(p), mutated_text(lambda: vector_text(p)) | mutated_json_text(
        lambda: json.loads(vector_bytes(p))))))
def test_pcs_signed_body(body: tuple[str, str]) -> None:
    path, text = body
    key = _PCS_BODIES[path]
    split = attempt(split_signed_body, text, key)
    if ok(split):
        inner, signature = split
        assert len(signature) == 64 and json.loads(inner) == json.loads(text)[key]
        attempt(parse_tcb_info if key == "tcbInfo" else parse_qe_identity, inner)


def _root_crl_issuer_retagged() -> bytes:
    """The real root CA CRL with its issuer CN's UTF8String tag (0x0C) turned into 0x0D, which
    cryptography parses lazily: found by the fuzzer as an untyped ValueError deep in verification."""
    crl = bytearray(_dcap_collateral().root_ca_crl)
    crl[crl.index(b"\x0c\x11Intel SGX Root CA")] = 0x0D
    return bytes(crl)


@fuzz_settings(150)
@given(case=st.sampled_from(("root_ca_crl", "pck_crl")).flatmap(lambda field: st.tuples(
    st.just(field), mutated_bytes(lambda: getattr(_dcap_collateral(), field), hot=(0, 1, 2, 3, 4)))))
@example(case=("root_ca_crl", _root_crl_issuer_retagged))
def test_mutated_crls(case: tuple[str, bytes | Any]) -> None:
    field, mutated = case
    mutated = mutated() if callable(mutated) else mutated
    collateral = replace(_dcap_collateral(), **{field: mutated})
    verified = attempt(verify_quote, vector_bytes(TDX_QUOTES[0]), collateral, AT_TDX)
    if ok(verified):
        assert verified.status == "UpToDate"


# ---------------------------------------------------------------------------- policy TOML


_POLICY_SEED = {"allow_simulated": False,
                "tdx": {"allow_debug": False, "accepted_tcb_statuses": ["UpToDate"], "mr_td": ["00" * 48],
                        "min_tee_tcb_svn": "00" * 16},
                "snp": {"allowed_vmpls": [0, 1], "min_reported_tcb": {"bl": 3, "snp": 8}, "measurement": ["ab" * 48]},
                "binding": {"pubkey": "11" * 32, "job_id": "22" * 32, "nonce": "33" * 32, "model_sha256": ["44" * 32]}}


@fuzz_settings(300)
@given(text=mutated_text(lambda: (Path(__file__).resolve().parents[1] / "docs" / "policy.example.toml").read_text())
       | mutated_json(_POLICY_SEED).map(lambda d: toml_document(d) if isinstance(d, dict) else str(d))
       | st.text(max_size=100))
@example(text="a = " + "[" * 5000 + "]" * 5000)
@example(text='[binding]\nreport_data = "' + "0" * 127 + '"')
def test_policy_toml(text: str) -> None:
    policy = attempt(Policy.from_toml, text)
    if ok(policy):
        violations = validate(policy, parse_quote(vector_bytes(TDX_QUOTES[0])), None)
        assert all(isinstance(v, str) and v for v in violations)
        validate(policy, parse_report(vector_bytes(SNP_REPORTS[0])), None)


# ---------------------------------------------------------------------------- the whole pipeline


def _verdict(evidence: Evidence | bytes, **kwargs: Any) -> Verdict:
    verdict = attempt(verify_evidence, evidence, **kwargs)
    assert ok(verdict), f"verify_evidence raised for bad evidence: {verdict.error!r}"
    assert isinstance(verdict, Verdict)
    assert not (verdict.verified and verdict.errors), "a verdict with errors claims to be verified"
    return verdict


@fuzz_settings(250)
@given(raw=_mutated_quote("tee/tdx/dcap-qvl/tdx_quote"))
def test_verify_evidence_tdx(raw: bytes) -> None:
    verdict = _verdict(raw, now=AT_TDX, collateral=_dcap_collateral())
    if verdict.verified:
        assert parse_quote(raw).signed_bytes == parse_quote(vector_bytes(TDX_QUOTES[0])).signed_bytes


@fuzz_settings(200)
@given(raw=st.sampled_from(SNP_REPORTS[:1]).flatmap(lambda r: mutated_bytes(lambda: vector_bytes(r), hot=_SNP_HOT)),
       table=st.none() | mutated_bytes(_milan_table, hot=_TABLE_HOT, max_ops=2))
def test_verify_evidence_snp(raw: bytes, table: bytes | None) -> None:
    verdict = _verdict(Evidence("snp", raw, certs=_milan_table() if table is None else table), now=AT_SNP)
    if verdict.verified:
        assert raw[:0x2A0] == vector_bytes(SNP_REPORTS[0])[:0x2A0]


@cache
def _sim_quote() -> bytes:
    return sim.make_quote(bytes(range(64)))


@fuzz_settings(150)
@given(raw=mutated_bytes(_sim_quote, hot=lambda: [0, 2, 4, 632, 636 + 128, 636 + 130]) | st.binary(max_size=100),
       envelope=st.booleans())
def test_verify_evidence_simulated_and_random(raw: bytes, envelope: bool) -> None:
    now = datetime.now(UTC)
    evidence = Evidence("sim", raw).to_json().encode() if envelope and len(raw) > 8 else raw
    verdict = _verdict(evidence, now=now, allow_simulated=True)
    refused = _verdict(evidence, now=now)
    assert not refused.confidential
    if verdict.tee == "sim":
        assert not verdict.confidential and not refused.verified


# ---------------------------------------------------------------------------- long values


def _tcb_info_with(field: str, value: str) -> str:
    info = _tcb_info_seed()
    if field == "tcbStatus":
        info["tcbLevels"][0]["tcbStatus"] = value
    else:
        info[field] = value
    return dumps(info)


_LONG_VALUE_INPUTS = {
    "policy key": lambda v: attempt(Policy.from_toml, f"{json.dumps(v)} = 1"),
    "policy bool": lambda v: attempt(Policy.from_toml, f"allow_simulated = {json.dumps(v)}"),
    "policy hex": lambda v: attempt(Policy.from_toml, f"[tdx]\nmr_td = [{json.dumps(v)}]"),
    "envelope version": lambda v: attempt(Evidence.from_json, json.dumps({"cdvm_evidence": v})),
    "envelope field": lambda v: attempt(Evidence.from_json, json.dumps({"cdvm_evidence": 1, v: 1})),
    "envelope tee": lambda v: attempt(Evidence.from_json, json.dumps({**_envelopes()[1], "tee": v})),
    "tcb status": lambda v: attempt(parse_tcb_info, _tcb_info_with("tcbStatus", v)),
    "tcb date": lambda v: attempt(parse_tcb_info, _tcb_info_with("issueDate", v)),
    "tcb version": lambda v: attempt(parse_tcb_info, _tcb_info_with("version", v)),
}


@fuzz_settings(80)
@given(where=st.sampled_from(sorted(_LONG_VALUE_INPUTS)), value=long_strings)
@example(where="policy key", value="k" * 5000)
@example(where="envelope field", value="f" * 5000)
@example(where="tcb status", value="s" * 5000)
def test_long_values_give_short_messages(where: str, value: str) -> None:
    """Errors name the bad value, but never echo thousands of characters of it (attempt checks)."""
    _LONG_VALUE_INPUTS[where](value)
