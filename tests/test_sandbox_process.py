"""The process sandbox backend with real bubblewrap/unshare and real processes (jobs/sandbox_process.py)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobs.sandbox import SandboxSpec, get_backend, python_runtime_binds
from jobs.sandbox_errors import SandboxError, SandboxExited, SandboxLimitExceeded, SandboxStartError
from jobs.sandbox_process import ProcessBackend, _pids_of_uid, _proc_start_time, classify_exit

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")
PRELUDE = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
from jobs.channel import BlockingChannel
ch = BlockingChannel(sys.stdin.buffer, sys.stdout.buffer)
"""
ISOLATIONS = [
    pytest.param("bwrap", marks=pytest.mark.skipif(not Path("/usr/bin/bwrap").exists(), reason="bubblewrap missing")),
    pytest.param("unshare", marks=pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="no world-readable python3")),
]


def spec_for(isolation: str, code: str, **limits: object) -> SandboxSpec:
    """A runner ``python -I -c PRELUDE+code``; unshare mode needs a world-readable interpreter."""
    python = sys.executable if isolation == "bwrap" else str(SYSTEM_PYTHON)
    binds = (REPO, *python_runtime_binds()) if isolation == "bwrap" else (REPO,)
    options: dict = {"wall_timeout_s": 30.0, "cpu_seconds": 20, "memory_bytes": 512 * 1024**2, **limits}
    return SandboxSpec(argv=(python, "-I", "-c", PRELUDE + textwrap.dedent(code)), ro_binds=binds,
                       env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, **options)


@pytest.fixture
def backend_for(tmp_path: Path):
    def make(isolation: str) -> ProcessBackend:
        return get_backend("process", isolation=isolation, state_root=tmp_path / "sandboxes")  # type: ignore[return-value]
    return make


def sandbox_state(backend: ProcessBackend, label: str) -> dict:
    return json.loads((backend.state_root / label / "state.json").read_text())


