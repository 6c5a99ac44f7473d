"""Several relays as one: publish to every write relay, read merged and de-duplicated events.

``publish`` sends to all write relays (or given URLs) concurrently and succeeds when at least
one accepts, returning every relay's result. ``subscribe`` merges the read relays' verified
events into one bounded stream, de-duplicated by event id with an LRU of ``seen_capacity``
ids (drop-oldest on overflow, as :class:`dvm.relay.Subscription`).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType

from dvm.config import RelayConfig, RelaysConfig
from dvm.keys import PrivateKey
from dvm.nip01 import Event
from dvm.relay import (
    DEFAULT_QUEUE_SIZE,
    DEFAULT_RESUME_MARGIN,
    OkResult,
    Relay,
    RelayError,
    RelayUnavailable,
    SeenIds,
    Subscription,
    SubscriptionClosed,
)
from dvm.wire import Filter

log = logging.getLogger(__name__)


class PublishFailed(RelayError):
    """No relay accepted the event; ``results`` maps each relay URL to its error."""

    def __init__(self, event_id: str, results: dict[str, OkResult | RelayError]) -> None:
        reasons = "; ".join(f"{url}: {result}" for url, result in results.items()) or "no relay to publish to"
        super().__init__(f"no relay accepted event {event_id}: {reasons}")
        self.event_id = event_id
        self.results = results


@dataclass(frozen=True)
class PublishResult:
    """Per-relay outcome of one publish (at least one accepted, else :class:`PublishFailed`)."""

    event_id: str
    results: dict[str, OkResult | RelayError]

    @property
    def accepted(self) -> list[str]:
        return [url for url, r in self.results.items() if isinstance(r, OkResult) and r.accepted]

    @property
    def failed(self) -> dict[str, RelayError]:
        return {url: r for url, r in self.results.items() if isinstance(r, RelayError)}


@dataclass(frozen=True)
class MessageLimits:
    """The smallest limits across the write relays (``None`` where no relay states one)."""

    max_message_length: int | None
    max_content_length: int | None


_END = object()


class PoolSubscription:
    """Merged, de-duplicated events from one subscription on several relays.

    ``async for`` ends when closed locally, or raises :class:`SubscriptionClosed` when every
    relay has closed it. :meth:`wait_eose` waits until each relay sent EOSE (or closed).
    """

    def __init__(self, subs: list[Subscription], queue_size: int, seen_capacity: int) -> None:
        self.subs = subs
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=queue_size)
        self._seen = SeenIds(seen_capacity)
        self.dropped_overflow = 0
        self._closed_reasons: list[str] = []
        self._ended = False
        self._tasks = [asyncio.create_task(self._pump(sub), name=f"pump {sub.relay.url}") for sub in subs]

    def _put(self, item: object) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped_overflow += 1
        self._queue.put_nowait(item)

    async def _pump(self, sub: Subscription) -> None:
        try:
            async for event in sub:
                if self._seen.add(event.id):
                    self._put(event)
        except SubscriptionClosed as closed:
            log.warning("%s", closed)
            self._closed_reasons.append(f"{sub.relay.url}: {closed.message}")
        if all(s.ended for s in self.subs) and not self._ended:
            self._ended = True
            self._put(_END)

    async def wait_eose(self, timeout: float | None = None) -> bool:
        """``True`` once every relay sent EOSE (or ended the subscription), ``False`` on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(s.eose.wait() for s in self.subs))
        except TimeoutError:
            return False
        return True

    def _raise_end(self) -> None:
        if self._closed_reasons:
            raise SubscriptionClosed("pool", "; ".join(self._closed_reasons), by_relay=True)
        raise SubscriptionClosed("pool", "closed by client", by_relay=False)

    async def get(self, timeout: float | None = None) -> Event:
        """The next new event; ``TimeoutError`` after ``timeout``; :class:`SubscriptionClosed` when ended."""
        if self._ended and self._queue.empty():
            self._raise_end()
        async with asyncio.timeout(timeout):
            item = await self._queue.get()
        if item is _END:
            self._raise_end()
        assert isinstance(item, Event)
        return item

    def __aiter__(self) -> PoolSubscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.get()
        except SubscriptionClosed as closed:
            if closed.by_relay:
                raise
            raise StopAsyncIteration from None

    async def close(self) -> None:
        for sub in self.subs:
            await sub.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self._ended:
            self._ended = True
            self._put(_END)


