"""The ``microvm`` sandbox backend: real QEMU VMs under TCG (KVM cannot run guests here).

The last test runs a whole confidential job in a VM: a real ``cdvm worker`` with
``[sandbox] backend = "microvm"``, a real relay, the real client; boot, simulated evidence,
the one-time key, DMs, a few generated tokens from the image's baseline llama.cpp, teardown.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest

from dvm.client import AskOptions, ConfidentialJob
from dvm.config import relays_from_urls
from dvm.keys import PrivateKey, PublicKey
from dvm.localrelay import LocalRelay
from jobs.image import Image, build_image, guest_llama_wheel
from jobs.sandbox import SandboxSpec, get_backend, python_runtime_binds
from jobs.sandbox_errors import SandboxError, SandboxExited, SandboxStartError
from jobs.sandbox_microvm import IMAGE_ENV, MicroVmBackend, exit_status, guest_view, run_conf
from jobs.sandbox_process import _alive
from jobs.settings import code_roots
from test_image import input_debs, user_image_cache
from workerproc import WorkerProcess

pytestmark = pytest.mark.slow

PROBE = r"""
import json, os, sys
from jobs.channel import BlockingChannel
channel = BlockingChannel(sys.stdin.buffer, sys.stdout.buffer)
try:
    open("/usr/cdvm-write-test", "w")
    writable = True
except OSError:
    writable = False
cgroup = open("/proc/self/cgroup").read().strip()
limits = {name: open(f"/sys/fs/cgroup/job/{name}").read().strip() for name in ("memory.max", "pids.max")}
channel.send({"op": "ready", "env": dict(os.environ), "net": sorted(os.listdir("/sys/class/net")),
              "usr_writable": writable, "cgroup": cgroup, "limits": limits, "cpus": os.cpu_count(),
              "flags": next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()})
