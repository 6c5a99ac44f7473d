"""The DVM worker: takes NIP-90 job requests and serves each in a fresh, single-use sandbox.

The worker holds the DVM's long-term identity and the relay connections. It never holds a
one-time key and never sees a cdvm job's prompt, documents or answer: the sandbox sends it
signed events to publish (their private parts already encrypted to the customer) and asks
for the events addressed to its one-time key, which the worker forwards unopened. Logs hold
event ids, states and error texts — never event content, a key or the runner's stderr.

Behaviour (docs/protocol.md has the messages):

* **Exactly once.** A request is admitted through the SQLite journal (:mod:`dvm.journal`)
  before anything else happens; a request seen again (relay replay, resubscription, a
  second worker sharing the journal) is ignored, so no job runs twice. Replicas on several
  machines (the ``coco`` backend) also claim each job cluster-wide (:class:`JobClaims`).
* **Every request hears back.** Each admitted request gets ``processing`` feedback
  (``starting a fresh sandbox`` or ``queued: ...``) or an ``error`` saying why not
  (``busy: ...``, unreadable encrypted params, a request over ``MAX_REQUEST_BYTES``); every
  job then ends in ``success`` or ``error``. Feedback and sandbox events are re-published
  with backoff for ``timeouts.publish`` seconds while the relays are unreachable.
* **Bounded.** At most ``max_concurrent`` jobs run and ``max_queued`` more wait; a key has at
  most ``per_customer`` jobs admitted. A freed slot goes to the waiting customer with the
  fewest running jobs, round-robin among equals (:class:`FairSlots`), so one busy key cannot
  starve the others.
  Memory is bounded by (max_concurrent + max_queued) jobs of at most 2 × MAX_REQUEST_BYTES
  each (the request and its opened params), MAX_PENDING_FEEDBACK feedback events in flight,
  DM_RELAY_CACHE recipients' relay lists, and the relay pool's bounded queues (see dvm.relay).
* **A sandbox is not trusted.** Its phases only move forward (a repeated phase never extends
  a deadline), it may hold one subscription (gift wraps to one key) and publish at most
  MAX_PUBLISHED_EVENTS events; at most MAX_FORWARDED_EVENTS events are forwarded to it.
  Every phase has a timeout; a sandbox stopped by a resource limit ends the job with
  ``the sandbox stopped: resource limit <memory|cpu|pids|timeout>``.
* **Crash recovery.** On start the worker claims the journal's jobs whose worker died, tells
  each customer (``RESTART_REASON``; retried until a relay accepts it) and only then marks
  them failed; the warm pool reaps the dead worker's sandboxes (processes and files).
* **Relay faults.** Subscriptions resume after reconnects (``since`` with margins, gift wraps
  with GIFT_WRAP_RESUME_MARGIN); one closed by every relay is opened again with backoff.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from attest import sim
from attest.collateral import collateral_to_json
from attest.errors import AttestError
from attest.providers import get_evidence
from dvm import nip04, nip44
from dvm.config import RelayConfig, RelaysConfig
from dvm.errors import CdvmError
from dvm.journal import JobRecord, Journal, JournalError
from dvm.keys import PrivateKey, PublicKey
from dvm.nip01 import Event
from dvm.nip09 import DELETION_KIND, deleted_ids
from dvm.nip17 import DM_RELAYS_KIND, parse_dm_relay_list
from dvm.nip40 import is_expired
from dvm.nip59 import GIFT_WRAP_KIND
from dvm.nip89 import build_announcement
from dvm.nip90 import JobRequest, JobRequestError, build_feedback, parse_encrypted_tags, parse_job_request
from dvm.nostr_errors import NostrError
from dvm.pool import PoolSubscription, PublishFailed, RelayPool
from dvm.relay import GIFT_WRAP_RESUME_MARGIN, RelayError, SubscriptionClosed
from dvm.wire import Filter
from jobs.sandbox import Sandbox
from jobs.sandbox_errors import ChannelError, SandboxError, SandboxExited, SandboxLimitExceeded
from jobs.warmpool import WarmPool

log = logging.getLogger(__name__)

MAX_FORWARDED_EVENTS = 50_000
"""Events forwarded to one sandbox at most: a flood to a one-time key cannot grow without bound."""
MAX_PUBLISHED_EVENTS = 64
"""Events one sandbox may have published (a job needs an attestation DM, an error DM and a result)."""
MAX_REQUEST_BYTES = 128 * 1024
"""Largest job request (serialized event) admitted; documents go to the enclave by DM instead."""
MAX_PENDING_FEEDBACK = 32
"""Admission feedback events being published at once; the request reader waits beyond that."""
MAX_EXTRA_RELAYS = 4
"""Relays named by a request (``relays`` tag) or by a recipient's DM relay list used per publish."""
DM_RELAY_CACHE = 1024
"""Recipients whose DM relay list (kind 10050) is remembered."""
MAX_REASON_CHARS = 500
MAX_EVIDENCE_REQUESTS = 2
"""Evidence a process sandbox may ask the worker for: the model key request and the customer's attestation."""
HEX_DIGITS = frozenset("0123456789abcdef")

