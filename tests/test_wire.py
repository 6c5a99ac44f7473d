"""NIP-01 wire messages: encoding, parsing, malformed frames, filters."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dvm.keys import PrivateKey
from dvm.nip01 import sign_event
from dvm.wire import (
    AuthChallenge,
    Closed,
    Eose,
    EventMessage,
    Filter,
    Notice,
    Ok,
    WireError,
    encode_auth,
    encode_close,
    encode_event,
    encode_req,
    parse_relay_message,
)

KEY = PrivateKey.generate()
ID = "ab" * 32


def test_encode_client_messages() -> None:
    event = sign_event(KEY, 1, "héllo")
    assert json.loads(encode_event(event.to_dict())) == ["EVENT", event.to_dict()]
    assert "héllo" in encode_event(event.to_dict())
    assert json.loads(encode_auth(event.to_dict()))[0] == "AUTH"
    req = json.loads(encode_req("s1", [Filter(kinds=[1], tags={"p": [ID]}, since=5), Filter(ids=[ID])]))
    assert req == ["REQ", "s1", {"kinds": [1], "#p": [ID], "since": 5}, {"ids": [ID]}]
    assert json.loads(encode_close("s1")) == ["CLOSE", "s1"]


@pytest.mark.parametrize("sub_id", ["", "x" * 65])
def test_bad_subscription_ids(sub_id: str) -> None:
    with pytest.raises(WireError):
        encode_req(sub_id, [Filter()])
    with pytest.raises(WireError):
        encode_close(sub_id)


def test_req_needs_a_filter() -> None:
    with pytest.raises(WireError):
        encode_req("s", [])


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ('["EVENT","s",{"id":"x"}]', EventMessage("s", {"id": "x"})),
        (f'["OK","{ID}",true,""]', Ok(ID, True, "")),
        (f'["OK","{ID}",false,"auth-required: sign in"]', Ok(ID, False, "auth-required: sign in")),
        (f'["OK","{ID}",true]', Ok(ID, True, "")),
        ('["OK","",false,"invalid: Bad signature"]', Ok("", False, "invalid: Bad signature")),
        ('["EOSE","s"]', Eose("s")),
        ('["CLOSED","s","error: gone"]', Closed("s", "error: gone")),
        ('["NOTICE","hi"]', Notice("hi")),
        ('["AUTH","chal"]', AuthChallenge("chal")),
        (b'["EOSE","s"]', Eose("s")),
    ],
)
def test_parse_valid(frame: str, expected: object) -> None:
    assert parse_relay_message(frame) == expected


def test_ok_prefix() -> None:
    assert Ok(ID, False, "auth-required: x").prefix == "auth-required"
    assert Ok(ID, False, "no prefix here").prefix == ""


@pytest.mark.parametrize(
    "frame",
    [
        "",
        "not json",
        "{}",
        "[]",
        "[1]",
        '"EVENT"',
        '["EVENT","s"]',
        '["EVENT","s",[]]',
        '["EVENT",1,{}]',
        '["EVENT","s",{},1]',
        '["OK","zz",true,""]',
        f'["OK","{ID}","true",""]',
        f'["OK","{ID}",true,5]',
        f'["OK","{ID}"]',
        '["EOSE"]',
        '["EOSE",5]',
        '["CLOSED"]',
        '["NOTICE"]',
        '["NOTICE",{}]',
        '["AUTH",null]',
        '["COUNT","s",{"count":1}]',
        '["WHAT"]',
        "[" * 100_000,
        b"\xff\xfe",
    ],
)
def test_parse_malformed(frame: str | bytes) -> None:
    with pytest.raises(WireError):
        parse_relay_message(frame)


def test_parse_oversized() -> None:
    frame = json.dumps(["NOTICE", "x" * 200])
    with pytest.raises(WireError, match="exceeds"):
        parse_relay_message(frame, max_size=100)


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_parse_never_leaks_untyped_errors(frame: str | bytes) -> None:
    try:
        parse_relay_message(frame)
    except WireError:
        pass


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=12))
def test_parse_random_json(value: object) -> None:
    try:
        parse_relay_message(json.dumps(value))
    except WireError:
        pass


def test_filter_validation() -> None:
    with pytest.raises(WireError):
        Filter(ids=["not-hex"])
    with pytest.raises(WireError):
        Filter(authors="ab" * 32)  # a bare string, not a list
    with pytest.raises(WireError):
        Filter(kinds=["1"])  # type: ignore[list-item]
    with pytest.raises(WireError):
        Filter(kinds=[True])  # type: ignore[list-item]
    with pytest.raises(WireError):
        Filter(tags={"pp": ["x"]})
    with pytest.raises(WireError):
        Filter(since=-1)
    assert Filter(tags={"p": ["a"]}) == Filter(tags=(("p", ("a",)),))
    assert hash(Filter(kinds=[1])) == hash(Filter(kinds=(1,)))


def test_filter_matches() -> None:
    other = PrivateKey.generate().public_key.hex()
    event = sign_event(KEY, 4, "x", tags=[["p", other], ["e", ID]], created_at=1000)
    me = KEY.public_key.hex()
    assert Filter().matches(event)
    assert Filter(ids=[event.id], authors=[me], kinds=[1, 4], since=1000, until=1000).matches(event)
    assert Filter(tags={"p": [other, ID], "e": [ID]}).matches(event)
    assert not Filter(ids=[ID]).matches(event)
    assert not Filter(authors=[other]).matches(event)
    assert not Filter(kinds=[1]).matches(event)
    assert not Filter(since=1001).matches(event)
    assert not Filter(until=999).matches(event)
    assert not Filter(tags={"p": [me]}).matches(event)
    assert not Filter(tags={"t": ["x"]}).matches(event)
    assert Filter(limit=0).matches(event)
