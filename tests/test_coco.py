"""The ``coco`` backend through the real Kubernetes client (HTTP, JSON, watch stream, attach
websocket) against a fake API server on loopback serving recorded responses (tests/k8sfake.py),
and the ``aa`` evidence provider against a loopback attestation-agent REST server."""
from __future__ import annotations

import asyncio
import base64
import json
import sys
import threading
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from attest.binding import build_report_data
from attest.errors import ProviderError
from attest.evidence import load_evidence
from attest.binding import attestation_agent_report_data as aa_report_data
from attest.providers import AaProvider, aa_runtime_data, evidence_report_data, get_evidence_auto
from dvm.keys import PrivateKey
from dvm.nip01 import Event
from dvm.nip90 import JobInput, build_job_request
from jobs.coco_manifests import CocoSettings
from jobs.model import resolve_model
from jobs.sandbox import SandboxSpec, get_backend
from jobs.sandbox_coco import CocoBackend
from jobs.sandbox_errors import ChannelError, SandboxExited, SandboxLimitExceeded, SandboxStartError
from jobs.settings import RunnerSettings, runner_spec
from k8sfake import FakeKube

IMAGE = "registry.example.org/cdvm/runner@sha256:" + "ab" * 32

ECHO_RUNNER = '''
import os, sys, time
from jobs.channel import BlockingChannel
out = os.fdopen(os.dup(1), "wb", buffering=0)
os.dup2(2, 1)
channel = BlockingChannel(sys.stdin.buffer, out)
print("echo runner starting", file=sys.stderr, flush=True)
channel.send({"op": "ready", "model": {"name": "echo", "sha256": "00" * 32}, "argv": sys.argv[1:],
              "home": os.environ.get("HOME"), "pythonpath": os.environ.get("PYTHONPATH")})
while (message := channel.recv()) is not None:
    op = message.get("op")
    if op == "cancel":
        break
    if op == "exit":
        sys.exit(int(message["code"]))
    if op == "sleep":
        time.sleep(float(message["seconds"]))
    if op == "garbage":
        out.write(b"\\x00\\x00\\x00\\x05nope!")
        continue
    channel.send({"op": "echo", "message": message})
'''


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[FakeKube]:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "echorunner.py").write_text(ECHO_RUNNER)
    fake = FakeKube(tmp_path / "kubelet", extra_pythonpath=(str(modules),))
    await fake.start()
    yield fake
    await fake.stop()


def _settings(kube: FakeKube, tmp_path: Path, **overrides: object) -> CocoSettings:
    options: dict[str, object] = {
        "image": IMAGE, "namespace": "cdvm", "runtime_class": "kata-qemu-tdx", "python": sys.executable,
        "model_path": "/opt/cdvm/model.gguf", "worker_id": "worker-a", "start_timeout_s": 20.0, "api_timeout_s": 10.0,
        "kubeconfig": str(kube.kubeconfig(tmp_path / "kubeconfig.json")),
    }
    options.update(overrides)
    return CocoSettings(**options)  # type: ignore[arg-type]


def _echo_spec(**limits: object) -> SandboxSpec:
    return SandboxSpec(argv=(sys.executable, "-m", "echorunner", "--model", "/host/models/m.gguf", "--tee", "auto"),
                       env={"HOME": "/tmp", "PYTHONPATH": "/host/code"}, **limits)  # type: ignore[arg-type]


@pytest.fixture
async def backend(kube: FakeKube, tmp_path: Path) -> AsyncIterator[CocoBackend]:
    coco = CocoBackend(_settings(kube, tmp_path))
    yield coco
    await coco.close()


async def test_job_pod_round_trip_over_attach(kube: FakeKube, backend: CocoBackend) -> None:
    async with await backend.start(_echo_spec(), "sb-roundtrip") as sandbox:
        ready = await asyncio.wait_for(sandbox.recv(), 20)
        assert ready["op"] == "ready"
        assert ready["argv"] == ["--model", "/opt/cdvm/model.gguf", "--tee", "auto"]
        assert ready["home"] == "/tmp"
        big = {"op": "blob", "data": "x" * (3 * 1024 * 1024)}
        await sandbox.send(big)
        echoed = await asyncio.wait_for(sandbox.recv(), 20)
        assert echoed == {"op": "echo", "message": big}
        await sandbox.send({"op": "exit", "code": 0})
        with pytest.raises(SandboxExited) as ended:
            await asyncio.wait_for(sandbox.recv(), 20)
        assert ended.value.reason == "exited" and ended.value.returncode == 0
        exit_info = await sandbox.wait()
        assert b"echo runner starting" in exit_info.stderr_tail
    assert ("cdvm", "cdvm-sb-roundtrip") not in kube.pods
    assert ("DELETE", "/api/v1/namespaces/cdvm/pods/cdvm-sb-roundtrip") in kube.requests


