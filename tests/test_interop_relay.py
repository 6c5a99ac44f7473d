"""Interop with rust-nostr (nostr-sdk 0.45): its in-process relay as a second relay
implementation, and its client reading what our client wrote (and the reverse)."""
from __future__ import annotations

import asyncio
import datetime
import inspect
from collections.abc import AsyncIterator

import pytest

from dvm import nip17
from dvm.config import relays_from_urls
from dvm.keys import PrivateKey, PublicKey
from dvm.localrelay import LocalRelay, free_port
from dvm.nip01 import sign_event
from dvm.pool import RelayPool
from dvm.relay import PublishRejected, Relay
from dvm.wire import Filter

ns = pytest.importorskip("nostr_sdk")

KEY = PrivateKey.generate()
ME = KEY.public_key.hex()
SECONDS = datetime.timedelta(seconds=5)


@pytest.fixture
async def sdk_relay() -> AsyncIterator[str]:
    """rust-nostr's LocalRelay on a loopback port (in this process, on its own runtime)."""
    port = free_port()
    relay = ns.LocalRelayBuilder().addr("127.0.0.1").port(port).build()
    await relay.run()
    yield f"ws://127.0.0.1:{port}"
    stopped = relay.shutdown()
    if inspect.isawaitable(stopped):
        await stopped


async def sdk_client(url: str):  # type: ignore[no-untyped-def]
    client = ns.Client()
    await client.add_relay(ns.RelayUrl.parse(url))
    await client.connect(SECONDS)
    return client


async def sdk_fetch(client, url: str, sdk_filter) -> list:  # type: ignore[no-untyped-def]
    return await client.fetch_events(ns.ReqTarget.single(ns.RelayUrl.parse(url), [sdk_filter]), SECONDS)


async def test_our_client_on_the_rust_relay(sdk_relay: str) -> None:
    async with Relay(sdk_relay, timeout=5) as client:
        stored = sign_event(KEY, 1, "stored on rust-nostr")
        assert (await client.publish(stored)).accepted
        sub = await client.subscribe([Filter(authors=[ME], kinds=[1])])
        assert (await sub.get(timeout=5)) == stored
        await asyncio.wait_for(sub.eose.wait(), 5)
        live = sign_event(KEY, 1, "live")
        assert (await client.publish(live)).accepted
        assert (await sub.get(timeout=5)) == live
        good = sign_event(KEY, 1, "x")
        forged = type(good)(good.id, good.pubkey, good.created_at, good.kind, good.tags, good.content, "00" * 64)
        with pytest.raises(PublishRejected):
            await client.publish(forged)


async def test_rust_client_reads_our_events(sdk_relay: str) -> None:
    event = sign_event(KEY, 1, "read me, rust", tags=[["t", "cdvm"]])
    async with Relay(sdk_relay, timeout=5) as client:
        await client.publish(event)
    rust = await sdk_client(sdk_relay)
    try:
        found = await sdk_fetch(rust, sdk_relay, ns.Filter().author(ns.PublicKey.parse(ME)))
        assert [e.id().to_hex() for e in found] == [event.id]
        assert found[0].verify() and found[0].content() == "read me, rust"
    finally:
        await rust.shutdown()


async def test_pool_across_two_implementations(sdk_relay: str, relay: LocalRelay) -> None:
    async with RelayPool(relays_from_urls([sdk_relay, relay.url]).relays) as pool:
        sub = await pool.subscribe([Filter(authors=[ME])])
        assert await sub.wait_eose(5)
        event = sign_event(KEY, 1, "on both relays")
        assert sorted((await pool.publish(event)).accepted) == sorted([sdk_relay, relay.url])
        assert (await sub.get(timeout=5)) == event
        with pytest.raises(TimeoutError):
            await sub.get(timeout=0.5)


async def test_rust_gift_wrap_opens_with_our_code(sdk_relay: str) -> None:
    rust_keys = ns.Keys.generate()
    rust = await sdk_client(sdk_relay)
    try:
        wrap = ns.nip17_make_private_msg(rust_keys, ns.PublicKey.parse(ME), "hello from rust")
        await rust.send_event(wrap)
    finally:
        await rust.shutdown()
    async with Relay(sdk_relay, timeout=5) as client:
        sub = await client.subscribe([Filter(kinds=[1059], tags={"p": [ME]})])
        message = nip17.open_dm(KEY, await sub.get(timeout=5))
    assert message.content == "hello from rust"
    assert message.sender == PublicKey.from_hex(rust_keys.public_key().to_hex())
