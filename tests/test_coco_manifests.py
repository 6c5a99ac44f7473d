"""Generated job pods, initdata and the shipped deploy/ manifests, validated against the
Kubernetes OpenAPI models that ship with the client (no schema JSON ships with it: every
object is checked field by field against the generated models' ``openapi_types`` /
``attribute_map`` — unknown fields, wrong types and bad quantities are errors — and then
deserialized into the typed models, whose setters enforce required fields)."""
from __future__ import annotations

import base64
import gzip
import hashlib
import json
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from dvm.config import parse_relays_toml
from jobs.cli import load_worker_file
from jobs.coco_manifests import (
    GATE_CODE,
    INITDATA_ANNOTATION,
    RUNTIME_CLASSES,
    START_BYTE,
    CocoConfigError,
    CocoSettings,
    agent_policy,
    check_image,
    container_command,
    decode_initdata,
    encode_initdata,
    initdata_digest,
    initdata_digest_for,
    initdata_toml,
    job_pod,
    pod_name,
    pod_state,
)
from jobs.coco_lease import claim_manifest, lease_name
from jobs.model import ModelRef
from jobs.sandbox import SandboxSpec
from jobs.sandbox_coco import AttachDemux, stdin_messages
from jobs.sandbox_errors import ChannelError, SandboxError
from jobs.settings import RunnerSettings, runner_spec
from k8sfake import SchemaError, check_schema, recorded, validate

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
IMAGE = "registry.example.org/cdvm/runner@sha256:" + "ab" * 32
MODELS = {"Deployment": "V1Deployment", "ServiceAccount": "V1ServiceAccount", "Role": "V1Role",
          "RoleBinding": "V1RoleBinding", "ConfigMap": "V1ConfigMap", "NetworkPolicy": "V1NetworkPolicy"}


def _spec(tmp_path: Path) -> SandboxSpec:
    model_file = tmp_path / "model.gguf"
    model_file.write_bytes(b"GGUF")
    model = ModelRef(name="model.gguf", path=model_file, sha256="cd" * 32, size=4, fingerprint=None)  # type: ignore[arg-type]
    return runner_spec(RunnerSettings(tee="auto", threads=2), model)


@pytest.mark.parametrize("runtime_class", RUNTIME_CLASSES)
def test_job_pod_validates_and_pins_everything(tmp_path: Path, runtime_class: str) -> None:
    settings = CocoSettings(image=IMAGE, runtime_class=runtime_class, worker_id="cdvm-worker-7d9f-abcde",
                            worker_kind="pod", worker_uid="6f1d7a0e-0000-4000-8000-000000000001",
                            node_selector={"intel.feature.node.kubernetes.io/tdx": "true"}, image_pull_secret="regcred")
    pod = job_pod(_spec(tmp_path), settings, "sb-0123456789abcdef")
    typed = validate(pod.manifest, "V1Pod")
    spec = typed.spec
    assert spec.runtime_class_name == runtime_class and spec.restart_policy == "Never"
    assert spec.automount_service_account_token is False and spec.host_network is False
    container = spec.containers[0]
    assert container.image == IMAGE and container.stdin and container.stdin_once and not container.tty
    assert container.resources.limits == container.resources.requests
    assert container.security_context.read_only_root_filesystem and container.security_context.capabilities.drop == ["ALL"]
    assert container.command[:3] == [settings.python, "-c", GATE_CODE]
    assert container.command[3] == "jobs.runner"
    assert container.command[container.command.index("--model") + 1] == settings.model_path
    assert not any(str(tmp_path) in arg for arg in container.command)
    assert "PYTHONPATH" not in {env.name for env in container.env}
    assert pod.manifest["metadata"]["ownerReferences"][0]["uid"] == settings.worker_uid
    document = decode_initdata(pod.manifest["metadata"]["annotations"][INITDATA_ANNOTATION])
    assert document == pod.initdata
    parsed = tomllib.loads(document)
    assert parsed["version"] == "0.1.0" and parsed["algorithm"] == "sha384"
    assert set(parsed["data"]) == {"aa.toml", "cdh.toml", "policy.rego"}
    assert json.dumps(container.command) in parsed["data"]["policy.rego"]
    assert pod.initdata_digest == hashlib.sha384(document.encode()).digest()


