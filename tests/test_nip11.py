"""NIP-11 relay information: parsing, and fetching over real HTTP on loopback."""
from __future__ import annotations

import json

import pytest
from aiohttp import web

from dvm.localrelay import LocalRelay
from dvm.nip11 import RelayInfo, RelayInfoError, fetch_relay_info, info_url

DOCUMENT = {
    "name": "test",
    "description": "a relay",
    "pubkey": "ab" * 32,
    "supported_nips": [1, 11, 42, "x", True],
    "software": "git+https://example.invalid",
    "version": "1.0",
    "limitation": {
        "max_message_length": 65536,
        "max_content_length": 8196,
        "max_subscriptions": 20,
        "auth_required": True,
        "payment_required": "no",
        "max_limit": -5,
    },
}


def test_parse_document() -> None:
    info = RelayInfo.from_dict(DOCUMENT)
    assert info.name == "test"
    assert info.supported_nips == (1, 11, 42)
    assert info.limitation.max_message_length == 65536
    assert info.limitation.max_content_length == 8196
    assert info.limitation.max_subscriptions == 20
    assert info.limitation.auth_required is True
    assert info.limitation.payment_required is None  # wrong type: treated as absent
    assert info.limitation.max_limit is None


@pytest.mark.parametrize("document", [{}, {"limitation": []}, {"name": 5, "supported_nips": "1"}])
def test_lenient_fields(document: dict) -> None:
    info = RelayInfo.from_dict(document)
    assert info.limitation.max_message_length is None


@pytest.mark.parametrize("text", ["[]", "nope", "null", '"s"', "{" * 10_000])
def test_not_an_object(text: str) -> None:
    with pytest.raises(RelayInfoError):
        RelayInfo.from_json(text)


def test_info_url() -> None:
    assert info_url("wss://relay.example/path") == "https://relay.example/path"
    assert info_url("ws://127.0.0.1:7000") == "http://127.0.0.1:7000"
    with pytest.raises(RelayInfoError):
        info_url("https://relay.example")


@pytest.fixture
async def http_server(unused_tcp_port: int):
    """A small aiohttp server: NIP-11 only for the right Accept header."""
    seen_accept: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen_accept.append(request.headers.get("Accept", ""))
        if request.path == "/garbage":
            return web.Response(text="<html>", content_type="application/nostr+json")
        if request.path == "/missing":
            return web.Response(status=404)
        if request.path == "/huge":
            return web.Response(body=b" " * (300 * 1024))
        if request.headers.get("Accept") != "application/nostr+json":
            return web.Response(text="use a nostr client")
        return web.Response(text=json.dumps(DOCUMENT), content_type="application/nostr+json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port)
    await site.start()
    yield f"ws://127.0.0.1:{unused_tcp_port}", seen_accept
    await runner.cleanup()


async def test_fetch_from_http_server(http_server) -> None:
    url, seen_accept = http_server
    info = await fetch_relay_info(url, timeout=5)
    assert info.limitation.max_message_length == 65536
    assert seen_accept == ["application/nostr+json"]


@pytest.mark.parametrize("path", ["/garbage", "/missing", "/huge"])
async def test_fetch_failures_are_typed(http_server, path: str) -> None:
    url, _ = http_server
    with pytest.raises(RelayInfoError):
        await fetch_relay_info(url + path, timeout=5)


async def test_fetch_connection_refused(unused_tcp_port: int) -> None:
    with pytest.raises(RelayInfoError, match="could not fetch"):
        await fetch_relay_info(f"ws://127.0.0.1:{unused_tcp_port}", timeout=2)


async def test_fetch_from_nostr_relay(relay: LocalRelay) -> None:
    info = await fetch_relay_info(relay.url, timeout=5)
    assert info.name == "cdvm loopback relay"
    assert 11 in info.supported_nips
    assert info.limitation.max_message_length is None
