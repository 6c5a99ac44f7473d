"""Sans-I/O pieces of the ``coco`` backend: settings, the per-job pod manifest, initdata.

One job = one pod whose ``runtimeClassName`` is a Kata Confidential Containers class, so
the pod is its own TDX or SEV-SNP VM. Everything the pod will run is pinned before launch:

* the image by digest (``name@sha256:<64 hex>``; a tag alone is refused: a tag can move);
* the command (the runner's arguments, rewritten to paths inside the image), its
  environment, limits and mounts, by the pod manifest built here;
* the **initdata** document (Confidential Containers initdata spec, version 0.1.0): a TOML
  text with ``version``, ``algorithm`` and a ``[data]`` table holding ``aa.toml``
  (attestation-agent config), ``cdh.toml`` (confidential-data-hub config) and
  ``policy.rego`` (the Kata agent policy that allows only this pod's containers, its
  attach stream, and no ``exec``). It travels gzip-compressed and base64-encoded in the
  pod annotation ``io.katacontainers.config.hypervisor.cc_init_data``.

The host hashes the initdata text with ``algorithm`` and the hardware measures the digest
at launch: on TDX it becomes MRCONFIGID (48 bytes: a SHA-384 digest as is, a shorter
digest zero-padded, a longer one truncated); on SEV-SNP it becomes HOSTDATA (32 bytes,
same rule). The guest's attestation agent refuses to start when the initdata it received
does not match the measured digest, so a verifier that checks MRCONFIGID/HOSTDATA against
:func:`initdata_digest_for` of the expected document knows the job's policy and
attestation configuration (docs/deploy.md).

The channel: the container runs with ``stdin: true, stdinOnce: true, tty: false`` and the
worker attaches to it (the API's ``attach`` websocket) — the pod's stdin/stdout are the
same byte stream the ``process`` backend gets from pipes. Because output written before
the attach would be lost, the container starts behind a one-byte gate
(:data:`GATE_CODE`): it reads :data:`START_BYTE` from stdin, then ``exec``\\ s the runner.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from jobs.sandbox import SandboxSpec, check_label
from jobs.sandbox_errors import SandboxError

INITDATA_ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"
INITDATA_VERSION = "0.1.0"
INITDATA_ALGORITHMS = ("sha256", "sha384", "sha512")
RUNTIME_CLASSES = (
    "kata-qemu-tdx",
    "kata-qemu-snp",
    "kata-qemu-nvidia-gpu-tdx",
    "kata-qemu-nvidia-gpu-snp",
    "kata-qemu-coco-dev",
)
MRCONFIGID_LEN = 48
HOSTDATA_LEN = 32

CONTAINER_NAME = "runner"
START_BYTE = b"\x01"
GATE_CODE = (
    "import os,sys\n"
    "if os.read(0,1)!=b'\\x01':sys.exit(125)\n"
    "os.execv(sys.executable,[sys.executable,'-m',*sys.argv[1:]])"
)
"""Runs as ``python -c GATE_CODE <module> <args>``: waits for the worker's attach, then execs the runner."""

LABEL_MANAGED = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_WORKER = "cdvm.dev/worker"
LABEL_WORKER_KIND = "cdvm.dev/worker-kind"
LABEL_SANDBOX = "cdvm.dev/sandbox"
ANNOTATION_INITDATA_DIGEST = "cdvm.dev/initdata-digest"
MANAGED_BY = "cdvm"
JOB_COMPONENT = "job"
JOB_SELECTOR = f"{LABEL_MANAGED}={MANAGED_BY},{LABEL_COMPONENT}={JOB_COMPONENT}"

_IMAGE = re.compile(
    r"(?P<name>[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?@sha256:(?P<digest>[0-9a-f]{64})"
)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_IN_IMAGE_PATH = re.compile(r"/[^\0]*")


class CocoConfigError(SandboxError):
    """The ``coco`` backend settings are invalid (image not pinned, unknown runtime class, ...)."""


def check_image(image: str) -> str:
    """An image reference pinned by digest (``registry/name[:tag]@sha256:<64 hex>``)."""
    if not isinstance(image, str) or not _IMAGE.fullmatch(image):
        raise CocoConfigError(
            f"image {image!r} is not pinned by digest: use name@sha256:<64 hex digits> "
            "(a tag alone can be moved to other bytes after the customer checked it)"
        )
    return image