PHASES = ("attesting", "waiting_documents", "generating")
PHASE_TEXT = {
    "attesting": "producing attestation evidence",
    "waiting_documents": "waiting for the customer's documents",
    "generating": "generating the answer",
}

RESTART_REASON = "the worker restarted while running this job; nothing was kept, please resubmit it"
SHUTDOWN_REASON = "the worker is shutting down; nothing was kept, please resubmit the job"
CANCEL_REASON = "the customer cancelled the job"
FLOOD_REASON = f"more than {MAX_FORWARDED_EVENTS} events were sent to the job's one-time key; the job was stopped"
TAKEN_REASON = "taken by another worker replica"
CLAIM_RETENTION_S = 86400.0
INTERNAL_REASON = "the worker hit an internal error while running this job; please resubmit it"


class JobClaims(Protocol):
    """Cluster-wide exactly-once admission when several worker replicas serve one DVM key
    (jobs.coco_lease: one Kubernetes Lease per job)."""

    async def claim(self, job_id: str) -> bool: ...

    async def finish(self, job_id: str, state: str) -> None: ...

    async def collect(self, retention_s: float) -> int: ...


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


class FairSlots:
    """``size`` run slots shared fairly: a freed slot goes to the waiting customer with the
    fewest running jobs; customers with equally many take turns (round-robin), and each
    customer's own jobs start in the order they came."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.running: dict[str, int] = {}
        self._in_use = 0
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._closed: Exception | None = None

    @property
    def free(self) -> bool:
        """Whether a job admitted now would start at once."""
        return self._in_use < self.size and not self._waiting

    async def acquire(self, customer: str) -> None:
        """Wait for a slot; raises the :meth:`close` error if the slots close first."""
        if self._closed is not None:
            raise self._closed
        if self.free:
            self._take(customer)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(customer, deque()).append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(customer)
            else:
                self._forget(customer, future)
            raise

    def release(self, customer: str) -> None:
        left = self.running.get(customer, 1) - 1
        if left:
            self.running[customer] = left
        else:
            self.running.pop(customer, None)
        self._in_use -= 1
        self._wake()

    def close(self, error: Exception) -> None:
        """Fail every waiting job (and later acquires) with ``error``."""
        self._closed = error
        for queue in self._waiting.values():
            for future in queue:
                if not future.done():
                    future.set_exception(error)
        self._waiting.clear()

    def _take(self, customer: str) -> None:
        self._in_use += 1
        self.running[customer] = self.running.get(customer, 0) + 1

    def _forget(self, customer: str, future: asyncio.Future[None]) -> None:
        queue = self._waiting.get(customer)
        if queue is None:
            return
        if future in queue:
            queue.remove(future)
        if not queue:
            del self._waiting[customer]

    def _wake(self) -> None:
        while self._in_use < self.size and self._waiting:
            customer = min(self._waiting, key=lambda c: self.running.get(c, 0))  # the first in turn among equals
            queue = self._waiting[customer]
            future = queue.popleft()
            if queue:
                self._waiting.move_to_end(customer)
            else:
                del self._waiting[customer]
            if future.done():
                continue
            self._take(customer)
            future.set_result(None)


@dataclass
class _Control:
    """Stops one job early: ``reason`` is what the customer is told."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""

    def set(self, reason: str) -> None:
        if not self.stop.is_set():
            self.reason = reason
            self.stop.set()