message = channel.recv()
channel.send({"op": "echo", "message": message})
print("runner stderr goes to the console", file=sys.stderr)
sys.exit(7)
"""


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The image built from the offline Debian packages, with the baseline llama.cpp wheel
    that .ci/install's ``cdvm image build`` left in the user's image cache."""
    wheel = guest_llama_wheel(user_image_cache() / "wheels", build=False)
    kernel_deb, busybox_deb = input_debs()
    return build_image(kernel_deb, busybox_deb, tmp_path_factory.mktemp("image"), llama_wheel=wheel)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probe runner as a file (run.conf passes no newline in an argument)."""
    path = tmp_path_factory.mktemp("probe") / "probe.py"
    path.write_text(PROBE)
    return path


def probe_spec(script: Path, **overrides: object) -> SandboxSpec:
    fields: dict[str, object] = dict(argv=(sys.executable, str(script)),
                                     ro_binds=(*python_runtime_binds(), *code_roots(), script),
                                     env={"PYTHONPATH": str(code_roots()[0]), "HOME": "/tmp"},
                                     memory_bytes=512 * 2**20, max_processes=32, wall_timeout_s=300.0)
    fields.update(overrides)
    return SandboxSpec(**fields)  # type: ignore[arg-type]


# ---- sans-I/O parts ------------------------------------------------------------------------------


def test_exit_status_reads_the_last_mark() -> None:
    tail = b"[ 1.0] boot\ncdvm-exit rc=1 oom_kill=0 pids_max=0\nnoise cdvm-exit rc=137 oom_kill=1 pids_max=2\n"
    assert exit_status(tail) == (137, 1, 2)
    assert exit_status(b"Kernel panic") == (None, 0, 0)
    assert exit_status(b"cdvm-exit rc=0 oom_kill= pids_max=") == (0, 0, 0)


def test_run_conf_lines() -> None:
    spec = SandboxSpec(argv=("/py", "-m", "jobs.runner", "--model", "/m dir/model.gguf"), env={"A": "b c", "PYTHONPATH": "/code"},
                       memory_bytes=1000, tmpfs_bytes=24, cpu_seconds=9, max_processes=5)
    conf = run_conf(spec, [("cdvm-0", Path("/usr"))], [("usr/lib", "/lib")], guest_site=True)
    assert conf.splitlines() == [
        "tmpfs 24", "share cdvm-0 /usr", "link usr/lib /lib", "cpu 9", "pids 5", "memory 1024",
        "env A=b c", "env PYTHONPATH=/cdvm/guest-site:/code",
        "arg /py", "arg -m", "arg jobs.runner", "arg --model", "arg /m dir/model.gguf"]
    with pytest.raises(SandboxStartError, match="newline"):
        run_conf(SandboxSpec(argv=("/py", "a\nb")), [], [], guest_site=False)
    with pytest.raises(SandboxStartError, match="="):
        run_conf(SandboxSpec(argv=("/a=b",)), [], [], guest_site=False)


def test_guest_view_shares_directories_once(tmp_path: Path) -> None:
    (tmp_path / "code" / "pkg").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"x")
    dirs, links = guest_view((tmp_path / "code" / "pkg", tmp_path / "code", tmp_path / "models" / "m.gguf",
                              Path("/usr/lib")))
    assert Path("/usr") in dirs and tmp_path / "code" in dirs and tmp_path / "models" in dirs
    assert tmp_path / "code" / "pkg" not in dirs and Path("/usr/lib") not in dirs
    assert all(not os.path.islink(d) for d in dirs)
    assert {path for _, path in links} == {p for p in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
                                           if os.path.islink(p)}
    with pytest.raises(SandboxStartError, match="does not exist"):
        guest_view((tmp_path / "missing",))


def test_backend_without_an_image_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(SandboxStartError, match="cdvm image build"):
        get_backend("microvm", image_dir=tmp_path)


def test_tee_launch_needs_a_new_enough_qemu(image: Image) -> None:
    with pytest.raises(SandboxStartError, match=r"QEMU >= 9\.1"):
        MicroVmBackend(image_dir=image.directory, tee="snp", firmware="/usr/share/ovmf/OVMF.fd")


# ---- real VMs --------------------------------------------------------------------------------------


async def test_runner_protocol_and_isolation_in_a_vm(image: Image, probe: Path, tmp_path: Path) -> None:
    backend = get_backend("microvm", image_dir=image.directory, state_root=tmp_path / "vms", accel="tcg")
    started = time.monotonic()
    async with await backend.start(probe_spec(probe), "probe-1") as sandbox:
        ready = await asyncio.wait_for(sandbox.recv(), 240)
        boot_s = time.monotonic() - started
        await sandbox.send({"op": "job", "payload": "é" * 1000})
        assert await sandbox.recv() == {"op": "echo", "message": {"op": "job", "payload": "é" * 1000}}
        ended = await sandbox.wait()
    print(f"microVM boot to runner ready under TCG: {boot_s:.1f} s")
    assert ended.reason == "exited" and ended.returncode == 7
    assert b"runner stderr goes to the console" in ended.stderr_tail
    env = ready["env"]
    assert env["PYTHONPATH"].startswith("/cdvm/guest-site:") and env["HOME"] == "/tmp"
    assert set(env) <= {"PYTHONPATH", "HOME", "LC_CTYPE"}, "only the spec's environment (Python adds LC_CTYPE)"
    assert ready["net"] == ["lo"], "no network device in the VM"
    assert ready["usr_writable"] is False, "shares are read-only"
    assert ready["cgroup"] == "0::/job" and ready["limits"] == {"memory.max": str(512 * 2**20 + 64 * 2**20),
                                                                 "pids.max": "32"}
    assert "avx2" in ready["flags"] and "avx512f" not in ready["flags"], "TCG's CPU: AVX2, no AVX-512"
    assert not (tmp_path / "vms" / "probe-1").exists(), "destroy removes the VM's files"


async def test_wall_timeout_kills_the_vm(image: Image, probe: Path, tmp_path: Path) -> None:
    backend = get_backend("microvm", image_dir=image.directory, state_root=tmp_path / "vms", accel="tcg")
    sandbox = await backend.start(probe_spec(probe, wall_timeout_s=3.0), "slow-1")
    with pytest.raises(SandboxExited) as exited:
        await asyncio.wait_for(sandbox.recv(), 60)
    assert exited.value.reason == "timeout"
    await sandbox.destroy()
    with pytest.raises(SandboxError, match="destroyed"):
        await sandbox.send({"op": "x"})


async def test_orphans_of_a_dead_worker_are_reaped(image: Image, probe: Path, tmp_path: Path) -> None:
    backend = get_backend("microvm", image_dir=image.directory, state_root=tmp_path / "vms", accel="tcg")
    sandbox = await backend.start(probe_spec(probe), "orphan-1")
    with pytest.raises(SandboxStartError, match="already used"):
        await backend.start(probe_spec(probe), "orphan-1")
    state_file = tmp_path / "vms" / "orphan-1" / "state.json"
    state = json.loads(state_file.read_text())
    assert _alive(state["pid"], state["pid_start"])
    assert await backend.reap_orphans() == 0, "a live owner's VM is left alone"
    state["owner_pid"], state["owner_start"] = 2**22 + 1, 1
    state_file.write_text(json.dumps(state))
    assert await backend.reap_orphans() == 1
    assert not _alive(state["pid"], state["pid_start"]) and not state_file.parent.exists()
    await sandbox.destroy()


# ---- the whole job in a VM -------------------------------------------------------------------------


def _wait_for_vms(root: Path, count: int, timeout: float = 60.0) -> dict[str, dict[str, int]]:
    """The state of ``count`` running VMs under ``root`` (the warm pool starts them in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {}
        for directory in root.iterdir() if root.exists() else ():
            try:
                state = json.loads((directory / "state.json").read_text())
            except (OSError, ValueError):
                continue
            if state.get("pid"):
                states[directory.name] = state
        if len(states) >= count:
            return states
        time.sleep(0.2)
    raise AssertionError(f"{count} VM(s) did not start under {root} within {timeout} s")


def test_confidential_job_in_a_microvm(image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IMAGE_ENV, str(image.directory))
    config = ("[sandbox]\nbackend = \"microvm\"\nmemory_mb = 1536\nn_ctx = 1024\n"
              "[timeouts]\nsandbox_start = 400\nattestation = 120\ngeneration = 300\n")
    started = time.monotonic()
    with LocalRelay(tmp_path / "relay") as relay:
        worker = WorkerProcess([relay.url], tmp_path / "worker-state", tee="sim", config_toml=config)
        worker.start(timeout=420)
        ready_s = time.monotonic() - started
        try:
            vms = worker.state_dir / "microvms"
            warm = _wait_for_vms(vms, 1)
            job = ConfidentialJob(PrivateKey.generate(), PublicKey.from_hex(worker.pubkey), relays_from_urls([relay.url]),
                                  AskOptions(allow_simulated=True, timeout=300, params={"max_tokens": "4"}))
            asked = time.monotonic()
            result = asyncio.run(job.run("What colour is the sky in the note?", [("note.txt", b"The sky is green.")]))
            job_s = time.monotonic() - asked
            assert result.verdict.simulated and not result.verdict.confidential
            assert 0 < result.usage["completion_tokens"] <= 4
            assert result.answer.strip()
            deadline = time.monotonic() + 30

            def vm_left() -> bool:
                return any(_alive(s["pid"], s["pid_start"]) or (vms / label).exists() for label, s in warm.items())

            while vm_left() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not any(_alive(s["pid"], s["pid_start"]) for s in warm.values()), "the job's VM is destroyed"
            assert not any((vms / label).exists() for label in warm), "and its files removed"
        finally:
            worker.stop()
    assert "microvm" in worker.log()
    print(f"worker up in {ready_s:.0f} s (the warm VM boots in the background); job {job_s:.0f} s; "
          f"total {time.monotonic() - started:.0f} s; timings {result.timings_ms}")
    if (tmp_path / "worker-state" / "microvms").exists():
        leftovers = [d for d in (tmp_path / "worker-state" / "microvms").iterdir()]
        assert not leftovers, "the worker destroys its warm VM on shutdown"


KILLED_WORKER = """
import asyncio, sys
from pathlib import Path
from jobs.sandbox import get_backend
from test_microvm import probe_spec

async def main():
    backend = get_backend("microvm", image_dir=sys.argv[1], state_root=Path(sys.argv[2]), accel="tcg")
    await backend.start(probe_spec(Path(sys.argv[3])), "killed-1")
    print("started", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def test_vm_dies_with_a_killed_worker_and_is_reaped(image: Image, probe: Path, tmp_path: Path) -> None:
    """QEMU runs under PR_SET_PDEATHSIG: a SIGKILLed worker takes its VMs along; the next
    worker's reap_orphans removes their files."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *map(str, code_roots())])}
    worker = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, str(image.directory), str(tmp_path / "vms"), str(probe)],
                              stdout=subprocess.PIPE, env=env, start_new_session=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == b"started"
        state = json.loads((tmp_path / "vms" / "killed-1" / "state.json").read_text())
        assert _alive(state["pid"], state["pid_start"])
        worker.kill()
        worker.wait(10)
        deadline = time.monotonic() + 10
        while _alive(state["pid"], state["pid_start"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(state["pid"], state["pid_start"]), "QEMU died with its worker"
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    backend = get_backend("microvm", image_dir=image.directory, state_root=tmp_path / "vms", accel="tcg")
    assert asyncio.run(backend.reap_orphans()) == 1 and not (tmp_path / "vms" / "killed-1").exists()