@dataclass(frozen=True)
class CocoSettings:
    """Operator settings of the ``coco`` backend (the ``[coco]`` table of its config file).

    ``python`` and ``model_path`` are paths inside ``image``; ``embedding_model_path`` too,
    when the worker's runner uses an embedding model. ``aa_toml`` / ``cdh_toml`` are put
    verbatim into initdata (for example the KBS address); ``policy_rego`` replaces the
    generated agent policy (e.g. one made by Kata's ``genpolicy`` from :func:`pod_manifest`).
    """

    image: str
    namespace: str = "cdvm"
    runtime_class: str = "kata-qemu-tdx"
    python: str = "/usr/local/bin/python3"
    model_path: str = "/opt/cdvm/model.gguf"
    embedding_model_path: str | None = None
    cpu: str = "2"
    extra_memory_mb: int = 256
    initdata_algorithm: str = "sha384"
    aa_toml: str = ""
    cdh_toml: str = ""
    policy_rego: str | None = None
    worker_id: str = "cdvm-worker"
    worker_kind: str = "host"
    worker_uid: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    image_pull_secret: str | None = None
    start_timeout_s: float = 600.0
    api_timeout_s: float = 30.0
    kubeconfig: str | None = None
    context: str | None = None

    def __post_init__(self) -> None:
        check_image(self.image)
        if self.runtime_class not in RUNTIME_CLASSES:
            raise CocoConfigError(f"runtime_class {self.runtime_class!r} is not one of {', '.join(RUNTIME_CLASSES)}")
        if not _DNS_LABEL.fullmatch(self.namespace or ""):
            raise CocoConfigError(f"namespace {self.namespace!r} is not a DNS-1123 label")
        for name in ("python", "model_path", "embedding_model_path"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and _IN_IMAGE_PATH.fullmatch(value)):
                raise CocoConfigError(f"{name} must be an absolute path inside the image, not {value!r}")
        if not isinstance(self.cpu, str) or not _QUANTITY.fullmatch(self.cpu):
            raise CocoConfigError(f"cpu {self.cpu!r} is not a Kubernetes quantity (e.g. \"2\" or \"1500m\")")
        if not isinstance(self.extra_memory_mb, int) or isinstance(self.extra_memory_mb, bool) or self.extra_memory_mb < 0:
            raise CocoConfigError("extra_memory_mb must be a non-negative integer")
        if self.initdata_algorithm not in INITDATA_ALGORITHMS:
            raise CocoConfigError(f"initdata_algorithm must be one of {', '.join(INITDATA_ALGORITHMS)}")
        for name in ("aa_toml", "cdh_toml", "policy_rego"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or "'''" in value):
                raise CocoConfigError(f"{name} must be a string without ''' (it is embedded as a TOML literal string)")
        for name in ("worker_id", "worker_kind"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or not _LABEL_VALUE.fullmatch(value):
                raise CocoConfigError(f"{name} {value!r} is not a valid Kubernetes label value")
        selector = dict(self.node_selector)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in selector.items()):
            raise CocoConfigError("node_selector must map strings to strings")
        if not self.start_timeout_s > 0 or not self.api_timeout_s > 0:
            raise CocoConfigError("start_timeout_s and api_timeout_s must be positive")
        object.__setattr__(self, "node_selector", MappingProxyType(selector))

    @property
    def tee_platform(self) -> str:
        """``tdx``, ``snp`` or ``none`` (coco-dev: a Kata VM without TEE, for testing only)."""
        return "tdx" if self.runtime_class.endswith("-tdx") else "snp" if self.runtime_class.endswith("-snp") else "none"

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], *, source: str = "[coco]") -> CocoSettings:
        """Build from a config table; unknown keys and wrong types are :class:`CocoConfigError`."""
        if not isinstance(table, Mapping):
            raise CocoConfigError(f"{source} must be a table")
        known = {f.name for f in fields(cls)}
        unknown = set(table) - known
        if unknown:
            raise CocoConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
        if "image" not in table:
            raise CocoConfigError(f"{source}: 'image' (pinned by digest) is required")
        try:
            return cls(**dict(table))
        except TypeError as error:
            raise CocoConfigError(f"{source}: {error}") from None


# ---- initdata ------------------------------------------------------------------------------


def _literal(text: str) -> str:
    """A TOML multi-line literal string holding ``text`` exactly (the newline after ''' is trimmed)."""
    return "'''\n" + text + "'''"


