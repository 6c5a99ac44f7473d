"""``cdvm bench`` job suites (bench/jobs.py) at a tiny size: the real relay, worker, sandboxes and
customers run, and every promised key is present and numeric (no timing assertions)."""
from __future__ import annotations

import json
import math
import secrets
from pathlib import Path

import pytest

from bench.harness import BenchError, Context, Report, run_suites
from bench.jobs import FACT, LEVELS, document, job_phases
from dvm.client import AskResult, max_chunk_bytes
from dvm.keys import PrivateKey
from dvm.nip17 import build_dm
from jobs.messages import chunk_message

TINY = 0.02
JOB_SUITES = ["job", "sandbox", "throughput", "ingest"]
NUMBER_KEYS = (
    "job_overhead_ratio", "job_overhead_ratio_p95", "job_total_ms", "raw_llama_ms", "job_overhead_ms",
    "enclave_inference_ratio_vs_raw",
    "sandbox_ready_ms_p50", "sandbox_ready_ms_p95", "sandbox_ready_cold_ms_p50", "sandbox_ready_cold_ms_p95",
    "sandbox_acquire_warm_ms", "sandbox_start_cold_ms",
    "worker_peak_rss_mb", "sandbox_peak_rss_mb",
    "ingest_mb_per_s", "ingest_ms", "ingest_index_mb_per_s",
)
PHASES = ("publish_request", "dispatch_and_attestation_dm", "evidence", "verify_attestation", "send_documents",
          "retrieval", "prompt_eval", "generation", "deliver_documents_and_result")


def _numeric(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def tiny_jobs_report(vectors: Path) -> dict:
    ctx = Context(quick=True, scale=TINY, vectors=vectors)
    report = run_suites(JOB_SUITES, ctx, argv=["bench", *JOB_SUITES])
    assert [(r.name, r.status, r.message) for r in report.results] == [(name, "ok", "") for name in JOB_SUITES]
    return json.loads(json.dumps(report.to_json()))


@pytest.mark.slow
def test_job_suites_record_every_key(tiny_jobs_report: dict) -> None:
    for key in NUMBER_KEYS:
        assert _numeric(tiny_jobs_report[key]), key
    assert set(tiny_jobs_report["job_phase_ms"]) == set(PHASES)
    assert all(_numeric(v) for v in tiny_jobs_report["job_phase_ms"].values())
    for group in ("jobs_per_min", "job_latency_p95_ms", "job_latency_ms"):
        assert set(tiny_jobs_report[group]) == {str(level) for level in LEVELS}, group
        assert all(_numeric(v) and v > 0 for v in tiny_jobs_report[group].values()), group
    assert tiny_jobs_report["sandbox_peak_rss_mb"] > 0 and tiny_jobs_report["worker_peak_rss_mb"] > 0


@pytest.mark.slow
def test_job_suites_rows_targets_and_notes(tiny_jobs_report: dict) -> None:
    rows = {row["key"]: row for row in tiny_jobs_report["table"]}
    assert rows["job_overhead_ratio"]["target"] == 1.2 and isinstance(rows["job_overhead_ratio"]["passed"], bool)
    assert rows["sandbox_ready_ms_p50"]["target"] == 100.0
    assert rows["jobs_per_min.8"]["better"] == "higher"
    assert all(tiny_jobs_report["notes"][name] for name in JOB_SUITES)


def test_document_is_deterministic_sized_and_holds_the_fact() -> None:
    for size in (4096, 100_000):
        text = document(size)
        assert len(text) == size and text == document(size)
    assert FACT.encode() in document(4096)
    assert document(4096, seed=1) != document(4096, seed=2)


def test_job_phases_add_up_to_the_wall_time() -> None:
    result = AskResult(
        job_id="0" * 64, enclave="1" * 64, answer="", verdict=None, model_sha256="2" * 64,  # type: ignore[arg-type]
        usage={"prompt_tokens": 10, "completion_tokens": 4},
        timings_ms={"posted": 5.0, "attestation_received": 40.0, "attestation_verified": 45.0,
                    "documents_sent": 70.0, "result_received": 1500.0},
        enclave_timings_ms={"evidence_ms": 2.0, "documents_ms": 50.0, "retrieval_ms": 20.0, "prompt_ms": 900.0,
                            "generation_ms": 450.0},
    )
    phases = job_phases(result)
    assert tuple(phases) == PHASES
    assert math.isclose(sum(phases.values()), 1500.0)
    assert phases["dispatch_and_attestation_dm"] == 33.0 and phases["deliver_documents_and_result"] == 60.0


def test_record_map_nests_in_json_and_rejects_clashes() -> None:
    ctx = Context(suite="t")
    ctx.record_map("per_level", {"1": 10.0, "2": 18.5}, better="higher", unit="/min")
    out = Report(quick=True, machine={}, results=[], context=ctx, created="", argv=[]).to_json()
    assert out["per_level"] == {"1": 10.0, "2": 18.5}
    assert [row["key"] for row in out["table"]] == ["per_level.1", "per_level.2"]
    with pytest.raises(BenchError):
        ctx.record("per_level", 1.0)
    with pytest.raises(BenchError):
        ctx.record_map("empty", {})
    with pytest.raises(BenchError):
        ctx.record_map("bad", {"a.b": 1.0})
    with pytest.raises(BenchError):
        ctx.record_map("machine", {"x": 1.0})


def test_document_pieces_fit_at_any_index() -> None:
    """Pieces of the size the client picks still fit when their document index and piece number
    have many digits (large documents, many documents)."""
    sender, enclave = PrivateKey.generate(), PrivateKey.generate().public_key
    job = secrets.token_hex(32)
    for limit in (128 * 1024, 32 * 1024):
        size = max_chunk_bytes(limit)
        assert max_chunk_bytes(limit) == size
        for doc, seq in ((0, 0), (10, 100), (63, 4095)):
            wrap = build_dm(sender, enclave, chunk_message(job, doc, seq, bytes(size)), include_sender_copy=False)[0]
            assert len(wrap.to_json()) + 64 <= limit
