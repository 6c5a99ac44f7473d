"""The customer's side of a confidential job (``cdvm ask``).

1. Post a job request naming the DVM, with ``["cdvm", "1", nonce]`` and nothing private.
2. Wait for the enclave's attestation DM (from its one-time key), verify the evidence
   against the policy, check that REPORTDATA binds that key, this job, this nonce and the
   expected model. On any failure: send nothing private, delete the request (NIP-09), and
   raise :class:`AttestationRejected` with every reason.
3. Send the documents to the one-time key as NIP-17 DMs, chunked to fit the relays, then a
   manifest and the run message (prompt and params).
4. Wait for the result event signed by the one-time key and decrypt it.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from attest.binding import check_report_data
from attest.collateral import collateral_from_json
from attest.errors import AttestError
from attest.evidence import Evidence
from attest.policy import Policy
from attest.verdict import Verdict
from attest.verify import verify_evidence_online
from dvm import nip44
from dvm.config import RelaysConfig
from dvm.errors import CdvmError
from dvm.keys import PrivateKey, PublicKey
from dvm.nip01 import Event
from dvm.nip09 import build_deletion
from dvm.nip17 import build_dm, open_dm
from dvm.nip40 import expiration_tag
from dvm.nip59 import GIFT_WRAP_KIND, MAX_TIME_TWEAK
from dvm.nip89 import HANDLER_KIND, AnnouncementError, parse_announcement
from dvm.nip90 import FEEDBACK_KIND, RESULT_KIND_OFFSET, build_job_request, parse_feedback
from dvm.nostr_errors import NostrError
from dvm.pool import PoolSubscription, RelayPool
from dvm.relay import GIFT_WRAP_RESUME_MARGIN
from dvm.wire import Filter
from jobs.messages import (
    Attestation,
    DocumentEntry,
    ProtocolError,
    chunk_message,
    manifest_message,
    parse_message,
    run_message,
    split_document,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE = 128 * 1024
"""Assumed relay message limit when neither relays.toml nor NIP-11 states one."""


class AskError(CdvmError):
    """The job could not be completed; the message says why."""


class AttestationRejected(AskError):
    """The enclave's evidence failed verification or policy: nothing private was sent."""

    def __init__(self, reasons: list[str], verdict: Verdict | None) -> None:
        super().__init__("attestation rejected, nothing private was sent: " + "; ".join(reasons))
        self.reasons = reasons
        self.verdict = verdict


@dataclass(frozen=True)
class AskOptions:
    """How the customer wants the job run and checked."""

    kind: int = 5050
    params: dict[str, str] = field(default_factory=dict)
    policy: Policy = field(default_factory=Policy.default)
    allow_simulated: bool = False
    expected_models: tuple[str, ...] = ()
    offline: bool = False
    timeout: float = 600.0
    expire_after: int = 3600


@dataclass
class AskResult:
    """What ``cdvm ask --json`` prints."""

    job_id: str
    enclave: str
    answer: str
    verdict: Verdict
    model_sha256: str
    usage: dict[str, int]
    timings_ms: dict[str, float]
    enclave_timings_ms: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "enclave": self.enclave,
            "answer": self.answer,
            "verdict": self.verdict.to_dict(),
            "model_sha256": self.model_sha256,
            "usage": self.usage,
            "timings": self.timings_ms,
            "enclave_timings": self.enclave_timings_ms,
        }


_PROBE_JOB = "0" * 64
_WIDEST_INDEX = (1 << 24) - 1
"""The largest document index and piece number an enclave may admit (jobs.messages.Limits):
the probe message carries them, so no real piece's message is longer than the one measured."""


@functools.lru_cache(maxsize=16)
def max_chunk_bytes(max_message_length: int) -> int:
    """The largest document piece whose gift-wrapped DM fits ``max_message_length`` and NIP-44's 65,535-byte limit.

    Found by building real wraps (binary search): padding and three base64 layers make a
    closed formula fragile. A wrap's length depends only on the lengths inside it (keys, ids
    and signatures are fixed-width hex, NIP-44 pads by length), so throw-away keys probe it
    once per limit and the answer is cached (about 15 wraps, some 20 ms, saved per job).
    """
    sender, recipient = PrivateKey.generate(), PrivateKey.generate().public_key

    def fits(size: int) -> bool:
        message = chunk_message(_PROBE_JOB, _WIDEST_INDEX, _WIDEST_INDEX, b"\0" * size)
        try:
            wrap = build_dm(sender, recipient, message, include_sender_copy=False)[0]
        except NostrError:
            return False
        return len(wrap.to_json()) + 64 <= max_message_length

    low, high = 256, 48 * 1024
    if not fits(low):
        raise AskError(f"the relays accept messages of at most {max_message_length} bytes: too small for a document DM")
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