async def test_registered_backend_reads_its_config_file(kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "coco.toml"
    config.write_text(f'[coco]\nimage = "{IMAGE}"\nruntime_class = "kata-qemu-snp"\npython = "{sys.executable}"\n'
                      f'kubeconfig = "{kube.kubeconfig(tmp_path / "kc.json")}"\nworker_id = "w1"\n')
    monkeypatch.setenv("CDVM_COCO_CONFIG", str(config))
    coco = get_backend("coco")
    assert isinstance(coco, CocoBackend) and coco.settings.runtime_class == "kata-qemu-snp"
    try:
        async with await coco.start(_echo_spec(), "sb-registered") as sandbox:
            assert (await asyncio.wait_for(sandbox.recv(), 20))["op"] == "ready"
            pod = kube.pods[("cdvm", "cdvm-sb-registered")]
            assert pod["spec"]["runtimeClassName"] == "kata-qemu-snp"
    finally:
        await coco.close()


async def test_runner_exit_code_and_limit_reasons(kube: FakeKube, backend: CocoBackend) -> None:
    sandbox = await backend.start(_echo_spec(), "sb-exitcode")
    await asyncio.wait_for(sandbox.recv(), 20)
    await sandbox.send({"op": "exit", "code": 3})
    with pytest.raises(SandboxExited) as ended:
        await asyncio.wait_for(sandbox.recv(), 20)
    assert ended.value.reason == "exited" and ended.value.returncode == 3
    await sandbox.destroy()

    kube.scenarios.append(["creating", "run", "sleep:1.5", "oomkilled"])
    sandbox = await backend.start(_echo_spec(), "sb-oom")
    await asyncio.wait_for(sandbox.recv(), 20)
    with pytest.raises(SandboxLimitExceeded) as oom:
        await asyncio.wait_for(sandbox.recv(), 20)
    assert oom.value.limit == "memory"
    await sandbox.destroy()


async def test_wall_timeout_deletes_the_pod(kube: FakeKube, backend: CocoBackend) -> None:
    sandbox = await backend.start(_echo_spec(wall_timeout_s=1.5), "sb-walltime")
    await asyncio.wait_for(sandbox.recv(), 20)
    await sandbox.send({"op": "sleep", "seconds": 30})
    with pytest.raises(SandboxLimitExceeded) as ended:
        await asyncio.wait_for(sandbox.recv(), 20)
    assert ended.value.limit == "timeout"
    assert ("cdvm", "cdvm-sb-walltime") not in kube.pods
    await sandbox.destroy()


async def test_garbage_on_stdout_is_a_channel_error(kube: FakeKube, backend: CocoBackend) -> None:
    async with await backend.start(_echo_spec(), "sb-garbage") as sandbox:
        await asyncio.wait_for(sandbox.recv(), 20)
        await sandbox.send({"op": "garbage"})
        with pytest.raises(ChannelError):
            await asyncio.wait_for(sandbox.recv(), 20)


@pytest.mark.parametrize(("steps", "expected"), [
    (["creating", "image-pull-error"], "ErrImagePull"),
    (["creating", "image-pull-backoff"], "ImagePullBackOff"),
    (["creating", "create-container-error"], "blocked by policy"),
    (["creating", "evicted"], "low on resource: memory"),
    (["creating", "node-lost"], "DeletionByTaintManager"),
    (["sleep:0.3", "deadline-exceeded"], "longer than the specified deadline"),
])
async def test_start_failures_end_with_a_reason_and_no_pod(kube: FakeKube, backend: CocoBackend,
                                                           steps: list[str], expected: str) -> None:
    kube.scenarios.append(steps)
    with pytest.raises(SandboxStartError, match=expected):
        await backend.start(_echo_spec(), "sb-startfail")
    assert ("cdvm", "cdvm-sb-startfail") not in kube.pods


async def test_start_timeout_names_the_scheduler_message(kube: FakeKube, tmp_path: Path) -> None:
    coco = CocoBackend(_settings(kube, tmp_path, start_timeout_s=1.5))
    kube.scenarios.append(["unschedulable", "hang"])
    try:
        with pytest.raises(SandboxStartError, match=r"did not start within 2 s .*0/3 nodes are available"):
            await coco.start(_echo_spec(), "sb-pending")
    finally:
        await coco.close()
    assert ("cdvm", "cdvm-sb-pending") not in kube.pods


async def test_compacted_watch_version_is_read_afresh(kube: FakeKube, backend: CocoBackend) -> None:
    kube.compacted = 10**9
    kube.scenarios.append(["creating", "sleep:0.5", "run"])
    async with await backend.start(_echo_spec(), "sb-compacted") as sandbox:
        assert (await asyncio.wait_for(sandbox.recv(), 20))["op"] == "ready"


async def test_node_lost_while_running(kube: FakeKube, backend: CocoBackend) -> None:
    kube.scenarios.append(["creating", "run", "sleep:1.5", "node-lost", "vanish"])
    sandbox = await backend.start(_echo_spec(), "sb-nodelost")
    await asyncio.wait_for(sandbox.recv(), 20)
    with pytest.raises(SandboxExited) as ended:
        await asyncio.wait_for(sandbox.recv(), 20)
    assert ended.value.reason == "killed"
    await sandbox.destroy()


async def test_reused_label_forbidden_and_invalid(kube: FakeKube, backend: CocoBackend) -> None:
    async with await backend.start(_echo_spec(), "sb-twice"):
        with pytest.raises(SandboxStartError, match="already used"):
            await backend.start(_echo_spec(), "sb-twice")
    kube.failures[("POST", "/api/v1/namespaces/cdvm/pods")] = 403
    with pytest.raises(SandboxStartError, match="HTTP 403 .*cannot create resource"):
        await backend.start(_echo_spec(), "sb-forbidden")


async def test_orphans_are_reaped_by_label(kube: FakeKube, tmp_path: Path) -> None:
    first = CocoBackend(_settings(kube, tmp_path, worker_id="worker-a"))
    other = CocoBackend(_settings(kube, tmp_path, worker_id="worker-b", worker_kind="pod"))
    gone = CocoBackend(_settings(kube, tmp_path, worker_id="worker-gone", worker_kind="pod"))
    try:
        await first.start(_echo_spec(), "sb-orphan1")
        await first.start(_echo_spec(), "sb-orphan2")
        await gone.start(_echo_spec(), "sb-orphan3")
        kube.pods[("cdvm", "worker-b")] = {"metadata": {"name": "worker-b", "namespace": "cdvm", "labels": {}}, "status": {}}
        kept = await other.start(_echo_spec(), "sb-alive")
        restarted = CocoBackend(_settings(kube, tmp_path, worker_id="worker-a"))
        assert await restarted.reap_orphans() == 3
        assert set(kube.pods) == {("cdvm", "worker-b"), ("cdvm", "cdvm-sb-alive")}
        assert await restarted.reap_orphans() == 0
        await kept.destroy()
        await restarted.close()
    finally:
        for coco in (first, other, gone):
            await coco.close()


@pytest.mark.slow
async def test_real_runner_serves_a_plain_job_in_a_pod(kube: FakeKube, tmp_path: Path) -> None:
    """The real jobs.runner (sim TEE, real llama.cpp) started by the coco backend, driven over attach."""
    model = resolve_model(None)
    spec = runner_spec(RunnerSettings(tee="sim", threads=1, n_ctx=512, max_tokens_cap=8), model)
    coco = CocoBackend(_settings(kube, tmp_path, model_path=str(model.path), start_timeout_s=60.0))
    customer, dvm_key = PrivateKey.generate(), PrivateKey.generate()
    request = build_job_request(customer, 5050, inputs=[JobInput("Say hello.", "text")], params=[("max_tokens", "4")],
                                targets=[dvm_key.public_key.hex()])
    try:
        async with await coco.start(spec, "sb-realrunner") as sandbox:
            ready = await asyncio.wait_for(sandbox.recv(), 120)
            assert ready["op"] == "ready" and ready["model"]["sha256"] == model.sha256
            await sandbox.send({"op": "job", "request": request.to_dict(), "opened_tags": None})
            ops = []
            while True:
                message = await asyncio.wait_for(sandbox.recv(), 120)
                ops.append(message["op"])
                if message["op"] == "publish":
                    result = Event.from_dict(message["event"])
                    result.verify()
                    assert result.kind == 6050 and message["role"] == "result"
                if message["op"] in ("done", "failed"):
                    break
            assert ops[-1] == "done" and "publish" in ops
    finally:
        await coco.close()


# ---- the aa evidence provider -----------------------------------------------------------------


class _AgentHandler(BaseHTTPRequestHandler):
    """The attestation agent's REST API: /aa/evidence?runtime_data=<text> -> recorded evidence."""

    body: bytes = b""
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        runtime_data = parse_qs(url.query).get("runtime_data", [""])[0]
        type(self).seen.append(runtime_data)
        if url.path != "/aa/evidence" or not runtime_data:
            self.send_response(400)
            self.end_headers()
            return
        body = type(self).body.replace(b"@RUNTIME_DATA@", runtime_data.encode())
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def agent() -> AsyncIterator[tuple[str, type[_AgentHandler]]]:
    handler = type("Handler", (_AgentHandler,), {"seen": [], "body": b""})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_aa_runtime_data_is_64_ascii_and_binds_the_report_data() -> None:
    report_data = build_report_data(PrivateKey.generate().public_key.raw, "11" * 32, "22" * 32, "33" * 32)
    text = aa_runtime_data(report_data)
    assert len(text) == 64 and text.isascii() and "=" not in text
    assert aa_report_data(report_data) == text.encode()
    assert aa_runtime_data(bytes(64)) != aa_runtime_data(b"\x01" + bytes(63))
    with pytest.raises(ProviderError):
        aa_runtime_data(b"short")


def test_aa_provider_reads_tdx_evidence_from_the_agent(agent, vectors: Path) -> None:
    url, handler = agent
    evidence = load_evidence((vectors / "tee" / "tdx" / "dcap-qvl" / "tdx-quote.bin").read_bytes())
    report_data = bytes(range(64))
    raw = bytearray(evidence.raw)
    offset = 48 + 520
    assert bytes(raw[offset:offset + 64]) == evidence_report_data("tdx", evidence.raw)
    raw[offset:offset + 64] = aa_report_data(report_data)
    tdx = json.dumps({"cc_eventlog": None, "quote": base64.b64encode(bytes(raw)).decode()})
    handler.body = json.dumps([["tdx", tdx]]).encode()
    got = AaProvider(url=url).get_evidence(report_data)
    assert got.tee == "tdx" and got.provider == "aa" and got.raw == bytes(raw)
    assert handler.seen == [aa_runtime_data(report_data)]
    handler.body = tdx.encode()
    assert AaProvider(url=url).get_evidence(report_data).raw == bytes(raw)
    with pytest.raises(ProviderError, match="carries REPORTDATA"):
        AaProvider(url=url).get_evidence(bytes(64))


@pytest.mark.parametrize(("body", "message"), [
    (json.dumps([["snp", json.dumps({"attestation_report": {"version": 2}, "cert_chain": None})]]), "sev-crate structure"),
    (json.dumps({"svn": "1", "report_data": "eHh4eA=="}), "without a TEE"),
    (json.dumps({"quote": "%%%"}), "not base64"),
    (json.dumps({"quote": base64.b64encode(b"not a quote").decode()}), "not a TDX quote"),
    ("[[1, 2]]", "unreadable evidence"),
    ("{", "unreadable evidence"),
    ("[]", "empty list"),
])
def test_aa_provider_refuses_unusable_evidence(agent, body: str, message: str) -> None:
    url, handler = agent
    handler.body = body.encode()
    with pytest.raises(ProviderError, match=message):
        AaProvider(url=url).get_evidence(bytes(64))


def test_aa_provider_unreachable_and_in_auto(agent) -> None:
    url, handler = agent
    assert AaProvider(url=url).unavailable() is None
    closed = AaProvider(url="http://127.0.0.1:9")
    assert "no attestation agent" in (closed.unavailable() or "")
    with pytest.raises(ProviderError, match="cannot reach"):
        closed.get_evidence(bytes(64))
    handler.body = b'{"svn": "1", "report_data": "eHh4eA=="}'
    with pytest.raises(ProviderError, match=r"aa: .*without a TEE"):
        get_evidence_auto(bytes(64), candidates=[AaProvider(url=url)])
