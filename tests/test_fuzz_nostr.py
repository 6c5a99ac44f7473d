"""Hostile input to the Nostr core, fuzzed: events, filters, relay frames, NIP-04/NIP-44
payloads, NIP-19 strings, gift wraps and DMs, relays.toml.

Every input ends in a result or a typed :class:`dvm.errors.CdvmError` (see tests/fuzzing.py);
accepted inputs must also keep the module's promises (round trips, no forged sender).
Seeds are real: the NIP-59/NIP-17 spec gift wraps and NIP-44 vectors from the vectors
directory, and events signed here by real keys.
"""
from __future__ import annotations

import json
from functools import cache
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from dvm import nip04, nip17, nip19, nip44, nip59
from dvm.config import parse_relays_toml
from dvm.keys import PrivateKey, PublicKey
from dvm.nip01 import Event, Rumor, make_rumor, sign_event
from dvm.wire import Filter, parse_relay_message
from fuzzing import (
    attempt,
    deep_json,
    dumps,
    fuzz_settings,
    json_values,
    long_strings,
    mutated_json,
    mutated_json_text,
    mutated_text,
    ok,
    toml_document,
    vector_json,
)

ALICE = PrivateKey.from_hex("11" * 32)
BOB = PrivateKey.from_hex("22" * 32)
EVE = PrivateKey.from_hex("33" * 32)
WHEN = 1_700_000_000


@cache
def signed_events() -> tuple[Event, ...]:
    """Real signed events: the spec gift wraps, a note with tags, a job request, a DM wrap."""
    nip59_wrap = Event.from_dict(vector_json("nostr/nip59-example.json")["gift_wrap"])
    nip17_wrap = Event.from_dict(vector_json("nostr/nip17-example.json")["gift_wrap"])
    note = sign_event(ALICE, 1, "hello ünïcode \n \"quoted\"", [["p", BOB.public_key.hex()], ["t", "x"]], WHEN)
    request = sign_event(ALICE, 5050, "", [["i", "what is 2+2?", "text"], ["param", "max_tokens", "8"],
                                           ["p", BOB.public_key.hex()]], WHEN)
    wrap = nip17.build_dm(ALICE, BOB.public_key, "a private note", include_sender_copy=False, now=WHEN)[0]
    return (nip59_wrap, nip17_wrap, note, request, wrap)


def event_dicts() -> st.SearchStrategy[dict[str, Any]]:
    return st.integers(0, 4).map(lambda i: signed_events()[i].to_dict())


def _same_signed_content(event: Event) -> bool:
    """A verifying event must be one of the real ones: mutations cannot forge a signature."""
    return any(event.id == real.id and (event.pubkey, event.created_at, event.kind, event.tags, event.content)
               == (real.pubkey, real.created_at, real.kind, real.tags, real.content) for real in signed_events())


# ---------------------------------------------------------------------------- NIP-01 events


def _check_event(event: Event) -> None:
    assert Event.from_json(event.to_json()) == event
    if ok(attempt(event.verify)):
        assert _same_signed_content(event), "a mutated event verified"


@fuzz_settings(250)
@given(data=event_dicts().flatmap(mutated_json))
@example(data={"id": "0" * 64, "pubkey": "0" * 64, "created_at": 2**32, "kind": 1, "tags": [], "content": "", "sig": "0" * 128})
def test_event_from_dict_mutated(data: Any) -> None:
    event = attempt(Event.from_dict, data)
    if ok(event):
        _check_event(event)


@fuzz_settings(250)
@given(text=st.text(max_size=300) | st.binary(max_size=300) | event_dicts().flatmap(lambda d: mutated_text(dumps(d))))
@example(text=deep_json())
@example(text='{"id":"' + "0" * 64 + '","pubkey":"' + "0" * 64 + '","created_at":1,"kind":1,"tags":[],"content":"\\ud800","sig":"' + "0" * 128 + '"}')
def test_event_from_json(text: str | bytes) -> None:
    event = attempt(Event.from_json, text)
    if ok(event):
        _check_event(event)


