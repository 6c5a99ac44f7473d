"""A fake Kubernetes API server on loopback (aiohttp) for the ``coco`` backend's tests.

It serves the real client's HTTP calls — pod create/read/list/watch/delete, the pod
``attach`` websocket (``v4.channel.k8s.io``), Lease create/read/replace/list/delete — with
responses built from ``tests/recorded/k8s`` (constructed from the API reference; see its
README), and enforces what the real server enforces for these tests: strict schema
validation of every body against the client's generated models (unknown fields, wrong
types and missing required fields are ``422``), ``409 AlreadyExists`` on a taken name,
``409 Conflict`` on a stale ``resourceVersion``, ``410 Expired`` for a compacted watch
version. A tiny "kubelet" runs a pod's container command as a local process (the test's
Python stands in for the image's) and applies scripted status steps.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import itertools
import json
import os
import re
import signal
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiohttp import WSMsgType, web
from kubernetes_asyncio import client as k8s_client

RECORDED = Path(__file__).parent / "recorded" / "k8s"
REPO = Path(__file__).resolve().parents[1]
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")


class SchemaError(Exception):
    """A body does not fit the Kubernetes OpenAPI models shipped with the client."""


def recorded(name: str) -> dict[str, Any]:
    return json.loads((RECORDED / f"{name}.json").read_text())


def _inner(type_name: str) -> tuple[str, str] | None:
    if type_name.startswith("list[") and type_name.endswith("]"):
        return "list", type_name[5:-1]
    if type_name.startswith("dict(") and type_name.endswith(")"):
        return "dict", type_name[5:-1].split(", ", 1)[1]
    return None


def check_schema(value: Any, type_name: str, path: str = "$") -> None:
    """Strictly check ``value`` (JSON) against the client's model ``type_name`` (e.g. ``V1Pod``)."""
    nested = _inner(type_name)
    if nested is not None:
        kind, inner = nested
        if kind == "list":
            if not isinstance(value, list):
                raise SchemaError(f"{path}: expected a list, got {type(value).__name__}")
            for index, item in enumerate(value):
                check_schema(item, inner, f"{path}[{index}]")
        else:
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise SchemaError(f"{path}: expected an object with string keys")
            for key, item in value.items():
                check_schema(item, inner, f"{path}.{key}")
        return
    if type_name == "str":
        if not isinstance(value, str):
            raise SchemaError(f"{path}: expected a string, got {type(value).__name__}")
    elif type_name == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(f"{path}: expected an integer, got {value!r}")
    elif type_name == "bool":
        if not isinstance(value, bool):
            raise SchemaError(f"{path}: expected a boolean, got {value!r}")
    elif type_name == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SchemaError(f"{path}: expected a number, got {value!r}")
    elif type_name in ("datetime", "date"):
        if not isinstance(value, str):
            raise SchemaError(f"{path}: expected an RFC 3339 time string")
        datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    elif type_name == "object":
        return
    else:
        model = getattr(k8s_client.models, type_name, None)
        if model is None:
            raise SchemaError(f"{path}: unknown model {type_name}")
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected a {type_name} object, got {type(value).__name__}")
        by_json = {json_key: attr for attr, json_key in model.attribute_map.items()}
        for key, item in value.items():
            if key not in by_json:
                raise SchemaError(f"{path}: unknown field {key!r} in {type_name}")
            if item is not None:
                check_schema(item, model.openapi_types[by_json[key]], f"{path}.{key}")
    if type_name == "V1ResourceRequirements":
        for section in ("limits", "requests"):
            for key, quantity in (value.get(section) or {}).items():
                if not _QUANTITY.fullmatch(quantity):
                    raise SchemaError(f"{path}.{section}.{key}: {quantity!r} is not a quantity")
    if type_name == "V1EmptyDirVolumeSource" and value.get("sizeLimit") and not _QUANTITY.fullmatch(value["sizeLimit"]):
        raise SchemaError(f"{path}.sizeLimit: not a quantity")


