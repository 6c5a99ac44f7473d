"""verify_evidence: parse → verify → validate, every failure a readable entry, on real vectors."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from attest import sim
from attest.binding import build_report_data
from attest.collateral import collateral_from_json
from attest.errors import AttestError
from attest.evidence import Evidence
from attest.policy import Policy
from attest.snp_certs import ARK_GUID, ASK_GUID, VCEK_GUID, CertTableEntry, encode_cert_table
from attest.verify import gather_materials, load_certificates, verify_evidence, verify_evidence_online

AT_TDX = datetime(2025, 7, 19, 10, 0, 34, tzinfo=timezone.utc)
AT_SNP = datetime(2023, 6, 1, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def _dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDVM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CDVM_CACHE_DIR", str(tmp_path / "cache"))


def _tdx(vectors: Path) -> tuple[bytes, object]:
    d = vectors / "tee/tdx/dcap-qvl"
    return (d / "tdx_quote").read_bytes(), collateral_from_json((d / "tdx_quote_collateral.json").read_bytes())


def _snp_envelope(vectors: Path) -> Evidence:
    d = vectors / "tee/snp/virtee-sev"
    ask, ark = (c.public_bytes(Encoding.DER) for c in load_certificates((d / "cert_chain_milan").read_bytes(), "chain"))
    table = encode_cert_table([CertTableEntry(VCEK_GUID, (d / "vcek_milan.der").read_bytes()),
                               CertTableEntry(ASK_GUID, ask), CertTableEntry(ARK_GUID, ark)])
    return Evidence("snp", (d / "report_milan.bin").read_bytes(), certs=table, provider="tsm")


def test_tdx_with_collateral(vectors: Path) -> None:
    quote, collateral = _tdx(vectors)
    verdict = verify_evidence(quote, now=AT_TDX, collateral=collateral)
    assert verdict.verified and verdict.confidential and verdict.errors == () and verdict.advisories == ()
    assert verdict.render_lines()[0] == "VERIFIED: genuine TDX evidence, accepted by the policy"


def test_snp_from_its_own_certificate_table(vectors: Path) -> None:
    verdict = verify_evidence(_snp_envelope(vectors), now=AT_SNP)
    assert verdict.verified and verdict.provider == "tsm" and verdict.details["product"] == "Milan"


@pytest.mark.parametrize("offset", [100, 700, 1000])
def test_tampered_tdx_quote_is_an_error_not_an_exception(vectors: Path, offset: int) -> None:
    quote, collateral = _tdx(vectors)
    bad = bytearray(quote)
    bad[offset] ^= 1
    verdict = verify_evidence(bytes(bad), now=AT_TDX, collateral=collateral)
    assert not verdict.verified and not verdict.confidential
    assert len(verdict.errors) == 1 and verdict.errors[0].startswith(("verify: ", "parse: "))
    assert verdict.render_lines()[0] == "NOT VERIFIED: TDX evidence rejected"


def test_tampered_snp_report(vectors: Path) -> None:
    evidence = _snp_envelope(vectors)
    raw = bytearray(evidence.raw)
    raw[0x90] ^= 1  # MEASUREMENT
    verdict = verify_evidence(Evidence("snp", bytes(raw), evidence.certs), now=AT_SNP)
    assert not verdict.verified and "signature does not verify" in verdict.errors[0]


@pytest.mark.parametrize("raw", [b"", b"\x04\x00\x02\x00\x81\x00\x00\x00" + bytes(100), bytes(3000)])
def test_garbage_becomes_a_parse_error(raw: bytes) -> None:
    verdict = verify_evidence(raw, now=AT_TDX)
    assert not verdict.verified and verdict.errors[0].startswith("parse: ")


def test_truncated_snp_and_tdreport(vectors: Path) -> None:
    tdreport = (vectors / "tee/tdx/intel-dcap_tdreport_for_test.dat").read_bytes()
    verdict = verify_evidence(tdreport, now=AT_TDX)
    assert verdict.tee == "tdreport" and not verdict.verified and "cannot be verified remotely" in verdict.errors[0]
    assert verdict.report_data == tdreport[128:192].hex()


def test_naive_time_is_misuse(vectors: Path) -> None:
    with pytest.raises(TypeError):
        verify_evidence(_tdx(vectors)[0], now=datetime(2025, 1, 1))


def test_unreadable_roots_dir(vectors: Path, tmp_path: Path) -> None:
    with pytest.raises(AttestError, match="cannot read roots directory"):
        verify_evidence(_snp_envelope(vectors), now=AT_SNP, roots_dir=tmp_path / "absent")


def test_sim_binding_end_to_end() -> None:
    pub, job, nonce, model = (bytes([i]) * 32 for i in (1, 2, 3, 4))
    quote = sim.make_quote(build_report_data(pub, job, nonce, model))
    now = datetime.now(timezone.utc)
    policy = Policy.from_toml(f'allow_simulated = true\n[binding]\npubkey = "{pub.hex()}"\njob_id = "{job.hex()}"\n'
                              f'nonce = "{nonce.hex()}"\nmodel_sha256 = ["{model.hex()}"]')
    verdict = verify_evidence(quote, now=now, policy=policy)
    assert verdict.tee == "sim" and verdict.verified and not verdict.confidential
    assert verdict.render_lines()[0].startswith("SIMULATED TEE")
    other_nonce = Policy.from_toml(f'allow_simulated = true\n[binding]\npubkey = "{pub.hex()}"\njob_id = "{job.hex()}"\n'
                                   f'nonce = "{"00" * 32}"\nmodel_sha256 = ["{model.hex()}"]')
    rejected = verify_evidence(quote, now=now, policy=other_nonce)
    assert not rejected.verified and rejected.policy_violations[0].startswith("REPORTDATA[32:64]")
    refused = verify_evidence(quote, now=now)
    assert refused.errors == ("simulated TEE evidence refused: pass --allow-simulated to accept it for testing; "
                              "it proves nothing",)


async def test_offline_gathering_notes_what_is_missing(vectors: Path) -> None:
    quote, _ = _tdx(vectors)
    materials = await gather_materials(Evidence("tdx", quote), now=AT_TDX, offline=True)
    assert materials.collateral is None and "offline and no cached collateral" in materials.notes[0]
    report = (vectors / "tee/snp/virtee-sev/report_milan.bin").read_bytes()
    verdict = await verify_evidence_online(Evidence("snp", report), now=AT_SNP, offline=True)
    assert not verdict.verified and "no VCEK certificate" in verdict.errors[0]
    assert verdict.details["notes"][0].startswith("SNP certificates: cannot tell whether this version-2 report")


async def test_online_path_uses_files_without_fetching(vectors: Path) -> None:
    verdict = await verify_evidence_online(_snp_envelope(vectors), now=AT_SNP, offline=True)
    assert verdict.verified and "notes" not in verdict.details