def assert_gone(backend: ProcessBackend, label: str, state: dict) -> None:
    assert not (backend.state_root / label).exists()
    for pid, start in ((state["pid"], state["pid_start"]), (state["child_pid"], state["child_start"])):
        if pid is not None:
            assert _proc_start_time(pid) != start, f"pid {pid} of sandbox {label} still runs"
    if state["uid"] is not None:
        assert _pids_of_uid(state["uid"]) == []
        assert not (backend.state_root / ".uids" / str(state["uid"])).exists()


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_echo_isolation_and_cleanup(isolation: str, backend_for, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDVM_NSEC", "nsec1canarycanarycanary")
    backend = backend_for(isolation)

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    code = f"""
    import socket
    ch.send({{"op": "ready"}})
    msg = ch.recv()
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=3).close()
        net = "connected"
    except OSError as exc:
        net = type(exc).__name__
    writes = {{}}
    for path in ("/tmp/probe", {str(REPO / "probe")!r}, {str(Path.home() / "probe")!r}, "/probe"):
        try:
            with open(path, "w") as f:
                f.write("x")
            writes[path] = "ok"
        except OSError as exc:
            writes[path] = exc.errno
    ch.send({{"op": "report", "echo": msg, "net": net, "writes": writes, "env": sorted(os.environ),
              "uid": os.getuid(), "pid": os.getpid()}})
    ch.recv()
    """
    async with server:
        sandbox = await backend.start(spec_for(isolation, code), "job-echo")
        state = sandbox_state(backend, "job-echo")
        assert await asyncio.wait_for(sandbox.recv(), 20) == {"op": "ready"}
        await sandbox.send({"op": "hello", "n": 1})
        report = await asyncio.wait_for(sandbox.recv(), 20)
    assert report["echo"] == {"op": "hello", "n": 1}
    assert report["net"] != "connected"
    assert report["writes"].pop("/tmp/probe") == "ok"
    assert all(result != "ok" for result in report["writes"].values()), report["writes"]
    assert not (REPO / "probe").exists() and not (Path.home() / "probe").exists()
    assert "CDVM_NSEC" not in report["env"]
    assert set(report["env"]) <= {"LANG", "PATH", "PWD"}
    assert report["pid"] < 10  # a fresh pid namespace
    if os.geteuid() == 0:  # a dedicated host uid runs the runner, never root
        assert state["uid"] is not None and _pids_of_uid(state["uid"])
    if isolation == "bwrap":
        assert report["uid"] == 65534
    ended = await sandbox.destroy()
    assert ended.reason == "killed"
    assert await sandbox.destroy() == ended
    assert_gone(backend, "job-echo", state)
    with pytest.raises(SandboxError):
        await sandbox.recv()


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize(("code", "limits", "reason"), [
    ("blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))", {"memory_bytes": 256 * 1024**2}, "memory"),
    ("while True:\n    pass", {"cpu_seconds": 1}, "cpu"),
    ("while True:\n    os.fork()", {"max_processes": 16}, "pids"),
    ("import time\ntime.sleep(60)", {"wall_timeout_s": 1.5}, "timeout"),
], ids=["memory", "cpu", "pids", "timeout"])
async def test_limits(isolation: str, code: str, limits: dict, reason: str, backend_for) -> None:
    backend = backend_for(isolation)
    sandbox = await backend.start(spec_for(isolation, 'ch.send({"op": "ready"})\n' + code, **limits), f"job-{reason}")
    state = sandbox_state(backend, f"job-{reason}")
    assert await asyncio.wait_for(sandbox.recv(), 20) == {"op": "ready"}
    with pytest.raises(SandboxLimitExceeded) as caught:
        await asyncio.wait_for(sandbox.recv(), 40)
    assert caught.value.limit == reason
    assert (await sandbox.wait()).reason == reason
    await sandbox.destroy()
    assert_gone(backend, f"job-{reason}", state)


async def test_clean_exit_and_send_after_exit(backend_for) -> None:
    backend = backend_for("bwrap")
    sandbox = await backend.start(spec_for("bwrap", 'ch.send({"op": "bye"})'), "job-exit")
    async with sandbox:
        assert await sandbox.recv() == {"op": "bye"}
        with pytest.raises(SandboxExited) as caught:
            await sandbox.recv()
        assert caught.value.reason == "exited" and caught.value.returncode == 0
        assert not isinstance(caught.value, SandboxLimitExceeded)
        with pytest.raises(SandboxExited):
            for _ in range(50):
                await sandbox.send({"op": "late", "pad": "x" * 65536})
    assert not (backend.state_root / "job-exit").exists()


async def test_labels_are_single_use_and_checked(backend_for) -> None:
    backend = backend_for("bwrap")
    with pytest.raises(SandboxError):
        await backend.start(spec_for("bwrap", ""), "../escape")
    (backend.state_root / "job-used").mkdir()
    with pytest.raises(SandboxStartError, match="already used"):
        await backend.start(spec_for("bwrap", ""), "job-used")
    with pytest.raises(SandboxStartError, match="does not exist"):
        await backend.start(SandboxSpec(argv=(sys.executable,), ro_binds=(Path("/nonexistent/model.gguf"),)), "job-bad")
    assert not (backend.state_root / "job-bad").exists()


def test_spec_validation() -> None:
    with pytest.raises(SandboxError):
        SandboxSpec(argv=())
    with pytest.raises(SandboxError):
        SandboxSpec(argv=("x",), env={"A=B": "c"})
    with pytest.raises(SandboxError):
        SandboxSpec(argv=("x",), memory_bytes=0)
    with pytest.raises(SandboxError):
        SandboxSpec(argv=("x",), ro_binds=(Path("relative"),))
    with pytest.raises(SandboxError):
        get_backend("nonesuch")


def test_classify_exit() -> None:
    assert classify_exit(0) == "exited"
    assert classify_exit(128 + signal.SIGXCPU) == "cpu"
    assert classify_exit(-signal.SIGXCPU) == "cpu"
    assert classify_exit(137) == "killed"
    assert classify_exit(137, oom_kills=1) == "memory"
    assert classify_exit(1, pids_max_hits=3) == "pids"
    assert classify_exit(1, stderr_tail=b"MemoryError\n") == "memory"
    assert classify_exit(1, stderr_tail=b"BlockingIOError: [Errno 11] Resource temporarily unavailable") == "pids"
    assert classify_exit(0, stderr_tail=b"MemoryError") == "exited"
    assert classify_exit(1) == "exited"
    assert classify_exit(137, forced="timeout") == "timeout"


CRASHING_WORKER = f"""
import asyncio, sys
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from jobs.sandbox import SandboxSpec, python_runtime_binds
from jobs.sandbox_process import ProcessBackend

async def main():
    backend = ProcessBackend(isolation=sys.argv[2], state_root=Path(sys.argv[1]))
    python = sys.executable if sys.argv[2] == "bwrap" else "/usr/bin/python3"
    spec = SandboxSpec(argv=(python, "-c", "import time; print(flush=True); time.sleep(600)"),
                       ro_binds=python_runtime_binds() if sys.argv[2] == "bwrap" else ())
    sandbox = await backend.start(spec, "job-orphan")
    await sandbox._proc.stdout.readline()
    print("started", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_reap_orphans_after_worker_crash(isolation: str, backend_for, tmp_path: Path) -> None:
    backend = backend_for(isolation)
    worker = subprocess.Popen([sys.executable, "-c", CRASHING_WORKER, str(backend.state_root), isolation],
                              stdout=subprocess.PIPE)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(worker.stdout.readline), 30)  # type: ignore[union-attr]
        assert line == b"started\n"
        state = sandbox_state(backend, "job-orphan")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert await backend.reap_orphans() == 1
    assert_gone(backend, "job-orphan", state)
    assert await backend.reap_orphans() == 0


async def test_reap_spares_live_workers(backend_for) -> None:
    backend = backend_for("bwrap")
    sandbox = await backend.start(spec_for("bwrap", 'ch.send({"op": "ready"})\nch.recv()'), "job-live")
    async with sandbox:
        assert await sandbox.recv() == {"op": "ready"}
        assert await backend.reap_orphans() == 0
        (backend.state_root / "job-stale").mkdir()
        os.utime(backend.state_root / "job-stale", (0, 0))
        assert await backend.reap_orphans() == 1
        await sandbox.send({"op": "still-there"})
