"""SIGKILL of a real `cdvm worker` while its jobs are queued, starting a sandbox, waiting for
documents and generating: after a restart no job runs twice, every customer gets an `error`,
and nothing of the old sandboxes survives (processes, uids, state files)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from dvm.keys import PrivateKey
from dvm.localrelay import LocalRelay
from dvm.worker import RESTART_REASON
from jobs.sandbox_process import _pids_of_uid, _proc_start_time
from workerproc import JobWatch, WorkerProcess, journal_state, sandbox_dirs, settled_state, worker_toml

pytestmark = pytest.mark.slow

CONFIG = worker_toml(
    worker={"max_concurrent": 3, "max_queued": 8, "per_customer": 2, "warm_pool": 0},
    sandbox={"runner_module": "tests.slow_start_runner"},
    timeouts={"documents": 120, "generation": 120},
)


async def _until(condition, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def _alive(state: dict) -> list[str]:
    """What of a sandbox (recorded from its state.json) still runs on the host."""
    found = []
    for pid, start in (("pid", "pid_start"), ("child_pid", "child_start")):
        if state.get(pid) is not None and _proc_start_time(state[pid]) == state[start]:
            found.append(f"{pid} {state[pid]}")
    if state.get("uid") is not None and _pids_of_uid(state["uid"]):
        found.append(f"processes of uid {state['uid']}")
    return found


async def test_sigkill_in_every_phase_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    relay = LocalRelay(tmp_path / "relay")
    await relay.astart()
    state_dir = tmp_path / "worker-state"
    worker = WorkerProcess([relay.url], state_dir, config_toml=CONFIG)
    await asyncio.to_thread(worker.start)
    watch = await JobWatch([relay.url], worker.pubkey).start()
    try:
        async with asyncio.timeout(150):
            documents = await watch.submit(PrivateKey.generate(), "documents")
            generating = await watch.submit(PrivateKey.generate(), "generate")
            await _until(lambda: journal_state(state_dir, documents) == "waiting_documents"
                         and journal_state(state_dir, generating) == "generating", 60, "two running jobs")
            starting = await watch.submit(PrivateKey.generate(), "echo")
            await _until(lambda: journal_state(state_dir, starting) == "starting" and len(sandbox_dirs(state_dir)) == 3,
                         20, "a sandbox starting")
            queued = await watch.submit(PrivateKey.generate(), "echo")
            await _until(lambda: ("processing", "queued: waiting for a free sandbox") in watch.feedback[queued], 20,
                         "a queued job")
            phases = {job: journal_state(state_dir, job) for job in (documents, generating, starting, queued)}
            assert list(phases.values()) == ["waiting_documents", "generating", "starting", "queued"]
            sandboxes = [json.loads((d / "state.json").read_text()) for d in sandbox_dirs(state_dir)]
            assert len(sandboxes) == 3

            await asyncio.to_thread(worker.kill)
            assert len(sandbox_dirs(state_dir)) == 3, "the dead worker's sandbox state waits for the next start"

            await asyncio.to_thread(worker.start)
            assert sandbox_dirs(state_dir) == [], "orphaned sandboxes are reaped before the worker is ready"
            for state in sandboxes:
                assert _alive(state) == [], f"sandbox {state['label']} survived the worker"
                assert not (state_dir / "sandboxes" / ".uids" / str(state["uid"])).exists(), "a uid lease was kept"

            await watch.wait_for(lambda: all(watch.final(job) for job in phases), 30, "the restart's error feedback")
            for job in phases:
                assert watch.final(job) == ("error", RESTART_REASON)
                assert await settled_state(state_dir, job) == "failed"
            after = await watch.submit(PrivateKey.generate(), "echo")
            await watch.wait_for(lambda: watch.final(after) is not None, 40, "a job after the restart")
            assert watch.final(after) == ("success", "sandbox destroyed") and len(watch.results[after]) == 1
            for job in phases:  # the relay replayed every request to the new worker: none ran again
                assert watch.statuses(job) == ["processing", "error"], watch.feedback[job]
                assert watch.results.get(job, []) == []
    finally:
        await watch.close()
        await asyncio.to_thread(worker.stop)
        await relay.aclose()
