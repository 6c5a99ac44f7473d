"""The ``coco`` sandbox backend: one Kubernetes Confidential Containers pod (a TDX or SEV-SNP
VM run by Kata) per job.

Life of a sandbox (see :mod:`jobs.coco_manifests` for what the pod pins):

1. create the pod (``POST /api/v1/namespaces/{ns}/pods``); a name conflict means the label
   was already used and is refused like any reused label;
2. watch it (``GET ...pods?watch=1&fieldSelector=metadata.name=...``) until its runner
   container is running; an image pull error, a container creation error, eviction, node
   loss or ``start_timeout_s`` end the start with :class:`SandboxStartError`;
3. attach to the container (``GET ...pods/{name}/attach?stdin=1&stdout=1&stderr=1``, a
   websocket speaking ``v4.channel.k8s.io``: each binary message is one channel byte — 0
   stdin, 1 stdout, 2 stderr, 3 error status — then data) and send the one start byte the
   container's gate waits for; from then on stdout carries channel frames
   (:mod:`jobs.channel`) and stdin takes ours, exactly as pipes do for ``process``;
4. when the stream ends, read the pod's final status (exit code, ``OOMKilled``,
   ``DeadlineExceeded``, eviction) for :class:`SandboxExit`;
5. delete the pod (grace period 0) on :meth:`CocoSandbox.destroy`.

Orphans: job pods carry the labels ``app.kubernetes.io/managed-by=cdvm``,
``app.kubernetes.io/component=job`` and ``cdvm.dev/worker=<worker id>``. On start a worker
deletes every job pod labelled with its own id (left by an earlier run of itself), and
every job pod of an in-cluster worker whose pod no longer exists; job pods of an
in-cluster worker also name it in ``ownerReferences``, so the cluster's garbage collector
removes them when the worker pod goes.

The Kubernetes client (``kubernetes_asyncio``, the ``cdvm[coco]`` extra) is imported only
when this backend is used; credentials come from the pod's service account when running
in a cluster, else from a kubeconfig.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvm.paths import config_dir
from jobs.channel import FrameDecoder, encode_frame
from jobs.coco_manifests import (
    CONTAINER_NAME,
    JOB_SELECTOR,
    LABEL_WORKER,
    LABEL_WORKER_KIND,
    START_BYTE,
    CocoConfigError,
    CocoSettings,
    PodState,
    job_pod,
    pod_state,
)
from jobs.sandbox import LIMIT_REASONS, ExitReason, Sandbox, SandboxBackend, SandboxExit, SandboxSpec, check_label
from jobs.sandbox_errors import ChannelError, SandboxError, SandboxExited, SandboxLimitExceeded, SandboxStartError

if TYPE_CHECKING:
    from jobs.coco_lease import JobClaims

log = logging.getLogger(__name__)

STDIN_CHANNEL, STDOUT_CHANNEL, STDERR_CHANNEL, ERROR_CHANNEL, RESIZE_CHANNEL = 0, 1, 2, 3, 4
STDIN_CHUNK = 32 * 1024
STDERR_TAIL_BYTES = 16 * 1024
FRAME_QUEUE = 256
EXIT_STATUS_WAIT_S = 10.0
CONFIG_ENV = "CDVM_COCO_CONFIG"
WORKER_ID_ENV = "CDVM_WORKER_ID"
WORKER_UID_ENV = "CDVM_WORKER_UID"
_EXIT_REASONS: frozenset[str] = frozenset({"exited", "killed", "memory", "cpu", "timeout", "pids"})


# ---- the attach stream (sans-I/O) -----------------------------------------------------------


class AttachDemux:
    """Splits ``v4.channel.k8s.io`` messages: stdout into channel frames, stderr into a bounded
    tail (never logged), the error channel into a status object."""

    def __init__(self, *, max_frame: int) -> None:
        self._frames = FrameDecoder(max_frame=max_frame)
        self._stderr = bytearray()
        self.status: dict[str, Any] | None = None

    def feed(self, message: bytes) -> list[dict[str, Any]]:
        """Frames completed by one websocket message (in order)."""
        if not message:
            return []
        channel, data = message[0], message[1:]
        if channel == STDOUT_CHANNEL:
            return self._frames.feed(data)
        if channel == STDERR_CHANNEL:
            self._stderr += data
            del self._stderr[:-STDERR_TAIL_BYTES]
        elif channel == ERROR_CHANNEL:
            try:
                status = json.loads(data.decode("utf-8")) if data else None
            except (UnicodeDecodeError, ValueError):
                status = {"status": "Failure", "message": "unreadable error-channel message"}
            if isinstance(status, dict):
                self.status = status
        elif channel not in (STDIN_CHANNEL, RESIZE_CHANNEL):
            raise ChannelError(f"attach stream message on unknown channel {channel}")
        return []

    @property
    def stderr_tail(self) -> bytes:
        return bytes(self._stderr)

    def close(self) -> None:
        """End of stream; a partly received frame is a :class:`ChannelError`."""
        self._frames.close()


def stdin_messages(data: bytes, *, chunk: int = STDIN_CHUNK) -> list[bytes]:
    """``data`` as stdin-channel websocket messages of at most ``chunk`` payload bytes each."""
    return [bytes([STDIN_CHANNEL]) + data[i:i + chunk] for i in range(0, len(data), chunk)]


# ---- talking to the cluster ------------------------------------------------------------------


def load_settings(path: str | Path | None = None) -> CocoSettings:
    """The ``[coco]`` table of ``path``, ``$CDVM_COCO_CONFIG`` or ``<config dir>/coco.toml``.

    A worker running as a pod learns its own name and uid from ``$CDVM_WORKER_ID`` and
    ``$CDVM_WORKER_UID`` (the downward API, deploy/worker.yaml): its job pods are then
    labelled with it, owned by it, and reaped by any replica once it is gone.
    """
    where = Path(path or os.environ.get(CONFIG_ENV) or config_dir() / "coco.toml")
    try:
        document = tomllib.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise CocoConfigError(f"cannot read the coco backend config {where}: {error}") from None
    table = document.get("coco", {})
    if not isinstance(table, dict):
        raise CocoConfigError(f"{where}: [coco] must be a table")
    table = dict(table)
    if os.environ.get(WORKER_ID_ENV):
        table.setdefault("worker_id", os.environ[WORKER_ID_ENV])
    if os.environ.get(WORKER_UID_ENV):
        table.setdefault("worker_uid", os.environ[WORKER_UID_ENV])
        table.setdefault("worker_kind", "pod")
    return CocoSettings.from_mapping(table, source=f"{where} [coco]")


def _kubernetes() -> Any:
    try:
        import kubernetes_asyncio
    except ImportError:
        raise SandboxStartError("the coco backend needs the Kubernetes client: pip install 'cdvm[coco]'") from None
    return kubernetes_asyncio


@dataclass
class KubeClients:
    """An API client (JSON over HTTP) and a websocket client (attach) sharing one configuration."""

    api: Any
    ws: Any
    core: Any
    coordination: Any

    async def close(self) -> None:
        await self.api.close()
        await self.ws.close()


async def connect(settings: CocoSettings) -> KubeClients:
    """Clients for the cluster: in-cluster service account when running in a pod and no
    kubeconfig is set, else the kubeconfig (``settings.kubeconfig`` or ``$KUBECONFIG``)."""
    k8s = _kubernetes()
    from kubernetes_asyncio.stream import WsApiClient

    configuration = k8s.client.Configuration()
    try:
        if settings.kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s.config.load_incluster_config(client_configuration=configuration)
        else:
            await k8s.config.load_kube_config(config_file=settings.kubeconfig, context=settings.context,
                                              client_configuration=configuration, persist_config=False)
    except (k8s.config.ConfigException, OSError) as error:
        raise SandboxStartError(f"no usable Kubernetes credentials: {error}") from None
    api = k8s.client.ApiClient(configuration)
    ws = WsApiClient(configuration)
    return KubeClients(api=api, ws=ws, core=k8s.client.CoreV1Api(api),
                       coordination=k8s.client.CoordinationV1Api(api))


def api_error_text(error: BaseException) -> str:
    """A short account of a failed API call (status, reason and the Status object's message)."""
    status = getattr(error, "status", None)
    if status is None:
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    message = ""
    body = getattr(error, "body", None)
    if body:
        with contextlib.suppress(ValueError, TypeError, UnicodeDecodeError):
            message = str(json.loads(body).get("message") or "")
    return f"HTTP {status} {getattr(error, 'reason', '') or ''}{': ' + message if message else ''}".strip()


def api_status(error: BaseException) -> int | None:
    """The HTTP status of a failed API call, ``None`` for a transport error."""
    status = getattr(error, "status", None)
    return status if isinstance(status, int) else None


async def delete_pod(clients: KubeClients, namespace: str, name: str, timeout: float) -> bool:
    """Delete a pod now (grace period 0); False when it was already gone."""
    try:
        await clients.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0,
                                                 propagation_policy="Background", _request_timeout=timeout)
    except Exception as error:  # noqa: BLE001 - ApiException or a transport error, told apart by status
        if api_status(error) == 404:
            return False
        raise SandboxError(f"could not delete the job pod {name}: {api_error_text(error)}") from None
    return True