@fuzz_settings(150)
@given(data=event_dicts().flatmap(mutated_json) | json_values)
def test_rumor_from_dict(data: Any) -> None:
    rumor = attempt(Rumor.from_dict, data)
    if ok(rumor) and ok(attempt(rumor.verify)):
        assert Rumor.from_json(rumor.to_json()) == rumor


# ---------------------------------------------------------------------------- filters and relay frames

_FILTER_SEED = {"ids": ["ab" * 32], "authors": [ALICE.public_key.hex()], "kinds": [1, 5050],
                "tags": {"p": [BOB.public_key.hex()], "e": ["x"]}, "since": 1, "until": 2**31, "limit": 10}


@fuzz_settings(200)
@given(fields=mutated_json(_FILTER_SEED) | st.dictionaries(st.sampled_from(sorted(_FILTER_SEED)), json_values))
@example(fields={"ids": 5})
@example(fields={"tags": [["p"]]})
@example(fields={"tags": {"p": 5}})
def test_filter(fields: Any) -> None:
    if not isinstance(fields, dict):
        return
    fields = {key: value for key, value in fields.items() if key in _FILTER_SEED}
    made = attempt(lambda: Filter(**fields))
    if ok(made):
        wire = made.to_dict()
        tags = {key[1:]: value for key, value in wire.items() if key.startswith("#")}
        assert Filter(**{k: v for k, v in wire.items() if not k.startswith("#")}, tags=tags) == made
        for event in signed_events():
            assert isinstance(made.matches(event), bool)


def _frames() -> st.SearchStrategy[str]:
    real = [json.dumps(["EVENT", "sub", event.to_dict()]) for event in signed_events()] + [
        json.dumps(["OK", "ab" * 32, True, "duplicate: seen"]), json.dumps(["OK", "", False, "blocked"]),
        json.dumps(["EOSE", "sub"]), json.dumps(["CLOSED", "sub", "auth-required: x"]),
        json.dumps(["NOTICE", "hi"]), json.dumps(["AUTH", "challenge"]),
    ]
    return st.sampled_from(real).flatmap(lambda frame: mutated_json_text(json.loads(frame)))


@fuzz_settings(300)
@given(frame=_frames() | st.text(max_size=200) | st.binary(max_size=200) | json_values.map(dumps))
@example(frame=deep_json())
@example(frame=b'["NOTICE","\xff"]')
def test_relay_frame(frame: str | bytes) -> None:
    message = attempt(parse_relay_message, frame)
    if ok(message) and type(message).__name__ == "EventMessage":
        assert isinstance(message.event, dict)
        event = attempt(Event.from_dict, message.event)
        if ok(event):
            _check_event(event)


# ---------------------------------------------------------------------------- NIP-04 and NIP-44


@cache
def _nip04_payload() -> str:
    return nip04.encrypt(ALICE, BOB.public_key, "the secret document, NIP-04 style")