def initdata_toml(data: Mapping[str, str], algorithm: str = "sha384") -> str:
    """The initdata document (version 0.1.0) for ``data`` (file name -> content), keys sorted."""
    if algorithm not in INITDATA_ALGORITHMS:
        raise CocoConfigError(f"initdata algorithm {algorithm!r} is not one of {', '.join(INITDATA_ALGORITHMS)}")
    lines = [f'version = "{INITDATA_VERSION}"', f'algorithm = "{algorithm}"', "", "[data]"]
    for name in sorted(data):
        content = data[name]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or "'''" in content:
            raise CocoConfigError(f"initdata entry {name!r} cannot be embedded (bad name or ''' in its content)")
        lines.append(f'"{name}" = {_literal(content)}')
    return "\n".join(lines) + "\n"


def encode_initdata(document: str) -> str:
    """The annotation value: base64 (standard alphabet) of gzip of the document; deterministic."""
    return base64.b64encode(gzip.compress(document.encode("utf-8"), mtime=0)).decode("ascii")


def decode_initdata(annotation: str) -> str:
    """Inverse of :func:`encode_initdata` (what the Kata runtime does with the annotation)."""
    try:
        return gzip.decompress(base64.b64decode(annotation, validate=True)).decode("utf-8")
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as error:
        raise CocoConfigError(f"initdata annotation is not base64 of gzip of UTF-8 text: {error}") from None


def initdata_digest(document: str, algorithm: str) -> bytes:
    """The digest of the initdata text with its own ``algorithm``."""
    if algorithm not in INITDATA_ALGORITHMS:
        raise CocoConfigError(f"initdata algorithm {algorithm!r} is not one of {', '.join(INITDATA_ALGORITHMS)}")
    return hashlib.new(algorithm, document.encode("utf-8")).digest()


def initdata_digest_for(document: str, algorithm: str, platform: str) -> bytes:
    """What the hardware shows: MRCONFIGID (``tdx``, 48 bytes) or HOSTDATA (``snp``, 32 bytes),
    the digest truncated or zero-padded to that length."""
    length = {"tdx": MRCONFIGID_LEN, "snp": HOSTDATA_LEN}.get(platform)
    if length is None:
        raise CocoConfigError(f"platform {platform!r} has no initdata field (tdx: MRCONFIGID, snp: HOSTDATA)")
    return initdata_digest(document, algorithm)[:length].ljust(length, b"\0")


# ---- the agent policy -----------------------------------------------------------------------

_ALLOWED_REQUESTS = (
    "AddARPNeighborsRequest", "CloseStdinRequest", "CreateSandboxRequest", "DestroySandboxRequest",
    "GetOOMEventRequest", "GuestDetailsRequest", "ListInterfacesRequest", "ListRoutesRequest",
    "MemHotplugByProbeRequest", "OnlineCPUMemRequest", "ReadStreamRequest", "RemoveContainerRequest",
    "ReseedRandomDevRequest", "SetGuestDateTimeRequest", "SignalProcessRequest", "StartContainerRequest",
    "StatsContainerRequest", "TtyWinResizeRequest", "UpdateInterfaceRequest", "UpdateRoutesRequest",
    "WaitProcessRequest", "WriteStreamRequest",
)
_DENIED_REQUESTS = (
    "AddSwapRequest", "CopyFileRequest", "ExecProcessRequest", "GetMetricsRequest", "PauseContainerRequest",
    "RemoveStaleVirtiofsShareMountsRequest", "ResumeContainerRequest", "SetPolicyRequest", "StartTracingRequest",
    "StopTracingRequest", "UpdateContainerRequest", "UpdateEphemeralMountsRequest",
)


def agent_policy(command: list[str], image: str) -> str:
    """A Kata agent policy (Rego, package ``agent_policy``) for one job pod.

    Allows creating only the pause container and the runner with exactly ``command`` and no
    terminal, pulling only ``image``; denies ``exec`` (nobody gets a shell in the job's VM),
    file copies into the guest, swap, a later policy change and tracing. Reading and writing
    the container's streams stay allowed: they carry only channel frames (docs/protocol.md §7).
    """
    lines = ["package agent_policy", ""]
    lines += [f"default {name} := true" for name in _ALLOWED_REQUESTS]
    lines += [f"default {name} := false" for name in _DENIED_REQUESTS]
    lines += ["default CreateContainerRequest := false", "default PullImageRequest := false", ""]
    lines += [
        "CreateContainerRequest {",
        '    input.OCI.Process.Args == ["/pause"]',
        "}",
        "",
        "CreateContainerRequest {",
        f"    input.OCI.Process.Args == {json.dumps(command, ensure_ascii=False)}",
        "    input.OCI.Process.Terminal == false",
        "}",
        "",
        "PullImageRequest {",
        f"    input.image == {json.dumps(image)}",
        "}",
    ]
    return "\n".join(lines) + "\n"


