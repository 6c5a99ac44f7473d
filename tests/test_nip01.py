"""dvm.nip01: canonical serialization, strict event shape, id and signature checks."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvm.keys import PrivateKey
from dvm.nip01 import Event, Rumor, compute_id, make_rumor, serialize_for_id, sign_event
from dvm.nostr_errors import InvalidEvent, InvalidSignature, NostrError

KEY = PrivateKey.from_hex("5f8e2a3c1d4b6a7980e1f2d3c4b5a69788796a5b4c3d2e1f0a9b8c7d6e5f4a3b")


def _good() -> dict[str, Any]:
    return sign_event(
        KEY, 1, "hello", [["t", "nostr"], ["p", KEY.public_key.hex(), "wss://r.example"]], 1_700_000_000
    ).to_dict()


def test_serialization_rules() -> None:
    pub = KEY.public_key.hex()
    text = 'a\nb"c\\d\re\tf\bg\fh\x01i\x1fj\x7fk é 😀 \u2028'
    raw = serialize_for_id(pub, 1, 2, [["x", "y"]], text)
    expected = (
        f'[0,"{pub}",1,2,[["x","y"]],"a\\nb\\"c\\\\d\\re\\tf\\bg\\fh\\u0001i\\u001fj\x7fk é 😀 \u2028"]'
    ).encode()
    assert raw == expected
    assert compute_id(pub, 1, 2, [["x", "y"]], text) == hashlib.sha256(expected).hexdigest()


def test_sign_and_verify_round_trip() -> None:
    event = sign_event(KEY, 1, "gm ☕", [("t", "coffee")], 1_700_000_000)
    event.verify()
    assert event.is_valid()
    assert event.pubkey == KEY.public_key.hex()
    assert event.tags == (("t", "coffee"),)
    again = Event.from_json(event.to_json())
    assert again == event
    assert Event.from_dict(json.loads(event.to_json())) == event
    assert event.to_dict()["tags"] == [["t", "coffee"]]
    assert " " not in event.to_json().replace("gm ☕", "")
    assert "☕" in event.to_json()


def test_sign_defaults_created_at_to_now_and_accepts_generators() -> None:
    import time

    event = sign_event(KEY, 7, "+", (t for t in [["e", "ab"]]))
    assert abs(event.created_at - time.time()) < 5
    assert event.tags == (("e", "ab"),)
    event.verify()


def test_tampering_is_detected() -> None:
    good = _good()
    Event.from_dict(good).verify()
    for field, value in [("content", "bye"), ("kind", 2), ("created_at", 1), ("tags", [])]:
        with pytest.raises(InvalidEvent, match="id does not match"):
            Event.from_dict({**good, field: value}).verify()
    sig = good["sig"]
    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    with pytest.raises(InvalidSignature):
        Event.from_dict({**good, "sig": flipped}).verify()
    other = sign_event(PrivateKey.generate(), 1, "hello", good["tags"], good["created_at"]).to_dict()
    with pytest.raises(InvalidSignature):
        Event.from_dict({**other, "sig": good["sig"]}).verify()
    assert not Event.from_dict({**good, "sig": flipped}).is_valid()


def test_off_curve_pubkey_is_an_invalid_signature() -> None:
    pub = "00" * 32
    event_id = compute_id(pub, 1, 1, [], "x")
    event = Event.from_dict(
        {"id": event_id, "pubkey": pub, "created_at": 1, "kind": 1, "tags": [], "content": "x", "sig": "00" * 64}
    )
    with pytest.raises(InvalidSignature, match="pubkey"):
        event.verify()


BAD_FIELDS: list[tuple[str, object]] = [
    ("id", "AB" * 32),
    ("id", "ab" * 31),
    ("id", "zz" * 32),
    ("id", 5),
    ("id", None),
    ("pubkey", "ab" * 33),
    ("pubkey", b"\xab" * 32),
    ("sig", "ab" * 63),
    ("sig", "ab" * 64 + "\n"),
    ("created_at", True),
    ("created_at", -1),
    ("created_at", 2**32),
    ("created_at", 10**30),
    ("created_at", 1.0),
    ("created_at", "1700000000"),
    ("kind", False),
    ("kind", -1),
    ("kind", 65536),
    ("kind", 1.5),
    ("kind", None),
    ("tags", "p"),
    ("tags", {"p": "x"}),
    ("tags", ["p"]),
    ("tags", [["p", 1]]),
    ("tags", [["p", None]]),
    ("tags", [[["p"]]]),
    ("tags", None),
    ("content", None),
    ("content", 5),
    ("content", b"x"),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_from_dict_rejects_bad_fields(field: str, value: object) -> None:
    with pytest.raises(InvalidEvent, match=field):
        Event.from_dict({**_good(), field: value})


@pytest.mark.parametrize("field", ["id", "pubkey", "created_at", "kind", "tags", "content", "sig"])
def test_from_dict_rejects_missing_fields(field: str) -> None:
    data = _good()
    del data[field]
    with pytest.raises(InvalidEvent, match=field):
        Event.from_dict(data)


def test_boundaries_accepted() -> None:
    pub = KEY.public_key.hex()
    for kind, created_at in [(0, 0), (65535, 2**32 - 1)]:
        sign_event(KEY, kind, "", [], created_at).verify()
    event = sign_event(KEY, 1, "", [[], ["only"]], 1)
    assert event.first_tag("only") == ("only",)
    assert event.tag_values("only") == []
    assert Event.from_dict({**event.to_dict(), "extra": "ignored"}) == event
    assert pub == event.pubkey


@pytest.mark.parametrize("data", [None, [], "event", 5, ["id", "pubkey"]])
def test_from_dict_rejects_non_objects(data: object) -> None:
    with pytest.raises(InvalidEvent, match="JSON object"):
        Event.from_dict(data)


@pytest.mark.parametrize(
    "text", ["", "{", "[" * 100_000 + "]" * 100_000, "nul", b"\xff\xfe", '{"id": NaN}', "1" * 5000]
)
def test_from_json_rejects_garbage(text: str | bytes) -> None:
    with pytest.raises(InvalidEvent):
        Event.from_json(text)


def test_sign_event_rejects_bad_input() -> None:
    with pytest.raises(InvalidEvent, match="content"):
        sign_event(KEY, 1, "\ud800")  # lone surrogate cannot be UTF-8
    with pytest.raises(InvalidEvent, match="kind"):
        sign_event(KEY, 70000, "x")
    with pytest.raises(InvalidEvent, match="tags"):
        sign_event(KEY, 1, "x", [["p", 3]])  # type: ignore[list-item]
    with pytest.raises(InvalidEvent, match="content"):
        sign_event(KEY, 1, None)  # type: ignore[arg-type]


def test_lone_surrogate_from_json_cannot_verify() -> None:
    data = {**_good(), "content": "\ud800"}
    with pytest.raises(InvalidEvent, match="UTF-8"):
        Event.from_dict(data).verify()


def test_tag_helpers() -> None:
    event = Event.from_dict(_good())
    assert event.tag_values("p") == [KEY.public_key.hex()]
    assert event.first_tag("p") == ("p", KEY.public_key.hex(), "wss://r.example")
    assert event.first_tag("e") is None
    assert event.tag_values("e") == []


def test_rumor() -> None:
    rumor = make_rumor(KEY.public_key, 14, "secret text", [["p", "ab" * 32]], 1_700_000_000)
    assert rumor.id == compute_id(rumor.pubkey, rumor.created_at, rumor.kind, rumor.tags, rumor.content)
    rumor.verify()
    assert "secret text" not in repr(rumor)
    assert "sig" not in rumor.to_dict()
    assert Rumor.from_json(rumor.to_json()) == rumor
    no_id = rumor.to_dict()
    del no_id["id"]
    assert Rumor.from_dict(no_id) == rumor
    wrong = Rumor.from_dict({**rumor.to_dict(), "content": "other"})
    with pytest.raises(InvalidEvent, match="rumor id does not match"):
        wrong.verify()
    with pytest.raises(InvalidEvent, match="pubkey"):
        Rumor.from_dict({**no_id, "pubkey": "xyz"})
    with pytest.raises(InvalidEvent, match="id"):
        Rumor.from_dict({**rumor.to_dict(), "id": 3})
    assert make_rumor(KEY.public_key.hex(), 1, "x", created_at=5).pubkey == KEY.public_key.hex()


def test_errors_are_typed() -> None:
    assert issubclass(InvalidSignature, InvalidEvent)
    assert issubclass(InvalidEvent, NostrError)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_field_values = st.one_of(
    _json,
    st.just("ab" * 32),
    st.just("cd" * 64),
    st.integers(0, 70000),
    st.lists(st.lists(st.text(max_size=5), max_size=3), max_size=3),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        _json,
        st.fixed_dictionaries(
            {}, optional={f: _field_values for f in ("id", "pubkey", "created_at", "kind", "tags", "content", "sig")}
        ),
    )
)
def test_garbage_into_from_dict_and_verify(data: object) -> None:
    try:
        event = Event.from_dict(data)
    except InvalidEvent:
        return
    with pytest.raises(InvalidEvent):
        event.verify()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_garbage_into_from_json(text: bytes | str) -> None:
    with pytest.raises(InvalidEvent):
        Event.from_json(text)
