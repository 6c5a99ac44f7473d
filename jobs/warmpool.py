"""A pool of pre-started sandboxes, each used for exactly one job.

A sandbox is "warm" once its runner has loaded and hashed the model and sent ``ready``.
:meth:`WarmPool.acquire` hands out a warm sandbox so a job never waits for process start or
model load, and :meth:`WarmPool.replenish` (called when that job is over) starts its
replacement; with ``size=0`` every
job starts its sandbox cold. Nothing is ever returned to the pool: a sandbox that served a
job is destroyed by its user. A warm sandbox that ends while it waits (a limit, its wall
timeout) is dropped and replaced, never handed out; a sandbox whose start is interrupted
(the job cancelled, the worker shutting down) is destroyed as soon as it is up, never leaked.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

from jobs.sandbox import Sandbox, SandboxBackend, SandboxSpec
from jobs.sandbox_errors import SandboxError, SandboxStartError

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0
"""How long :meth:`WarmPool.close` waits for interrupted starts to come up and be destroyed."""


@dataclass(frozen=True)
class ReadyInfo:
    """What the runner reported when it became ready, and how long that took."""

    model_name: str
    model_sha256: str
    start_ms: float


class _Warm:
    """One ready sandbox waiting for its job, watched so that its end is noticed."""

    def __init__(self, sandbox: Sandbox, info: ReadyInfo) -> None:
        self.sandbox = sandbox
        self.info = info
        self.ended = asyncio.create_task(sandbox.wait())


class WarmPool:
    """Keeps ``size`` sandboxes started and ready; see the module docstring."""

    def __init__(self, backend: SandboxBackend, spec: SandboxSpec, size: int, ready_timeout: float = 180.0) -> None:
        self.backend = backend
        self.spec = spec
        self.size = max(0, size)
        self.ready_timeout = ready_timeout
        self._ready: asyncio.Queue[_Warm | SandboxError] = asyncio.Queue()
        self._filling: set[asyncio.Task[None]] = set()
        self._abandoned: set[asyncio.Future[None]] = set()
        self._closed = False
        self.last_ready: ReadyInfo | None = None

    async def start(self) -> None:
        """Reap sandboxes a crashed worker left behind, then begin filling the pool."""
        reaped = await self.backend.reap_orphans()
        if reaped:
            log.warning("removed %d sandbox(es) left by an earlier worker", reaped)
        for _ in range(self.size):
            self._refill()

    def _refill(self) -> None:
        if self._closed:
            return
        task = asyncio.create_task(self._fill_one())
        self._filling.add(task)
        task.add_done_callback(self._filling.discard)

    async def _fill_one(self) -> None:
        try:
            sandbox, info = await self._start_ready()
        except SandboxError as error:
            log.error("could not pre-start a sandbox: %s", error)
            self._ready.put_nowait(error)
            return
        if self._closed:
            await sandbox.destroy()
            return
        self._ready.put_nowait(_Warm(sandbox, info))

    async def _start_ready(self) -> tuple[Sandbox, ReadyInfo]:
        started = time.perf_counter()
        starting = asyncio.ensure_future(self.backend.start(self.spec, f"sb-{secrets.token_hex(8)}"))
        try:
            sandbox = await asyncio.shield(starting)
        except asyncio.CancelledError:
            self._abandon(starting)
            raise
        try:
            async with asyncio.timeout(self.ready_timeout):
                message = await sandbox.recv()
        except (TimeoutError, SandboxError) as error:
            await sandbox.destroy()
            raise SandboxStartError(f"the sandbox runner did not become ready: {error or 'timed out'}") from None
        except BaseException:
            await asyncio.shield(sandbox.destroy())
            raise
        model = message.get("model") if message.get("op") == "ready" else None
        if not isinstance(model, dict):
            await sandbox.destroy()
            raise SandboxStartError(f"the sandbox runner did not start: {message.get('reason') or message.get('op')}")
        info = ReadyInfo(str(model.get("name")), str(model.get("sha256")), (time.perf_counter() - started) * 1000)
        self.last_ready = info
        return sandbox, info

    def _abandon(self, starting: asyncio.Future[Sandbox]) -> None:
        """Destroy a sandbox whose start was interrupted, once it is up: a spawn is never cancelled
        half-way (asyncio would then wait for a process that bubblewrap holds back)."""
        async def destroy_when_started() -> None:
            try:
                sandbox = await starting
            except Exception:  # the start failed and the backend removed what it had made
                return
            await sandbox.destroy()

        task = asyncio.ensure_future(destroy_when_started())
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)

    async def acquire(self) -> Sandbox:
        """A ready sandbox that has never served a job."""
        if not self.size:
            sandbox, _ = await self._start_ready()
            return sandbox
        while True:
            if self._ready.empty() and not self._filling:
                self._refill()
            item = await self._ready.get()
            if isinstance(item, SandboxError):
                raise item
            if not item.ended.done():
                item.ended.cancel()
                item.sandbox.reset_deadline()
                return item.sandbox
            ended = await item.sandbox.destroy()
            log.warning("a warm sandbox ended while it waited (%s); using the next one", ended.reason)

    def replenish(self) -> None:
        """Start a replacement for a sandbox that was handed out, once its job is over.

        Refilling only then keeps the replacement's start-up (interpreter, model hash and load:
        about a second of CPU) from competing with the running job for the same cores; a job
        that finds the pool empty still gets a sandbox started at once (:meth:`acquire`)."""
        if self._ready.qsize() + len(self._filling) < self.size:
            self._refill()

    async def close(self) -> None:
        """Destroy every idle sandbox and stop refilling."""
        self._closed = True
        for task in list(self._filling):
            task.cancel()
        await asyncio.gather(*self._filling, return_exceptions=True)
        while not self._ready.empty():
            item = self._ready.get_nowait()
            if isinstance(item, _Warm):
                item.ended.cancel()
                await item.sandbox.destroy()
        if self._abandoned:
            await asyncio.wait(self._abandoned, timeout=CLOSE_TIMEOUT_S)
        close_backend = getattr(self.backend, "close", None)
        if close_backend is not None:
            await close_backend()