# ---- the pod --------------------------------------------------------------------------------


def pod_name(label: str) -> str:
    """The job pod's name for a sandbox label: ``cdvm-`` + the label, lowercased, ``_`` -> ``-``."""
    name = "cdvm-" + check_label(label).lower().replace("_", "-")
    name = name[:63].rstrip("-")
    if not _DNS_LABEL.fullmatch(name):
        raise SandboxError(f"sandbox label {label!r} does not give a valid pod name")
    return name


def _runner_args(spec: SandboxSpec, settings: CocoSettings) -> tuple[str, list[str]]:
    """The runner module and its arguments, with host paths replaced by paths inside the image."""
    argv = list(spec.argv)
    if len(argv) < 3 or argv[1] != "-m":
        raise CocoConfigError("the coco backend runs Python runner modules: the spec's argv must be [python, -m, module, ...]")
    module, args = argv[2], argv[3:]
    replaced = {"--model": settings.model_path, "--embedding-model": settings.embedding_model_path}
    out: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in replaced and index + 1 < len(args):
            target = replaced[arg]
            if target is None:
                raise CocoConfigError(f"the runner uses {arg} but the [coco] settings name no path for it in the image")
            out += [arg, target]
            index += 2
            continue
        out.append(arg)
        index += 1
    return module, out


def container_command(spec: SandboxSpec, settings: CocoSettings) -> list[str]:
    """The job container's full command: the start gate, then the runner module and arguments."""
    module, args = _runner_args(spec, settings)
    return [settings.python, "-c", GATE_CODE, module, *args]


def _quantity_bytes(count: int) -> str:
    mebibytes = math.ceil(count / 1024**2)
    return f"{mebibytes}Mi"


@dataclass(frozen=True)
class JobPod:
    """A rendered job pod: the manifest and its initdata (document and measured digest)."""

    manifest: dict[str, Any]
    initdata: str
    initdata_digest: bytes = field(repr=False)

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])


def job_pod(spec: SandboxSpec, settings: CocoSettings, label: str) -> JobPod:
    """The pod manifest (a ``v1`` ``Pod`` as JSON-ready dict) of one job's sandbox."""
    name = pod_name(label)
    command = container_command(spec, settings)
    policy = settings.policy_rego if settings.policy_rego is not None else agent_policy(command, settings.image)
    document = initdata_toml(
        {"aa.toml": settings.aa_toml, "cdh.toml": settings.cdh_toml, "policy.rego": policy},
        settings.initdata_algorithm,
    )
    digest = initdata_digest(document, settings.initdata_algorithm)
    env = [{"name": key, "value": value} for key, value in spec.env.items() if key != "PYTHONPATH"]
    memory = _quantity_bytes(spec.memory_bytes + spec.tmpfs_bytes + settings.extra_memory_mb * 1024**2)
    labels = {
        LABEL_MANAGED: MANAGED_BY,
        LABEL_COMPONENT: JOB_COMPONENT,
        LABEL_WORKER: settings.worker_id,
        LABEL_WORKER_KIND: settings.worker_kind,
        LABEL_SANDBOX: check_label(label),
    }
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": settings.namespace,
        "labels": labels,
        "annotations": {
            INITDATA_ANNOTATION: encode_initdata(document),
            ANNOTATION_INITDATA_DIGEST: f"{settings.initdata_algorithm}:{digest.hex()}",
        },
    }
    if settings.worker_uid:
        metadata["ownerReferences"] = [{
            "apiVersion": "v1", "kind": "Pod", "name": settings.worker_id, "uid": settings.worker_uid,
            "controller": False, "blockOwnerDeletion": False,
        }]
    container = {
        "name": CONTAINER_NAME,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": env,
        "workingDir": "/tmp",
        "stdin": True,
        "stdinOnce": True,
        "tty": False,
        "resources": {
            "requests": {"cpu": settings.cpu, "memory": memory},
            "limits": {"cpu": settings.cpu, "memory": memory},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 65534,
            "runAsGroup": 65534,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "terminationMessagePolicy": "File",
    }
    pod_spec: dict[str, Any] = {
        "runtimeClassName": settings.runtime_class,
        "restartPolicy": "Never",
        "activeDeadlineSeconds": math.ceil(settings.start_timeout_s + spec.wall_timeout_s),
        "terminationGracePeriodSeconds": 1,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "shareProcessNamespace": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": _quantity_bytes(spec.tmpfs_bytes)}}],
    }
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if settings.image_pull_secret:
        pod_spec["imagePullSecrets"] = [{"name": settings.image_pull_secret}]
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
    return JobPod(manifest=manifest, initdata=document, initdata_digest=digest)


# ---- reading pod status ---------------------------------------------------------------------

IMAGE_ERRORS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                          "RegistryUnavailable", "SignatureValidationFailed"})
CONTAINER_ERRORS = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError",
                              "PreCreateHookError", "PostStartHookError", "CrashLoopBackOff"})


