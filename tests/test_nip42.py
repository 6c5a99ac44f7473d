"""dvm.nip42: building AUTH events and checking them the way a relay does."""

from __future__ import annotations

import pytest

from dvm import nip42
from dvm.keys import PrivateKey
from dvm.nip01 import Event, sign_event
from dvm.nostr_errors import Nip42Error

KEY = PrivateKey.from_hex("4" * 64)
NOW = 1_700_000_000
URL = "wss://relay.example.com/"


def test_build_and_verify() -> None:
    event = nip42.build_auth_event(KEY, URL, "challenge-123", now=NOW)
    assert event.kind == nip42.AUTH_KIND == 22242
    assert event.content == ""
    assert event.tag_values("relay") == [URL]
    assert event.tag_values("challenge") == ["challenge-123"]
    nip42.verify_auth_event(event, URL, "challenge-123", NOW + 30)
    nip42.verify_auth_event(event, URL, "challenge-123", NOW - 600)


@pytest.mark.parametrize("url", ["wss://relay.example.com", "WSS://Relay.Example.com/", "wss://relay.example.com:443"])
def test_equivalent_urls_match(url: str) -> None:
    event = nip42.build_auth_event(KEY, URL, "c", now=NOW)
    nip42.verify_auth_event(event, url, "c", NOW)


@pytest.mark.parametrize(
    ("relay", "challenge", "now", "message"),
    [
        ("wss://other.example.com", "c", NOW, "relay"),
        ("wss://relay.example.com:444", "c", NOW, "relay"),
        ("ws://relay.example.com", "c", NOW, "relay"),
        ("wss://relay.example.com/sub", "c", NOW, "relay"),
        (URL, "d", NOW, "challenge"),
        (URL, "c", NOW + 601, "created_at"),
        (URL, "c", NOW - 601, "created_at"),
        ("wss://[bad", "c", NOW, "malformed"),
    ],
)
def test_mismatches(relay: str, challenge: str, now: int, message: str) -> None:
    event = nip42.build_auth_event(KEY, URL, "c", now=NOW)
    with pytest.raises(Nip42Error, match=message):
        nip42.verify_auth_event(event, relay, challenge, now)


def test_wrong_kind_missing_tags_and_forgery() -> None:
    with pytest.raises(Nip42Error, match="kind"):
        nip42.verify_auth_event(sign_event(KEY, 1, "", [["relay", URL], ["challenge", "c"]], NOW), URL, "c", NOW)
    with pytest.raises(Nip42Error, match="challenge"):
        nip42.verify_auth_event(sign_event(KEY, 22242, "", [["relay", URL]], NOW), URL, "c", NOW)
    with pytest.raises(Nip42Error, match="relay"):
        nip42.verify_auth_event(sign_event(KEY, 22242, "", [["challenge", "c"]], NOW), URL, "c", NOW)
    event = nip42.build_auth_event(KEY, URL, "c", now=NOW)
    forged = Event.from_dict({**event.to_dict(), "sig": "00" * 64})
    with pytest.raises(Nip42Error, match="not authentic"):
        nip42.verify_auth_event(forged, URL, "c", NOW)
    with pytest.raises(Nip42Error):
        nip42.build_auth_event(KEY, None, "c")  # type: ignore[arg-type]
