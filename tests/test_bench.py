"""``cdvm bench``: the harness's statistics and report, and the crypto and attest suites run
at a tiny size (no timing assertions: only that every promised key is there and numeric)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import cli as bench_cli
from bench import harness
from bench.harness import (
    RESERVED_KEYS,
    BenchError,
    Context,
    Skip,
    interleaved,
    load_suites,
    measure,
    run_suites,
    suite,
    summarize,
    to_markdown,
    write_docs,
)
from dvm.cli import main

TINY = 0.02
CRYPTO_KEYS = (
    "nip44_time_ratio_vs_nostr_sdk", "nip44_1k_time_ratio_vs_nostr_sdk", "nip44_32k_time_ratio_vs_nostr_sdk",
    "nip44_1k_ms", "nip44_1k_nostr_sdk_ms", "nip44_32k_ms", "nip44_32k_nostr_sdk_ms",
    "giftwrap_time_ratio_vs_nostr_sdk", "giftwrap_ms", "giftwrap_nostr_sdk_ms",
    "event_verify_per_s", "schnorr_verify_per_s", "event_verify_time_ratio_vs_schnorr",
    "event_verify_json_ratio_vs_nostr_sdk",
)
ATTEST_KEYS = (
    "tdx_verify_cold_ratio_vs_dcap_qvl", "tdx_verify_warm_ratio_vs_dcap_qvl", "tdx_verify_cold_ms",
    "tdx_verify_warm_ms", "tdx_verify_dcap_qvl_ms", "snp_verify_ms", "snp_verify_cold_ms",
    "snp_verify_warm_ratio_vs_p384_verify",
)


def _numeric(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def tiny_report(vectors: Path) -> dict:
    ctx = Context(quick=True, scale=TINY, vectors=vectors)
    report = run_suites(["crypto", "attest"], ctx, argv=["bench", "crypto", "attest"])
    assert [(r.name, r.status, r.message) for r in report.results] == [("crypto", "ok", ""), ("attest", "ok", "")]
    return json.loads(json.dumps(report.to_json()))


def test_summarize_median_and_percentiles() -> None:
    stats = summarize([float(v) for v in range(1, 101)])
    assert (stats.median, stats.n, stats.min, stats.max) == (50.5, 100, 1.0, 100.0)
    assert 94 < stats.p95 < 96 and 5 < stats.p5 < 7
    single = summarize([3.0])
    assert single.median == single.p95 == single.p5 == 3.0
    with pytest.raises(BenchError):
        summarize([])


def test_measure_and_interleaved_count_rounds_and_run_setup() -> None:
    calls = {"a": 0, "b": 0, "setup": 0}

    def bump(name: str) -> None:
        calls[name] += 1

    stats = measure(lambda: bump("a"), rounds=5, warmup=1, inner=3)
    assert stats.n == 5 and calls["a"] == 1 + 5 * 3
    calls.update(a=0)
    comparison = interleaved(lambda: bump("a"), lambda: bump("b"), rounds=4, warmup=0,
                             setup_a=lambda: bump("setup"))
    assert comparison.a.n == comparison.b.n == comparison.ratio.n == 4
    assert calls["setup"] == calls["a"] == 4  # a setup runs before each call: one call per round
    assert all(r > 0 for r in comparison.ratio.samples)
    with pytest.raises(BenchError):
        measure(lambda: None, rounds=0)


def test_record_rules() -> None:
    ctx = Context(suite="t")
    ctx.record("speed_per_s", 20_000, 15_000, "higher", unit="/s")
    ctx.record("ratio", summarize([0.5, 0.7, 0.9]), 1.0, unit="x")
    ctx.record("missing", None, 1.0, note="reference not installed")
    assert [(m.key, m.passed) for m in ctx.metrics] == [
        ("speed_per_s", True), ("ratio", True), ("ratio_p95", None), ("missing", None)]
    with pytest.raises(BenchError):
        ctx.record("ratio", 1.0)
    with pytest.raises(BenchError):
        ctx.record(next(iter(RESERVED_KEYS)), 1.0)
    with pytest.raises(BenchError):
        ctx.record("text", "fast")  # type: ignore[arg-type]
    assert Context(quick=True, scale=TINY).n(full=1000, quick=100) == 2


def test_a_failing_or_skipping_suite_does_not_hide_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "SUITES", dict(load_suites()))

    @suite("test-skip", "always skips")
    def skipper(ctx: Context) -> None:
        raise Skip("no hardware here")

    @suite("test-error", "always fails")
    def failer(ctx: Context) -> None:
        raise RuntimeError("boom")

    @suite("test-async", "returns extra metrics from a coroutine")
    async def extra(ctx: Context) -> dict[str, float]:
        return {"answer_ms": 42.0}

    report = run_suites(["test-skip", "test-error", "test-async"], Context())
    assert [(r.status, r.message) for r in report.results] == [
        ("skipped", "no hardware here"), ("error", "RuntimeError: boom"), ("ok", "")]
    assert report.to_json()["answer_ms"] == 42.0
    with pytest.raises(BenchError, match="unknown benchmark suite"):
        run_suites(["no-such-suite"], Context())


def test_crypto_suite_keys_are_numeric(tiny_report: dict) -> None:
    for key in CRYPTO_KEYS:
        assert _numeric(tiny_report[key]), key
        if (key.endswith("_ms") or "ratio" in key) and key != "nip44_time_ratio_vs_nostr_sdk":
            assert _numeric(tiny_report[key + "_p95"]), key


def test_attest_suite_keys_are_numeric(tiny_report: dict) -> None:
    for key in ATTEST_KEYS:
        assert _numeric(tiny_report[key]), key


def test_report_has_machine_targets_and_notes(tiny_report: dict) -> None:
    machine = tiny_report["machine"]
    assert machine["cores_logical"] >= 1 and machine["memory_gib"] > 0
    assert machine["cpu_model"] and machine["python"].split()[0] in ("CPython", "PyPy")
    assert len(machine["load_average"]) == 3
    targeted = {row["key"]: row for row in tiny_report["table"] if row["target"] is not None}
    assert set(targeted) == {"nip44_time_ratio_vs_nostr_sdk", "nip44_1k_time_ratio_vs_nostr_sdk",
                             "nip44_32k_time_ratio_vs_nostr_sdk", "giftwrap_time_ratio_vs_nostr_sdk",
                             "event_verify_per_s", "tdx_verify_warm_ratio_vs_dcap_qvl"}
    assert all(isinstance(row["passed"], bool) for row in targeted.values())
    assert tiny_report["notes"]["crypto"] and tiny_report["notes"]["attest"]


def test_attest_suite_skips_without_vectors() -> None:
    report = run_suites(["attest"], Context(quick=True, scale=TINY, vectors=None))
    assert report.results[0].status == "skipped"
    assert "CDVM_VECTORS" in report.results[0].message


def test_docs_markdown_and_plots(vectors: Path, tmp_path: Path) -> None:
    ctx = Context(quick=True, scale=TINY, vectors=vectors)
    report = run_suites(["attest"], ctx, argv=["bench", "attest"])
    written = write_docs(report, tmp_path / "docs" / "benchmarks.md")
    assert [p.name for p in written] == ["benchmarks.md", "bench-targets.png", "bench-timings.png"]
    text = written[0].read_text(encoding="utf-8")
    assert "| `tdx_verify_warm_ratio_vs_dcap_qvl` |" in text and "](bench-targets.png)" in text
    assert "## Machine" in text and "Load average" in text
    for image in written[1:]:
        assert image.read_bytes().startswith(b"\x89PNG")
    assert "## Targets" in to_markdown(report)


def test_cli_writes_json_and_docs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench_cli, "Context", lambda **kw: Context(scale=TINY, **kw))
    monkeypatch.setenv("CDVM_VECTORS", str(tmp_path / "nowhere"))
    out = tmp_path / "b.json"
    assert main(["bench", "attest", "--quick", "--json", str(out), "--docs", str(tmp_path / "b.md")]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["suites"]["attest"]["status"] == "skipped" and data["quick"] is True
    assert (tmp_path / "b.md").is_file()
    assert "attest: skipped" in capsys.readouterr().out
    assert main(["bench", "nonsense", "--quick"]) == 1