@dataclass(frozen=True)
class PodState:
    """Where a job pod stands: ``pending``, ``running`` or ``ended``; ``reason`` says why it ended
    (an :data:`jobs.sandbox.ExitReason` or a start failure text)."""

    stage: str
    reason: str = ""
    message: str = ""
    returncode: int | None = None


def _runner_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if isinstance(s, Mapping) and s.get("name") == CONTAINER_NAME), {})


def pod_state(pod: Mapping[str, Any], *, deleted: bool = False) -> PodState:
    """Classify a pod object (as the API returns it) for the sandbox's life cycle.

    Image and container-creation errors end the start at once (the kubelet would retry an
    image pull forever); eviction, preemption, node loss (``DisruptionTarget``, phase
    ``Unknown``, deletion by the node lifecycle controller) and ``activeDeadlineSeconds``
    end it with a reason the customer can read.
    """
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    container = _runner_status(pod)
    state = container.get("state") or {}
    waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
    pod_reason, pod_message = status.get("reason") or "", status.get("message") or ""
    disruption = next((c for c in status.get("conditions") or []
                       if isinstance(c, Mapping) and c.get("type") == "DisruptionTarget" and c.get("status") == "True"), None)
    code = terminated.get("exitCode") if isinstance(terminated.get("exitCode"), int) else None
    if pod_reason == "DeadlineExceeded":
        return PodState("ended", "timeout", pod_message or "the pod ran past its activeDeadlineSeconds", code)
    if pod_reason == "Evicted":
        return PodState("ended", "evicted", pod_message or "the pod was evicted", code)
    if terminated:
        reason = terminated.get("reason") or ""
        kind = "memory" if reason == "OOMKilled" else "killed" if code is not None and code > 128 else "exited"
        return PodState("ended", kind, terminated.get("message") or reason, code)
    if phase == "Failed":
        return PodState("ended", "killed", pod_message or pod_reason or "the pod failed")
    if phase == "Succeeded":
        return PodState("ended", "exited", "the pod completed", 0)
    if phase == "Unknown" or pod_reason == "NodeLost":
        return PodState("ended", "node_lost", pod_message or "the node running the pod stopped responding")
    if disruption is not None:
        return PodState("ended", "disrupted", f"{disruption.get('reason') or 'disrupted'}: {disruption.get('message') or ''}".strip(": "))
    if deleted or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return PodState("ended", "deleted", "the pod was deleted")
    if waiting.get("reason") in IMAGE_ERRORS:
        return PodState("ended", "image", f"{waiting['reason']}: {waiting.get('message') or 'the image could not be pulled'}")
    if waiting.get("reason") in CONTAINER_ERRORS:
        return PodState("ended", "container", f"{waiting['reason']}: {waiting.get('message') or ''}".strip(": "))
    if phase == "Running" and state.get("running") is not None:
        return PodState("running")
    unschedulable = next((c for c in status.get("conditions") or []
                          if isinstance(c, Mapping) and c.get("type") == "PodScheduled" and c.get("status") == "False"), None)
    if unschedulable is not None:
        return PodState("pending", "unschedulable", unschedulable.get("message") or "")
    return PodState("pending", waiting.get("reason") or "", waiting.get("message") or "")