def validate(obj: dict[str, Any], type_name: str) -> Any:
    """:func:`check_schema`, then deserialize into the typed model (required fields enforced)."""
    check_schema(obj, type_name)
    api = object.__new__(k8s_client.ApiClient)  # deserialization needs only the configuration, not a session
    api.configuration = k8s_client.Configuration()
    try:
        return api.deserialize(SimpleNamespace(data=json.dumps(obj)), type_name)
    except ValueError as error:
        raise SchemaError(f"{type_name}: {error}") from None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    return web.json_response(body, status=code)


def _selected(obj: dict[str, Any], label_selector: str | None, field_selector: str | None) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, (label_selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    for term in filter(None, (field_selector or "").split(",")):
        key, _, value = term.partition("=")
        if key == "metadata.name" and obj["metadata"]["name"] != value:
            return False
    return True


class FakeKube:
    """The fake API server; ``scenarios`` (FIFO) script the next pods' lives, default ``["creating", "run"]``.

    Steps: a recorded ``pod-status-<name>`` file name applies that status; ``run`` starts the
    container process and applies ``running``; ``sleep:<s>`` pauses; ``oomkilled`` kills the
    process and applies the OOM status; ``vanish`` deletes the pod (node lifecycle
    controller); ``hang`` stops the script (the pod stays as it is).
    """

    def __init__(self, workdir: Path, *, extra_pythonpath: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.extra_pythonpath = extra_pythonpath
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.leases: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.scenarios: list[list[str]] = []
        self.compacted = 0
        self.requests: list[tuple[str, str]] = []
        self.failures: dict[tuple[str, str], int] = {}
        self._versions = itertools.count(100)
        self._changed = asyncio.Condition()
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._sockets: dict[str, list[web.WebSocketResponse]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ---- server ------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(middlewares=[self._log])
        core, coord = "/api/v1/namespaces/{ns}", "/apis/coordination.k8s.io/v1/namespaces/{ns}"
        app.router.add_post(f"{core}/pods", self.create_pod)
        app.router.add_get(f"{core}/pods", self.list_pods)
        app.router.add_get(f"{core}/pods/{{name}}", self.read_pod)
        app.router.add_delete(f"{core}/pods/{{name}}", self.delete_pod)
        app.router.add_get(f"{core}/pods/{{name}}/attach", self.attach)
        app.router.add_post(f"{coord}/leases", self.create_lease)
        app.router.add_get(f"{coord}/leases", self.list_leases)
        app.router.add_get(f"{coord}/leases/{{name}}", self.read_lease)
        app.router.add_put(f"{coord}/leases/{{name}}", self.replace_lease)
        app.router.add_delete(f"{coord}/leases/{{name}}", self.delete_lease)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for proc in self._procs.values():
            await proc.wait()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "worker", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "worker", "namespace": "cdvm"}}],
        }))
        return path

    @web.middleware
    async def _log(self, request: web.Request, handler: Any) -> web.StreamResponse:
        key = (request.method, request.path)
        self.requests.append(key)
        if request.headers.get("Authorization") != "Bearer fake-token":
            return _status(401, "Unauthorized", "Unauthorized")
        for (method, prefix), code in list(self.failures.items()):
            if request.method == method and request.path.startswith(prefix):
                body = recorded({403: "status-403-forbidden", 422: "status-422-invalid"}[code])["object"]
                return web.json_response(body, status=code)
        return await handler(request)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _emit(self, kind: str, obj: dict[str, Any], event: str) -> None:
        version = next(self._versions)
        obj["metadata"]["resourceVersion"] = str(version)
        async with self._changed:
            self.events.append((version, event, copy.deepcopy({"kind": kind, **obj})))
            self._changed.notify_all()

    # ---- pods --------------------------------------------------------------------------

    async def create_pod(self, request: web.Request) -> web.Response:
        namespace = request.match_info["ns"]
        body = await request.json()
        try:
            validate(body, "V1Pod")
        except SchemaError as error:
            return _status(422, "Invalid", str(error))
        name = body["metadata"]["name"]
        if (namespace, name) in self.pods:
            return web.json_response(recorded("status-409-already-exists")["object"], status=409)
        body["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now(), namespace=namespace)
        body["status"] = {"phase": "Pending", "qosClass": "Guaranteed"}
        self.pods[(namespace, name)] = body
        await self._emit("Pod", body, "ADDED")
        steps = self.scenarios.pop(0) if self.scenarios else ["creating", "run"]
        self._spawn(self._lifecycle(namespace, name, steps))
        return web.json_response(body, status=201)

    async def _apply(self, namespace: str, name: str, step: str) -> None:
        pod = self.pods.get((namespace, name))
        if pod is None:
            return
        snapshot = recorded(f"pod-status-{step}")
        pod["status"] = snapshot["status"]
        pod["metadata"].update(snapshot.get("metadata", {}))
        await self._emit("Pod", pod, "MODIFIED")

    async def _lifecycle(self, namespace: str, name: str, steps: list[str]) -> None:
        for step in steps:
            if step == "hang":
                return
            if step.startswith("sleep:"):
                await asyncio.sleep(float(step[6:]))
            elif step == "run":
                await self._run(namespace, name)
            elif step == "vanish":
                await self._remove_pod(namespace, name)
            elif step == "oomkilled":
                proc = self._procs.get(name)
                if proc is not None and proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                await self._apply(namespace, name, "oomkilled")
            else:
                await self._apply(namespace, name, step)

    async def _run(self, namespace: str, name: str) -> None:
        pod = self.pods[(namespace, name)]
        container = pod["spec"]["containers"][0]
        env = {item["name"]: item["value"] for item in container.get("env", [])}
        env["PYTHONPATH"] = os.pathsep.join((str(REPO), *self.extra_pythonpath))
        env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
        tmp = self.workdir / name
        tmp.mkdir(parents=True, exist_ok=True)
        env.update({k: str(tmp / Path(v).name) for k, v in env.items() if k.startswith("CDVM_") and k.endswith("_DIR")})
        proc = await asyncio.create_subprocess_exec(
            *container["command"], stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp, start_new_session=True)
        self._procs[name] = proc
        await self._apply(namespace, name, "running")
        self._spawn(self._pump(name, proc.stdout, 1))
        self._spawn(self._pump(name, proc.stderr, 2))
        self._spawn(self._reap(namespace, name, proc))

    async def _pump(self, name: str, stream: asyncio.StreamReader | None, channel: int) -> None:
        assert stream is not None
        while chunk := await stream.read(4096):
            for ws in list(self._sockets.get(name, [])):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_bytes(bytes([channel]) + chunk)

    async def _reap(self, namespace: str, name: str, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        await asyncio.sleep(0.05)
        for ws in self._sockets.pop(name, []):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_bytes(bytes([3]) + json.dumps({"metadata": {}, "status": "Success"}).encode())
            await ws.close()
        pod = self.pods.get((namespace, name))
        if pod is None or pod["status"].get("phase") in ("Failed", "Succeeded"):
            return
        await self._apply(namespace, name, "completed" if code == 0 else "error-exit")
        if code:
            terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
            terminated["exitCode"] = code if code > 0 else 128 - code
            await self._emit("Pod", pod, "MODIFIED")

    async def read_pod(self, request: web.Request) -> web.Response:
        pod = self.pods.get((request.match_info["ns"], request.match_info["name"]))
        if pod is None:
            return web.json_response(recorded("status-404-not-found")["object"], status=404)
        return web.json_response(pod)

    async def list_pods(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        labels, fields = query.get("labelSelector"), query.get("fieldSelector")
        if query.get("watch") not in ("true", "True", "1"):
            items = [p for (ns, _), p in self.pods.items() if ns == request.match_info["ns"] and _selected(p, labels, fields)]
            return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": str(next(self._versions))}, "items": items})
        return await self._watch(request, "Pod", labels, fields)

    async def _watch(self, request: web.Request, kind: str, labels: str | None, fields: str | None) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or 0)
        timeout = float(request.query.get("timeoutSeconds") or 300)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        if since and since < self.compacted:
            error = recorded("status-410-expired")["object"]
            await response.write(json.dumps({"type": "ERROR", "object": error}).encode() + b"\n")
            return response
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sent = since
        while loop.time() < deadline:
            for version, event, obj in [e for e in self.events if e[0] > sent]:
                sent = version
                if obj["kind"] == kind and obj["metadata"].get("namespace") == request.match_info["ns"] \
                        and _selected(obj, labels, fields):
                    try:
                        await response.write(json.dumps({"type": event, "object": obj}).encode() + b"\n")
                    except ConnectionError:
                        return response
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - loop.time()))
        return response

    async def delete_pod(self, request: web.Request) -> web.Response:
        pod = await self._remove_pod(request.match_info["ns"], request.match_info["name"])
        if pod is None:
            return web.json_response(recorded("status-404-not-found")["object"], status=404)
        return web.json_response(pod)

    async def _remove_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """Delete a pod: kill its process, close its attach streams, emit DELETED."""
        pod = self.pods.pop((namespace, name), None)
        if pod is None:
            return None
        proc = self._procs.get(name)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for ws in self._sockets.pop(name, []):
            await ws.close()
        pod["metadata"]["deletionTimestamp"] = _now()
        await self._emit("Pod", pod, "DELETED")
        return pod

    async def attach(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        pod = self.pods.get((request.match_info["ns"], name))
        query = request.query
        if pod is None:
            return web.json_response(recorded("status-404-not-found")["object"], status=404)
        if query.get("container") != "runner" or query.get("stdin") not in ("True", "true", "1") or query.get("tty") in ("True", "true", "1"):
            return _status(400, "BadRequest", "attach needs container=runner, stdin and no tty")
        proc = self._procs.get(name)
        if proc is None or proc.returncode is not None:
            return _status(400, "BadRequest", f"container runner in pod {name} is not running")
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",), max_msg_size=0)
        await ws.prepare(request)
        self._sockets.setdefault(name, []).append(ws)
        async for message in ws:
            if message.type == WSMsgType.BINARY and message.data[:1] == b"\x00" and proc.stdin is not None:
                proc.stdin.write(message.data[1:])
                with contextlib.suppress(ConnectionError):
                    await proc.stdin.drain()
        if proc.stdin is not None:
            proc.stdin.close()
        return ws

    # ---- leases ------------------------------------------------------------------------

    async def create_lease(self, request: web.Request) -> web.Response:
        namespace = request.match_info["ns"]
        body = await request.json()
        try:
            validate(body, "V1Lease")
        except SchemaError as error:
            return _status(422, "Invalid", str(error))
        name = body["metadata"]["name"]
        if (namespace, name) in self.leases:
            conflict = recorded("status-409-already-exists")["object"]
            conflict["message"] = f'leases.coordination.k8s.io "{name}" already exists'
            return web.json_response(conflict, status=409)
        body["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now(), namespace=namespace)
        self.leases[(namespace, name)] = body
        await self._emit("Lease", body, "ADDED")
        return web.json_response(body, status=201)

    async def read_lease(self, request: web.Request) -> web.Response:
        lease = self.leases.get((request.match_info["ns"], request.match_info["name"]))
        if lease is None:
            return web.json_response(recorded("status-404-not-found")["object"], status=404)
        return web.json_response(lease)

    async def list_leases(self, request: web.Request) -> web.Response:
        labels = request.query.get("labelSelector")
        items = [lease for (ns, _), lease in self.leases.items() if ns == request.match_info["ns"] and _selected(lease, labels, None)]
        return web.json_response({"kind": "LeaseList", "apiVersion": "coordination.k8s.io/v1",
                                  "metadata": {"resourceVersion": str(next(self._versions))}, "items": items})

    async def replace_lease(self, request: web.Request) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        body = await request.json()
        try:
            validate(body, "V1Lease")
        except SchemaError as error:
            return _status(422, "Invalid", str(error))
        current = self.leases.get(key)
        if current is None:
            return web.json_response(recorded("status-404-not-found")["object"], status=404)
        if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            return web.json_response(recorded("status-409-conflict")["object"], status=409)
        body["metadata"].update(uid=current["metadata"]["uid"], creationTimestamp=current["metadata"]["creationTimestamp"])
        self.leases[key] = body
        await self._emit("Lease", body, "MODIFIED")
        return web.json_response(body)

    async def delete_lease(self, request: web.Request) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        current = self.leases.get(key)
        if current is None:
            return web.json_response(recorded("status-404-not-found")["object"], status=404)
        body = await request.json() if request.can_read_body else {}
        wanted = ((body or {}).get("preconditions") or {}).get("resourceVersion")
        if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
            return web.json_response(recorded("status-409-conflict")["object"], status=409)
        del self.leases[key]
        await self._emit("Lease", current, "DELETED")
        return web.json_response(current)
