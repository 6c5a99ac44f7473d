"""One relay connection: a thin asyncio shell over :mod:`dvm.wire` (NIP-01, NIP-42).

Rules this client keeps:

* Every received event goes through ``Event.from_dict`` + ``verify()`` and must match the
  subscription's filters before anything sees it; bad ones are dropped and counted in
  :class:`RelayStats` (logged at debug), as are malformed frames. Verification comes before
  de-duplication, so a forged copy cannot shadow the real event's id.
* Memory is bounded: websockets keeps at most ``max_queue`` frames of ``max_frame`` bytes
  (further reads stall the TCP stream: backpressure), and each subscription queue holds at
  most ``queue_size`` events, dropping the *oldest* when a flooding relay outruns the reader
  (counted in ``stats.dropped_overflow``).
* The connection is re-opened automatically with capped exponential backoff and jitter (reset
  only after a connection stayed up ``STABLE_CONNECTION`` seconds). Open
  subscriptions are re-sent with ``since`` = last seen ``created_at`` minus the
  subscription's ``resume_margin`` (use more than two days for NIP-59 gift wraps, whose
  timestamps are back-dated); duplicates are removed by id.
* With a private key and ``auth`` on, ``["AUTH", challenge]`` is answered with a kind 22242
  event (NIP-42); an EVENT rejected with ``auth-required:`` is retried once after the AUTH is
  accepted, and a subscription CLOSED with ``auth-required:`` is re-sent.
* ``publish`` refuses an event whose frame exceeds the relay's ``max_message_length``
  (from configuration, else NIP-11) before sending it.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from types import TracebackType

import websockets
from websockets.exceptions import ConnectionClosed, InvalidURI, WebSocketException

from dvm.keys import PrivateKey
from dvm.nip01 import Event
from dvm.nip11 import RelayInfo, RelayInfoError, fetch_relay_info
from dvm.nip42 import build_auth_event
from dvm.nostr_errors import NostrError
from dvm.wire import (
    DEFAULT_MAX_FRAME,
    AuthChallenge,
    Closed,
    Eose,
    EventMessage,
    Filter,
    Notice,
    Ok,
    WireError,
    encode_auth,
    encode_close,
    encode_event,
    encode_req,
    parse_relay_message,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
DEFAULT_QUEUE_SIZE = 1000
DEFAULT_RESUME_MARGIN = 60
STABLE_CONNECTION = 10.0
"""Seconds a connection must last before the backoff starts again from ``backoff_initial``."""
GIFT_WRAP_RESUME_MARGIN = 2 * 86400 + 3600
"""Resume margin for kind 1059 subscriptions: NIP-59 randomises created_at up to two days back."""


class RelayError(NostrError):
    """A relay could not be used for what was asked."""


class RelayUnavailable(RelayError):
    """The relay is not connected and its last connection attempt failed (or the client is closed)."""


class PublishTimeout(RelayError):
    """No OK arrived for a published event within the timeout."""


class PublishRejected(RelayError):
    """The relay answered OK false; ``message`` is the relay's reason (``prefix: text``)."""

    def __init__(self, relay_url: str, message: str) -> None:
        super().__init__(f"{relay_url} rejected the event: {message or '(no reason given)'}")
        self.relay_url = relay_url
        self.message = message


class MessageTooLarge(RelayError):
    """The EVENT frame is larger than the relay accepts."""


class SubscriptionClosed(RelayError):
    """The relay ended a subscription (CLOSED) or the subscription was closed locally."""

    def __init__(self, sub_id: str, message: str, by_relay: bool) -> None:
        super().__init__(f"subscription {sub_id} closed{' by the relay' if by_relay else ''}: {message}")
        self.sub_id = sub_id
        self.message = message
        self.by_relay = by_relay


@dataclass(frozen=True)
class OkResult:
    """A relay's acceptance of a published event (``message`` may say ``duplicate:``)."""

    relay_url: str
    event_id: str
    accepted: bool
    message: str