class RelayPool:
    """Read/write relays from configuration; see the module docstring."""

    def __init__(
        self,
        relays: Iterable[RelayConfig],
        *,
        private_key: PrivateKey | None = None,
        fetch_info: bool = False,
        seen_capacity: int = 10_000,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self._key = private_key
        self._fetch_info = fetch_info
        self._seen_capacity = seen_capacity
        self._queue_size = queue_size
        self._backoff = (backoff_initial, backoff_max)
        self.configs: dict[str, RelayConfig] = {}
        self.relays: dict[str, Relay] = {}
        for config in relays:
            self.configs[config.url] = config
            self.relays[config.url] = self._make_relay(config)

    @classmethod
    def from_config(cls, config: RelaysConfig, **options: object) -> RelayPool:
        return cls(config.relays, **options)  # type: ignore[arg-type]

    def _make_relay(self, config: RelayConfig) -> Relay:
        return Relay(
            config.url,
            private_key=self._key,
            auth=config.auth,
            max_message_length=config.max_message_length,
            timeout=config.timeout,
            queue_size=self._queue_size,
            backoff_initial=self._backoff[0],
            backoff_max=self._backoff[1],
            fetch_info=self._fetch_info,
        )

    @property
    def read_urls(self) -> list[str]:
        return [url for url, c in self.configs.items() if c.read]

    @property
    def write_urls(self) -> list[str]:
        return [url for url, c in self.configs.items() if c.write]

    def relay(self, url: str) -> Relay:
        """The pool's relay for ``url``, adding it (all roles) if it is not configured."""
        if url not in self.relays:
            config = RelayConfig(url=url)
            self.configs[url] = config
            self.relays[url] = self._make_relay(config)
        return self.relays[url]

    async def start(self, wait: float | None = None) -> list[str]:
        """Start every relay; if ``wait`` is given, wait up to that long for them to connect
        (a relay whose first attempt fails is not waited for).

        Returns the URLs connected so far (relays that are down keep retrying in the background).
        """
        await asyncio.gather(*(r.start() for r in self.relays.values()))
        if wait:
            await asyncio.gather(*(self._try_connect(r, wait) for r in self.relays.values()))
        return [url for url, r in self.relays.items() if r.connected]

    @staticmethod
    async def _try_connect(relay: Relay, wait: float) -> None:
        try:
            await relay.wait_connected(wait, fail_fast=True)
        except RelayError as error:
            log.warning("%s", error)

    async def publish(
        self, event: Event, *, urls: Sequence[str] | None = None, timeout: float | None = None
    ) -> PublishResult:
        """Publish to ``urls`` (default: the write relays) concurrently; :class:`PublishFailed` if none accepts."""
        targets = list(dict.fromkeys(urls if urls is not None else self.write_urls))
        relays = [self.relay(url) for url in targets]
        outcomes = await asyncio.gather(*(self._publish_one(r, event, timeout) for r in relays))
        results = dict(zip(targets, outcomes, strict=True))
        result = PublishResult(event.id, results)
        if not result.accepted:
            raise PublishFailed(event.id, results)
        for url, error in result.failed.items():
            log.info("publish of %s to %s failed: %s", event.id, url, error)
        return result

    @staticmethod
    async def _publish_one(relay: Relay, event: Event, timeout: float | None) -> OkResult | RelayError:
        try:
            return await relay.publish(event, timeout)
        except RelayError as error:
            return error

    async def subscribe(
        self,
        filters: Iterable[Filter],
        *,
        urls: Sequence[str] | None = None,
        resume_margin: int = DEFAULT_RESUME_MARGIN,
    ) -> PoolSubscription:
        """Subscribe on ``urls`` (default: the read relays) and merge the results."""
        chosen = tuple(filters)
        targets = list(dict.fromkeys(urls if urls is not None else self.read_urls))
        if not targets:
            raise RelayError("no relay to read from")
        subs = [await self.relay(url).subscribe(chosen, resume_margin=resume_margin) for url in targets]
        return PoolSubscription(subs, self._queue_size, self._seen_capacity)

    async def query(
        self, filters: Iterable[Filter], *, urls: Sequence[str] | None = None, timeout: float = 5.0
    ) -> list[Event]:
        """Stored events matching ``filters``, de-duplicated: collected until every relay
        sent EOSE (or ended the subscription) or ``timeout`` passed."""
        chosen = tuple(filters)
        targets = list(dict.fromkeys(urls if urls is not None else self.read_urls))
        subs = [await self.relay(url).subscribe(chosen) for url in targets]
        try:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(self._eose_unless_down(s) for s in subs))
            except TimeoutError:
                log.debug("query timed out after %gs on %s", timeout, [s.relay.url for s in subs if not s.eose.is_set()])
            seen = SeenIds(self._seen_capacity)
            return [event for sub in subs for event in sub.drain() if seen.add(event.id)]
        finally:
            for sub in subs:
                await sub.close()

    @staticmethod
    async def _eose_unless_down(sub: Subscription) -> None:
        """Wait for EOSE, but not on a relay whose connection attempt failed."""
        try:
            await sub.relay.wait_connected(fail_fast=True)
        except RelayUnavailable:
            return
        await sub.eose.wait()

    def limits(self) -> MessageLimits:
        """Smallest ``max_message_length`` / ``max_content_length`` across the write relays."""
        writers = [self.relays[url] for url in self.write_urls]
        messages = [r.max_message_length for r in writers if r.max_message_length is not None]
        contents = [r.max_content_length for r in writers if r.max_content_length is not None]
        return MessageLimits(min(messages, default=None), min(contents, default=None))

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in self.relays.values()))

    async def __aenter__(self) -> RelayPool:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
