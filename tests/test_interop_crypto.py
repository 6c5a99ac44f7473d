"""Interop with rust-nostr (nostr-sdk 0.45.1, test-only): ids, signatures, NIP-04/19/44/59/17 both ways."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvm import nip04, nip17, nip19, nip44, nip59
from dvm.keys import PrivateKey, PublicKey
from dvm.nip01 import Event, Rumor, make_rumor, sign_event
from dvm.nostr_errors import InvalidEvent

ns = pytest.importorskip("nostr_sdk")

ALICE = PrivateKey.from_hex("a1" * 32)
BOB = PrivateKey.from_hex("b2" * 32)
N_ALICE = ns.Keys.parse(ALICE.secret_hex())
N_BOB = ns.Keys.parse(BOB.secret_hex())
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_texts = st.text(max_size=120)
_tags = st.lists(
    st.tuples(st.text(min_size=1, max_size=6).map(lambda s: "x-" + s), st.lists(_texts, max_size=3)).map(
        lambda t: [t[0], *t[1]]
    ),
    max_size=4,
)


def _their_pub(key: PrivateKey) -> object:
    return ns.PublicKey.parse(key.public_key.hex())


def test_public_key_derivation_matches() -> None:
    for _ in range(5):
        key = PrivateKey.generate()
        theirs = ns.Keys.parse(key.secret_hex())
        assert theirs.public_key().to_hex() == key.public_key.hex()
        assert theirs.public_key().to_bech32() == key.public_key.npub()
        assert theirs.secret_key().to_bech32() == key.nsec()


@PROPERTY
@given(_texts, _tags, st.integers(0, 65535), st.integers(0, 2**32 - 1))
def test_our_events_verify_in_nostr_sdk(content: str, tags: list[list[str]], kind: int, created_at: int) -> None:
    event = sign_event(ALICE, kind, content, tags, created_at)
    theirs = ns.Event.from_json(event.to_json())
    assert theirs.verify()
    assert theirs.id().to_hex() == event.id
    assert theirs.content() == content


@PROPERTY
@given(_texts, _tags, st.integers(0, 65535), st.integers(0, 2**32 - 1))
def test_nostr_sdk_events_verify_here(content: str, tags: list[list[str]], kind: int, created_at: int) -> None:
    builder = ns.EventBuilder(ns.Kind(kind), content).tags([ns.Tag.parse(t) for t in tags])
    theirs = builder.custom_created_at(ns.Timestamp.from_secs(created_at)).finalize(N_ALICE)
    event = Event.from_json(theirs.as_json())
    event.verify()
    assert event.id == theirs.id().to_hex()
    assert event.content == content
    assert [list(t) for t in event.tags] == tags


def test_tampered_nostr_sdk_event_fails_here() -> None:
    theirs = ns.EventBuilder(ns.Kind(1), "original").finalize(N_ALICE)
    data = json.loads(theirs.as_json())
    data["content"] = "changed"
    with pytest.raises(InvalidEvent, match="id does not match"):
        Event.from_dict(data).verify()


@PROPERTY
@given(_texts)
def test_nip04_both_ways(text: str) -> None:
    ours = nip04.encrypt(ALICE, BOB.public_key, text)
    assert ns.nip04_decrypt(N_BOB.secret_key(), N_ALICE.public_key(), ours) == text
    theirs = ns.nip04_encrypt(N_ALICE.secret_key(), N_BOB.public_key(), text)
    assert nip04.decrypt(BOB, ALICE.public_key, theirs) == text


@PROPERTY
@given(st.text(min_size=1, max_size=400))
def test_nip44_both_ways(text: str) -> None:
    key = nip44.conversation_key(ALICE, BOB.public_key)
    ours = nip44.encrypt(text, key)
    assert ns.nip44_decrypt(N_BOB.secret_key(), N_ALICE.public_key(), ours) == text
    theirs = ns.nip44_encrypt(N_ALICE.secret_key(), N_BOB.public_key(), text, ns.Nip44Version.V2)
    assert nip44.decrypt(theirs, nip44.conversation_key(BOB, ALICE.public_key)) == text


def test_nip44_long_message_both_ways() -> None:
    key = nip44.conversation_key(ALICE, BOB.public_key)
    longest = "ü" * 32767 + "a"  # 65,535 bytes, the v2 maximum
    assert ns.nip44_decrypt(N_BOB.secret_key(), N_ALICE.public_key(), nip44.encrypt(longest, key)) == longest
    # nostr-sdk 0.45.1 refuses to *encrypt* more than 65,408 bytes (it decrypts up to 65,535).
    theirs_longest = "ü" * 32704
    theirs = ns.nip44_encrypt(N_ALICE.secret_key(), N_BOB.public_key(), theirs_longest, ns.Nip44Version.V2)
    assert nip44.decrypt(theirs, key) == theirs_longest


def test_nip19_both_ways() -> None:
    pub = ALICE.public_key.hex()
    event_id = sign_event(ALICE, 1, "x", created_at=1).id
    relays = ["wss://relay.example.com", "wss://nos.lol"]
    assert ns.PublicKey.parse(nip19.npub_encode(pub)).to_hex() == pub
    assert ns.SecretKey.parse(nip19.nsec_encode(ALICE.secret_bytes())).to_hex() == ALICE.secret_hex()
    assert ns.EventId.parse(nip19.note_encode(event_id)).to_hex() == event_id
    assert nip19.decode(ns.EventId.parse(event_id).to_bech32()).hex == event_id

    profile = ns.Nip19Profile.from_bech32(nip19.nprofile_encode(pub, relays))
    assert profile.public_key().to_hex() == pub
    assert [str(r) for r in profile.relays()] == relays
    theirs = ns.Nip19Profile(_their_pub(ALICE), [ns.RelayUrl.parse(r) for r in relays]).to_bech32()
    assert nip19.decode(theirs) == nip19.Decoded(kind="nprofile", hex=pub, relays=tuple(relays))

    nevent = ns.Nip19Event.from_bech32(nip19.nevent_encode(event_id, relays, author=pub, kind=5999))
    assert nevent.event_id().to_hex() == event_id
    assert nevent.author().to_hex() == pub
    assert nevent.kind().as_u16() == 5999
    assert [str(r) for r in nevent.relays()] == relays
    theirs = ns.Nip19Event(
        ns.EventId.parse(event_id), _their_pub(ALICE), ns.Kind(5999), [ns.RelayUrl.parse(relays[0])]
    ).to_bech32()
    assert nip19.decode(theirs) == nip19.Decoded(
        kind="nevent", hex=event_id, relays=(relays[0],), author=pub, event_kind=5999
    )


@pytest.mark.parametrize("content", ["party tonight?", 'ünï\ncode "quoted" 😀'])
def test_nip59_ours_opened_by_nostr_sdk(content: str) -> None:
    rumor = make_rumor(ALICE.public_key, 1, content, [["t", "x"]])
    wrap = nip59.gift_wrap(ALICE, rumor, BOB.public_key)
    opened = ns.UnwrappedGift.from_gift_wrap(N_BOB, ns.Event.from_json(wrap.to_json()))
    assert opened.sender().to_hex() == ALICE.public_key.hex()
    assert Rumor.from_json(opened.rumor().as_json()) == rumor


@pytest.mark.parametrize("content", ["party tonight?", 'ünï\ncode "quoted" 😀'])
def test_nip59_nostr_sdk_opened_here(content: str) -> None:
    rumor = ns.EventBuilder(ns.Kind(1), content).finalize_unsigned(N_ALICE.public_key())
    wrap = ns.nip59_make_gift_wrap(N_ALICE, N_BOB.public_key(), rumor)
    opened = nip59.unwrap(BOB, Event.from_json(wrap.as_json()))
    assert opened.sender == ALICE.public_key
    assert opened.rumor.content == content
    assert opened.rumor.created_at == rumor.created_at().as_secs()
    assert opened.wrap.tag_values("p") == [BOB.public_key.hex()]


def test_nip17_nostr_sdk_dm_opened_here() -> None:
    wrap = ns.nip17_make_private_msg(N_ALICE, N_BOB.public_key(), "hola 👋")
    dm = nip17.open_dm(BOB, Event.from_json(wrap.as_json()))
    assert dm.sender == ALICE.public_key
    assert dm.kind == 14
    assert dm.content == "hola 👋"
    assert dm.recipients == (BOB.public_key,)


def test_nip17_our_dm_opened_by_nostr_sdk() -> None:
    to_bob, own_copy = nip17.build_dm(ALICE, BOB.public_key, "que tal?", subject="hi")
    for keys, wrap in ((N_BOB, to_bob), (N_ALICE, own_copy)):
        opened = ns.UnwrappedGift.from_gift_wrap(keys, ns.Event.from_json(wrap.to_json()))
        assert opened.sender().to_hex() == ALICE.public_key.hex()
        rumor = opened.rumor()
        assert rumor.kind().as_u16() == 14
        assert rumor.content() == "que tal?"
        assert [t.to_vec() for t in rumor.tags()] == [["p", BOB.public_key.hex()], ["subject", "hi"]]


def test_nip17_relay_list_both_ways() -> None:
    ours = nip17.dm_relay_list(ALICE, ["wss://inbox.example.com"])
    assert [str(u) for u in ns.nip17_extract_relay_list(ns.Event.from_json(ours.to_json()))] == [
        "wss://inbox.example.com"
    ]
    theirs = ns.EventBuilder(ns.Kind(10050), "").tags([ns.Tag.parse(["relay", "wss://dm.example.org"])]).finalize(N_BOB)
    assert nip17.parse_dm_relay_list(Event.from_json(theirs.as_json())) == ["wss://dm.example.org"]


def test_their_public_key_parses_here() -> None:
    assert PublicKey.from_npub_or_hex(N_BOB.public_key().to_bech32()) == BOB.public_key
