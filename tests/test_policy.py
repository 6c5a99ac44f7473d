"""Policy files and the validate step, on real quotes and reports."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from attest.binding import build_report_data
from attest.errors import PolicyError
from attest.policy import Policy, validate
from attest.snp import parse_report
from attest.tdx import parse_quote

DOCS = Path(__file__).resolve().parents[1] / "docs"


@dataclass(frozen=True)
class Crypto:
    """The shape of a crypto verification result that the policy reads."""

    tcb_status: str | None = "UpToDate"
    qe_status: str | None = "UpToDate"
    product: str | None = "Milan"


def tdx(vectors: Path, name: str):
    return parse_quote((vectors / "tee/tdx" / name).read_bytes())


def snp(vectors: Path, name: str):
    return parse_report((vectors / "tee/snp" / name).read_bytes())


def test_example_policy_loads_and_equals_the_default() -> None:
    assert Policy.from_toml(DOCS / "policy.example.toml") == Policy.default()


def test_default_rejects_a_debug_td(vectors: Path) -> None:
    violations = validate(Policy.default(), tdx(vectors, "trustee/tdx_quote_4.dat"), Crypto())
    assert len(violations) == 1 and "debug TD" in violations[0]


def test_default_rejects_a_nonzero_mrservicetd(vectors: Path) -> None:
    quote = tdx(vectors, "trustee/tdx_quote_5.dat")
    violations = validate(Policy.default(), quote, Crypto())
    assert len(violations) == 1 and "MRSERVICETD" in violations[0]
    allowed = Policy.from_toml(f'[tdx]\nallowed_mr_servicetd = ["{quote.body.mr_service_td.hex()}"]')
    assert validate(allowed, quote, Crypto()) == []


def test_default_rejects_a_debug_snp_guest(vectors: Path) -> None:
    violations = validate(Policy.default(), snp(vectors, "go-sev-guest/attestation.bin"), Crypto())
    assert len(violations) == 1 and "POLICY bit 19" in violations[0]
    assert validate(Policy.from_toml("[snp]\nallow_debug = true"), snp(vectors, "go-sev-guest/attestation.bin"), Crypto()) == []


def test_default_accepts_clean_evidence(vectors: Path) -> None:
    assert validate(Policy.default(), tdx(vectors, "go-tdx-guest/quote_v5_sample.dat"), Crypto()) == []
    assert validate(Policy.default(), snp(vectors, "virtee-sev/report_milan.bin"), Crypto()) == []


def test_sept_ve_disable_is_required(vectors: Path) -> None:
    quote = tdx(vectors, "go-tdx-guest/tdx_prod_quote_SPR_E4.dat")
    assert any("SEPT_VE_DISABLE" in v for v in validate(Policy.default(), quote, Crypto()))
    relaxed = Policy.from_toml("[tdx]\nrequire_sept_ve_disable = false")
    assert validate(relaxed, quote, Crypto()) == []


@pytest.mark.parametrize(
    ("tcb", "qe", "expected"),
    [
        ("UpToDate", "UpToDate", []),
        ("SWHardeningNeeded", "UpToDate", []),
        ("OutOfDate", "UpToDate", ["platform TCB status OutOfDate"]),
        ("ConfigurationNeeded", "UpToDate", ["platform TCB status ConfigurationNeeded"]),
        ("UpToDate", "OutOfDate", ["quoting enclave status OutOfDate"]),
        (None, None, ["platform TCB status Unknown (no collateral", "quoting enclave status Unknown"]),
    ],
)
def test_tcb_statuses(vectors: Path, tcb: str | None, qe: str | None, expected: list[str]) -> None:
    violations = validate(Policy.default(), tdx(vectors, "go-tdx-guest/quote_v5_sample.dat"), Crypto(tcb, qe))
    assert len(violations) == len(expected)
    for violation, start in zip(violations, expected):
        assert violation.startswith(start)


def test_unknown_tcb_can_be_accepted_explicitly(vectors: Path) -> None:
    policy = Policy.from_toml('[tdx]\naccepted_tcb_statuses = ["UpToDate", "Unknown"]\naccepted_qe_statuses = ["UpToDate", "Unknown"]')
    assert validate(policy, tdx(vectors, "go-tdx-guest/quote_v5_sample.dat"), Crypto(None, None)) == []


def test_tdx_allow_lists(vectors: Path) -> None:
    quote = tdx(vectors, "go-tdx-guest/quote_v5_sample.dat")
    pinned = Policy.from_toml(f'[tdx]\nmr_td = ["{quote.body.mr_td.hex()}"]\nrtmr1 = ["{quote.body.rtmr1.hex().upper()}"]')
    assert validate(pinned, quote, Crypto()) == []
    other = tdx(vectors, "dcap-qvl/tdx_quote")
    violations = validate(pinned, other, Crypto())
    assert [v.split()[0] for v in violations] == ["MRTD", "RTMR1"]
    assert other.body.mr_td.hex() in violations[0]


def test_min_tee_tcb_svn(vectors: Path) -> None:
    quote = tdx(vectors, "go-tdx-guest/quote_v5_sample.dat")  # tee_tcb_svn 0b0104...
    assert validate(Policy.from_toml('[tdx]\nmin_tee_tcb_svn = "0b010400000000000000000000000000"'), quote, Crypto()) == []
    violations = validate(Policy.from_toml('[tdx]\nmin_tee_tcb_svn = "0c000000000000000000000000000000"'), quote, Crypto())
    assert len(violations) == 1 and "component(s) 0" in violations[0]


def test_snp_rules(vectors: Path) -> None:
    report = snp(vectors, "trustee/test-report.bin")  # reported TCB bl 3, tee 0, snp 8, ucode 115
    assert validate(Policy.from_toml(f'[snp]\nmeasurement = ["{report.measurement.hex()}"]\nallowed_vmpls = [0]'),
                    report, Crypto()) == []
    violations = validate(Policy.from_toml('[snp]\nallowed_vmpls = [1]\nhost_data = ["' + "11" * 32 + '"]\n'
                                           '[snp.min_reported_tcb]\nucode = 116\nsnp = 8'), report, Crypto())
    assert len(violations) == 3
    assert "VMPL 0" in violations[0] and violations[1].startswith("HOST_DATA")
    assert "ucode SVN 115 is below the policy minimum 116" in violations[2]


def test_binding_inputs_and_model_list(vectors: Path) -> None:
    report = snp(vectors, "virtee-sev/report_milan.bin")
    exact = Policy.from_toml(f'[binding]\nreport_data = "{report.report_data.hex()}"')
    assert validate(exact, report, Crypto()) == []
    wrong = Policy.from_toml(f'[binding]\nreport_data = "{"00" * 64}"')
    assert "is not the expected" in validate(wrong, report, Crypto())[0]
    pub, job, nonce, model = (bytes([i]) * 32 for i in (1, 2, 3, 4))
    data = build_report_data(pub, job, nonce, model)
    policy_text = (f'[binding]\npubkey = "{pub.hex()}"\njob_id = "{job.hex()}"\nnonce = "{nonce.hex()}"\n'
                   f'model_sha256 = ["{"ee" * 32}", "{model.hex()}"]')
    policy = Policy.from_toml(policy_text)
    bound = replace(report, report_data=data)
    assert validate(policy, bound, Crypto()) == []
    unbound = validate(policy, report, Crypto())
    assert len(unbound) == 1 and "REPORTDATA[0:32]" in unbound[0]
    other_job = replace(report, report_data=build_report_data(pub, bytes(32), nonce, model))
    assert "any of the 2 accepted model digests" in validate(policy, other_job, Crypto())[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("allow_simulatd = true", "unknown policy key 'allow_simulatd'"),
        ("[tdx]\nmrtd = []", "unknown policy key 'tdx.mrtd'"),
        ("[snp.min_reported_tcb]\nmicrocode = 1", "unknown policy key 'snp.min_reported_tcb.microcode'"),
        ("[gpu]\nx = 1", "unknown policy key 'gpu'"),
        ("[tdx]\nmr_td = ['abcd']", "tdx.mr_td: expected 48 bytes"),
        ("[tdx]\nmr_td = ['xyz']", "tdx.mr_td: 'xyz' is not hex"),
        ("[tdx]\nallow_debug = 1", "tdx.allow_debug: expected true or false"),
        ("[snp]\nallowed_vmpls = [4]", "snp.allowed_vmpls"),
        ("[snp.min_reported_tcb]\nbl = 300", "snp.min_reported_tcb.bl"),
        ("[binding]\npubkey = '" + "00" * 32 + "'", "missing: job_id, nonce, model_sha256"),
        ("[binding]\ngpu_evidence_sha256 = '" + "00" * 32 + "'", "missing: pubkey"),
        ("allow_simulated = ", "not valid TOML"),
        ("tdx = 3", "tdx: expected a table"),
    ],
)
def test_bad_policies_name_the_key(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("(", r"\(")):
        Policy.from_toml(text)


def test_unreadable_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        Policy.from_toml(tmp_path / "missing.toml")
