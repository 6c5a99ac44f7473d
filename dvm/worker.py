"""The DVM worker: takes NIP-90 job requests and serves each in a fresh, single-use sandbox.

The worker holds the DVM's long-term identity and the relay connections. It never holds a
one-time key and never sees a cdvm job's prompt, documents or answer: the sandbox sends it
signed events to publish (their private parts already encrypted to the customer) and asks
for the events addressed to its one-time key, which the worker forwards unopened.

Admission is exactly-once through the SQLite journal (dvm.journal); concurrency is bounded
(``max_concurrent`` jobs run, ``max_queued`` wait, ``per_customer`` active jobs per key), and
every phase has a timeout. See docs/protocol.md for the messages.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvm import nip04, nip44
from dvm.config import RelaysConfig
from dvm.errors import CdvmError
from dvm.journal import Journal
from dvm.keys import PrivateKey, PublicKey
from dvm.nip01 import Event
from dvm.nip09 import DELETION_KIND, deleted_ids
from dvm.nip17 import DM_RELAYS_KIND, parse_dm_relay_list
from dvm.nip40 import is_expired
from dvm.nip59 import GIFT_WRAP_KIND
from dvm.nip89 import build_announcement
from dvm.nip90 import JobRequest, JobRequestError, build_feedback, parse_job_request
from dvm.nostr_errors import NostrError
from dvm.pool import PoolSubscription, PublishFailed, RelayPool
from dvm.relay import GIFT_WRAP_RESUME_MARGIN, RelayError
from dvm.wire import Filter
from jobs.sandbox import Sandbox
from jobs.sandbox_errors import SandboxError
from jobs.warmpool import WarmPool

log = logging.getLogger(__name__)

MAX_FORWARDED_EVENTS = 50_000
"""Events forwarded to one sandbox at most: a flood to a one-time key cannot grow without bound."""

PHASE_TEXT = {
    "attesting": "producing attestation evidence",
    "waiting_documents": "waiting for the customer's documents",
    "generating": "generating the answer",
}

RESTART_REASON = "the worker restarted while running this job; nothing was kept, please resubmit it"


@dataclass(frozen=True)
class Timeouts:
    """Seconds each phase may take before the job fails with an `error` feedback."""

    sandbox_start: float = 180.0
    attestation: float = 60.0
    documents: float = 120.0
    generation: float = 600.0
    publish: float = 15.0


@dataclass(frozen=True)
class WorkerConfig:
    """What an operator sets (config file and command line)."""

    kinds: tuple[int, ...] = (5050,)
    accept_untargeted: bool = True
    tee: str = "auto"
    max_concurrent: int = 2
    max_queued: int = 16
    per_customer: int = 2
    warm_pool: int = 1
    timeouts: Timeouts = field(default_factory=Timeouts)
    announce: bool = True
    name: str = "cdvm"
    policy_summary: dict[str, Any] = field(default_factory=dict)


class JobFailed(CdvmError):
    """A job failed for a reason the customer can act on (sent as `error` feedback)."""


class Worker:
    """One DVM identity serving job requests from its relays."""

    def __init__(
        self,
        identity: PrivateKey,
        relays: RelaysConfig,
        config: WorkerConfig,
        warm_pool: WarmPool,
        journal_path: Path,
        *,
        model_info: dict[str, str],
        on_ready: Callable[[str], None] | None = None,
    ) -> None:
        self.identity = identity
        self.config = config
        self.relays = relays
        self.pool = RelayPool.from_config(relays, private_key=identity)
        self.warm = warm_pool
        self.journal = Journal(journal_path)
        self.model_info = model_info
        self.on_ready = on_ready
        self._slots = asyncio.Semaphore(config.max_concurrent)
        self._waiting = 0
        self._active_by_customer: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancels: dict[str, asyncio.Event] = {}
        self._dm_relays: dict[str, list[str]] = {}
        self.started_at = int(time.time())

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or forever)."""
        await self.pool.start(wait=10)
        try:
            await self._recover()
            await self.warm.start()
            if self.config.announce:
                await self._announce()
            requests = await self.pool.subscribe([self._request_filter()])
            deletions = await self.pool.subscribe([Filter(kinds=(DELETION_KIND,), since=self.started_at)])
            line = (
                f"worker ready {self.identity.public_key.npub()} kinds={','.join(map(str, self.config.kinds))} "
                f"relays={','.join(self.pool.read_urls)} tee={self.config.tee}"
            )
            log.warning("%s", line)
            if self.on_ready:
                self.on_ready(line)
            readers = [
                asyncio.create_task(self._read(requests, self._on_request)),
                asyncio.create_task(self._read(deletions, self._on_deletion)),
            ]
            if stop is None:
                await asyncio.gather(*readers)
            else:
                await stop.wait()
            for reader in readers:
                reader.cancel()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        for cancel in self._cancels.values():
            cancel.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        await self.warm.close()
        await self.pool.close()
        self.journal.close()

    async def _recover(self) -> None:
        """Tell every customer whose job a previous run of this worker left unfinished."""
        for record in self.journal.recover_interrupted(RESTART_REASON):
            log.warning("job %s was interrupted by a worker restart; customer told to resubmit", record.id)
            await self._feedback(record.id, record.customer, "error", RESTART_REASON)

    async def _announce(self) -> None:
        metadata = {
            "name": self.config.name,
            "about": "Confidential AI jobs: each job runs in a fresh attested sandbox with a one-time key.",
            "cdvm": {
                "version": 1,
                "tee": self.config.tee,
                "confidential": self.config.tee != "sim",
                "encrypted_params": True,
                "policy": self.config.policy_summary,
                "models": [self.model_info],
            },
        }
        event = build_announcement(self.identity, f"cdvm-{self.identity.public_key.hex()[:16]}", self.config.kinds, metadata)
        try:
            await self.pool.publish(event)
        except PublishFailed as error:
            log.warning("handler announcement not published: %s", error)

    def _request_filter(self) -> Filter:
        tags = {} if self.config.accept_untargeted else {"p": [self.identity.public_key.hex()]}
        return Filter(kinds=self.config.kinds, tags=tags, since=self.started_at - 60)

    @staticmethod
    async def _read(subscription: PoolSubscription, handler: Callable[[Event], Awaitable[None]]) -> None:
        async for event in subscription:
            try:
                await handler(event)
            except CdvmError as error:
                log.info("event %s ignored: %s", event.id, error)

    # ---- admission -------------------------------------------------------------------------

    async def _on_request(self, event: Event) -> None:
        if event.kind not in self.config.kinds:
            return
        request = parse_job_request(event)
        me = self.identity.public_key.hex()
        if request.targets and me not in request.targets:
            return
        if not request.targets and not self.config.accept_untargeted:
            return
        if is_expired(event, int(time.time())):
            return
        if not self.journal.admit(request.id, request.customer, request.kind):
            return
        busy = self._admission_refusal(request.customer)
        if busy:
            self.journal.advance(request.id, "rejected", busy)
            await self._feedback(request.id, request.customer, "error", busy)
            return
        try:
            opened = self._open_params(request)
        except (NostrError, JobRequestError) as error:
            reason = f"cannot read the encrypted job params: {error}"
            self.journal.advance(request.id, "rejected", reason)
            await self._feedback(request.id, request.customer, "error", reason)
            return
        self._waiting += 1
        self._active_by_customer[request.customer] = self._active_by_customer.get(request.customer, 0) + 1
        status = "processing"
        info = "queued: waiting for a free sandbox" if self._slots.locked() else "starting a fresh sandbox"
        await self._feedback(request.id, request.customer, status, info)
        task = asyncio.create_task(self._job(request, opened), name=f"job {request.id[:12]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _admission_refusal(self, customer: str) -> str:
        if self._waiting >= self.config.max_concurrent + self.config.max_queued:
            return "busy: too many jobs in the queue, try again in a few minutes"
        if self._active_by_customer.get(customer, 0) >= self.config.per_customer:
            return f"busy: at most {self.config.per_customer} active jobs per customer key"
        return ""

    def _open_params(self, request: JobRequest) -> list[list[str]] | None:
        """Decrypt a plain NIP-90 encrypted request (sealed to this DVM's key, which the operator holds)."""
        if request.encryption is None:
            return None
        customer = PublicKey.from_hex(request.customer)
        if request.encryption == "nip04":
            plaintext = nip04.decrypt(self.identity, customer, request.event.content)
        else:
            plaintext = nip44.decrypt(request.event.content, nip44.conversation_key(self.identity, customer))
        tags = json.loads(plaintext)
        if not isinstance(tags, list) or not all(isinstance(t, list) and all(isinstance(i, str) for i in t) for t in tags):
            raise JobRequestError("encrypted params must be a JSON array of string arrays")
        return tags

    async def _on_deletion(self, event: Event) -> None:
        for job_id in deleted_ids(event):
            record = self.journal.get(job_id)
            if record and record.customer == event.pubkey and job_id in self._cancels:
                self._cancels[job_id].set()

    # ---- one job ---------------------------------------------------------------------------

    async def _job(self, request: JobRequest, opened: list[list[str]] | None) -> None:
        cancel = self._cancels.setdefault(request.id, asyncio.Event())
        try:
            async with self._slots:
                self._waiting -= 1
                self.journal.advance(request.id, "starting")
                try:
                    await self._serve(request, opened, cancel)
                except CdvmError as error:
                    reason = str(error)
                    self.journal.advance(request.id, "failed", reason)
                    await self._feedback(request.id, request.customer, "error", reason)
                else:
                    self.journal.advance(request.id, "done")
                    await self._feedback(request.id, request.customer, "success", "sandbox destroyed")
        finally:
            self._cancels.pop(request.id, None)
            left = self._active_by_customer.get(request.customer, 1) - 1
            if left:
                self._active_by_customer[request.customer] = left
            else:
                self._active_by_customer.pop(request.customer, None)

    async def _serve(self, request: JobRequest, opened: list[list[str]] | None, cancel: asyncio.Event) -> None:
        timeouts = self.config.timeouts
        try:
            sandbox = await asyncio.wait_for(self.warm.acquire(), timeouts.sandbox_start)
        except TimeoutError:
            raise JobFailed(f"no sandbox became ready within {timeouts.sandbox_start:.0f} s; try again later") from None
        forwarders: list[asyncio.Task[None]] = []
        subscriptions: list[PoolSubscription] = []
        try:
            await sandbox.send({"op": "job", "request": request.event.to_dict(), "opened_tags": opened})
            phase, deadline = "attesting", time.monotonic() + timeouts.attestation
            result_published = False
            while True:
                message = await self._next_message(sandbox, cancel, deadline, phase)
                op = message.get("op")
                if op == "phase":
                    phase = str(message.get("phase"))
                    self.journal.advance(request.id, phase if phase in ("attesting", "waiting_documents", "generating") else "generating")
                    limit = {"waiting_documents": timeouts.documents, "generating": timeouts.generation}.get(phase, timeouts.attestation)
                    deadline = time.monotonic() + limit
                elif op == "publish":
                    role = await self._publish_for(sandbox, request, message)
                    result_published = result_published or role == "result"
                elif op == "subscribe":
                    subscription = await self._forward(sandbox, message, forwarders)
                    subscriptions.append(subscription)
                elif op == "done":
                    if not result_published:
                        raise JobFailed("the sandbox finished without publishing a result")
                    return
                elif op == "failed":
                    raise JobFailed(str(message.get("reason") or "the job failed inside the sandbox"))
        finally:
            for task in forwarders:
                task.cancel()
            for subscription in subscriptions:
                await subscription.close()
            await sandbox.destroy()

    async def _next_message(self, sandbox: Sandbox, cancel: asyncio.Event, deadline: float, phase: str) -> dict[str, Any]:
        receive = asyncio.ensure_future(sandbox.recv())
        cancelled = asyncio.ensure_future(cancel.wait())
        done, _ = await asyncio.wait({receive, cancelled}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED)
        cancelled.cancel()
        if receive in done:
            try:
                return receive.result()
            except SandboxError as error:
                raise JobFailed(f"the sandbox stopped: {error}") from None
        receive.cancel()
        reason = "the customer cancelled the job" if cancel.is_set() else f"timed out while {PHASE_TEXT.get(phase, phase)}"
        await self._cancel_sandbox(sandbox, reason)
        raise JobFailed(reason)

    async def _cancel_sandbox(self, sandbox: Sandbox, reason: str) -> None:
        """Ask the runner to stop (it tells the customer what was missing), then give up on it."""
        try:
            await sandbox.send({"op": "cancel", "reason": reason})
            async with asyncio.timeout(5):
                while (await sandbox.recv()).get("op") not in ("failed", "done"):
                    pass
        except (SandboxError, TimeoutError):
            pass

    async def _publish_for(self, sandbox: Sandbox, request: JobRequest, message: dict[str, Any]) -> str:
        event = Event.from_dict(message.get("event"))
        event.verify()
        role = str(message.get("role"))
        urls = list(self.pool.write_urls) + list(request.relays)
        if role == "dm" and isinstance(message.get("recipient"), str):
            urls += await self._dm_relays_of(message["recipient"])
        try:
            await self.pool.publish(event, urls=list(dict.fromkeys(urls)), timeout=self.config.timeouts.publish)
        except (PublishFailed, RelayError) as error:
            if role == "result":
                raise JobFailed(f"the result could not be published: {error}") from None
            log.warning("sandbox event %s not published: %s", event.id, error)
        return role

    async def _dm_relays_of(self, pubkey: str) -> list[str]:
        """The recipient's NIP-17 DM relays (kind 10050), looked up once per worker run."""
        if pubkey not in self._dm_relays:
            try:
                events = await self.pool.query([Filter(kinds=(DM_RELAYS_KIND,), authors=(pubkey,), limit=1)], timeout=3)
            except RelayError:
                events = []
            newest = max(events, key=lambda e: e.created_at, default=None)
            self._dm_relays[pubkey] = parse_dm_relay_list(newest)[:4] if newest else []
        return self._dm_relays[pubkey]

    async def _forward(self, sandbox: Sandbox, message: dict[str, Any], forwarders: list[asyncio.Task[None]]) -> PoolSubscription:
        """Subscribe for the sandbox (only gift wraps to one key are allowed) and forward what arrives."""
        spec = message.get("filter")
        if not isinstance(spec, dict) or set(spec) != {"kinds", "#p"} or spec["kinds"] != [GIFT_WRAP_KIND] or len(spec["#p"]) != 1:
            raise JobFailed("the sandbox asked for a subscription outside the protocol")
        subscription = await self.pool.subscribe(
            [Filter(kinds=(GIFT_WRAP_KIND,), tags={"p": spec["#p"]})], resume_margin=GIFT_WRAP_RESUME_MARGIN
        )

        async def pump() -> None:
            forwarded = 0
            async for event in subscription:
                forwarded += 1
                if forwarded > MAX_FORWARDED_EVENTS:
                    log.warning("sandbox flooded: more than %d events to its key; dropping the rest", MAX_FORWARDED_EVENTS)
                    return
                await sandbox.send({"op": "event", "event": event.to_dict()})

        forwarders.append(asyncio.create_task(pump()))
        return subscription

    async def _feedback(self, request_id: str, customer: str, status: str, info: str) -> None:
        event = build_feedback(self.identity, request_id, customer, status, info)
        try:
            await self.pool.publish(event, timeout=self.config.timeouts.publish)
        except (PublishFailed, RelayError) as error:
            log.warning("feedback %s for job %s not published: %s", status, request_id, error)

