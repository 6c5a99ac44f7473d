"""dvm.nip17: the spec's DM, building and opening DMs, and kind-10050 relay lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvm import nip17, nip44, nip59
from dvm.keys import PrivateKey
from dvm.nip01 import Event, make_rumor, sign_event
from dvm.nostr_errors import Nip17Error, Nip59Error

ALICE = PrivateKey.from_hex("7" * 64)
BOB = PrivateKey.from_hex("8" * 64)
NOW = 1_700_000_000


def test_spec_example_opens(vectors: Path) -> None:
    data = json.loads((vectors / "nostr" / "nip17-example.json").read_text())
    recipient = PrivateKey.from_nsec_or_hex(data["recipient_nsec"])
    assert recipient.secret_hex() == data["recipient_secret_key_hex"]
    dm = nip17.open_dm(recipient, Event.from_dict(data["gift_wrap"]))
    expected = data["expected_rumor"]
    assert dm.sender.hex() == data["expected_seal_pubkey"]
    assert dm.kind == 14
    assert dm.content == "Hola, que tal?"
    assert dm.rumor_id == expected["id"]
    assert dm.created_at == expected["created_at"]
    assert [r.hex() for r in dm.recipients] == [expected["tags"][0][1]]


def test_build_and_open_both_copies() -> None:
    wraps = nip17.build_dm(ALICE, BOB.public_key, "secret ✉", subject="job 42", tags=[["e", "ab" * 32]], now=NOW)
    assert len(wraps) == 2
    assert wraps[0].tag_values("p") == [BOB.public_key.hex()]
    assert wraps[1].tag_values("p") == [ALICE.public_key.hex()]
    to_bob = nip17.open_dm(BOB, wraps[0])
    own_copy = nip17.open_dm(ALICE, wraps[1])
    assert to_bob == own_copy
    assert to_bob.sender == ALICE.public_key
    assert to_bob.recipients == (BOB.public_key,)
    assert to_bob.content == "secret ✉"
    assert to_bob.subject == "job 42"
    assert to_bob.created_at == NOW
    assert ("e", "ab" * 32) in to_bob.tags
    assert "secret" not in repr(to_bob)
    with pytest.raises(Nip59Error):
        nip17.open_dm(BOB, wraps[1])


def test_single_copy_and_note_to_self() -> None:
    assert len(nip17.build_dm(ALICE, BOB.public_key, "x", include_sender_copy=False)) == 1
    (to_self,) = nip17.build_dm(ALICE, ALICE.public_key, "note to self")
    note = nip17.open_dm(ALICE, to_self)
    assert note.recipients == (ALICE.public_key,)
    assert note.subject is None


def test_non_dm_rumor_is_refused() -> None:
    wrap = nip59.gift_wrap(ALICE, make_rumor(ALICE.public_key, 1, "note"), BOB.public_key)
    with pytest.raises(Nip17Error, match="not a direct message"):
        nip17.open_dm(BOB, wrap)


def test_bad_p_tag_is_refused() -> None:
    rumor = make_rumor(ALICE.public_key, 14, "x", [["p", "not-a-key"]])
    with pytest.raises(Nip17Error, match="'p' tag"):
        nip17.open_dm(BOB, nip59.gift_wrap(ALICE, rumor, BOB.public_key))


def test_file_message_kind_15_opens() -> None:
    rumor = make_rumor(ALICE.public_key, 15, "https://files.example/x.bin", [["p", BOB.public_key.hex()]])
    assert nip17.open_dm(BOB, nip59.gift_wrap(ALICE, rumor, BOB.public_key)).kind == 15


def test_dm_relay_list() -> None:
    relays = ["wss://inbox.example", "ws://127.0.0.1:7447"]
    event = nip17.dm_relay_list(ALICE, relays, now=NOW)
    event.verify()
    assert event.kind == 10050
    assert event.tags == (("relay", relays[0]), ("relay", relays[1]))
    assert nip17.parse_dm_relay_list(event) == relays
    with pytest.raises(Nip17Error, match="ws://"):
        nip17.dm_relay_list(ALICE, ["https://nope.example"])
    junk = sign_event(
        ALICE,
        10050,
        "",
        [
            ["relay", "wss://a.example"],
            ["relay", "https://b"],
            ["relay", "wss://a.example"],
            ["relay", "wss://[x"],
            ["relay"],
        ],
    )
    assert nip17.parse_dm_relay_list(junk) == ["wss://a.example"]
    with pytest.raises(Nip17Error, match="10050"):
        nip17.parse_dm_relay_list(sign_event(ALICE, 10002, "", [["r", "wss://a.example"]]))


def test_wrap_content_is_nip44() -> None:
    wrap = nip17.build_dm(ALICE, BOB.public_key, "x")[0]
    assert nip44.looks_like_nip44(wrap.content)
