"""Suites ``job``, ``sandbox``, ``throughput`` and ``ingest``: what a confidential job costs.

Every suite runs the real stack on this machine: a loopback nostr-relay (dvm.localrelay), the
worker built as ``cdvm worker`` builds it (:func:`jobs.cli.serve`: dvm.worker.Worker over a
jobs.warmpool.WarmPool of ``process`` sandboxes running jobs.runner with the default model,
SIMULATED TEE), and customers (dvm.client.ConfidentialJob). The sandbox backend is wrapped
(:class:`ObservedBackend`) only to see which sandboxes are ready or busy, so that a timed
round never starts while the pool is still refilling from the previous one.

* ``job``: wall time from the customer publishing the request to holding the verified,
  decrypted answer (fresh sandbox, evidence, attestation DM, verification, one 4 KB document
  over DMs, retrieval, generation, encrypted result), divided round by round by the time
  llama-cpp-python takes in this process, model loaded, on the exact prompt the runner builds
  (same document, same retrieval) with the same threads and exactly the same number of tokens
  (``ignore_eos``, greedy, fixed seed). Rounds alternate (job, raw / raw, job).
* ``sandbox``: job arrival to a fresh sandbox ready with its attestation DM published (the
  runner's first ``publish`` frame), with a warm pool and cold (process start, model hash and
  load, evidence), driven through WarmPool and the host-sandbox channel directly.
* ``throughput``: 1, 2, 4 and 8 concurrent customers against one worker whose
  ``max_concurrent`` (and warm pool) equals the concurrency; peak memory sampled with psutil.
* ``ingest``: several MB of documents sent as chunked DMs and indexed in the enclave
  (``max_tokens=1``).
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from attest import sim
from bench.harness import BenchError, Context, summarize, suite
from dvm.client import AskOptions, AskResult, ConfidentialJob
from dvm.config import RelaysConfig, relays_from_urls
from dvm.keys import PrivateKey
from dvm.localrelay import LocalRelay
from dvm.nip90 import build_job_request
from dvm.worker import Worker, WorkerConfig
from jobs.model import ModelRef, resolve_model
from jobs.rag import Bm25Index, build_prompt, chunk_documents, prompt_budget
from jobs.sandbox import Sandbox, SandboxBackend, SandboxExit, SandboxSpec, get_backend
from jobs.settings import RunnerSettings, runner_spec
from jobs.warmpool import WarmPool

QUESTION = "What is the door code of the secure archive room?"
SEED = 42
DOCUMENT_BYTES = 4096
THROUGHPUT_DOCUMENT_BYTES = 1024
JOB_KIND = 5050
SETTLE_TIMEOUT_S = 300.0
FACT = "The secure archive room is on the basement level, and its door code is 4417-KESTREL."
_WORDS = (
    "badge visitor archive laboratory desk report quarter floor machine coffee escort reception schedule "
    "project budget meeting review sample freezer microscope safety training window corridor stairs "
    "delivery parcel printer network account password policy holiday cafeteria parking bicycle"
).split()


# ---------------------------------------------------------------------------- workload


def document(size: int, seed: int = SEED) -> bytes:
    """A deterministic ASCII text of exactly ``size`` bytes: paragraphs of plain sentences with
    one fact (:data:`FACT`) in the middle, the kind of document a customer asks about."""
    rng = random.Random(seed)
    sentences = [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(256)
    ]
    parts: list[str] = []
    length = 0
    while length < size:
        paragraph = " ".join(rng.choice(sentences) for _ in range(rng.randint(3, 6))) + "\n\n"
        parts.append(paragraph)
        length += len(paragraph)
    middle = len(parts) // 2
    parts.insert(middle, FACT + "\n\n")
    return "".join(parts).encode("ascii")[:size]


def generation_params(max_tokens: int) -> dict[str, str]:
    """Job params fixing the work: greedy, seeded, exactly ``max_tokens`` tokens (no early stop)."""
    return {"max_tokens": str(max_tokens), "temperature": "0", "seed": str(SEED), "ignore_eos": "true"}


# ---------------------------------------------------------------------------- observed sandboxes


class ObservedSandbox(Sandbox):
    """A sandbox passed through unchanged; reports ``ready``/``job``/destroy to its backend."""

    def __init__(self, inner: Sandbox, backend: ObservedBackend) -> None:
        self.inner = inner
        self.label = inner.label
        self._backend = backend

    async def send(self, obj: dict[str, Any]) -> None:
        if obj.get("op") == "job":
            self._backend.mark(self, "busy")
        await self.inner.send(obj)

    async def recv(self) -> dict[str, Any]:
        message = await self.inner.recv()
        if message.get("op") == "ready":
            self._backend.mark(self, "ready")
        return message

    async def wait(self) -> SandboxExit:
        return await self.inner.wait()

    async def destroy(self) -> SandboxExit:
        try:
            return await self.inner.destroy()
        finally:
            self._backend.mark(self, None)

    def reset_deadline(self) -> None:
        self.inner.reset_deadline()


class ObservedBackend(SandboxBackend):
    """Wraps a backend to count sandboxes that are starting, ready (idle) or busy with a job."""

    def __init__(self, inner: SandboxBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.states: dict[ObservedSandbox, str] = {}
        self._changed = asyncio.Event()

    async def start(self, spec: SandboxSpec, job_label: str) -> Sandbox:
        sandbox = ObservedSandbox(await self.inner.start(spec, job_label), self)
        self.mark(sandbox, "starting")
        return sandbox

    async def reap_orphans(self) -> int:
        return await self.inner.reap_orphans()

    def mark(self, sandbox: ObservedSandbox, state: str | None) -> None:
        if state is None:
            self.states.pop(sandbox, None)
        else:
            self.states[sandbox] = state
        self._changed.set()

    def count(self, state: str) -> int:
        return sum(1 for value in self.states.values() if value == state)

    async def settle(self, ready: int, timeout: float = SETTLE_TIMEOUT_S) -> None:
        """Wait until ``ready`` sandboxes are idle and ready and no job holds one."""
        async with asyncio.timeout(timeout):
            while not (self.count("ready") >= ready and not self.count("busy") and not self.count("starting")):
                self._changed.clear()
                await self._changed.wait()


# ---------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    """A running worker on a loopback relay, and how customers reach it."""

    relays: RelaysConfig
    dvm: PrivateKey
    model: ModelRef
    backend: ObservedBackend
    pool_size: int

    async def settle(self) -> None:
        """Until the warm pool is full and no job runs (untimed, between rounds)."""
        try:
            await self.backend.settle(self.pool_size)
        except TimeoutError:
            raise BenchError(f"the worker's warm pool did not refill within {SETTLE_TIMEOUT_S:.0f} s") from None

    async def ask(self, question: str, documents: list[tuple[str, bytes]], params: dict[str, str]) -> AskResult:
        """One confidential job by a fresh customer key, the way ``cdvm ask --allow-simulated`` runs it."""
        options = AskOptions(params=params, allow_simulated=True, expected_models=(self.model.sha256,), timeout=600)
        job = ConfidentialJob(PrivateKey.generate(), self.dvm.public_key, self.relays, options)
        return await job.run(question, documents)


@contextlib.asynccontextmanager
async def loopback_relay() -> AsyncIterator[LocalRelay]:
    """A real nostr-relay on loopback in a private directory."""
    with tempfile.TemporaryDirectory(prefix="cdvm-bench-") as tmp:
        async with LocalRelay(Path(tmp) / "relay") as relay:
            yield relay


@contextlib.asynccontextmanager
async def running_worker(relay_url: str, config: WorkerConfig, settings: RunnerSettings) -> AsyncIterator[Stack]:
    """A worker assembled exactly as :func:`jobs.cli.serve` assembles it (the backend observed),
    yielded once it announced itself ready and its warm pool is full."""
    model = resolve_model(None)
    if settings.tee == "sim":
        sim.sim_root_certificate()
    backend = ObservedBackend(get_backend("process"))
    identity = PrivateKey.generate()
    spec = runner_spec(settings, model, identity.public_key.hex())
    warm = WarmPool(backend, spec, config.warm_pool, config.timeouts.sandbox_start)
    relays = relays_from_urls([relay_url])
    ready, stop = asyncio.Event(), asyncio.Event()
    with tempfile.TemporaryDirectory(prefix="cdvm-bench-worker-") as tmp:
        worker = Worker(identity, relays, config, warm, Path(tmp) / "journal.sqlite3",
                        model_info={"name": model.name, "sha256": model.sha256}, on_ready=lambda _line: ready.set())
        task = asyncio.create_task(worker.run(stop))
        try:
            waiter = asyncio.ensure_future(ready.wait())
            await asyncio.wait({waiter, task}, timeout=SETTLE_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            if not ready.is_set():
                waiter.cancel()
                if task.done():
                    raise BenchError(f"the worker stopped before it was ready: {task.exception()!r}")
                raise BenchError(f"the worker was not ready within {SETTLE_TIMEOUT_S:.0f} s")
            stack = Stack(relays, identity, model, backend, config.warm_pool)
            await stack.settle()
            yield stack
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)


class MemorySampler:
    """Peak resident memory of this process (worker, customers) and of each sandbox runner."""

    def __init__(self, runner_module: str, interval_s: float = 0.1) -> None:
        self.runner_marker = runner_module
        self.interval_s = interval_s
        self.self_peak = 0
        self.runner_peak = 0
        self._runners: dict[int, psutil.Process] = {}
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        me = psutil.Process()
        with contextlib.suppress(psutil.Error):
            self.self_peak = max(self.self_peak, me.memory_info().rss)
        for child in me.children(recursive=True):
            try:
                if child.pid not in self._runners and self.runner_marker in child.cmdline():
                    self._runners[child.pid] = child
                if child.pid in self._runners:
                    self.runner_peak = max(self.runner_peak, child.memory_info().rss)
            except psutil.Error:
                self._runners.pop(child.pid, None)

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    async def __aenter__(self) -> MemorySampler:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.sample()


# ---------------------------------------------------------------------------- raw llama.cpp


class RawLlama:
    """llama-cpp-python used directly in this process: the baseline of the ``job`` suite.

    Same model file, context, batch and threads as the runner (jobs.llm.load with the worker's
    RunnerSettings); the same prompt (the runner's retrieval and prompt assembly over the same
    documents); exactly ``max_tokens`` tokens (end-of-generation tokens biased to -inf, as
    llama.cpp's ``--ignore-eos``), greedy.
    """

    def __init__(self, model: ModelRef, settings: RunnerSettings) -> None:
        import llama_cpp

        batch = min(512, settings.n_ctx)
        self._llama = llama_cpp.Llama(
            model_path=str(model.path), n_ctx=settings.n_ctx, n_batch=batch, n_ubatch=batch,
            n_threads=settings.threads, n_threads_batch=settings.threads, verbose=False,
        )
        vocab = llama_cpp.llama_model_get_vocab(self._llama.model)
        self._no_eog = {t: -math.inf for t in range(self._llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        self.settings = settings

    def close(self) -> None:
        self._llama.close()

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode("utf-8", "replace"), add_bos=False, special=False))

    def prompt_tokens(self, question: str, documents: Sequence[tuple[str, bytes]], max_tokens: int) -> list[int]:
        """The tokens the runner evaluates for this question and these documents (BOS first)."""
        texts = [(name, data.decode("utf-8", errors="replace")) for name, data in documents]
        chunks = chunk_documents(texts, count_tokens=self.count_tokens)
        passages = Bm25Index(chunks).search(question, k=self.settings.retrieve_k)
        budget = prompt_budget(self._llama.n_ctx(), max_tokens)
        prompt, _ = build_prompt(question, passages, token_budget=budget, count_tokens=self.count_tokens)
        return self._llama.tokenize(prompt.encode("utf-8", "replace"), add_bos=True, special=False)

    def generate(self, tokens: list[int], max_tokens: int) -> tuple[float, int]:
        """Seconds to evaluate ``tokens`` from an empty cache and generate ``max_tokens``; tokens generated."""
        self._llama.reset()
        start = time.perf_counter()
        out = self._llama.create_completion(tokens, max_tokens=max_tokens, temperature=0.0, seed=SEED,
                                            logit_bias=self._no_eog)
        elapsed = time.perf_counter() - start
        return elapsed, int(out["usage"]["completion_tokens"])


# ---------------------------------------------------------------------------- suite: job


def job_phases(result: AskResult) -> dict[str, float]:
    """Disjoint phases (ms) of one job, summing to the customer's wall time; from the client's
    marks (since it published the request) and the enclave's own timings."""
    client, enclave = result.timings_ms, result.enclave_timings_ms
    evidence = enclave.get("evidence_ms", 0.0)
    retrieval = enclave.get("retrieval_ms", 0.0)
    prompt = enclave.get("prompt_ms", 0.0)
    generation = enclave.get("generation_ms", 0.0)
    posted = client["posted"]
    received = client["attestation_received"]
    verified = client["attestation_verified"]
    sent = client["documents_sent"]
    total = client["result_received"]
    return {
        "publish_request": posted,
        "dispatch_and_attestation_dm": received - posted - evidence,
        "evidence": evidence,
        "verify_attestation": verified - received,
        "send_documents": sent - verified,
        "retrieval": retrieval,
        "prompt_eval": prompt,
        "generation": generation,
        "deliver_documents_and_result": total - sent - retrieval - prompt - generation,
    }


def _check_work(result: AskResult, prompt_tokens: int, max_tokens: int) -> None:
    usage = result.usage
    if usage.get("completion_tokens") != max_tokens or usage.get("prompt_tokens") != prompt_tokens:
        raise BenchError(
            f"the job did different work than the baseline: {usage} vs prompt_tokens={prompt_tokens}, "
            f"completion_tokens={max_tokens}; the runner's prompt assembly changed: update bench/jobs.py"
        )


@suite("job", "confidential job end to end vs raw llama-cpp-python, same prompt and tokens")
async def job_overhead(ctx: Context) -> None:
    """Record ``job_overhead_ratio`` and ``job_phase_ms`` (see the module docstring)."""
    settings = RunnerSettings(tee="sim")
    max_tokens = ctx.n(full=64, quick=64, minimum=4)
    params = generation_params(max_tokens)
    documents = [("handbook.txt", document(DOCUMENT_BYTES))]
    rounds, warmup = ctx.n(full=15, quick=3), 1
    config = WorkerConfig(tee="sim", warm_pool=1, max_concurrent=1, name="cdvm bench")
    async with loopback_relay() as relay, running_worker(relay.url, config, settings) as stack:
        raw = await asyncio.to_thread(RawLlama, stack.model, settings)
        try:
            tokens = raw.prompt_tokens(QUESTION, documents, max_tokens)
            job_s: list[float] = []
            raw_s: list[float] = []
            phases: list[dict[str, float]] = []

            async def job_round(timed: bool) -> None:
                result = await stack.ask(QUESTION, documents, params)
                _check_work(result, len(tokens), max_tokens)
                if timed:
                    job_s.append(result.timings_ms["result_received"] / 1000)
                    phases.append(job_phases(result))

            async def raw_round(timed: bool) -> None:
                elapsed, produced = await asyncio.to_thread(raw.generate, tokens, max_tokens)
                if produced != max_tokens:
                    raise BenchError(f"llama-cpp-python generated {produced} tokens, not {max_tokens}")
                if timed:
                    raw_s.append(elapsed)

            for index in range(warmup + rounds):
                order = (job_round, raw_round) if index % 2 == 0 else (raw_round, job_round)
                for side in order:
                    await stack.settle()
                    await side(index >= warmup)
        finally:
            raw.close()
    ratios = summarize([a / b for a, b in zip(job_s, raw_s)])
    job, baseline = summarize(job_s), summarize(raw_s)
    ctx.distributions.append((ctx.suite, f"job, {max_tokens} tokens", (("confidential job", job),
                                                                     ("raw llama-cpp-python", baseline))))
    ctx.note(f"{rounds} interleaved rounds (job, raw / raw, job; the warm pool refilled and the worker idle "
             f"before each side): {len(tokens)} prompt tokens (the runner's BM25 retrieval over one "
             f"{DOCUMENT_BYTES}-byte document), {max_tokens} generated tokens, {settings.threads} threads, "
             "greedy, ignore_eos, seed fixed")
    ctx.note("the job includes what the worker does in service: taking its sandbox makes the warm pool start the "
             "replacement at once (Python, imports, model SHA-256 and load: sandbox_start_cold_ms of CPU), which "
             "runs during the job's prompt evaluation; with llama.cpp on every core that contention, not the "
             "protocol (job_overhead_ms), is most of the gap to raw (enclave_inference_ratio_vs_raw)")
    ctx.record("job_overhead_ratio", ratios, 1.2, unit="x",
               note=f"customer publish → decrypted verified answer / raw llama-cpp-python, {max_tokens} tokens")
    ctx.record("job_total_ms", job, unit="ms")
    ctx.record("raw_llama_ms", baseline, unit="ms", note="create_completion on the same tokens, model loaded")
    ctx.record_map("job_phase_ms", {name: statistics.median(p[name] for p in phases) for name in phases[0]},
                   unit="ms", note="median per phase; phases are disjoint and add up to the job's wall time")
    overhead = [total * 1000 - p["prompt_eval"] - p["generation"] for total, p in zip(job_s, phases)]
    ctx.record("job_overhead_ms", summarize([v / 1000 for v in overhead]), unit="ms",
               note="job wall time minus the enclave's prompt evaluation and generation")
    inference = [(p["prompt_eval"] + p["generation"]) / 1000 / r for p, r in zip(phases, raw_s)]
    ctx.record("enclave_inference_ratio_vs_raw", summarize(inference), unit="x",
               note="the runner's prompt eval + generation / raw llama-cpp-python (same round)")


# ---------------------------------------------------------------------------- suite: sandbox


async def _until_attested(sandbox: Sandbox, request: dict[str, Any], timeout: float) -> None:
    """Hand the runner its job and wait for its first ``publish`` (the attestation DM)."""
    await sandbox.send({"op": "job", "request": request, "opened_tags": None})
    async with asyncio.timeout(timeout):
        while True:
            message = await sandbox.recv()
            op = message.get("op")
            if op == "publish":
                return
            if op in ("failed", "done"):
                raise BenchError(f"the runner ended before attesting: {message.get('reason') or op}")


async def _readiness(pool: WarmPool, backend: ObservedBackend, count: int, warm: bool,
                     timeout: float) -> tuple[list[float], list[float]]:
    """Seconds from job arrival to attestation DM (and to a ready sandbox) for ``count`` jobs."""
    dvm, customer = PrivateKey.generate(), PrivateKey.generate()
    ready_s: list[float] = []
    acquire_s: list[float] = []
    for _ in range(count):
        if warm:
            await backend.settle(1)
        request = build_job_request(customer, JOB_KIND, targets=[dvm.public_key.hex()],
                                    extra_tags=[["cdvm", "1", secrets.token_hex(32)]]).to_dict()
        start = time.perf_counter()
        sandbox = await pool.acquire()
        acquired = time.perf_counter()
        try:
            await _until_attested(sandbox, request, timeout)
            ready_s.append(time.perf_counter() - start)
            acquire_s.append(acquired - start)
        finally:
            await sandbox.destroy()
            pool.replenish()
    return ready_s, acquire_s


@suite("sandbox", "sandbox readiness: job arrival to fresh sandbox with evidence, warm pool and cold")
async def sandbox_readiness(ctx: Context) -> None:
    """Record ``sandbox_ready_ms_p50``/``_p95`` (warm pool) and the cold variants."""
    settings = RunnerSettings(tee="sim")
    model = resolve_model(None)
    sim.sim_root_certificate()
    spec = runner_spec(settings, model)
    timeout = WorkerConfig().timeouts.sandbox_start
    warm_count, cold_count = ctx.n(full=50, quick=8), ctx.n(full=50, quick=3)
    backend = ObservedBackend(get_backend("process"))
    pool = WarmPool(backend, spec, 1, timeout)
    await pool.start()
    try:
        warm_s, acquire_s = await _readiness(pool, backend, warm_count, True, timeout)
    finally:
        await pool.close()
    cold_pool = WarmPool(backend, spec, 0, timeout)
    cold_s, start_s = await _readiness(cold_pool, backend, cold_count, False, timeout)
    warm, cold = summarize(warm_s), summarize(cold_s)
    ctx.distributions.append((ctx.suite, "sandbox ready", (("warm pool", warm), ("cold", cold))))
    ctx.note(f"warm: {warm_count} jobs, each taking a pre-started sandbox (runner loaded, waiting) from a pool of 1 "
             f"that was refilled before the job; cold: {cold_count} jobs, each starting its sandbox (bubblewrap, "
             "Python, model hashed and loaded); both end at the runner's first publish (the attestation DM: "
             "one-time key, REPORTDATA, SIMULATED evidence, gift wrap)")
    ctx.record("sandbox_ready_ms_p50", warm.median * 1000, 100.0, unit="ms", note="warm pool")
    ctx.record("sandbox_ready_ms_p95", warm.p95 * 1000, unit="ms", note="warm pool")
    ctx.record("sandbox_ready_cold_ms_p50", cold.median * 1000, unit="ms")
    ctx.record("sandbox_ready_cold_ms_p95", cold.p95 * 1000, unit="ms")
    ctx.record("sandbox_acquire_warm_ms", summarize(acquire_s), unit="ms", note="taking a ready sandbox from the pool")
    ctx.record("sandbox_start_cold_ms", summarize(start_s), unit="ms",
               note="start to the runner's ready (Python start, imports, model SHA-256, model load)")


# ---------------------------------------------------------------------------- suite: throughput

LEVELS = (1, 2, 4, 8)


async def _customers(stack: Stack, customers: int, jobs_each: int, documents: list[tuple[str, bytes]],
                     params: dict[str, str]) -> tuple[float, list[float]]:
    """Seconds for ``customers`` concurrent customers to finish ``jobs_each`` jobs each, and each job's latency."""
    latencies: list[float] = []

    async def customer() -> None:
        for _ in range(jobs_each):
            result = await stack.ask(QUESTION, documents, params)
            latencies.append(result.timings_ms["result_received"] / 1000)

    start = time.perf_counter()
    await asyncio.gather(*(customer() for _ in range(customers)))
    return time.perf_counter() - start, latencies


@suite("throughput", "jobs per minute and p95 latency at 1, 2, 4, 8 concurrent customers; peak memory")
async def throughput(ctx: Context) -> None:
    """Record ``jobs_per_min``, ``job_latency_p95_ms`` (by concurrency) and peak RSS."""
    cores = RunnerSettings().threads
    jobs_each = ctx.n(full=3, quick=1, minimum=1)
    max_tokens = ctx.n(full=32, quick=16, minimum=4)
    params = generation_params(max_tokens)
    documents = [("handbook.txt", document(THROUGHPUT_DOCUMENT_BYTES))]
    per_min: dict[str, float] = {}
    p95: dict[str, float] = {}
    median: dict[str, float] = {}
    async with loopback_relay() as relay, MemorySampler(RunnerSettings().runner_module) as memory:
        for level in LEVELS:
            settings = RunnerSettings(tee="sim", threads=max(1, cores // level))
            config = WorkerConfig(tee="sim", warm_pool=level, max_concurrent=level, per_customer=2,
                                  max_queued=16, name="cdvm bench")
            async with running_worker(relay.url, config, settings) as stack:
                elapsed, latencies = await _customers(stack, level, jobs_each, documents, params)
            per_min[str(level)] = len(latencies) / elapsed * 60
            stats = summarize(latencies)
            p95[str(level)] = stats.p95 * 1000
            median[str(level)] = stats.median * 1000
    ctx.note(f"each level: a fresh worker with max_concurrent = warm_pool = concurrency and llama.cpp threads per "
             f"sandbox = {cores} cores / concurrency (all cores per sandbox oversubscribes the CPU: in a quick run "
             "at 8 customers that fell from 41 to 10 jobs/min), pool full at the start; "
             f"each customer runs {jobs_each} job(s) back to back ({THROUGHPUT_DOCUMENT_BYTES}-byte document, "
             f"{max_tokens} tokens, "
             "ignore_eos); jobs/min = jobs / time from the first request to the last answer. Sandbox "
             "refills run during the jobs, as in service")
    ctx.note("worker_peak_rss_mb is this whole process (worker, customers, harness); sandbox_peak_rss_mb the "
             "largest runner process, the memory-mapped model's pages (shared between sandboxes) included")
    ctx.record_map("jobs_per_min", per_min, better="higher", unit="/min")
    ctx.record_map("job_latency_p95_ms", p95, unit="ms")
    ctx.record_map("job_latency_ms", median, unit="ms")
    ctx.record("worker_peak_rss_mb", memory.self_peak / 2**20, unit="MiB")
    ctx.record("sandbox_peak_rss_mb", memory.runner_peak / 2**20, unit="MiB")


# ---------------------------------------------------------------------------- suite: ingest


def ingest_seconds(result: AskResult) -> float:
    """From the verified attestation to the answer, minus the enclave's prompt eval and generation:
    building and sending the DMs, relaying them, opening and assembling them, and indexing."""
    client, enclave = result.timings_ms, result.enclave_timings_ms
    inference = enclave.get("prompt_ms", 0.0) + enclave.get("generation_ms", 0.0)
    return (client["result_received"] - client["attestation_verified"] - inference) / 1000


@suite("ingest", "document ingestion: MB/s delivered over DMs and indexed in the enclave")
async def ingest(ctx: Context) -> None:
    """Record ``ingest_mb_per_s``."""
    settings = RunnerSettings(tee="sim")
    total = ctx.n(full=4096, quick=1024, minimum=64) * 1024
    count = 4
    documents = [(f"doc-{i}.txt", document(total // count, seed=SEED + i)) for i in range(count)]
    size = sum(len(data) for _, data in documents)
    rounds = ctx.n(full=3, quick=1, minimum=1)
    params = generation_params(1)
    seconds: list[float] = []
    index_s: list[float] = []
    config = WorkerConfig(tee="sim", warm_pool=1, max_concurrent=1, name="cdvm bench")
    async with loopback_relay() as relay, running_worker(relay.url, config, settings) as stack:
        for _ in range(rounds):
            await stack.settle()
            result = await stack.ask(QUESTION, documents, params)
            seconds.append(ingest_seconds(result))
            index_s.append(result.enclave_timings_ms.get("retrieval_ms", 0.0) / 1000)
    stats = summarize(seconds)
    ctx.note(f"{rounds} job(s) with {count} documents, {size / 1e6:.2f} MB in all, max_tokens=1: time from the "
             "verified attestation to the answer minus the enclave's prompt evaluation and generation")
    ctx.record("ingest_mb_per_s", size / 1e6 / stats.median, better="higher", unit="MB/s")
    ctx.record("ingest_ms", stats, unit="ms")
    ctx.record("ingest_index_mb_per_s", size / 1e6 / statistics.median(index_s), better="higher", unit="MB/s",
               note="enclave chunking, token counting and BM25 indexing alone")