def test_job_pod_is_deterministic_and_differs_per_command(tmp_path: Path) -> None:
    settings = CocoSettings(image=IMAGE)
    spec = _spec(tmp_path)
    first, again = job_pod(spec, settings, "sb-a"), job_pod(spec, settings, "sb-b")
    assert first.initdata == again.initdata and first.initdata_digest == again.initdata_digest
    assert first.manifest["metadata"]["annotations"][INITDATA_ANNOTATION] == again.manifest["metadata"]["annotations"][INITDATA_ANNOTATION]
    other = job_pod(spec, CocoSettings(image=IMAGE, model_path="/models/other.gguf"), "sb-a")
    assert other.initdata_digest != first.initdata_digest


def test_initdata_encoding_and_hardware_fields() -> None:
    document = initdata_toml({"aa.toml": "[token_configs]\n", "policy.rego": "package agent_policy\n"}, "sha256")
    assert tomllib.loads(document)["data"]["aa.toml"] == "[token_configs]\n"
    encoded = encode_initdata(document)
    assert gzip.decompress(base64.b64decode(encoded)).decode() == document
    sha256 = hashlib.sha256(document.encode()).digest()
    assert initdata_digest(document, "sha256") == sha256
    assert initdata_digest_for(document, "sha256", "tdx") == sha256 + bytes(16)
    assert initdata_digest_for(document, "sha256", "snp") == sha256
    doc384 = initdata_toml({}, "sha384")
    assert initdata_digest_for(doc384, "sha384", "tdx") == hashlib.sha384(doc384.encode()).digest()
    assert initdata_digest_for(doc384, "sha384", "snp") == hashlib.sha384(doc384.encode()).digest()[:32]
    with pytest.raises(CocoConfigError):
        initdata_digest_for(document, "sha256", "none")
    with pytest.raises(CocoConfigError):
        initdata_toml({"x": "'''"})
    with pytest.raises(CocoConfigError):
        initdata_toml({}, "md5")
    with pytest.raises(CocoConfigError):
        decode_initdata("not base64!")


@pytest.mark.parametrize("image", [
    "registry.example.org/cdvm/runner:latest",
    "cdvm",
    "registry.example.org/cdvm@sha256:" + "AB" * 32,
    "registry.example.org/cdvm@sha256:" + "ab" * 31,
    "registry.example.org/cdvm:v1@sha512:" + "ab" * 64,
    "",
])
def test_tag_only_or_malformed_images_are_refused(image: str) -> None:
    with pytest.raises(CocoConfigError, match="pinned by digest"):
        check_image(image)
    with pytest.raises(CocoConfigError):
        CocoSettings(image=image)


def test_pinned_images_are_accepted() -> None:
    for image in (IMAGE, "ghcr.io/acme/cdvm:1.2@sha256:" + "0f" * 32, "localhost:5000/cdvm@sha256:" + "00" * 32):
        assert check_image(image) == image


@pytest.mark.parametrize(("options", "message"), [
    ({"runtime_class": "kata-qemu"}, "runtime_class"),
    ({"namespace": "Bad_NS"}, "namespace"),
    ({"python": "python3"}, "absolute path"),
    ({"cpu": "two"}, "quantity"),
    ({"initdata_algorithm": "sha1"}, "initdata_algorithm"),
    ({"aa_toml": "x = '''y'''"}, "'''"),
    ({"worker_id": "has space"}, "label value"),
    ({"extra_memory_mb": -1}, "non-negative"),
])
def test_bad_settings_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(CocoConfigError, match=message):
        CocoSettings(image=IMAGE, **options)  # type: ignore[arg-type]


def test_settings_from_mapping_rejects_unknown_and_missing() -> None:
    assert CocoSettings.from_mapping({"image": IMAGE}).namespace == "cdvm"
    with pytest.raises(CocoConfigError, match="unknown key"):
        CocoSettings.from_mapping({"image": IMAGE, "imagee": IMAGE})
    with pytest.raises(CocoConfigError, match="required"):
        CocoSettings.from_mapping({})
    with pytest.raises(CocoConfigError):
        CocoSettings.from_mapping({"image": IMAGE, "start_timeout_s": "soon"})


