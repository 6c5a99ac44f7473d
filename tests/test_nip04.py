"""dvm.nip04: round trips, wire shape, and typed errors for malformed or mis-keyed payloads."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvm import nip04
from dvm.keys import PrivateKey
from dvm.nostr_errors import Nip04Error, NostrError

ALICE = PrivateKey.from_hex("1" * 64)
BOB = PrivateKey.from_hex("2" * 64)


def test_round_trip_and_shape() -> None:
    text = "hello NIP-04 ✓ " * 10
    payload = nip04.encrypt(ALICE, BOB.public_key, text)
    ciphertext, iv = payload.split("?iv=")
    assert len(base64.b64decode(iv)) == 16
    assert len(base64.b64decode(ciphertext)) % 16 == 0
    assert nip04.decrypt(BOB, ALICE.public_key, payload) == text
    assert nip04.decrypt(ALICE, BOB.public_key, payload) == text
    assert nip04.looks_like_nip04(payload)
    assert nip04.encrypt(ALICE, BOB.public_key, text) != payload  # fresh IV
    assert nip04.decrypt(BOB, ALICE.public_key, nip04.encrypt(ALICE, BOB.public_key, "")) == ""


def test_wrong_key_fails() -> None:
    payload = nip04.encrypt(ALICE, BOB.public_key, "x" * 100)
    with pytest.raises(Nip04Error, match="does not decrypt"):
        nip04.decrypt(PrivateKey.generate(), ALICE.public_key, payload)


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "abc",
        "?iv=",
        "AAAA?iv=AAAA",
        "AAAAAAAAAAAAAAAAAAAAAA==?iv=" + "A" * 22 + "==",  # 16 bytes, valid IV, wrong padding
        "AAAAAAAAAAAAAAA=?iv=" + "A" * 22 + "==",  # 11 bytes: not a whole block
        "A===?iv=" + "A" * 22 + "==",
        "!!!!?iv=" + "A" * 22 + "==",
        "A" * 2_000_000 + "?iv=" + "A" * 22 + "==",
    ],
)
def test_malformed_payloads(payload: str) -> None:
    with pytest.raises(Nip04Error):
        nip04.decrypt(BOB, ALICE.public_key, payload)


def test_bad_types() -> None:
    with pytest.raises(Nip04Error):
        nip04.decrypt(BOB, ALICE.public_key, None)  # type: ignore[arg-type]
    with pytest.raises(Nip04Error):
        nip04.encrypt(ALICE, BOB.public_key, b"x")  # type: ignore[arg-type]
    with pytest.raises(Nip04Error, match="UTF-8"):
        nip04.encrypt(ALICE, BOB.public_key, "\ud800")
    assert issubclass(Nip04Error, NostrError)


def test_looks_like() -> None:
    assert not nip04.looks_like_nip04("hello")
    assert not nip04.looks_like_nip04("AgAAAA" * 30)
    assert not nip04.looks_like_nip04(5)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=200)
    | st.tuples(st.binary(max_size=80), st.binary(min_size=16, max_size=16)).map(
        lambda p: f"{base64.b64encode(p[0]).decode()}?iv={base64.b64encode(p[1]).decode()}"
    )
)
def test_garbage(payload: str) -> None:
    with contextlib.suppress(Nip04Error):
        nip04.decrypt(BOB, ALICE.public_key, payload)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_round_trip_property(text: str) -> None:
    assert nip04.decrypt(BOB, ALICE.public_key, nip04.encrypt(ALICE, BOB.public_key, text)) == text
