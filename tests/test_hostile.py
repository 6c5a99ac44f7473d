"""Hostile sandbox workloads against a real `cdvm worker` (bubblewrap sandboxes, small limits):
each is stopped, its customer gets an `error` naming why, and the worker serves the next job."""
from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest

from dvm.keys import PrivateKey
from dvm.localrelay import LocalRelay
from workerproc import JobWatch, WorkerProcess, sandbox_dirs, worker_toml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = worker_toml(
    worker={"max_concurrent": 4, "max_queued": 16, "per_customer": 2, "warm_pool": 1},
    sandbox={"runner_module": "tests.scripted_runner", "memory_mb": 256, "cpu_seconds": 2,
             "max_processes": 24, "tmpfs_mb": 8},
    timeouts={"attestation": 8, "documents": 8, "generation": 8},
)


async def test_hostile_workloads_are_stopped_and_the_worker_goes_on(tmp_path: Path) -> None:
    connections: list[bytes] = []

    async def listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(await reader.read(100))
        writer.close()

    server = await asyncio.start_server(listener, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mark = secrets.token_hex(4)
    outside = [REPO / "tests" / f"pwned-{mark}", tmp_path / f"pwned-{mark}", Path(f"/pwned-{mark}"),
               tmp_path / "worker-state" / f"pwned-{mark}"]
    expected = {
        "memory": "the sandbox stopped: resource limit memory",
        "spin": "the sandbox stopped: resource limit cpu",
        "fork": "the sandbox stopped: resource limit pids",
        f"network:{port}": "the sandbox stopped unexpectedly (exited, exit status 1)",
        "write:" + ",".join(map(str, outside)): "the sandbox stopped unexpectedly (exited, exit status 1)",
        "generate": "timed out while generating the answer",
        "phase-spam": "timed out while generating the answer",
        "chatty": "the sandbox asked to publish more than 64 events; job stopped",
        "bad-subscribe": "the sandbox asked for a subscription outside the protocol",
        "echo": None,
    }
    relay = LocalRelay(tmp_path / "relay")
    await relay.astart()
    worker = WorkerProcess([relay.url], tmp_path / "worker-state", config_toml=CONFIG)
    await asyncio.to_thread(worker.start)
    watch = await JobWatch([relay.url], worker.pubkey).start()
    try:
        async with asyncio.timeout(240), server:
            jobs = {await watch.submit(PrivateKey.generate(), script): script for script in expected}
            normal = await watch.submit(PrivateKey.generate(), "echo")
            await watch.wait_for(lambda: all(watch.final(job) for job in jobs), 200, "every job to end")
            for job, script in jobs.items():
                status, info = watch.final(job)  # type: ignore[misc]
                if expected[script] is None:
                    assert status == "success" and len(watch.results[job]) == 1, (script, status, info)
                else:
                    assert (status, info) == ("error", expected[script]), script
            after = await watch.submit(PrivateKey.generate(), "echo")
            await watch.wait_for(lambda: watch.final(after) is not None and watch.final(normal) is not None, 30,
                                 "the normal jobs")
            assert watch.final(after)[0] == watch.final(normal)[0] == "success"  # type: ignore[index]
        assert connections == [], "a sandbox reached the host network"
        assert not any(path.exists() for path in outside), "a sandbox wrote outside its tmpfs"
        assert worker.process is not None and worker.process.poll() is None
        await asyncio.sleep(1)
        assert len(sandbox_dirs(worker.state_dir)) <= 1, "only the next warm sandbox may remain"
        assert "internal error" not in worker.log()
    finally:
        await watch.close()
        await asyncio.to_thread(worker.stop)
        await relay.aclose()