class _Inbox:
    """A sandbox's messages, read by one pending receive that a timeout never cuts mid-frame."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self._pending: asyncio.Future[dict[str, Any]] | None = None

    def next(self) -> asyncio.Future[dict[str, Any]]:
        """The pending receive (started if none is)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.sandbox.recv())
        return self._pending

    def take(self) -> dict[str, Any]:
        """The message the finished receive got; :class:`JobFailed` if the sandbox ended or broke the channel."""
        assert self._pending is not None and self._pending.done()
        pending, self._pending = self._pending, None
        try:
            return pending.result()
        except (SandboxError, ChannelError) as error:
            raise _sandbox_failed(error) from None

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


class Worker:
    """One DVM identity serving job requests from its relays; see the module docstring."""

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
        claims: JobClaims | None = None,
    ) -> None:
        self.identity = identity
        self.config = config
        self.relays = relays
        self.pool = RelayPool.from_config(relays, private_key=identity)
        self.warm = warm_pool
        self.journal = Journal(journal_path)
        self.model_info = model_info
        self.on_ready = on_ready
        self.claims = claims
        self._slots = FairSlots(config.max_concurrent)
        self._in_flight = 0
        self._admitted_by_customer: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._outbox = asyncio.Semaphore(MAX_PENDING_FEEDBACK)
        self._controls: dict[str, _Control] = {}
        self._dm_relays: OrderedDict[str, list[str]] = OrderedDict()
        self._stopping = False
        self.started_at = int(time.time())

    def __repr__(self) -> str:
        return f"Worker({self.identity.public_key.npub()!r}, jobs={self._in_flight})"

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or forever)."""
        await self.pool.start(wait=10)
        readers: list[asyncio.Task[None]] = []
        try:
            interrupted = self.journal.claim_interrupted()
            self._spawn(self._tell_interrupted(interrupted))
            await self.warm.start()
            if self.claims is not None:
                self._spawn(self._collect_claims())
            if self.config.announce:
                await self._announce()
            readers = [
                asyncio.create_task(self._read([self._request_filter()], self._on_request)),
                asyncio.create_task(self._read([Filter(kinds=(DELETION_KIND,), since=self.started_at)], self._on_deletion)),
            ]
            line = (
                f"worker ready {self.identity.public_key.npub()} kinds={','.join(map(str, self.config.kinds))} "
                f"relays={','.join(self.pool.read_urls)} tee={self.config.tee}"
            )
            log.warning("%s", line)
            if self.on_ready:
                self.on_ready(line)
            if stop is None:
                await asyncio.gather(*readers)
            else:
                await stop.wait()
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await self.shutdown()

    async def shutdown(self) -> None:
        """Fail queued jobs, cancel running ones (their customers are told), then close everything."""
        self._stopping = True
        self._slots.close(JobFailed(SHUTDOWN_REASON))
        for control in self._controls.values():
            control.set(SHUTDOWN_REASON)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.config.timeouts.publish + 10)
        for task in (*self._tasks, *self._background):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        await self.warm.close()
        await self.pool.close()
        self.journal.close()

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _tell_interrupted(self, records: list[JobRecord]) -> None:
        """Tell every customer whose job a dead worker left unfinished; retried until a relay accepts."""
        delay = 5.0
        while records:
            left = []
            for record in records:
                log.warning("job %s was interrupted by a worker restart; telling the customer to resubmit", record.id)
                if await self._feedback(record.id, record.customer, "error", RESTART_REASON):
                    self._record(record.id, "failed", RESTART_REASON)
                else:
                    left.append(record)
            records = left
            if records:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 300.0)

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

    async def _read(self, filters: list[Filter], handler: Callable[[Event], Awaitable[None]]) -> None:
        """Hand every event to ``handler``; a subscription every relay closed is opened again."""
        delay = 1.0
        while True:
            subscription = await self.pool.subscribe(filters)
            try:
                async for event in subscription:
                    delay = 1.0
                    await self._handle(handler, event)
                return
            except SubscriptionClosed as closed:
                log.warning("the relays closed a subscription (%s); opening it again in %.0f s", closed, delay)
            finally:
                await subscription.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    @staticmethod
    async def _handle(handler: Callable[[Event], Awaitable[None]], event: Event) -> None:
        try:
            await handler(event)
        except CdvmError as error:
            log.info("event %s ignored: %s", event.id, error)
        except Exception as error:  # a bug must not stop the reader; the message may quote input, so only the type
            log.error("event %s: internal error %s", event.id, type(error).__name__)

    # ---- admission -------------------------------------------------------------------------

    async def _on_request(self, event: Event) -> None:
        if event.kind not in self.config.kinds or self._stopping:
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
        if self.claims is not None and not await self._claim(request.id):
            self._record(request.id, "rejected", TAKEN_REASON)
            return
        opened: list[list[str]] | None = None
        refusal = self._admission_refusal(request)
        if not refusal:
            try:
                opened = self._open_params(request)
            except (NostrError, JobRequestError) as error:
                refusal = f"cannot read the encrypted job params: {error}"
        if refusal:
            self._record(request.id, "rejected", refusal)
            await self._tell(request.id, request.customer, "error", refusal)
            return
        self._in_flight += 1
        self._admitted_by_customer[request.customer] = self._admitted_by_customer.get(request.customer, 0) + 1
        info = "starting a fresh sandbox" if self._slots.free else "queued: waiting for a free sandbox"
        await self._tell(request.id, request.customer, "processing", info)
        task = asyncio.create_task(self._job(request, opened), name=f"job {request.id[:12]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _admission_refusal(self, request: JobRequest) -> str:
        if len(request.event.to_json()) > MAX_REQUEST_BYTES:
            return f"the job request is larger than {MAX_REQUEST_BYTES // 1024} KiB; send documents to the enclave instead"
        if self._in_flight >= self.config.max_concurrent + self.config.max_queued:
            return "busy: too many jobs in the queue, try again in a few minutes"
        if self._admitted_by_customer.get(request.customer, 0) >= self.config.per_customer:
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
        return parse_encrypted_tags(plaintext)

    async def _on_deletion(self, event: Event) -> None:
        for job_id in deleted_ids(event):
            record = self.journal.get(job_id)
            if record and record.customer == event.pubkey and job_id in self._controls:
                self._controls[job_id].set(CANCEL_REASON)

    # ---- one job ---------------------------------------------------------------------------

    async def _job(self, request: JobRequest, opened: list[list[str]] | None) -> None:
        control = self._controls.setdefault(request.id, _Control())
        try:
            try:
                await self._slots.acquire(request.customer)
            except JobFailed as error:
                await self._end(request, "failed", str(error))
                return
            try:
                if control.stop.is_set():
                    raise JobFailed(control.reason)
                self._record(request.id, "starting")
                await self._serve(request, opened, control)
            except CdvmError as error:
                await self._end(request, "failed", str(error))
            except Exception as error:  # never leave a customer without an answer; the message may quote input
                log.error("job %s: internal error %s", request.id, type(error).__name__)
                await self._end(request, "failed", INTERNAL_REASON)
            else:
                await self._end(request, "done", "sandbox destroyed")
            finally:
                self._slots.release(request.customer)
        finally:
            self._controls.pop(request.id, None)
            self._in_flight -= 1
            left = self._admitted_by_customer.get(request.customer, 1) - 1
            if left:
                self._admitted_by_customer[request.customer] = left
            else:
                self._admitted_by_customer.pop(request.customer, None)

    async def _claim(self, job_id: str) -> bool:
        """Take the job cluster-wide (several replicas serve one DVM key); on doubt, leave it."""
        assert self.claims is not None
        try:
            return await self.claims.claim(job_id)
        except CdvmError as error:
            log.warning("job %s left to other replicas: %s", job_id, error)
            return False

    async def _collect_claims(self) -> None:
        """Delete other jobs' claims once nobody can see their requests again (daily)."""
        assert self.claims is not None
        while True:
            try:
                await self.claims.collect(CLAIM_RETENTION_S)
            except CdvmError as error:
                log.warning("old job claims not collected: %s", error)
            await asyncio.sleep(CLAIM_RETENTION_S / 24)

    async def _end(self, request: JobRequest, state: str, reason: str) -> None:
        reason = reason[:MAX_REASON_CHARS]
        self._record(request.id, state, "" if state == "done" else reason)
        if self.claims is not None:
            try:
                await self.claims.finish(request.id, state)
            except CdvmError as error:
                log.warning("job %s: claim not updated: %s", request.id, error)
        await self._feedback(request.id, request.customer, "success" if state == "done" else "error", reason)

    def _record(self, job_id: str, state: str, reason: str = "") -> None:
        try:
            self.journal.advance(job_id, state, reason)
        except JournalError as error:
            log.error("job %s: %s", job_id, error)

    async def _serve(self, request: JobRequest, opened: list[list[str]] | None, control: _Control) -> None:
        timeouts = self.config.timeouts
        try:
            sandbox = await asyncio.wait_for(self.warm.acquire(), timeouts.sandbox_start)
        except TimeoutError:
            raise JobFailed(f"no sandbox became ready within {timeouts.sandbox_start:.0f} s; try again later") from None
        except SandboxError as error:
            raise JobFailed(f"no sandbox could be started: {error}") from None
        inbox = _Inbox(sandbox)
        forwarder: asyncio.Task[None] | None = None
        subscription: PoolSubscription | None = None
        try:
            try:
                await sandbox.send({"op": "job", "request": request.event.to_dict(), "opened_tags": opened})
            except SandboxError as error:
                raise _sandbox_failed(error) from None
            phase, deadline = "attesting", time.monotonic() + timeouts.attestation
            result_published = False
            published = evidence_requests = 0
            while True:
                message = await self._next_message(inbox, control, deadline, phase)
                op = message.get("op")
                if op == "phase":
                    new = message.get("phase")
                    if new in PHASES and PHASES.index(new) > PHASES.index(phase):
                        phase = str(new)
                        self._record(request.id, phase)
                        limit = {"waiting_documents": timeouts.documents, "generating": timeouts.generation}[phase]
                        deadline = time.monotonic() + limit
                elif op == "publish":
                    published += 1
                    if published > MAX_PUBLISHED_EVENTS:
                        raise JobFailed(f"the sandbox asked to publish more than {MAX_PUBLISHED_EVENTS} events; job stopped")
                    role = await self._publish_for(request, message)
                    result_published = result_published or role == "result"
                elif op == "subscribe":
                    if subscription is not None:
                        raise JobFailed("the sandbox asked for a second subscription; job stopped")
                    subscription = await self._subscribe_for(message)
                    forwarder = asyncio.create_task(self._forward(sandbox, subscription, control))
                elif op == "evidence":
                    evidence_requests += 1
                    if evidence_requests > MAX_EVIDENCE_REQUESTS:
                        raise JobFailed(f"the sandbox asked for evidence more than {MAX_EVIDENCE_REQUESTS} times; job stopped")
                    await inbox.sandbox.send(await self._evidence_for(message))
                elif op == "done":
                    if not result_published:
                        raise JobFailed("the sandbox finished without publishing a result")
                    return
                elif op == "failed":
                    raise JobFailed(str(message.get("reason") or "the job failed inside the sandbox"))
        finally:
            inbox.close()
            if forwarder is not None:
                forwarder.cancel()
            if subscription is not None:
                await subscription.close()
            await sandbox.destroy()
            self.warm.replenish()

    async def _next_message(self, inbox: _Inbox, control: _Control, deadline: float, phase: str) -> dict[str, Any]:
        receive = inbox.next()
        stopped = asyncio.ensure_future(control.stop.wait())
        done, _ = await asyncio.wait({receive, stopped}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if receive in done:
            return inbox.take()
        reason = control.reason if control.stop.is_set() else f"timed out while {PHASE_TEXT.get(phase, phase)}"
        await self._cancel_sandbox(inbox, reason)
        raise JobFailed(reason)

    async def _evidence_for(self, message: dict[str, Any]) -> dict[str, Any]:
        """Evidence for the REPORTDATA a process sandbox chose (``--tee host``, docs/protocol.md §8).

        The worker runs in the same confidential VM as its process sandboxes, which see no TEE
        device; REPORTDATA and evidence are public, and the runner checks the binding itself.
        """
        report_data = message.get("report_data")
        if not isinstance(report_data, str) or len(report_data) != 128 or not all(c in HEX_DIGITS for c in report_data):
            raise JobFailed("the sandbox asked for evidence with malformed REPORTDATA; job stopped")
        try:
            evidence = await asyncio.to_thread(get_evidence, bytes.fromhex(report_data), self.config.tee)
        except AttestError as error:
            return {"op": "evidence", "error": str(error)[:MAX_REASON_CHARS]}
        collateral = json.loads(collateral_to_json(sim.sim_collateral())) if evidence.tee == "sim" else None
        return {"op": "evidence", "evidence": json.loads(evidence.to_json()), "collateral": collateral}

    @staticmethod
    async def _cancel_sandbox(inbox: _Inbox, reason: str) -> None:
        """Ask the runner to stop (it tells the customer what was missing), then give up on it."""
        try:
            await inbox.sandbox.send({"op": "cancel", "reason": reason})
            async with asyncio.timeout(5):
                while True:
                    await asyncio.wait({inbox.next()})
                    if inbox.take().get("op") in ("failed", "done"):
                        return
        except (JobFailed, SandboxError, TimeoutError):
            pass

    async def _publish_for(self, request: JobRequest, message: dict[str, Any]) -> str:
        event = Event.from_dict(message.get("event"))
        event.verify()
        role = str(message.get("role"))
        extra = list(request.relays)
        if role == "dm" and isinstance(message.get("recipient"), str):
            extra += await self._dm_relays_of(message["recipient"])
        try:
            await self._publish(event, extra)
        except RelayError as error:
            if role == "result":
                raise JobFailed(f"the result could not be published: {error}") from None
            log.warning("sandbox event %s not published: %s", event.id, error)
        return role

    async def _publish(self, event: Event, extra_urls: Iterable[str] = ()) -> None:
        """Publish to the write relays, re-trying with backoff for ``timeouts.publish`` seconds
        (a relay restarting); also, once, to up to MAX_EXTRA_RELAYS other relays named for it.
        Raises :class:`PublishFailed` when no relay accepted it."""
        extras = [url for url in dict.fromkeys(extra_urls)
                  if url.startswith(("ws://", "wss://")) and url not in self.pool.configs][:MAX_EXTRA_RELAYS]
        elsewhere = asyncio.ensure_future(self._publish_elsewhere(event, extras)) if extras else None
        deadline = time.monotonic() + self.config.timeouts.publish
        delay = 0.25
        try:
            while True:
                try:
                    await self.pool.publish(event, timeout=max(0.5, deadline - time.monotonic()))
                    return
                except PublishFailed:
                    if deadline - time.monotonic() <= delay:
                        if elsewhere is not None and await elsewhere:
                            return
                        raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 4.0)
        finally:
            if elsewhere is not None and not elsewhere.done():
                self._spawn(elsewhere)

    async def _publish_elsewhere(self, event: Event, urls: list[str]) -> bool:
        """One publish to relays outside the pool, over connections closed right after."""
        pool = RelayPool([RelayConfig(url=url, read=False) for url in urls], private_key=self.identity)
        try:
            await pool.publish(event, timeout=self.config.timeouts.publish)
            return True
        except RelayError as error:
            log.info("event %s not published to the requested relays: %s", event.id, error)
            return False
        finally:
            await pool.close()

    async def _dm_relays_of(self, pubkey: str) -> list[str]:
        """The recipient's NIP-17 DM relays (kind 10050), remembered for DM_RELAY_CACHE recipients."""
        if pubkey in self._dm_relays:
            self._dm_relays.move_to_end(pubkey)
            return self._dm_relays[pubkey]
        try:
            events = await self.pool.query([Filter(kinds=(DM_RELAYS_KIND,), authors=(pubkey,), limit=1)], timeout=3)
        except RelayError:
            events = []
        newest = max(events, key=lambda e: e.created_at, default=None)
        self._dm_relays[pubkey] = parse_dm_relay_list(newest)[:MAX_EXTRA_RELAYS] if newest else []
        if len(self._dm_relays) > DM_RELAY_CACHE:
            self._dm_relays.popitem(last=False)
        return self._dm_relays[pubkey]

    async def _subscribe_for(self, message: dict[str, Any]) -> PoolSubscription:
        """Subscribe for the sandbox: only gift wraps to one key are allowed."""
        spec = message.get("filter")
        if not isinstance(spec, dict) or set(spec) != {"kinds", "#p"} or spec["kinds"] != [GIFT_WRAP_KIND] \
                or not isinstance(spec["#p"], list) or len(spec["#p"]) != 1:
            raise JobFailed("the sandbox asked for a subscription outside the protocol")
        try:
            PublicKey.from_hex(spec["#p"][0])
        except (NostrError, TypeError):
            raise JobFailed("the sandbox asked for a subscription outside the protocol") from None
        return await self.pool.subscribe(
            [Filter(kinds=(GIFT_WRAP_KIND,), tags={"p": spec["#p"]})], resume_margin=GIFT_WRAP_RESUME_MARGIN
        )

    @staticmethod
    async def _forward(sandbox: Sandbox, subscription: PoolSubscription, control: _Control) -> None:
        """Forward the subscription's events to the sandbox; a flood past MAX_FORWARDED_EVENTS stops the job."""
        forwarded = 0
        try:
            async for event in subscription:
                forwarded += 1
                if forwarded > MAX_FORWARDED_EVENTS:
                    log.warning("sandbox %s flooded: more than %d events to its key", sandbox.label, MAX_FORWARDED_EVENTS)
                    control.set(FLOOD_REASON)
                    return
                try:
                    await sandbox.send({"op": "event", "event": event.to_dict()})
                except ChannelError:
                    log.info("event %s is too large for the sandbox channel; dropped", event.id)
        except (SandboxError, SubscriptionClosed) as error:
            log.info("forwarding to sandbox %s ended: %s", sandbox.label, error)

    async def _tell(self, request_id: str, customer: str, status: str, info: str) -> None:
        """Feedback published in the background, at most MAX_PENDING_FEEDBACK at once."""
        await self._outbox.acquire()
        task = asyncio.ensure_future(self._feedback(request_id, customer, status, info))
        self._background.add(task)
        task.add_done_callback(self._told)

    def _told(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)  # type: ignore[arg-type]
        self._outbox.release()

    async def _feedback(self, request_id: str, customer: str, status: str, info: str) -> bool:
        event = build_feedback(self.identity, request_id, customer, status, info)
        try:
            await self._publish(event)
            return True
        except RelayError as error:
            log.warning("feedback %s for job %s not published: %s", status, request_id, error)
            return False


def _sandbox_failed(error: CdvmError) -> JobFailed:
    """What the customer is told when the sandbox ended or broke its channel (never its stderr)."""
    if isinstance(error, SandboxLimitExceeded):
        return JobFailed(f"the sandbox stopped: resource limit {error.limit}")
    if isinstance(error, SandboxExited):
        return JobFailed(f"the sandbox stopped unexpectedly ({error.reason}, exit status {error.returncode})")
    return JobFailed(f"the sandbox broke the channel protocol: {error}")