@dataclass
class RelayStats:
    """Counters of what this client dropped or survived (for logs and tests)."""

    bad_frames: int = 0
    invalid_events: int = 0
    unmatched_events: int = 0
    duplicate_events: int = 0
    dropped_overflow: int = 0
    notices: int = 0
    connections: int = 0
    failed_connects: int = 0


class SeenIds:
    """A bounded LRU set of event ids: ``add`` returns ``False`` for an id seen recently."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, event_id: str) -> bool:
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return False
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._ids)


_END = object()
_sub_counter = itertools.count(1)


class _Disconnected(Exception):
    """Internal: the connection dropped while an OK was awaited (the publish is re-sent)."""


class Subscription:
    """Verified, filter-matching, de-duplicated events of one REQ on one relay.

    Iterate with ``async for`` (ends when closed locally; raises :class:`SubscriptionClosed`
    when the relay closes it) or call :meth:`get`. ``eose`` is set on EOSE.
    """

    def __init__(
        self, relay: Relay, sub_id: str, filters: tuple[Filter, ...], queue_size: int, resume_margin: int
    ) -> None:
        self.relay = relay
        self.sub_id = sub_id
        self.filters = filters
        self.resume_margin = resume_margin
        self.eose = asyncio.Event()
        self.last_created_at: int | None = None
        self.closed_reason: str | None = None
        self._closed_by_relay = False
        self._ended = False
        self._auth_retried = False
        self._awaiting_auth = False
        self._seen = SeenIds(max(queue_size * 4, 1000))
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=queue_size)

    def resume_filters(self) -> tuple[Filter, ...]:
        """The filters to re-send after a reconnect (``since`` moved up to what was seen)."""
        if self.last_created_at is None:
            return self.filters
        resume = max(0, self.last_created_at - self.resume_margin)
        return tuple(replace(f, since=max(f.since or 0, resume)) for f in self.filters)

    def _put(self, item: object) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.relay.stats.dropped_overflow += 1
        self._queue.put_nowait(item)

    def _deliver(self, event: Event) -> None:
        if not self._seen.add(event.id):
            self.relay.stats.duplicate_events += 1
            return
        if self.last_created_at is None or event.created_at > self.last_created_at:
            self.last_created_at = event.created_at
        self._put(event)

    def _end(self, reason: str, by_relay: bool) -> None:
        if self._ended:
            return
        self._ended = True
        self.closed_reason = reason
        self._closed_by_relay = by_relay
        self.eose.set()
        self._put(_END)

    @property
    def ended(self) -> bool:
        return self._ended

    def _raise_end(self) -> None:
        raise SubscriptionClosed(self.sub_id, self.closed_reason or "", self._closed_by_relay)

    async def get(self, timeout: float | None = None) -> Event:
        """The next event; ``TimeoutError`` after ``timeout``; :class:`SubscriptionClosed` when ended."""
        if self._ended and self._queue.empty():
            self._raise_end()
        async with asyncio.timeout(timeout):
            item = await self._queue.get()
        if item is _END:
            self._raise_end()
        assert isinstance(item, Event)
        return item

    def drain(self) -> list[Event]:
        """Every event queued right now, without waiting."""
        events: list[Event] = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is _END:
                self._queue.put_nowait(_END)
                break
            assert isinstance(item, Event)
            events.append(item)
        return events

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.get()
        except SubscriptionClosed as closed:
            if closed.by_relay:
                raise
            raise StopAsyncIteration from None

    async def close(self) -> None:
        """Send CLOSE (if connected) and end the iterator."""
        await self.relay._unsubscribe(self)


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """Exponential backoff with "equal jitter": a delay in [d/2, d], d = min(maximum, initial * 2**failures)."""
    delay = min(maximum, initial * (2 ** min(failures, 30)))
    return random.uniform(delay / 2, delay)


class Relay:
    """One relay: connect, publish, subscribe, with reconnects and NIP-42 AUTH.

    Start with :meth:`start` (returns at once; the connection is kept up in the background)
    or :meth:`connect` (waits for the first connection). ``async with Relay(url) as relay``
    connects and closes.
    """

    def __init__(
        self,
        url: str,
        *,
        private_key: PrivateKey | None = None,
        auth: bool = True,
        max_message_length: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_queue: int = 16,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        fetch_info: bool = False,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.info: RelayInfo | None = None
        self.stats = RelayStats()
        self.last_error: str | None = None
        self._key = private_key if auth else None
        self._configured_max_message_length = max_message_length
        self._max_frame = max_frame
        self._max_queue = max_queue
        self._queue_size = queue_size
        self._backoff = (backoff_initial, backoff_max)
        self._fetch_info = fetch_info
        self._ws: websockets.ClientConnection | None = None
        self._connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._attempt_failed = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[str, list[asyncio.Future[Ok]]] = {}
        """Publishes awaiting OK, by event id; each EVENT frame gets one OK, answered in order."""
        self._subs: dict[str, Subscription] = {}
        self._auth_id: str | None = None
        self._auth_done = asyncio.Event()
        self._auth_error: str | None = None

    def __repr__(self) -> str:
        return f"Relay({self.url!r}, connected={self.connected})"

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._connected.is_set()

    @property
    def max_message_length(self) -> int | None:
        """Largest frame the relay accepts: configuration first, else its NIP-11 limitation."""
        if self._configured_max_message_length is not None:
            return self._configured_max_message_length
        return self.info.limitation.max_message_length if self.info else None

    @property
    def max_content_length(self) -> int | None:
        """Largest event content the relay accepts (NIP-11), if it says."""
        return self.info.limitation.max_content_length if self.info else None

    async def start(self) -> None:
        """Begin connecting in the background (fetching NIP-11 first if asked)."""
        if self._closing:
            raise RelayUnavailable(f"{self.url}: client is closed")
        if self._task is not None:
            return
        if self._fetch_info and self.info is None:
            try:
                self.info = await fetch_relay_info(self.url, timeout=min(self.timeout, 5.0))
            except RelayInfoError as error:
                log.debug("%s: no NIP-11 document: %s", self.url, error)
        self._task = asyncio.create_task(self._run(), name=f"relay {self.url}")

    async def wait_connected(self, timeout: float | None = None, *, fail_fast: bool = False) -> None:
        """Wait until connected; :class:`RelayUnavailable` if that does not happen within ``timeout``
        (or, with ``fail_fast``, as soon as a connection attempt fails)."""
        try:
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                if fail_fast:
                    await self._until_connected()
                else:
                    await self._connected.wait()
        except TimeoutError:
            raise RelayUnavailable(f"could not connect to {self.url}: {self.last_error or 'timed out'}") from None

    async def connect(self, timeout: float | None = None) -> Relay:
        """:meth:`start` and :meth:`wait_connected`."""
        await self.start()
        await self.wait_connected(timeout)
        return self

    async def close(self) -> None:
        """Stop reconnecting, close the socket, end every subscription and pending publish."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for sub in list(self._subs.values()):
            sub._end("client closed", by_relay=False)
        self._subs.clear()
        self._notify()
        self._fail_pending(RelayUnavailable(f"{self.url}: client closed"))

    async def __aenter__(self) -> Relay:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- connection loop -------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while not self._closing:
            opened = False
            opened_at = 0.0
            try:
                async with websockets.connect(
                    self.url,
                    max_size=self._max_frame,
                    max_queue=self._max_queue,
                    open_timeout=self.timeout,
                    close_timeout=1.0,
                    ping_interval=20.0,
                    ping_timeout=20.0,
                ) as ws:
                    opened, opened_at = True, loop.time()
                    self._attempt_failed = False
                    self.stats.connections += 1
                    self._ws = ws
                    await self._on_open(ws)
                    self._connected.set()
                    self._notify()
                    log.debug("%s: connected", self.url)
                    async for frame in ws:
                        await self._on_frame(frame)
                    self.last_error = "connection closed by the relay"
            except (OSError, TimeoutError, WebSocketException) as error:
                self.last_error = str(error) or type(error).__name__
                if isinstance(error, InvalidURI):
                    self._closing = True
            finally:
                self._ws = None
                self._connected.clear()
                self._auth_done.clear()
                self._auth_id = None
                self._fail_pending(_Disconnected())
            if not opened:
                failures += 1
                self.stats.failed_connects += 1
                self._attempt_failed = True
            elif loop.time() - opened_at < STABLE_CONNECTION:
                failures += 1  # a relay that accepts and drops at once is not hammered
            else:
                failures = 0
            self._notify()
            if self._closing:
                break
            delay = backoff_delay(failures, *self._backoff)
            log.debug("%s: disconnected (%s); reconnecting in %.2fs", self.url, self.last_error, delay)
            await asyncio.sleep(delay)

    async def _on_open(self, ws: websockets.ClientConnection) -> None:
        for sub in list(self._subs.values()):
            sub._awaiting_auth = sub._auth_retried = False
            await ws.send(encode_req(sub.sub_id, sub.resume_filters()))

    def _notify(self) -> None:
        """Wake everything waiting in :meth:`_until_connected`."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _until_connected(self) -> None:
        while not self.connected:
            if self._closing:
                raise RelayUnavailable(f"{self.url}: client is closed")
            if self._attempt_failed:
                raise RelayUnavailable(f"{self.url} is unreachable: {self.last_error}")
            await self._changed.wait()

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for futures in pending.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    def _forget_pending(self, event_id: str, future: asyncio.Future[Ok]) -> None:
        futures = self._pending.get(event_id)
        if futures is not None and future in futures:
            futures.remove(future)
            if not futures:
                del self._pending[event_id]

    async def _send(self, frame: str) -> bool:
        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(frame)
        except ConnectionClosed:
            return False
        return True

    # --- incoming frames ---------------------------------------------------------------

    async def _on_frame(self, frame: str | bytes) -> None:
        try:
            message = parse_relay_message(frame, self._max_frame)
        except WireError as error:
            self.stats.bad_frames += 1
            log.debug("%s: dropped malformed frame: %s", self.url, error)
            return
        if isinstance(message, EventMessage):
            self._on_event(message)
        elif isinstance(message, Ok):
            await self._on_ok(message)
        elif isinstance(message, Eose):
            sub = self._subs.get(message.sub_id)
            if sub is not None:
                sub.eose.set()
        elif isinstance(message, Closed):
            await self._on_closed(message)
        elif isinstance(message, Notice):
            self.stats.notices += 1
            log.info("%s NOTICE: %s", self.url, message.message[:300])
        elif isinstance(message, AuthChallenge):
            await self._on_auth_challenge(message.challenge)

    def _on_event(self, message: EventMessage) -> None:
        sub = self._subs.get(message.sub_id)
        if sub is None:
            self.stats.unmatched_events += 1
            return
        try:
            event = Event.from_dict(message.event)
            event.verify()
        except NostrError as error:
            self.stats.invalid_events += 1
            log.debug("%s: dropped invalid event: %s", self.url, error)
            return
        if not any(f.matches(event) for f in sub.filters):
            self.stats.unmatched_events += 1
            log.debug("%s: dropped event %s that does not match subscription %s", self.url, event.id, sub.sub_id)
            return
        sub._deliver(event)

    async def _on_ok(self, ok: Ok) -> None:
        if ok.event_id and ok.event_id == self._auth_id:
            self._auth_error = None if ok.accepted else (ok.message or "AUTH rejected")
            self._auth_done.set()
            if ok.accepted:
                log.debug("%s: authenticated", self.url)
                for sub in list(self._subs.values()):
                    if sub._awaiting_auth:
                        sub._awaiting_auth = False
                        await self._send(encode_req(sub.sub_id, sub.resume_filters()))
            return
        waiting = self._pending.get(ok.event_id, []) if ok.event_id else [f for fs in self._pending.values() for f in fs]
        # nostr-relay 1.14 answers a rejected EVENT with an empty id; relays answer in order.
        future = next((f for f in waiting if not f.done()), None)
        if future is not None:
            future.set_result(ok)

    async def _on_closed(self, message: Closed) -> None:
        sub = self._subs.get(message.sub_id)
        if sub is None:
            return
        if message.message.startswith("auth-required:") and self._key is not None and not sub._auth_retried:
            sub._auth_retried = True
            sub._awaiting_auth = True
            if self._auth_done.is_set() and self._auth_error is None:
                sub._awaiting_auth = False
                await self._send(encode_req(sub.sub_id, sub.resume_filters()))
            return
        del self._subs[message.sub_id]
        log.info("%s closed subscription %s: %s", self.url, sub.sub_id, message.message[:300])
        sub._end(message.message, by_relay=True)

    async def _on_auth_challenge(self, challenge: str) -> None:
        if self._key is None:
            log.debug("%s: AUTH challenge ignored (no key or auth disabled)", self.url)
            return
        try:
            event = build_auth_event(self._key, self.url, challenge)
        except NostrError as error:
            log.debug("%s: cannot answer AUTH challenge: %s", self.url, error)
            return
        self._auth_id = event.id
        self._auth_error = None
        self._auth_done.clear()
        await self._send(encode_auth(event.to_dict()))

    # --- publish / subscribe -------------------------------------------------------------

    async def publish(self, event: Event, timeout: float | None = None) -> OkResult:
        """Send ``event`` and wait for the relay's OK.

        Raises :class:`PublishRejected` (OK false; ``duplicate:`` counts as accepted),
        :class:`PublishTimeout`, :class:`RelayUnavailable` or :class:`MessageTooLarge`.
        A connection lost before the OK re-sends the event after reconnecting.
        """
        frame = encode_event(event.to_dict())
        limit = self.max_message_length
        size = len(frame.encode())
        if limit is not None and size > limit:
            raise MessageTooLarge(f"event frame of {size} bytes exceeds {self.url}'s limit of {limit} bytes")
        if self._closing:
            raise RelayUnavailable(f"{self.url}: client is closed")
        await self.start()
        wait = self.timeout if timeout is None else timeout
        auth_retried = False
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(wait):
                while True:
                    await self._until_connected()
                    future: asyncio.Future[Ok] = loop.create_future()
                    self._pending.setdefault(event.id, []).append(future)
                    try:
                        if not await self._send(frame):
                            await asyncio.sleep(0.05)
                            continue
                        ok = await future
                    except _Disconnected:
                        continue
                    finally:
                        self._forget_pending(event.id, future)
                    if ok.accepted or ok.prefix == "duplicate":
                        return OkResult(self.url, event.id, True, ok.message)
                    if ok.prefix == "auth-required" and self._key is not None and not auth_retried:
                        auth_retried = True
                        await self._auth_done.wait()
                        if self._auth_error is None:
                            continue
                        raise PublishRejected(self.url, f"{ok.message} (AUTH failed: {self._auth_error})")
                    raise PublishRejected(self.url, ok.message)
        except TimeoutError:
            raise PublishTimeout(f"{self.url} did not confirm event {event.id} within {wait:g}s") from None

    async def subscribe(
        self,
        filters: Iterable[Filter],
        *,
        sub_id: str | None = None,
        queue_size: int | None = None,
        resume_margin: int = DEFAULT_RESUME_MARGIN,
    ) -> Subscription:
        """Open a subscription (sent now if connected, else on connect; re-sent on reconnect)."""
        if self._closing:
            raise RelayUnavailable(f"{self.url}: client is closed")
        chosen = tuple(filters)
        identifier = sub_id or f"cdvm-{next(_sub_counter)}-{secrets.token_hex(4)}"
        frame = encode_req(identifier, chosen)
        if identifier in self._subs:
            raise RelayError(f"subscription id {identifier!r} is already open on {self.url}")
        sub = Subscription(self, identifier, chosen, queue_size or self._queue_size, resume_margin)
        self._subs[identifier] = sub
        await self.start()
        if self._ws is not None:
            await self._send(frame)
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.get(sub.sub_id) is sub:
            del self._subs[sub.sub_id]
            if self.connected:
                await self._send(encode_close(sub.sub_id))
        sub._end("closed by client", by_relay=False)
