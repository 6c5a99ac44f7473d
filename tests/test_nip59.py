"""dvm.nip59: the spec's gift wrap, round trips, timestamps, and every layer's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvm import nip44, nip59
from dvm.keys import PrivateKey, PublicKey
from dvm.nip01 import Event, Rumor, make_rumor, sign_event
from dvm.nostr_errors import Nip59Error, NostrError

ALICE = PrivateKey.from_hex("5" * 64)
BOB = PrivateKey.from_hex("6" * 64)
NOW = 1_700_000_000
TWO_DAYS = 2 * 24 * 3600


def _wrap_raw(inner_json: str, recipient: PublicKey, kind: int = 1059) -> Event:
    """A correctly signed wrap around arbitrary plaintext (to test the inner checks)."""
    ephemeral = PrivateKey.generate()
    content = nip44.encrypt(inner_json, nip44.conversation_key(ephemeral, recipient))
    return sign_event(ephemeral, kind, content, [["p", recipient.hex()]], NOW)


def _seal_raw(signer: PrivateKey, rumor_json: str, recipient: PublicKey, kind: int = 13) -> Event:
    content = nip44.encrypt(rumor_json, nip44.conversation_key(signer, recipient))
    return sign_event(signer, kind, content, [], NOW)


def test_spec_example_unwraps(vectors: Path) -> None:
    data = json.loads((vectors / "nostr" / "nip59-example.json").read_text())
    recipient = PrivateKey.from_hex(data["recipient_secret_key_hex"])
    wrap = Event.from_dict(data["gift_wrap"])
    opened = nip59.unwrap(recipient, wrap)
    assert opened.sender.hex() == data["expected_seal_pubkey"]
    assert opened.seal.kind == nip59.SEAL_KIND
    assert opened.seal.pubkey == data["expected_seal_pubkey"]
    assert opened.rumor == Rumor.from_dict(data["expected_rumor"])
    assert opened.rumor.kind == 1
    assert opened.rumor.content == "Are you going to the party tonight?"
    assert opened.wrap is wrap


def test_round_trip_and_layers() -> None:
    rumor = make_rumor(ALICE.public_key, 1, "party? 🎉", [["t", "x"]], NOW - 5)
    wrap = nip59.gift_wrap(ALICE, rumor, BOB.public_key, now=NOW, extra_tags=[["expiration", str(NOW + 60)]])
    assert wrap.kind == 1059
    assert wrap.tags == (("p", BOB.public_key.hex()), ("expiration", str(NOW + 60)))
    assert wrap.pubkey not in (ALICE.public_key.hex(), BOB.public_key.hex())
    assert NOW - TWO_DAYS <= wrap.created_at <= NOW
    opened = nip59.unwrap(BOB, wrap)
    assert opened.rumor == rumor
    assert opened.sender == ALICE.public_key
    assert opened.seal.tags == ()
    assert NOW - TWO_DAYS <= opened.seal.created_at <= NOW
    assert opened.rumor.created_at == NOW - 5
    with pytest.raises(Nip59Error, match="decrypt"):
        nip59.unwrap(ALICE, wrap)


def test_one_time_keys_and_random_times() -> None:
    rumor = make_rumor(ALICE.public_key, 1, "x", created_at=NOW)
    wraps = [nip59.gift_wrap(ALICE, rumor, BOB.public_key, now=NOW) for _ in range(8)]
    assert len({w.pubkey for w in wraps}) == 8
    assert len({w.created_at for w in wraps}) > 1
    seal = nip59.seal(ALICE, rumor, BOB.public_key, now=NOW)
    assert seal.kind == 13 and seal.tags == () and seal.pubkey == ALICE.public_key.hex()
    assert NOW - TWO_DAYS <= seal.created_at <= NOW


def test_seal_refuses_foreign_rumor_and_oversize() -> None:
    with pytest.raises(Nip59Error, match="pubkey"):
        nip59.seal(ALICE, make_rumor(BOB.public_key, 1, "x"), BOB.public_key)
    big = make_rumor(ALICE.public_key, 1, "x" * 60_000)
    with pytest.raises(Nip59Error, match="cannot encrypt"):
        nip59.gift_wrap(ALICE, big, BOB.public_key)


def test_wrong_kind_and_bad_signature() -> None:
    wrap = nip59.gift_wrap(ALICE, make_rumor(ALICE.public_key, 1, "x"), BOB.public_key)
    with pytest.raises(Nip59Error, match="not a gift wrap"):
        nip59.unwrap(BOB, _wrap_raw("{}", BOB.public_key, kind=1))
    forged = Event.from_dict({**wrap.to_dict(), "sig": "11" * 64})
    with pytest.raises(Nip59Error, match="not authentic"):
        nip59.unwrap(BOB, forged)


def test_spoofed_sender_is_rejected() -> None:
    rumor = make_rumor(BOB.public_key, 14, "I am Bob", created_at=NOW)  # Alice claims to be Bob
    seal = _seal_raw(ALICE, rumor.to_json(), BOB.public_key)
    with pytest.raises(Nip59Error, match="spoofed"):
        nip59.unwrap(BOB, _wrap_raw(seal.to_json(), BOB.public_key))


def test_inner_layer_checks() -> None:
    rumor = make_rumor(ALICE.public_key, 14, "hi", created_at=NOW)
    not_a_seal = _seal_raw(ALICE, rumor.to_json(), BOB.public_key, kind=14)
    with pytest.raises(Nip59Error, match="not a seal"):
        nip59.unwrap(BOB, _wrap_raw(not_a_seal.to_json(), BOB.public_key))
    seal = _seal_raw(ALICE, rumor.to_json(), BOB.public_key)
    forged_seal = {**seal.to_dict(), "sig": "22" * 64}
    with pytest.raises(Nip59Error, match="seal .* invalid"):
        nip59.unwrap(BOB, _wrap_raw(json.dumps(forged_seal), BOB.public_key))
    bad_id = {**rumor.to_dict(), "content": "changed"}
    with pytest.raises(Nip59Error, match="rumor id does not match"):
        nip59.unwrap(BOB, _wrap_raw(_seal_raw(ALICE, json.dumps(bad_id), BOB.public_key).to_json(), BOB.public_key))
    with pytest.raises(Nip59Error, match="rumor .* invalid"):
        nip59.unwrap(BOB, _wrap_raw(_seal_raw(ALICE, "not json", BOB.public_key).to_json(), BOB.public_key))
    with pytest.raises(Nip59Error, match="cannot decrypt the seal"):
        seal_for_carol = _seal_raw(ALICE, rumor.to_json(), PrivateKey.generate().public_key)
        nip59.unwrap(BOB, _wrap_raw(seal_for_carol.to_json(), BOB.public_key))
    with pytest.raises(Nip59Error, match="cannot decrypt the gift wrap"):
        nip59.unwrap(BOB, sign_event(PrivateKey.generate(), 1059, "not nip44", [], NOW))


def test_rumor_without_id_is_accepted() -> None:
    rumor = make_rumor(ALICE.public_key, 14, "hi", created_at=NOW)
    no_id = rumor.to_dict()
    del no_id["id"]
    wrap = _wrap_raw(_seal_raw(ALICE, json.dumps(no_id), BOB.public_key).to_json(), BOB.public_key)
    assert nip59.unwrap(BOB, wrap).rumor == rumor
    assert issubclass(Nip59Error, NostrError)


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=1, max_size=300))
def test_garbage_seal_plaintext(text: str) -> None:
    with pytest.raises(Nip59Error):
        nip59.unwrap(BOB, _wrap_raw(text, BOB.public_key))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_garbage_wrap_content(text: str) -> None:
    with pytest.raises(Nip59Error):
        nip59.unwrap(BOB, sign_event(ALICE, 1059, text, [], NOW))