async def read_pod(clients: KubeClients, namespace: str, name: str, timeout: float) -> dict[str, Any] | None:
    """The pod as a JSON dict, ``None`` when it does not exist."""
    try:
        pod = await clients.core.read_namespaced_pod(name, namespace, _request_timeout=timeout)
    except Exception as error:  # noqa: BLE001
        if api_status(error) == 404:
            return None
        raise SandboxError(f"could not read the job pod {name}: {api_error_text(error)}") from None
    return clients.api.sanitize_for_serialization(pod)


# ---- one sandbox -----------------------------------------------------------------------------


def _exit_reason(state: PodState) -> ExitReason:
    return state.reason if state.reason in _EXIT_REASONS else "killed"  # type: ignore[return-value]


class CocoSandbox(Sandbox):
    """A started job pod with its attach stream; built by :meth:`CocoBackend.start`."""

    def __init__(self, backend: CocoBackend, spec: SandboxSpec, label: str, name: str, ws: Any) -> None:
        self.label = label
        self.pod = name
        self._backend = backend
        self._spec = spec
        self._ws = ws
        self._demux = AttachDemux(max_frame=spec.max_frame)
        self._frames: asyncio.Queue[dict[str, Any] | ChannelError | None] = asyncio.Queue(FRAME_QUEUE)
        self._reader = asyncio.create_task(self._read())
        self._forced: ExitReason | None = None
        self._exit: SandboxExit | None = None
        self._detail = ""
        self._destroyed = False
        self._lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None
        self.reset_deadline()

    def __repr__(self) -> str:
        return f"CocoSandbox(label={self.label!r}, pod={self.pod!r})"

    async def _read(self) -> None:
        import aiohttp

        end: ChannelError | None = None
        try:
            async for message in self._ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    data = message.data
                elif message.type == aiohttp.WSMsgType.TEXT:
                    data = message.data.encode("utf-8")
                else:
                    break
                for frame in self._demux.feed(data):
                    await self._frames.put(frame)
            self._demux.close()
        except ChannelError as error:
            end = error
        except (aiohttp.ClientError, OSError) as error:
            log.info("sandbox %s: attach stream broke: %s", self.label, error)
        finally:
            await self._frames.put(end)

    def reset_deadline(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = asyncio.create_task(self._expire(self._spec.wall_timeout_s))

    async def _expire(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if not self._reader.done():
            self._forced = self._forced or "timeout"
            with contextlib.suppress(SandboxError):
                await self._backend.delete(self.pod)
            await self._ws.close()

    def _exited_error(self, ended: SandboxExit) -> SandboxExited:
        detail = f": {self._detail}" if self._detail else ""
        message = f"sandbox {self.label} (pod {self.pod}) ended: {ended.reason} (exit status {ended.returncode}){detail}"
        if ended.reason in LIMIT_REASONS:
            return SandboxLimitExceeded(message, limit=ended.reason, returncode=ended.returncode)
        return SandboxExited(message, reason=ended.reason, returncode=ended.returncode)

    async def send(self, obj: dict[str, Any]) -> None:
        if self._destroyed:
            raise SandboxError(f"sandbox {self.label} was destroyed")
        frame = encode_frame(obj, max_frame=self._spec.max_frame)
        if self._ws.closed or self._reader.done():
            raise self._exited_error(await self.wait())
        async with self._send_lock:
            try:
                for message in stdin_messages(frame):
                    await self._ws.send_bytes(message)
            except (ConnectionError, RuntimeError, OSError):
                raise self._exited_error(await self.wait()) from None

    async def recv(self) -> dict[str, Any]:
        if self._destroyed:
            raise SandboxError(f"sandbox {self.label} was destroyed")
        item = await self._frames.get()
        if isinstance(item, dict):
            return item
        self._frames.put_nowait(item)
        if isinstance(item, ChannelError):
            raise item
        raise self._exited_error(await self.wait())

    async def wait(self) -> SandboxExit:
        if self._exit is None:
            await asyncio.shield(self._reader)
            returncode, reason = None, self._forced
            if reason is None:
                state = await self._final_state()
                returncode, reason, self._detail = state.returncode, _exit_reason(state), state.message
                if state.reason not in _EXIT_REASONS:
                    self._detail = f"{state.reason}: {state.message}".rstrip(": ")
            if self._exit is None:
                self._exit = SandboxExit(returncode=returncode, reason=reason, stderr_tail=self._demux.stderr_tail)
                log.info("sandbox %s (pod %s) ended: %s (exit status %s)", self.label, self.pod, reason, returncode)
        return self._exit

    async def _final_state(self) -> PodState:
        """The pod's status once its runner ended; the kubelet reports it a moment after the stream closes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EXIT_STATUS_WAIT_S
        state = PodState("pending")
        while True:
            try:
                pod = await self._backend.read(self.pod)
            except SandboxError as error:
                return PodState("ended", "killed", str(error))
            if pod is None:
                return PodState("ended", "deleted", "the pod was deleted")
            state = pod_state(pod)
            if state.stage == "ended" or loop.time() > deadline:
                return state if state.stage == "ended" else PodState("ended", "killed", "the attach stream closed")
            await asyncio.sleep(0.2)

    async def destroy(self) -> SandboxExit:
        async with self._lock:
            if not self._destroyed:
                if not self._reader.done():
                    self._forced = self._forced or "killed"
                try:
                    await self._backend.delete(self.pod)
                except SandboxError as error:
                    log.warning("sandbox %s: %s (the worker's next start reaps it)", self.label, error)
                await self._ws.close()
                ended = await self.wait()
                if self._watchdog is not None:
                    self._watchdog.cancel()
                self._destroyed = True
                log.debug("sandbox %s destroyed (pod %s deleted)", self.label, self.pod)
                return ended
        return await self.wait()


class CocoBackend(SandboxBackend):
    """Starts each sandbox as a Confidential Containers pod (see the module docstring)."""

    name = "coco"

    def __init__(self, settings: CocoSettings | None = None, *, config: str | Path | None = None) -> None:
        self.settings = settings or load_settings(config)
        self._clients: KubeClients | None = None
        self._connecting = asyncio.Lock()
        log.info("sandbox isolation: Confidential Containers pods (runtime class %s, image %s, namespace %s)",
                 self.settings.runtime_class, self.settings.image, self.settings.namespace)

    async def clients(self) -> KubeClients:
        async with self._connecting:
            if self._clients is None:
                self._clients = await connect(self.settings)
        return self._clients

    async def close(self) -> None:
        """Close the HTTP sessions to the API server."""
        if self._clients is not None:
            await self._clients.close()
            self._clients = None

    async def job_claims(self, holder: str | None = None) -> JobClaims:
        """Exactly-once job claims (:mod:`jobs.coco_lease`) in this backend's namespace."""
        from jobs.coco_lease import JobClaims

        return JobClaims(await self.clients(), self.settings.namespace, holder or self.settings.worker_id,
                         timeout=self.settings.api_timeout_s)

    async def delete(self, name: str) -> bool:
        return await delete_pod(await self.clients(), self.settings.namespace, name, self.settings.api_timeout_s)

    async def read(self, name: str) -> dict[str, Any] | None:
        return await read_pod(await self.clients(), self.settings.namespace, name, self.settings.api_timeout_s)

    async def start(self, spec: SandboxSpec, job_label: str) -> CocoSandbox:
        label = check_label(job_label)
        pod = job_pod(spec, self.settings, label)
        clients = await self.clients()
        namespace, timeout = self.settings.namespace, self.settings.api_timeout_s
        try:
            created = await clients.core.create_namespaced_pod(namespace, pod.manifest, _request_timeout=timeout)
        except Exception as error:  # noqa: BLE001
            if api_status(error) == 409:
                raise SandboxStartError(f"sandbox label {label} was already used (pod {pod.name} exists); "
                                        "every job needs a fresh sandbox") from None
            raise SandboxStartError(f"could not create the job pod {pod.name}: {api_error_text(error)}") from None
        log.info("sandbox %s: pod %s created (%s, initdata %s %s)", label, pod.name, self.settings.runtime_class,
                 self.settings.initdata_algorithm, pod.initdata_digest.hex())
        try:
            await self._wait_running(clients, pod.name, clients.api.sanitize_for_serialization(created))
            ws = await self._attach(clients, pod.name)
        except BaseException:
            with contextlib.suppress(SandboxError):
                await self.delete(pod.name)
            raise
        return CocoSandbox(self, spec, label, pod.name, ws)

    async def _wait_running(self, clients: KubeClients, name: str, pod: dict[str, Any]) -> None:
        """Watch the pod until its runner runs; raise :class:`SandboxStartError` when it cannot."""
        from kubernetes_asyncio import watch

        namespace = self.settings.namespace
        state = pod_state(pod)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.start_timeout_s
        try:
            async with asyncio.timeout(self.settings.start_timeout_s):
                while True:
                    if state.stage == "running":
                        return
                    if state.stage == "ended":
                        raise SandboxStartError(f"the job pod {name} did not start: {state.reason}: {state.message}".rstrip(": "))
                    version = (pod.get("metadata") or {}).get("resourceVersion")
                    remaining = max(1, int(deadline - loop.time()))
                    stream = watch.Watch().stream(
                        clients.core.list_namespaced_pod, namespace, field_selector=f"metadata.name={name}",
                        resource_version=version, timeout_seconds=min(remaining, 300),
                    )
                    try:
                        async with stream:
                            async for event in stream:
                                pod = event["raw_object"]
                                state = pod_state(pod, deleted=event["type"] == "DELETED")
                                if state.stage != "pending":
                                    break
                    except Exception as error:  # noqa: BLE001 - 410 Gone: the version was compacted; read afresh
                        if api_status(error) != 410:
                            raise
                    if state.stage == "pending":
                        fresh = await read_pod(clients, namespace, name, self.settings.api_timeout_s)
                        if fresh is None:
                            raise SandboxStartError(f"the job pod {name} was deleted while starting")
                        pod, state = fresh, pod_state(fresh)
        except TimeoutError:
            why = f" (last state: {state.reason}: {state.message})".replace(": )", ")") if state.reason else ""
            raise SandboxStartError(f"the job pod {name} did not start within {self.settings.start_timeout_s:.0f} s{why}") from None
        except SandboxError:
            raise
        except Exception as error:  # noqa: BLE001 - ApiException or transport errors from the watch
            raise SandboxStartError(f"watching the job pod {name} failed: {api_error_text(error)}") from None

    async def _attach(self, clients: KubeClients, name: str) -> Any:
        """Open the attach websocket and release the container's start gate."""
        from kubernetes_asyncio.client import CoreV1Api

        try:
            connecting = await CoreV1Api(clients.ws).connect_get_namespaced_pod_attach(
                name, self.settings.namespace, container=CONTAINER_NAME, stdin=True, stdout=True, stderr=True,
                tty=False, _preload_content=False)
            async with asyncio.timeout(self.settings.api_timeout_s):
                ws = await connecting
                await ws.send_bytes(bytes([STDIN_CHANNEL]) + START_BYTE)
        except Exception as error:  # noqa: BLE001
            raise SandboxStartError(f"could not attach to the job pod {name}: {api_error_text(error)}") from None
        return ws

    async def reap_orphans(self) -> int:
        clients = await self.clients()
        namespace, timeout = self.settings.namespace, self.settings.api_timeout_s
        try:
            pods = await clients.core.list_namespaced_pod(namespace, label_selector=JOB_SELECTOR, _request_timeout=timeout)
        except Exception as error:  # noqa: BLE001
            raise SandboxError(f"could not list job pods in namespace {namespace}: {api_error_text(error)}") from None
        live_workers: dict[str, bool] = {}
        reaped = 0
        for item in pods.items:
            labels = item.metadata.labels or {}
            owner, kind = labels.get(LABEL_WORKER), labels.get(LABEL_WORKER_KIND)
            if owner != self.settings.worker_id:
                if kind != "pod" or not owner:
                    continue
                if owner not in live_workers:
                    live_workers[owner] = await read_pod(clients, namespace, owner, timeout) is not None
                if live_workers[owner]:
                    continue
            if await delete_pod(clients, namespace, item.metadata.name, timeout):
                reaped += 1
                log.info("reaped job pod %s (worker %s)", item.metadata.name, owner)
        return reaped
