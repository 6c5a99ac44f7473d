"""One relay connection against real relays on loopback: nostr-relay 1.14, and scripted
websockets servers that misbehave on purpose (malformed frames, forged events, floods,
oversized frames, AUTH, CLOSED)."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from dvm.keys import PrivateKey
from dvm.localrelay import LocalRelay
from dvm.nip01 import Event, sign_event
from dvm.nip42 import AUTH_KIND, verify_auth_event
from dvm.relay import (
    MessageTooLarge,
    PublishRejected,
    PublishTimeout,
    Relay,
    RelayUnavailable,
    SeenIds,
    SubscriptionClosed,
    backoff_delay,
)
from dvm.wire import Filter

KEY = PrivateKey.generate()
ME = KEY.public_key.hex()

Handler = Callable[[ServerConnection], Awaitable[None]]


@asynccontextmanager
async def scripted_relay(handler: Handler, nip11: dict | None = None) -> AsyncIterator[str]:
    """A raw websockets server on loopback running ``handler`` per connection; yields its URL."""

    def process_request(connection: ServerConnection, request):  # type: ignore[no-untyped-def]
        if nip11 is not None and request.headers.get("Accept") == "application/nostr+json":
            return connection.respond(HTTPStatus.OK, json.dumps(nip11))
        return None

    async def guarded(connection: ServerConnection) -> None:
        try:
            await handler(connection)
        except ConnectionClosed:
            pass

    async with serve(guarded, "127.0.0.1", 0, process_request=process_request, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


async def next_req(ws: ServerConnection) -> list:
    """The next REQ the client sends (other messages are skipped)."""
    while True:
        message = json.loads(await ws.recv())
        if message[0] == "REQ":
            return message


# --- against nostr-relay ----------------------------------------------------------------


async def test_publish_ok_eose_and_live_events(relay: LocalRelay) -> None:
    stored = sign_event(KEY, 1, "stored")
    async with Relay(relay.url, timeout=5) as client:
        ok = await client.publish(stored)
        assert ok.accepted and ok.event_id == stored.id and ok.relay_url == relay.url
        again = await client.publish(stored)
        assert again.accepted and again.message.startswith("duplicate:")
        sub = await client.subscribe([Filter(authors=[ME], kinds=[1])])
        assert (await sub.get(timeout=5)) == stored
        await asyncio.wait_for(sub.eose.wait(), 5)
        live = sign_event(KEY, 1, "live")
        await client.publish(live)
        assert (await sub.get(timeout=5)) == live
        await sub.close()
        with pytest.raises(SubscriptionClosed):
            await sub.get(timeout=1)
        assert [e async for e in sub] == []


async def test_concurrent_publishes_of_one_event_each_get_their_ok(relay: LocalRelay) -> None:
    event = sign_event(KEY, 1, "twice at once")
    async with Relay(relay.url, timeout=5) as client:
        results = await asyncio.gather(client.publish(event), client.publish(event), client.publish(event))
    assert all(result.accepted and result.event_id == event.id for result in results)


async def test_rejected_publish_carries_relay_message(relay: LocalRelay) -> None:
    good = sign_event(KEY, 1, "x")
    forged = Event(good.id, good.pubkey, good.created_at, good.kind, good.tags, good.content, "00" * 64)
    async with Relay(relay.url, timeout=5) as client:
        with pytest.raises(PublishRejected) as info:
            await client.publish(forged)
        assert "invalid" in info.value.message  # nostr-relay answers with an empty id: matched in order
        assert client.connected


async def test_notice_is_counted(relay_factory: Callable[..., Awaitable[LocalRelay]]) -> None:
    local = await relay_factory(subscription_limit=1)
    async with Relay(local.url, timeout=5) as client:
        first = await client.subscribe([Filter(kinds=[1])])
        await asyncio.wait_for(first.eose.wait(), 5)
        await client.subscribe([Filter(kinds=[2])])
        async with asyncio.timeout(5):
            while client.stats.notices == 0:
                await asyncio.sleep(0.02)


async def test_reconnect_resubscribes_and_gets_missed_events(relay: LocalRelay) -> None:
    before = sign_event(KEY, 1, "before the crash")
    async with Relay(relay.url, timeout=5, backoff_initial=2.0, backoff_max=2.0) as client:
        sub = await client.subscribe([Filter(authors=[ME], kinds=[1])])
        await client.publish(before)
        assert (await sub.get(timeout=5)) == before
        await relay.akill()
        await relay.astart()
        assert client.stats.connections == 1 and not client.connected
        missed = sign_event(KEY, 1, "published while the client was away")
        async with Relay(relay.url, timeout=5) as other:
            await other.publish(missed)
        assert client.stats.connections == 1  # still in backoff: this event was missed live
        assert (await sub.get(timeout=15)) == missed
        assert client.stats.connections == 2
        async with asyncio.timeout(5):  # "before" comes again (since margin) and is dropped as a duplicate
            while client.stats.duplicate_events == 0:
                await asyncio.sleep(0.02)
        assert sub.drain() == []
        assert (await client.publish(sign_event(KEY, 1, "after"))).accepted


async def test_publish_to_a_dead_relay_fails_fast(unused_tcp_port: int) -> None:
    client = Relay(f"ws://127.0.0.1:{unused_tcp_port}", timeout=10, backoff_initial=0.05)
    started = time.monotonic()
    with pytest.raises(RelayUnavailable, match="unreachable"):
        await client.publish(sign_event(KEY, 1, "x"))
    assert time.monotonic() - started < 5
    with pytest.raises(RelayUnavailable):
        await client.wait_connected(0.3)
    assert client.stats.failed_connects >= 1
    await client.close()
    with pytest.raises(RelayUnavailable, match="closed"):
        await client.publish(sign_event(KEY, 1, "x"))


async def test_close_ends_subscriptions(relay: LocalRelay) -> None:
    client = await Relay(relay.url, timeout=5).connect()
    sub = await client.subscribe([Filter(kinds=[1])])
    await client.close()
    assert [e async for e in sub] == []
    with pytest.raises(RelayUnavailable):
        await client.subscribe([Filter(kinds=[1])])


async def test_outbound_size_limit_from_config(relay: LocalRelay) -> None:
    async with Relay(relay.url, timeout=5, max_message_length=1000) as client:
        with pytest.raises(MessageTooLarge, match="1000"):
            await client.publish(sign_event(KEY, 1, "x" * 2000))
        assert (await client.publish(sign_event(KEY, 1, "small"))).accepted


async def test_large_event_accepted_by_local_relay(relay: LocalRelay) -> None:
    big = sign_event(KEY, 1059, "y" * (600 * 1024), tags=[["p", ME]], created_at=int(time.time()) - 2 * 86400)
    async with Relay(relay.url, timeout=10) as client:
        assert (await client.publish(big)).accepted
        sub = await client.subscribe([Filter(ids=[big.id])])
        assert (await sub.get(timeout=10)).id == big.id


# --- against scripted relays ------------------------------------------------------------


async def test_hostile_frames_are_dropped_and_counted() -> None:
    good = sign_event(KEY, 1, "good")
    other_kind = sign_event(KEY, 7, "does not match the filter")
    bad_sig = {**good.to_dict(), "sig": "11" * 64}
    wrong_id = {**good.to_dict(), "content": "tampered"}

    async def handler(ws: ServerConnection) -> None:
        sub_id = (await next_req(ws))[1]
        for frame in [
            "not json",
            "[]",
            '{"EVENT": 1}',
            '["EVENT"]',
            '["WHATEVER", 1]',
            json.dumps(["OK", "zz", True, ""]),
            json.dumps(["OK", "ab" * 32, True, "nobody waits for this"]),
            json.dumps(["EVENT", sub_id, {"id": "x"}]),
            json.dumps(["EVENT", sub_id, bad_sig]),
            json.dumps(["EVENT", sub_id, wrong_id]),
            json.dumps(["EVENT", sub_id, other_kind.to_dict()]),
            json.dumps(["EVENT", "unknown-sub", good.to_dict()]),
            b"\xff\x00binary",
            json.dumps(["EVENT", sub_id, good.to_dict()]),
            json.dumps(["EVENT", sub_id, good.to_dict()]),
            json.dumps(["EOSE", sub_id]),
        ]:
            await ws.send(frame)
        await ws.wait_closed()

    async with scripted_relay(handler) as url, Relay(url, timeout=5) as client:
        sub = await client.subscribe([Filter(kinds=[1])])
        assert (await sub.get(timeout=5)) == good
        await asyncio.wait_for(sub.eose.wait(), 5)
        with pytest.raises(TimeoutError):
            await sub.get(timeout=0.2)
        stats = client.stats
        assert stats.bad_frames == 7
        assert stats.invalid_events == 3
        assert stats.unmatched_events == 2
        assert stats.duplicate_events == 1
        assert client.connected and stats.connections == 1


async def test_oversized_frame_drops_connection_then_recovers() -> None:
    event = sign_event(KEY, 1, "after reconnect")
    connections = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        sub_id = (await next_req(ws))[1]
        if connections == 1:
            await ws.send(json.dumps(["NOTICE", "x" * 50_000]))
        else:
            await ws.send(json.dumps(["EVENT", sub_id, event.to_dict()]))
        await ws.wait_closed()

    async with scripted_relay(handler) as url, Relay(url, timeout=5, max_frame=20_000, backoff_initial=0.05) as client:
        sub = await client.subscribe([Filter(kinds=[1])])
        assert (await sub.get(timeout=5)) == event
        assert client.stats.connections == 2


async def test_flood_is_bounded_drop_oldest() -> None:
    events = [sign_event(KEY, 1, f"n{i}", created_at=1_700_000_000 + i) for i in range(600)]

    async def handler(ws: ServerConnection) -> None:
        sub_id = (await next_req(ws))[1]
        for event in events:
            await ws.send(json.dumps(["EVENT", sub_id, event.to_dict()]))
        await ws.send(json.dumps(["EOSE", sub_id]))
        await ws.wait_closed()

    async with scripted_relay(handler) as url, Relay(url, timeout=5, queue_size=50) as client:
        sub = await client.subscribe([Filter(kinds=[1])])
        await asyncio.wait_for(sub.eose.wait(), 20)
        received = sub.drain()
        assert len(received) == 50
        assert received == events[-50:]  # the oldest were dropped
        assert client.stats.dropped_overflow == 550


async def test_closed_by_relay_ends_subscription() -> None:
    async def handler(ws: ServerConnection) -> None:
        sub_id = (await next_req(ws))[1]
        await ws.send(json.dumps(["CLOSED", sub_id, "error: shutting down this query"]))
        await ws.wait_closed()

    async with scripted_relay(handler) as url, Relay(url, timeout=5) as client:
        sub = await client.subscribe([Filter(kinds=[1])])
        with pytest.raises(SubscriptionClosed, match="shutting down") as info:
            async for _ in sub:
                pass
        assert info.value.by_relay and sub.ended


async def test_publish_timeout_when_relay_never_answers() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with scripted_relay(handler) as url, Relay(url, timeout=5) as client:
        with pytest.raises(PublishTimeout, match="did not confirm"):
            await client.publish(sign_event(KEY, 1, "x"), timeout=0.3)


async def test_publish_resent_after_connection_drop() -> None:
    event = sign_event(KEY, 1, "resend me")
    attempts = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal attempts
        async for frame in ws:
            message = json.loads(frame)
            if message[0] == "EVENT":
                attempts += 1
                if attempts == 1:
                    return  # drop the connection without answering
                await ws.send(json.dumps(["OK", message[1]["id"], True, ""]))

    async with scripted_relay(handler) as url, Relay(url, timeout=5, backoff_initial=0.05) as client:
        assert (await client.publish(event)).accepted
        assert attempts == 2


async def test_auth_challenge_answered_and_publish_retried() -> None:
    """The relay demands NIP-42 AUTH for EVENT and REQ; it checks our kind 22242 event."""
    challenge = "challenge-123"
    stored = sign_event(KEY, 1, "for authenticated readers")
    seen_auth: list[Event] = []

    async def handler(ws: ServerConnection) -> None:
        url = f"ws://127.0.0.1:{ws.local_address[1]}"
        authed = False
        async for frame in ws:
            message = json.loads(frame)
            if message[0] == "AUTH":
                event = Event.from_dict(message[1])
                verify_auth_event(event, url, challenge, int(time.time()))
                seen_auth.append(event)
                authed = True
                await ws.send(json.dumps(["OK", event.id, True, ""]))
            elif message[0] == "EVENT":
                if authed:
                    await ws.send(json.dumps(["OK", message[1]["id"], True, ""]))
                else:
                    await ws.send(json.dumps(["OK", message[1]["id"], False, "auth-required: who are you"]))
                    await ws.send(json.dumps(["AUTH", challenge]))
            elif message[0] == "REQ":
                if authed:
                    await ws.send(json.dumps(["EVENT", message[1], stored.to_dict()]))
                    await ws.send(json.dumps(["EOSE", message[1]]))
                else:
                    await ws.send(json.dumps(["CLOSED", message[1], "auth-required: sign in first"]))

    async with scripted_relay(handler) as url:
        async with Relay(url, private_key=KEY, timeout=5) as client:
            sub = await client.subscribe([Filter(kinds=[1])])
            ok = await client.publish(sign_event(KEY, 1, "needs auth"))
            assert ok.accepted
            assert (await sub.get(timeout=5)) == stored
        assert len(seen_auth) == 1 and seen_auth[0].kind == AUTH_KIND and seen_auth[0].pubkey == ME

        async with Relay(url, timeout=5) as anonymous:  # no key: the rejection is reported
            with pytest.raises(PublishRejected, match="auth-required"):
                await anonymous.publish(sign_event(KEY, 1, "x"))


async def test_nip11_limit_applies_to_publish() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    info = {"name": "tiny", "limitation": {"max_message_length": 700, "max_content_length": 100}}
    async with scripted_relay(handler, nip11=info) as url:
        async with Relay(url, timeout=5, fetch_info=True) as client:
            assert client.info is not None and client.info.name == "tiny"
            assert client.max_message_length == 700 and client.max_content_length == 100
            with pytest.raises(MessageTooLarge):
                await client.publish(sign_event(KEY, 1, "z" * 800))
        async with Relay(url, timeout=5, fetch_info=True, max_message_length=5000) as client:
            assert client.max_message_length == 5000  # configuration wins


def test_backoff_is_capped_with_jitter() -> None:
    delays = [backoff_delay(n, 0.5, 8.0) for n in range(12)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert all(4.0 <= d for d in delays[5:])
    assert backoff_delay(1000, 0.5, 8.0) <= 8.0


def test_seen_ids_lru() -> None:
    seen = SeenIds(3)
    assert [seen.add(x) for x in "abca"] == [True, True, True, False]
    assert seen.add("d") and len(seen) == 3
    assert seen.add("b")  # "b" was the least recently used and fell out


async def test_accept_and_drop_relay_is_not_hammered() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.close()

    async with scripted_relay(handler) as url:
        client = Relay(url, timeout=5, backoff_initial=0.1, backoff_max=10.0)
        await client.start()
        await asyncio.sleep(1.5)
        await client.close()
        assert 2 <= client.stats.connections <= 6  # backoff grows: 0.1-0.2, 0.2-0.4, 0.4-0.8, ...