def test_command_translation(tmp_path: Path) -> None:
    settings = CocoSettings(image=IMAGE, python="/usr/bin/python3")
    spec = SandboxSpec(argv=(sys.executable, "-m", "jobs.runner", "--model", "/host/m.gguf", "--embedding-model", "/host/e.gguf"))
    with pytest.raises(CocoConfigError, match="embedding-model"):
        container_command(spec, settings)
    with_embedding = CocoSettings(image=IMAGE, embedding_model_path="/opt/cdvm/embed.gguf")
    assert container_command(spec, with_embedding)[-2:] == ["--embedding-model", "/opt/cdvm/embed.gguf"]
    with pytest.raises(CocoConfigError, match="runner modules"):
        container_command(SandboxSpec(argv=("/bin/true",)), settings)


def test_pod_names() -> None:
    assert pod_name("sb-0123456789abcdef") == "cdvm-sb-0123456789abcdef"
    assert pod_name("Job_X") == "cdvm-job-x"
    assert len(pod_name("a" * 64)) == 63
    with pytest.raises(SandboxError):
        pod_name("../evil")


def test_agent_policy_shape() -> None:
    policy = agent_policy(["/usr/bin/python3", "-c", "x"], IMAGE)
    assert "default ExecProcessRequest := false" in policy
    assert "default SetPolicyRequest := false" in policy
    assert "default ReadStreamRequest := true" in policy and "default WriteStreamRequest := true" in policy
    assert f'input.image == "{IMAGE}"' in policy
    assert policy.count("CreateContainerRequest {") == 2


def test_gate_releases_the_runner_only_on_the_start_byte(tmp_path: Path) -> None:
    import subprocess

    argv = [sys.executable, "-c", GATE_CODE, "json.tool"]
    released = subprocess.run(argv, input=START_BYTE + b'{"a": 1}', capture_output=True, timeout=30)
    assert released.returncode == 0 and json.loads(released.stdout) == {"a": 1}
    refused = subprocess.run(argv, input=b"x{}", capture_output=True, timeout=30)
    assert refused.returncode == 125


@pytest.mark.parametrize(("name", "stage", "reason"), [
    ("unschedulable", "pending", "unschedulable"),
    ("creating", "pending", "ContainerCreating"),
    ("running", "running", ""),
    ("image-pull-error", "ended", "image"),
    ("image-pull-backoff", "ended", "image"),
    ("create-container-error", "ended", "container"),
    ("evicted", "ended", "evicted"),
    ("node-lost", "ended", "disrupted"),
    ("oomkilled", "ended", "memory"),
    ("deadline-exceeded", "ended", "timeout"),
    ("completed", "ended", "exited"),
    ("error-exit", "ended", "exited"),
])
def test_recorded_pod_statuses_classify(name: str, stage: str, reason: str) -> None:
    snapshot = recorded(f"pod-status-{name}")
    pod = {"metadata": {"name": "cdvm-sb-1", **snapshot.get("metadata", {})}, "status": snapshot["status"]}
    check_schema(snapshot["status"], "V1PodStatus")
    state = pod_state(pod)
    assert (state.stage, state.reason) == (stage, reason)


def test_pod_state_on_garbage_never_raises() -> None:
    for pod in ({}, {"status": None}, {"status": {"containerStatuses": [1, "x", {"name": "runner", "state": None}]}},
                {"status": {"conditions": ["x"]}}):
        assert pod_state(pod).stage == "pending"
    assert pod_state({}, deleted=True).reason == "deleted"


def test_recorded_attach_session_demultiplexes() -> None:
    session = recorded("attach-session")
    demux = AttachDemux(max_frame=1 << 20)
    frames = []
    for message in session["messages"]:
        frames += demux.feed(base64.b64decode(message))
    demux.close()
    assert frames == session["frames"]
    assert b"llama_model_loader" in demux.stderr_tail
    assert demux.status == {"metadata": {}, "status": "Success"}


