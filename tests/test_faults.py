"""Relay faults in the middle of a job: a real `cdvm worker` (real runner, llama.cpp, simulated TEE,
or tests.scripted_runner), real relays that are killed and restarted, and the real client. Also
sandbox faults around the warm pool (a warm sandbox dying, a start interrupted)."""
from __future__ import annotations

import asyncio
import secrets
import sys
from pathlib import Path

import pytest

from dvm.client import AskOptions, ConfidentialJob
from dvm.config import relays_from_urls
from dvm.keys import PrivateKey, PublicKey
from dvm.localrelay import LocalRelay
from dvm.nip90 import FEEDBACK_KIND, parse_feedback
from dvm.pool import RelayPool
from dvm.wire import Filter
from jobs.sandbox import SandboxSpec, python_runtime_binds
from jobs.sandbox_errors import SandboxExited
from jobs.sandbox_process import ProcessBackend
from jobs.warmpool import WarmPool
from workerproc import JobWatch, WorkerProcess, journal_state, settled_state, worker_toml

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _documents() -> tuple[str, list[tuple[str, bytes]]]:
    code = f"{secrets.randbelow(9000) + 1000}-{secrets.token_hex(2).upper()}"
    fact = f"The access code for the Zorblat vault is {code}. It is changed every spring."
    filler = "The cafeteria opens at 7:30 and closes after lunch at 14:00 on weekdays."
    return code, [("vault.txt", fact.encode()), ("cafeteria.txt", filler.encode())]


async def _events(url: str, filters: list[Filter]) -> list:
    pool = RelayPool.from_config(relays_from_urls([url]))
    await pool.start(wait=5)
    try:
        return await pool.query(filters, timeout=5)
    finally:
        await pool.close()


async def _job_events(url: str, worker: WorkerProcess, job_id: str) -> tuple[int, list[str]]:
    """How many results the relay holds for the job, and the statuses of the DVM's feedback."""
    results = await _events(url, [Filter(kinds=(6050,), tags={"e": [job_id]})])
    feedback = await _events(url, [Filter(kinds=(FEEDBACK_KIND,), authors=(worker.pubkey,), tags={"e": [job_id]})])
    return len(results), sorted(parse_feedback(event).status for event in feedback)


async def _ask(urls: list[str], worker: WorkerProcess, on_progress) -> tuple[str, object]:
    code, documents = _documents()
    job = ConfidentialJob(PrivateKey.generate(), PublicKey.from_hex(worker.pubkey), relays_from_urls(urls),
                          AskOptions(allow_simulated=True, timeout=150, params={"max_tokens": "16"}),
                          progress=on_progress)
    result = await job.run("What is the access code for the Zorblat vault?", documents)
    return code, result


async def test_job_completes_over_the_other_relay_when_one_dies(tmp_path: Path) -> None:
    first, second = LocalRelay(tmp_path / "relay-a"), LocalRelay(tmp_path / "relay-b")
    await asyncio.gather(first.astart(), second.astart())
    worker = WorkerProcess([first.url, second.url], tmp_path / "worker-state", tee="sim")
    await asyncio.to_thread(worker.start)
    killed: list[str] = []

    def on_progress(line: str) -> None:
        if line.startswith("attestation received") and not killed:
            first.kill()  # the enclave now waits for documents that can only travel over the second relay
            killed.append(line)

    try:
        async with asyncio.timeout(170):
            code, result = await _ask([first.url, second.url], worker, on_progress)
        assert killed and not first.running
        assert code in result.answer  # type: ignore[attr-defined]
        job_id = result.job_id  # type: ignore[attr-defined]
        assert await settled_state(worker.state_dir, job_id) == "done"
        results, statuses = await _job_events(second.url, worker, job_id)
        assert results == 1 and statuses == ["processing", "success"]
    finally:
        await asyncio.to_thread(worker.stop)
        await asyncio.gather(first.aclose(), second.aclose())


