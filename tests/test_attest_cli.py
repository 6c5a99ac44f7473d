"""`cdvm attest verify --json` gives the verdict MANIFEST.md / EXPECTED.json state for every
shared TDX and SNP vector at its stated time (offline: nothing is fetched), and the
simulated TEE round trip."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNKNOWN_TCB = "platform TCB status Unknown"
UNKNOWN_QE = "quoting enclave status Unknown"

# (evidence, extra arguments, time, verified, tcb_status, error substring, violation prefixes)
CASES = [
    ("tdx/dcap-qvl/tdx_quote", ["--collateral", "tdx/dcap-qvl/tdx_quote_collateral.json"],
     "2025-07-19T10:00:34Z", True, "UpToDate", None, []),
    ("tdx/dcap-qvl/tdx_quote", ["--collateral", "tdx/dcap-qvl/tdx_quote_collateral.json"],
     "2025-07-19T10:00:36Z", False, None, "expired at 2025-07-19T10:00:35Z", []),
    ("tdx/dcap-qvl/tdx_quote_outdated", ["--collateral", "tdx/dcap-qvl/tdx_quote_outdated_collateral.json"],
     "2026-03-20T10:41:14Z", False, None, "no TCB level", []),
    ("tdx/dcap-qvl/tdx-quote.bin", [], "2025-01-01T00:00:00Z", False, None, None, [UNKNOWN_TCB, UNKNOWN_QE]),
    ("tdx/dcap-qvl/quote-from-tappd.bin", [], "2025-01-01T00:00:00Z", False, None, None, [UNKNOWN_TCB, UNKNOWN_QE]),
    ("tdx/go-tdx-guest/tdx_prod_quote_SPR_E4.dat", [], "2023-07-01T01:00:00Z", False, None, None,
     ["the TD does not set SEPT_VE_DISABLE", UNKNOWN_TCB, UNKNOWN_QE]),
    ("tdx/go-tdx-guest/quote_v5_sample.dat", [], "2026-02-03T01:00:00Z", False, None, None, [UNKNOWN_TCB, UNKNOWN_QE]),
    ("tdx/trustee/tdx_quote_4.dat", [], "2025-11-01T00:00:00Z", False, None, None,
     ["the TD is a debug TD", UNKNOWN_TCB, UNKNOWN_QE]),
    ("tdx/trustee/tdx_quote_5.dat", [], "2025-11-01T00:00:00Z", False, None, None,
     ["MRSERVICETD is 383c87d3", UNKNOWN_TCB, UNKNOWN_QE]),
    ("snp/go-sev-guest/attestation.bin", ["--vcek", "snp/go-sev-guest/vcek.testcer", "--roots", "roots/amd"],
     "2022-09-25T00:00:00Z", False, None, None, ["the SNP guest policy allows debugging"]),
    ("snp/virtee-sev/report_milan.bin", ["--vcek", "snp/virtee-sev/vcek_milan.der", "--certs", "snp/virtee-sev/cert_chain_milan"],
     "2023-06-01T00:00:00Z", True, None, None, []),
    ("snp/virtee-sev/report_milan.bin", ["--vcek", "snp/virtee-sev/vcek_milan.der", "--roots", "roots/amd"],
     "2023-06-01T00:00:00Z", True, None, None, []),
    ("snp/trustee/test-report.bin", ["--vcek", "snp/trustee/test-vcek.der", "--roots", "roots/amd"],
     "2024-06-01T00:00:00Z", True, None, None, []),
    ("snp/trustee/test-vlek-report.bin", ["--vcek", "snp/trustee/test-vlek.der", "--roots", "roots/amd"],
     "2025-06-01T00:00:00Z", True, None, None, []),
    ("snp/trustee/test-vlek-report.bin", ["--vcek", "snp/trustee/test-vlek.der", "--roots", "roots/amd"],
     "2025-12-11T00:00:00Z", False, None, "expired at 2025-12-10T22:14:21Z", []),
    ("snp/trustee/test-report.bin", ["--vcek", "snp/virtee-sev/vcek_milan.der", "--roots", "roots/amd"],
     "2024-06-01T00:00:00Z", False, None, "the VCEK belongs to another chip", []),
    ("snp/virtee-sev/report_milan.bin", [], "2023-06-01T00:00:00Z", False, None, "no VCEK certificate", []),
]


def cdvm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvm.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "CDVM_STATE_DIR": str(tmp_path / "state"), "CDVM_CACHE_DIR": str(tmp_path / "cache"),
            "CDVM_CONFIG_DIR": str(tmp_path / "config")}


def _arguments(vectors: Path, extra: list[str]) -> list[str]:
    return [str(vectors / "tee" / a) if not a.startswith("--") else a for a in extra]


@pytest.mark.parametrize(("name", "extra", "at", "verified", "tcb", "error", "violations"), CASES,
                         ids=[f"{c[0]}@{c[2]}" for c in CASES])
def test_verify_json_on_every_vector(vectors: Path, env: dict[str, str], name: str, extra: list[str], at: str,
                                     verified: bool, tcb: str | None, error: str | None, violations: list[str]) -> None:
    result = cdvm("attest", "verify", str(vectors / "tee" / name), *_arguments(vectors, extra), "--at", at,
                  "--offline", "--json", env=env)
    verdict = json.loads(result.stdout)
    assert verdict["verified"] is verified, (verdict["errors"], verdict["policy_violations"])
    assert result.returncode == (0 if verified else 1)
    assert verdict["confidential"] is verified
    assert verdict["tcb_status"] == tcb
    if error is None:
        assert verdict["errors"] == []
    else:
        assert len(verdict["errors"]) == 1 and error in verdict["errors"][0]
    assert len(verdict["policy_violations"]) == len(violations)
    for violation, prefix in zip(verdict["policy_violations"], violations):
        assert violation.startswith(prefix)
    expected = json.loads((vectors / "tee/EXPECTED.json").read_text())
    entry = next(e for e in expected.values() if e["file"].endswith(name))
    assert verdict["report_data"] == entry["report_data"]
    key = "mr_td" if name.startswith("tdx") else "measurement"
    assert verdict["measurements"][key] == entry[key]
    stderr_lines = [line for line in result.stderr.splitlines() if line.startswith("cdvm: ")]
    assert len(stderr_lines) == len(verdict["errors"]) + len(verdict["policy_violations"])
    assert set(verdict) >= {"tee", "verified", "tcb_status", "qe_status", "advisories", "report_data", "measurements",
                            "policy_violations", "errors", "confidential"}


def test_full_tdx_verdict_fields(vectors: Path, env: dict[str, str]) -> None:
    result = cdvm("attest", "verify", str(vectors / "tee/tdx/dcap-qvl/tdx_quote"), "--collateral",
                  str(vectors / "tee/tdx/dcap-qvl/tdx_quote_collateral.json"), "--at", "2025-07-19T10:00:34Z",
                  "--offline", "--json", env=env)
    verdict = json.loads(result.stdout)
    entry = json.loads((vectors / "tee/EXPECTED.json").read_text())["dcap-qvl/tdx_quote+collateral"]
    assert (verdict["tee"], verdict["qe_status"], verdict["advisories"]) == ("tdx", "UpToDate", [])
    for name in ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam", "mr_config_id", "mr_owner", "mr_owner_config"):
        assert verdict["measurements"][name] == entry[name]
    assert verdict["details"]["fmspc"] == entry["fmspc"]


def test_a_policy_accepting_unknown_tcb_verifies_without_collateral(vectors: Path, env: dict[str, str], tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[tdx]\naccepted_tcb_statuses = ["Unknown"]\naccepted_qe_statuses = ["Unknown"]\n')
    result = cdvm("attest", "verify", str(vectors / "tee/tdx/go-tdx-guest/quote_v5_sample.dat"), "--policy", str(policy),
                  "--at", "2026-02-03T01:00:00Z", "--offline", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("VERIFIED: genuine TDX evidence")


def test_sim_round_trip(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "evidence.json"
    made = cdvm("attest", "evidence", "--provider", "sim", "--report-data", "ab" * 64, "-o", str(out), env=env)
    assert made.returncode == 0, made.stderr
    assert "SIMULATED" in made.stderr
    assert json.loads(out.read_text())["tee"] == "sim"

    accepted = cdvm("attest", "verify", str(out), "--allow-simulated", "--json", env=env)
    verdict = json.loads(accepted.stdout)
    assert accepted.returncode == 0
    assert (verdict["tee"], verdict["verified"], verdict["confidential"]) == ("sim", True, False)
    assert verdict["report_data"] == "ab" * 64
    assert "SIMULATED" in accepted.stderr

    human = cdvm("attest", "verify", str(out), "--allow-simulated", env=env)
    assert human.returncode == 0 and human.stdout.splitlines()[0].startswith("SIMULATED TEE — NOT CONFIDENTIAL")

    refused = cdvm("attest", "verify", str(out), "--json", env=env)
    verdict = json.loads(refused.stdout)
    assert refused.returncode == 1 and verdict["verified"] is False and verdict["confidential"] is False
    assert verdict["errors"] == ["simulated TEE evidence refused: pass --allow-simulated to accept it for testing; "
                                 "it proves nothing"]
    assert "pass --allow-simulated" in refused.stderr


def test_evidence_without_a_tee(env: dict[str, str], tmp_path: Path) -> None:
    result = cdvm("attest", "evidence", "--provider", "tdx-guest", "-o", str(tmp_path / "e.json"), env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("cdvm: error: tdx-guest: cannot open /dev/tdx_guest")


def test_tdreport_is_refused(vectors: Path, env: dict[str, str]) -> None:
    result = cdvm("attest", "verify", str(vectors / "tee/tdx/intel-dcap_tdreport_for_test.dat"), "--json", "--offline", env=env)
    verdict = json.loads(result.stdout)
    assert result.returncode == 1 and verdict["tee"] == "tdreport"
    assert "cannot be verified remotely" in verdict["errors"][0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "POLICY"], "cdvm: error: unknown policy key 'tdx.mrtd'"),
        (["--collateral", "MISSING"], "cdvm: error: cannot read collateral"),
    ],
)
def test_usage_errors_are_one_line(vectors: Path, env: dict[str, str], tmp_path: Path, args: list[str], message: str) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[tdx]\nmrtd = []\n")
    args = [str(policy) if a == "POLICY" else str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    result = cdvm("attest", "verify", str(vectors / "tee/tdx/dcap-qvl/tdx_quote"), *args, "--offline", env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(message)


def test_garbage_evidence(env: dict[str, str], tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00" * 100)
    result = cdvm("attest", "verify", str(junk), env=env)
    assert result.returncode == 1 and result.stderr.startswith("cdvm: error: unrecognised evidence (100 bytes)")