class ConfidentialJob:
    """One ``ask``: the state of a job from request to decrypted answer."""

    def __init__(
        self,
        identity: PrivateKey,
        dvm: PublicKey,
        relays: RelaysConfig,
        options: AskOptions,
        progress: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.identity = identity
        self.dvm = dvm
        self.options = options
        self.progress = progress
        self.pool = RelayPool.from_config(relays, private_key=identity, fetch_info=True)
        self.nonce = secrets.token_hex(32)
        self.timings: dict[str, float] = {}
        self._t0 = 0.0

    def _mark(self, phase: str) -> None:
        self.timings[phase] = round((time.perf_counter() - self._t0) * 1000, 1)

    async def run(self, prompt: str, documents: list[tuple[str, bytes]]) -> AskResult:
        await self.pool.start(wait=10)
        try:
            async with asyncio.timeout(self.options.timeout):
                return await self._run(prompt, documents)
        except TimeoutError:
            raise AskError(f"no answer within {self.options.timeout:.0f} s") from None
        finally:
            await self.pool.close()

    async def _run(self, prompt: str, documents: list[tuple[str, bytes]]) -> AskResult:
        expected_models = set(self.options.expected_models) or await self._announced_models()
        request = build_job_request(
            self.identity,
            self.options.kind,
            targets=[self.dvm.hex()],
            extra_tags=[["cdvm", "1", self.nonce], list(expiration_tag(int(time.time()) + self.options.expire_after))],
        )
        me = self.identity.public_key.hex()
        feedback = await self.pool.subscribe(
            [Filter(kinds=(FEEDBACK_KIND, self.options.kind + RESULT_KIND_OFFSET), tags={"e": [request.id]})]
        )
        inbox = await self.pool.subscribe(
            [Filter(kinds=(GIFT_WRAP_KIND,), tags={"p": [me]}, since=int(time.time()) - MAX_TIME_TWEAK - 600)],
            resume_margin=GIFT_WRAP_RESUME_MARGIN,
        )
        events = self._events(feedback, inbox)
        limit = self.pool.limits().max_message_length or DEFAULT_MAX_MESSAGE
        chunk_size = asyncio.ensure_future(asyncio.to_thread(max_chunk_bytes, limit))
        try:
            self._t0 = time.perf_counter()
            await self.pool.publish(request)
            self._mark("posted")
            self.progress(f"job posted: {request.id}")
            attestation, sender = await self._await_attestation(request.id, events)
            self._mark("attestation_received")
            self.progress(f"attestation received from one-time key {sender.npub()}")
            verdict = await self._verify(request, attestation, sender, expected_models)
            self._mark("attestation_verified")
            for line in verdict.render_lines()[:4]:
                self.progress(f"  {line}")
            await self._send_documents(request.id, sender, prompt, documents, await chunk_size)
            self._mark("documents_sent")
            self.progress(f"documents sent: {len(documents)} ({sum(len(d) for _, d in documents)} bytes)")
            payload = await self._await_result(request.id, sender, events)
            self._mark("result_received")
            self.progress("result received and decrypted")
        finally:
            if chunk_size.done() and not chunk_size.cancelled():
                chunk_size.exception()  # retrieved here: a failed probe only matters once documents are sent
            chunk_size.cancel()
            await events.aclose()
            await feedback.close()
            await inbox.close()
        return AskResult(
            job_id=request.id,
            enclave=sender.hex(),
            answer=str(payload.get("answer", "")),
            verdict=verdict,
            model_sha256=attestation.model_sha256,
            usage={k: int(v) for k, v in dict(payload.get("usage") or {}).items()},
            timings_ms=self.timings,
            enclave_timings_ms={k: float(v) for k, v in dict(payload.get("timings_ms") or {}).items()},
        )

    async def _announced_models(self) -> set[str]:
        """Model digests the DVM's NIP-89 announcement lists (empty when it has none)."""
        events = await self.pool.query([Filter(kinds=(HANDLER_KIND,), authors=(self.dvm.hex(),), limit=5)], timeout=5)
        digests: set[str] = set()
        for event in events:
            try:
                models = parse_announcement(event).cdvm.get("models", [])
            except AnnouncementError:
                continue
            digests.update(m["sha256"] for m in models if isinstance(m, dict) and isinstance(m.get("sha256"), str))
        return digests

    def _job_feedback_error(self, event: Event, job_id: str) -> None:
        if event.kind == FEEDBACK_KIND and event.pubkey == self.dvm.hex():
            try:
                fb = parse_feedback(event)
            except NostrError:
                return
            if fb.request_id == job_id:
                if fb.status == "error":
                    raise AskError(f"the DVM reports an error: {fb.extra_info or event.content}")
                self.progress(f"DVM: {fb.status}{': ' + fb.extra_info if fb.extra_info else ''}")

    @staticmethod
    async def _events(feedback: PoolSubscription, inbox: PoolSubscription) -> AsyncGenerator[tuple[str, Event], None]:
        """Events from both subscriptions, tagged with where they came from, in arrival order."""
        merged: asyncio.Queue[tuple[str, Event]] = asyncio.Queue()

        async def pump(name: str, subscription: PoolSubscription) -> None:
            async for event in subscription:
                await merged.put((name, event))

        pumps = [asyncio.create_task(pump("feedback", feedback)), asyncio.create_task(pump("inbox", inbox))]
        try:
            while True:
                yield await merged.get()
        finally:
            for task in pumps:
                task.cancel()

    async def _await_attestation(
        self, job_id: str, events: AsyncIterator[tuple[str, Event]]
    ) -> tuple[Attestation, PublicKey]:
        async for source, event in events:
            if source == "feedback":
                self._job_feedback_error(event, job_id)
                continue
            message = self._open(event, job_id)
            if message is None:
                continue
            obj, sender = message
            if obj["type"] == "error":
                raise AskError(f"the enclave reports an error: {obj.get('message')}")
            if obj["type"] == "attestation":
                try:
                    return Attestation.from_message(obj), sender
                except ProtocolError as error:
                    raise AttestationRejected([f"malformed attestation message: {error}"], None) from None
        raise AskError("the relays closed the subscription")

    def _open(self, wrap: Event, job_id: str) -> tuple[dict[str, Any], PublicKey] | None:
        try:
            dm = open_dm(self.identity, wrap)
            return parse_message(dm.content, job_id), dm.sender
        except (NostrError, ProtocolError):
            return None

    async def _verify(
        self, request: Event, attestation: Attestation, sender: PublicKey, expected_models: set[str]
    ) -> Verdict:
        reasons: list[str] = []
        verdict: Verdict | None = None
        try:
            evidence = Evidence.from_json(json.dumps(attestation.evidence))
            collateral = None
            if attestation.collateral is not None:
                collateral = collateral_from_json(json.dumps(attestation.collateral))
            verdict = await verify_evidence_online(
                evidence,
                collateral=collateral,
                now=datetime.now(timezone.utc),
                policy=self.options.policy,
                allow_simulated=self.options.allow_simulated,
                offline=self.options.offline,
            )
            reasons += verdict.reasons()
            if attestation.pubkey != sender.hex():
                reasons.append("the attestation names a different key than the one that sent it")
            if attestation.job != request.id or attestation.nonce != self.nonce:
                reasons.append("the attestation is for another job or nonce (a replay)")
            if verdict.report_data:
                check_report_data(
                    bytes.fromhex(verdict.report_data), sender.raw, request.id, self.nonce, attestation.model_sha256
                )
            if expected_models and attestation.model_sha256 not in expected_models:
                reasons.append(f"the enclave loaded model {attestation.model_sha256}, which is not one the policy or the DVM's announcement expects")
        except AttestError as error:
            reasons.append(str(error))
        if reasons:
            self.progress("attestation REJECTED: " + "; ".join(reasons))
            await self._cancel(request.id, "attestation rejected by the client")
            raise AttestationRejected(reasons, verdict)
        assert verdict is not None
        self.progress(f"attestation verified: tee={verdict.tee} tcb={verdict.tcb_status} model={attestation.model_sha256[:16]}…")
        return verdict

    async def _cancel(self, job_id: str, reason: str) -> None:
        try:
            await self.pool.publish(build_deletion(self.identity, [job_id], [self.options.kind], reason))
        except CdvmError as error:
            log.warning("could not publish the job cancellation: %s", error)

    async def _send_documents(
        self, job_id: str, enclave: PublicKey, prompt: str, documents: list[tuple[str, bytes]], size: int
    ) -> None:
        """Send the pieces, the manifest and the run message; each DM goes out as soon as it is
        wrapped, so relays and the enclave work while the rest are still being built."""
        entries: list[DocumentEntry] = []
        messages: list[str] = []
        for index, (name, data) in enumerate(documents):
            pieces = split_document(data, size)
            entries.append(DocumentEntry(name, len(data), hashlib.sha256(data).hexdigest(), len(pieces)))
            messages += [chunk_message(job_id, index, seq, piece) for seq, piece in enumerate(pieces)]
        messages.append(manifest_message(job_id, entries))
        messages.append(run_message(job_id, prompt, self.options.params))
        publishes: list[asyncio.Future[Any]] = []
        try:
            for content in messages:
                wrap = build_dm(self.identity, enclave, content, include_sender_copy=False)[0]
                publishes.append(asyncio.ensure_future(self.pool.publish(wrap)))
                await asyncio.sleep(0)
            await asyncio.gather(*publishes)
        finally:
            for publish in publishes:
                publish.cancel()

    async def _await_result(
        self, job_id: str, enclave: PublicKey, events: AsyncIterator[tuple[str, Event]]
    ) -> dict[str, Any]:
        key = nip44.conversation_key(self.identity, enclave)
        async for source, event in events:
            if source == "inbox":
                message = self._open(event, job_id)
                if message and message[1] == enclave and message[0]["type"] == "error":
                    raise AskError(f"the enclave reports an error: {message[0].get('message')}")
                continue
            if event.kind == FEEDBACK_KIND:
                self._job_feedback_error(event, job_id)
                continue
            if event.pubkey != enclave.hex():
                continue
            try:
                payload = parse_message(nip44.decrypt(event.content, key), job_id)
            except (NostrError, ProtocolError) as error:
                raise AskError(f"the result could not be decrypted: {error}") from None
            if payload.get("type") == "result":
                return payload
        raise AskError("the relays closed the subscription")