async def test_job_completes_after_the_only_relay_restarts(tmp_path: Path) -> None:
    relay = LocalRelay(tmp_path / "relay")
    await relay.astart()
    worker = WorkerProcess([relay.url], tmp_path / "worker-state", tee="sim")
    await asyncio.to_thread(worker.start)
    restarts: list[asyncio.Task[None]] = []

    async def restart_later() -> None:
        await asyncio.sleep(1.0)
        await relay.arestart()

    def on_progress(line: str) -> None:
        if line.startswith("documents sent") and not restarts:
            relay.kill()  # the documents are stored; the enclave has not necessarily seen them yet
            restarts.append(asyncio.get_running_loop().create_task(restart_later()))

    try:
        async with asyncio.timeout(170):
            code, result = await _ask([relay.url], worker, on_progress)
            await restarts[0]
        assert code in result.answer  # type: ignore[attr-defined]
        job_id = result.job_id  # type: ignore[attr-defined]
        assert await settled_state(worker.state_dir, job_id) == "done"
        results, statuses = await _job_events(relay.url, worker, job_id)
        assert results == 1 and statuses == ["processing", "success"]
        assert "not published" not in worker.log()
    finally:
        await asyncio.to_thread(worker.stop)
        await relay.aclose()


async def test_worker_publishes_again_once_its_relay_is_back(tmp_path: Path) -> None:
    """The sandbox hands over its result while the only relay is down: the worker keeps trying
    (timeouts.publish) and the customer gets exactly one result and one success."""
    relay = LocalRelay(tmp_path / "relay")
    await relay.astart()
    config = worker_toml(sandbox={"runner_module": "tests.scripted_runner"}, timeouts={"publish": 30})
    worker = WorkerProcess([relay.url], tmp_path / "worker-state", config_toml=config)
    await asyncio.to_thread(worker.start)
    watch = await JobWatch([relay.url], worker.pubkey).start()
    try:
        async with asyncio.timeout(90):
            job = await watch.submit(PrivateKey.generate(), "slow-echo:1.5")
            while journal_state(worker.state_dir, job) != "generating":
                await asyncio.sleep(0.05)
            await relay.akill()
            await asyncio.sleep(4)  # the result is handed to the worker while nothing listens
            await relay.arestart()
            await watch.wait_for(lambda: watch.final(job) is not None, 60, "the job to end")
        assert watch.final(job) == ("success", "sandbox destroyed")
        assert len(watch.results[job]) == 1
        assert await settled_state(worker.state_dir, job) == "done"
    finally:
        await watch.close()
        await asyncio.to_thread(worker.stop)
        await relay.aclose()


READY_THEN_EXIT = """
import sys, time
sys.path.insert(0, {repo!r})
from jobs.channel import BlockingChannel
channel = BlockingChannel(sys.stdin.buffer, sys.stdout.buffer)
channel.send({{"op": "ready", "model": {{"name": "m", "sha256": "00"}}}})
time.sleep({linger})
"""


def _spec(linger: float) -> SandboxSpec:
    code = READY_THEN_EXIT.format(repo=str(REPO), linger=linger)
    return SandboxSpec(argv=(sys.executable, "-I", "-c", code), ro_binds=(REPO, *python_runtime_binds()),
                       env={"PATH": "/usr/bin:/bin"}, wall_timeout_s=60.0)


async def test_warm_sandbox_that_dies_while_waiting_is_replaced(tmp_path: Path) -> None:
    backend = ProcessBackend(state_root=tmp_path / "sandboxes")
    pool = WarmPool(backend, _spec(linger=0.2), size=1, ready_timeout=30)
    async with asyncio.timeout(60):
        await pool.start()
        await asyncio.sleep(3)  # the first warm sandbox is ready, then its runner exits
        sandbox = await pool.acquire()
        try:
            with pytest.raises(SandboxExited):  # a fresh sandbox: ready was consumed, then it ends normally
                await sandbox.recv()
        finally:
            await sandbox.destroy()
        await pool.close()
    assert not [p for p in (tmp_path / "sandboxes").iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("after", [0.0, 0.002, 0.005, 0.02])
async def test_interrupted_sandbox_start_leaves_nothing(tmp_path: Path, after: float) -> None:
    """A job cancelled (or a worker stopping) at any moment of a sandbox's start leaks nothing."""
    root = tmp_path / "sandboxes"
    pool = WarmPool(ProcessBackend(state_root=root), _spec(linger=30), size=0, ready_timeout=30)
    async with asyncio.timeout(60):
        starting = asyncio.create_task(pool.acquire())
        await asyncio.sleep(after)
        starting.cancel()
        try:
            sandbox = await starting
        except asyncio.CancelledError:
            pass
        else:  # the start won the race
            await sandbox.destroy()
        await pool.close()
    assert not [p for p in root.iterdir() if not p.name.startswith(".")]