def test_attach_demux_errors() -> None:
    demux = AttachDemux(max_frame=16)
    with pytest.raises(ChannelError, match="exceeds"):
        demux.feed(b"\x01" + (1000).to_bytes(4, "big"))
    demux = AttachDemux(max_frame=1024)
    demux.feed(b"\x01\x00\x00")
    with pytest.raises(ChannelError, match="inside a frame"):
        demux.close()
    with pytest.raises(ChannelError, match="unknown channel"):
        AttachDemux(max_frame=16).feed(b"\x09data")
    assert AttachDemux(max_frame=16).feed(b"") == []
    garbled = AttachDemux(max_frame=16)
    garbled.feed(b"\x03\xff")
    assert garbled.status is not None and garbled.status["status"] == "Failure"
    tail = AttachDemux(max_frame=16)
    tail.feed(b"\x02" + b"e" * 40_000)
    assert len(tail.stderr_tail) == 16 * 1024


def test_stdin_messages_chunk_and_reassemble() -> None:
    data = bytes(range(256)) * 300
    messages = stdin_messages(data, chunk=1000)
    assert all(m[0] == 0 and len(m) <= 1001 for m in messages)
    assert b"".join(m[1:] for m in messages) == data
    assert stdin_messages(b"") == []


def test_lease_manifest_validates() -> None:
    import datetime

    body = claim_manifest("ab" * 32, "cdvm", "worker-a", datetime.datetime(2026, 1, 10, tzinfo=datetime.UTC), 3600)
    typed = validate(body, "V1Lease")
    assert typed.spec.holder_identity == "worker-a" and typed.metadata.name == "cdvm-job-" + "ab" * 32
    with pytest.raises(SandboxError):
        lease_name("not-an-id")


def test_schema_check_catches_mistakes(tmp_path: Path) -> None:
    pod = job_pod(_spec(tmp_path), CocoSettings(image=IMAGE), "sb-x").manifest
    for mutate, message in (
        (lambda p: p["spec"].__setitem__("restartPolicyy", "Never"), "unknown field"),
        (lambda p: p["spec"]["containers"][0].__setitem__("stdin", "yes"), "boolean"),
        (lambda p: p["spec"]["containers"][0]["resources"]["limits"].__setitem__("memory", "lots"), "quantity"),
        (lambda p: p["spec"]["containers"][0].pop("name"), "name"),
        (lambda p: p["spec"].__setitem__("containers", {}), "list"),
    ):
        broken = json.loads(json.dumps(pod))
        mutate(broken)
        with pytest.raises(SchemaError, match=message):
            validate(broken, "V1Pod")


# ---- deploy/ ------------------------------------------------------------------------------------


def _deploy_documents() -> list[dict]:
    documents = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def test_deploy_manifests_validate() -> None:
    documents = _deploy_documents()
    kinds = sorted(doc["kind"] for doc in documents)
    assert kinds == sorted(["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "NetworkPolicy"])
    for doc in documents:
        validate(doc, MODELS[doc["kind"]])
        assert doc["metadata"]["namespace"] == "cdvm"


def test_rbac_is_limited_to_pods_and_leases_in_one_namespace() -> None:
    documents = _deploy_documents()
    assert not any(doc["kind"].startswith("Cluster") for doc in documents)
    role = next(doc for doc in documents if doc["kind"] == "Role")
    granted = {(group, resource) for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
    assert granted == {("", "pods"), ("", "pods/attach"), ("coordination.k8s.io", "leases")}
    assert all("*" not in rule["verbs"] and "*" not in rule["resources"] for rule in role["rules"])
    deployment = next(doc for doc in documents if doc["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "cdvm-worker"


def test_configmap_holds_valid_cdvm_configs(tmp_path: Path) -> None:
    config = next(doc for doc in _deploy_documents() if doc["kind"] == "ConfigMap")["data"]
    relays = parse_relays_toml(config["relays.toml"])
    assert relays.read_urls
    (tmp_path / "worker.toml").write_text(config["worker.toml"])
    loaded = load_worker_file(tmp_path / "worker.toml")
    settings = loaded.settings
    assert loaded.backend == "coco"
    coco = CocoSettings.from_mapping(tomllib.loads(config["coco.toml"])["coco"])
    assert coco.runtime_class in RUNTIME_CLASSES
    model = ModelRef(name="m.gguf", path=tmp_path / "worker.toml", sha256="00" * 32, size=1, fingerprint=None)  # type: ignore[arg-type]
    pod = job_pod(runner_spec(settings, model), coco, "sb-deploy")
    validate(pod.manifest, "V1Pod")