@fuzz_settings(200)
@given(payload=st.text(max_size=200) | mutated_text(_nip04_payload) | st.builds(
    lambda a, b: f"{a}?iv={b}", st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=64),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", min_size=24, max_size=24)))
def test_nip04_decrypt(payload: str) -> None:
    # NIP-04 is unauthenticated: a mutated payload may decrypt to garbage, but only as a str.
    plain = attempt(nip04.decrypt, BOB, ALICE.public_key, payload)
    if ok(plain):
        assert isinstance(plain, str)
        if payload == _nip04_payload():
            assert plain == "the secret document, NIP-04 style"


def _nip44_cases() -> list[tuple[str, str, str]]:
    """(conversation key hex, payload, plaintext) of the official vectors."""
    valid = vector_json("nostr/nip44.vectors.json")["v2"]["valid"]["encrypt_decrypt"]
    return [(case["conversation_key"], case["payload"], case["plaintext"]) for case in valid]


def _nip44_inputs() -> st.SearchStrategy[tuple[int, str]]:
    return st.integers(0, 9).flatmap(lambda i: st.tuples(
        st.just(i), mutated_text(lambda: _nip44_cases()[i][1]) | st.text(max_size=300)))


@fuzz_settings(300)
@given(case=_nip44_inputs())
@example(case=(0, "A" * 132))
@example(case=(0, "Ag" + "A" * 130))
def test_nip44_decrypt(case: tuple[int, str]) -> None:
    index, payload = case
    key_hex, _, plaintext = _nip44_cases()[index]
    plain = attempt(nip44.decrypt, payload, bytes.fromhex(key_hex))
    if ok(plain):
        # The MAC admits only the authentic ciphertext (at most a non-canonical base64 spelling of it).
        assert plain == plaintext


@fuzz_settings(100)
@given(text=st.text(min_size=1, max_size=400))
def test_nip44_round_trip(text: str) -> None:
    key = nip44.conversation_key(ALICE, BOB.public_key)
    payload = attempt(nip44.encrypt, text, key)
    if ok(payload):
        assert nip44.decrypt(payload, key) == text


# ---------------------------------------------------------------------------- NIP-19


def _nip19_seeds() -> list[str]:
    pub = ALICE.public_key.hex()
    return [
        nip19.npub_encode(pub), nip19.nsec_encode(ALICE.secret_hex()), nip19.note_encode("ab" * 32),
        nip19.nprofile_encode(pub, ["wss://relay.example", "wss://ü.example"]),
        nip19.nevent_encode("ab" * 32, ["wss://r.example"], author=pub, kind=5050),
    ]


@fuzz_settings(300)
@given(text=st.text(max_size=120) | st.sampled_from(_nip19_seeds()).flatmap(mutated_text)
       | st.sampled_from(_nip19_seeds()).flatmap(lambda s: st.sampled_from(["nostr:" + s, s.upper(), " " + s])))
def test_nip19_decode(text: str) -> None:
    decoded = attempt(nip19.decode, text)
    if ok(decoded):
        if decoded.kind in ("npub", "nsec", "note"):
            encoders = {"npub": nip19.npub_encode, "nsec": nip19.nsec_encode, "note": nip19.note_encode}
            bare = text.strip()
            bare = bare[6:] if bare[:6].lower() == "nostr:" else bare
            assert encoders[decoded.kind](decoded.hex) == bare.lower()
        elif decoded.kind == "nprofile":
            assert nip19.decode(nip19.nprofile_encode(decoded.hex, decoded.relays)) == decoded
    attempt(PublicKey.from_npub_or_hex, text)


# ---------------------------------------------------------------------------- NIP-59 gift wraps and NIP-17 DMs


@cache
def _rumor_json() -> dict[str, Any]:
    return make_rumor(ALICE.public_key, nip17.CHAT_KIND, "hello bob", [["p", BOB.public_key.hex()]], WHEN).to_dict()


def _seal_for(rumor_text: str, signer: PrivateKey = ALICE, kind: int = nip59.SEAL_KIND) -> Event:
    content = nip44.encrypt(rumor_text, nip44.conversation_key(signer, BOB.public_key))
    return sign_event(signer, kind, content, (), WHEN)


def _wrap_for(seal_text: str, kind: int = nip59.GIFT_WRAP_KIND) -> Event:
    content = nip44.encrypt(seal_text, nip44.conversation_key(EVE, BOB.public_key))
    return sign_event(EVE, kind, content, [["p", BOB.public_key.hex()]], WHEN)


def _open(wrap: Event) -> None:
    unwrapped = attempt(nip59.unwrap, BOB, wrap)
    if ok(unwrapped):
        assert unwrapped.rumor.pubkey == unwrapped.seal.pubkey == unwrapped.sender.hex()
        unwrapped.rumor.verify()
        unwrapped.seal.verify()
    message = attempt(nip17.open_dm, BOB, wrap)
    if ok(message):
        assert message.kind in (nip17.CHAT_KIND, nip17.FILE_KIND)
        assert message.sender.hex() in (ALICE.public_key.hex(), EVE.public_key.hex())


@fuzz_settings(150)
@given(wrap=event_dicts().flatmap(mutated_json))
def test_gift_wrap_mutated_event(wrap: Any) -> None:
    event = attempt(Event.from_dict, wrap)
    if ok(event):
        _open(event)


@fuzz_settings(150)
@given(content=st.text(max_size=200) | mutated_text(lambda: signed_events()[4].content),
       kind=st.sampled_from((nip59.GIFT_WRAP_KIND, nip59.GIFT_WRAP_KIND, 1, 14)))
def test_gift_wrap_resigned_content(content: str, kind: int) -> None:
    # Correctly signed by the (one-time) wrap key, but the ciphertext is garbage.
    _open(sign_event(EVE, kind, content, [["p", BOB.public_key.hex()]], WHEN))


@fuzz_settings(150)
@given(seal=mutated_json(lambda: _seal_for(dumps(_rumor_json())).to_dict()) | json_values)
@example(seal=5)
@example(seal=deep_json(5000))
def test_gift_wrap_mutated_seal(seal: Any) -> None:
    text = seal if isinstance(seal, str) else dumps(seal)
    if text and ok(attempt(nip44.encrypt, text, bytes(32))):
        _open(_wrap_for(text))


@fuzz_settings(150)
@given(rumor=mutated_json(_rumor_json) | mutated_text(lambda: dumps(_rumor_json())),
       signer=st.sampled_from((ALICE, ALICE, EVE)), kind=st.sampled_from((nip59.SEAL_KIND, nip59.SEAL_KIND, 14)))
def test_gift_wrap_mutated_rumor(rumor: Any, signer: PrivateKey, kind: int) -> None:
    text = rumor if isinstance(rumor, str) else dumps(rumor)
    if text and ok(attempt(nip44.encrypt, text, bytes(32))):
        _open(_wrap_for(_seal_for(text, signer, kind).to_json()))


# ---------------------------------------------------------------------------- relays.toml

_RELAYS_TOML = """\
[[relay]]
url = "wss://relay.example.com"
read = true
write = true
dm = true
max_message_length = 131072
timeout = 5.5

[[relay]]
url = "ws://127.0.0.1:7447"
auth = false
"""


_RELAYS_SEED = {"relay": [{"url": "wss://relay.example.com", "dm": True, "max_message_length": 131072, "timeout": 5.5},
                          {"url": "ws://127.0.0.1:7447", "auth": False}]}


@fuzz_settings(250)
@given(text=st.text(max_size=200) | mutated_text(_RELAYS_TOML) | mutated_json(_RELAYS_SEED).map(
    lambda doc: toml_document(doc) if isinstance(doc, dict) else str(doc)))
@example(text="a = " + "[" * 5000 + "]" * 5000)
@example(text="a = " + "{b = " * 2000 + "1" + "}" * 2000)
@example(text='[[relay]]\nurl = "ws://[::1"\n')
def test_relays_toml(text: str) -> None:
    config = attempt(parse_relays_toml, text)
    if ok(config):
        assert config.relays and len({relay.url for relay in config.relays}) == len(config.relays)
        assert all(relay.url.lower().startswith(("ws://", "wss://")) and relay.timeout > 0 for relay in config.relays)


# ---------------------------------------------------------------------------- long values

_LONG_VALUE_INPUTS = {
    "relay url": lambda v: attempt(parse_relays_toml, f"[[relay]]\nurl = {json.dumps(v)}\n"),
    "relay key": lambda v: attempt(parse_relays_toml, f'[[relay]]\nurl = "ws://a"\n{json.dumps(v)} = 1\n'),
    "filter tag": lambda v: attempt(lambda: Filter(tags={v: ["x"]})),
    "filter id": lambda v: attempt(lambda: Filter(ids=[v])),
    "frame type": lambda v: attempt(parse_relay_message, json.dumps([v, "x"])),
}


@fuzz_settings(60)
@given(where=st.sampled_from(sorted(_LONG_VALUE_INPUTS)), value=long_strings)
@example(where="relay url", value="x" * 5000)
@example(where="relay key", value="k" * 5000)
@example(where="filter tag", value="t" * 5000)
def test_long_values_give_short_messages(where: str, value: str) -> None:
    """Errors name the bad value, but never echo thousands of characters of it (attempt checks)."""
    _LONG_VALUE_INPUTS[where](value)
