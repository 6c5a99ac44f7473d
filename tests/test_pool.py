"""RelayPool against two real nostr-relay processes on loopback."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from dvm.config import RelayConfig, relays_from_urls
from dvm.keys import PrivateKey
from dvm.localrelay import LocalRelay
from dvm.nip01 import sign_event
from dvm.pool import PublishFailed, RelayPool
from dvm.relay import OkResult, Relay, RelayError, RelayUnavailable
from dvm.wire import Filter

KEY = PrivateKey.generate()
ME = KEY.public_key.hex()
Factory = Callable[..., Awaitable[LocalRelay]]


async def test_publish_everywhere_and_deduplicate(relay_factory: Factory) -> None:
    one, two = await relay_factory(), await relay_factory()
    async with RelayPool(relays_from_urls([one.url, two.url]).relays) as pool:
        sub = await pool.subscribe([Filter(authors=[ME], kinds=[1])])
        assert await sub.wait_eose(5)
        event = sign_event(KEY, 1, "to both")
        result = await pool.publish(event)
        assert sorted(result.accepted) == sorted([one.url, two.url]) and not result.failed
        assert (await sub.get(timeout=5)) == event
        with pytest.raises(TimeoutError):
            await sub.get(timeout=0.5)  # the second relay's copy was de-duplicated
        only_two = sign_event(KEY, 1, "only on the second relay")
        await pool.publish(only_two, urls=[two.url])
        assert (await sub.get(timeout=5)) == only_two
        stored = await pool.query([Filter(authors=[ME])], timeout=5)
        assert sorted(e.id for e in stored) == sorted([event.id, only_two.id])
        await sub.close()
        assert [e async for e in sub] == []


async def test_publish_succeeds_with_one_relay_down(relay: LocalRelay, unused_tcp_port: int) -> None:
    dead = f"ws://127.0.0.1:{unused_tcp_port}"
    configs = [RelayConfig(relay.url, timeout=5), RelayConfig(dead, timeout=5)]
    async with RelayPool(configs, backoff_initial=0.05) as pool:
        assert await pool.start(wait=5) == [relay.url]
        result = await pool.publish(sign_event(KEY, 1, "x"))
        assert result.accepted == [relay.url]
        assert isinstance(result.results[relay.url], OkResult)
        assert isinstance(result.failed[dead], RelayUnavailable)


async def test_publish_fails_when_no_relay_accepts(unused_tcp_port: int) -> None:
    async with RelayPool([RelayConfig(f"ws://127.0.0.1:{unused_tcp_port}", timeout=3)], backoff_initial=0.05) as pool:
        with pytest.raises(PublishFailed, match="no relay accepted") as info:
            await pool.publish(sign_event(KEY, 1, "x"))
        assert list(info.value.results) == [f"ws://127.0.0.1:{unused_tcp_port}"]
    async with RelayPool([]) as empty:
        with pytest.raises(PublishFailed):
            await empty.publish(sign_event(KEY, 1, "x"))
        with pytest.raises(RelayError):
            await empty.subscribe([Filter()])


async def test_roles_and_limits(relay_factory: Factory) -> None:
    reader, writer = await relay_factory(), await relay_factory()
    configs = [
        RelayConfig(reader.url, read=True, write=False),
        RelayConfig(writer.url, read=False, write=True, max_message_length=70_000),
    ]
    async with RelayPool(configs) as pool:
        assert pool.read_urls == [reader.url] and pool.write_urls == [writer.url]
        assert pool.limits().max_message_length == 70_000
        assert pool.limits().max_content_length is None
        event = sign_event(KEY, 1, "written to the writer only")
        assert (await pool.publish(event)).accepted == [writer.url]
        assert await pool.query([Filter(ids=[event.id])], timeout=5) == []
        async with Relay(writer.url) as direct:
            sub = await direct.subscribe([Filter(ids=[event.id])])
            assert (await sub.get(timeout=5)) == event


async def test_pool_subscription_survives_one_relay_restart(relay_factory: Factory) -> None:
    one, two = await relay_factory(), await relay_factory()
    async with RelayPool(relays_from_urls([one.url, two.url]).relays, backoff_initial=0.1, backoff_max=0.5) as pool:
        sub = await pool.subscribe([Filter(authors=[ME], kinds=[1])])
        assert await sub.wait_eose(5)
        await one.arestart()
        event = sign_event(KEY, 1, "after restart")
        async with asyncio.timeout(10):
            while not pool.relays[one.url].connected:
                await asyncio.sleep(0.05)
        result = await pool.publish(event)
        assert sorted(result.accepted) == sorted([one.url, two.url])
        assert (await sub.get(timeout=5)) == event
