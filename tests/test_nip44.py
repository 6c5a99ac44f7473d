"""dvm.nip44: every official v2 vector (paulmillr/nip44) plus garbage and limit checks."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvm import nip44
from dvm.keys import PrivateKey, PublicKey
from dvm.nostr_errors import InvalidKey, Nip44Error, NostrError

VECTORS_SHA256 = "269ed0f69e4c192512cc779e78c555090cebc7c785b609e338a62afc3ce25040"


@pytest.fixture(scope="module")
def v2(vectors: Path) -> dict[str, Any]:
    raw = (vectors / "nostr" / "nip44.vectors.json").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == VECTORS_SHA256
    return json.loads(raw)["v2"]


def test_get_conversation_key(v2: dict[str, Any]) -> None:
    cases = v2["valid"]["get_conversation_key"]
    assert len(cases) == 35
    for case in cases:
        key = nip44.conversation_key(PrivateKey.from_hex(case["sec1"]), PublicKey.from_hex(case["pub2"]))
        assert key.hex() == case["conversation_key"], case.get("note")


def test_get_message_keys(v2: dict[str, Any]) -> None:
    section = v2["valid"]["get_message_keys"]
    conversation_key = bytes.fromhex(section["conversation_key"])
    assert len(section["keys"]) == 32
    for case in section["keys"]:
        chacha_key, chacha_nonce, hmac_key = nip44.message_keys(conversation_key, bytes.fromhex(case["nonce"]))
        assert (chacha_key.hex(), chacha_nonce.hex(), hmac_key.hex()) == (
            case["chacha_key"],
            case["chacha_nonce"],
            case["hmac_key"],
        )


def test_calc_padded_len(v2: dict[str, Any]) -> None:
    cases = v2["valid"]["calc_padded_len"]
    assert len(cases) == 24
    for unpadded, padded in cases:
        assert nip44.calc_padded_len(unpadded) == padded


def test_encrypt_decrypt(v2: dict[str, Any]) -> None:
    cases = v2["valid"]["encrypt_decrypt"]
    assert len(cases) == 10
    for case in cases:
        sec1, sec2 = PrivateKey.from_hex(case["sec1"]), PrivateKey.from_hex(case["sec2"])
        key = nip44.conversation_key(sec1, sec2.public_key)
        assert key.hex() == case["conversation_key"]
        assert nip44.conversation_key(sec2, sec1.public_key) == key
        payload = nip44.encrypt(case["plaintext"], key, bytes.fromhex(case["nonce"]))
        assert payload == case["payload"]
        assert nip44.decrypt(payload, key) == case["plaintext"]
        assert nip44.looks_like_nip44(payload)


def test_encrypt_decrypt_long_msg(v2: dict[str, Any]) -> None:
    cases = v2["valid"]["encrypt_decrypt_long_msg"]
    assert len(cases) == 3
    for case in cases:
        key = bytes.fromhex(case["conversation_key"])
        plaintext = case["pattern"] * case["repeat"]
        assert hashlib.sha256(plaintext.encode()).hexdigest() == case["plaintext_sha256"]
        payload = nip44.encrypt(plaintext, key, bytes.fromhex(case["nonce"]))
        assert hashlib.sha256(payload.encode()).hexdigest() == case["payload_sha256"]
        assert nip44.decrypt(payload, key) == plaintext


def test_invalid_encrypt_msg_lengths(v2: dict[str, Any]) -> None:
    lengths = v2["invalid"]["encrypt_msg_lengths"]
    assert len(lengths) == 4
    key = bytes(32)
    for length in lengths:
        with pytest.raises(Nip44Error, match="bytes"):
            nip44.encrypt("a" * length, key)


def test_invalid_get_conversation_key(v2: dict[str, Any]) -> None:
    cases = v2["invalid"]["get_conversation_key"]
    assert len(cases) == 8
    for case in cases:
        with pytest.raises(InvalidKey):
            nip44.conversation_key(PrivateKey.from_hex(case["sec1"]), PublicKey.from_hex(case["pub2"]))


def test_invalid_decrypt(v2: dict[str, Any]) -> None:
    cases = v2["invalid"]["decrypt"]
    assert len(cases) == 12
    for case in cases:
        with pytest.raises(Nip44Error):
            nip44.decrypt(case["payload"], bytes.fromhex(case["conversation_key"]))


def test_max_plaintext_boundary() -> None:
    key = bytes(range(32))
    assert nip44.MAX_PLAINTEXT_BYTES == 65535
    text = "é" * 32767 + "a"  # 65,535 UTF-8 bytes
    assert nip44.decrypt(nip44.encrypt(text, key), key) == text
    with pytest.raises(Nip44Error, match="65536 bytes"):
        nip44.encrypt("é" * 32768, key)
    with pytest.raises(Nip44Error, match="0 bytes"):
        nip44.encrypt("", key)


def test_bad_arguments() -> None:
    key = bytes(32)
    with pytest.raises(Nip44Error, match="UTF-8"):
        nip44.encrypt("\udc80", key)
    with pytest.raises(Nip44Error, match="plaintext must be a string"):
        nip44.encrypt(b"x", key)  # type: ignore[arg-type]
    with pytest.raises(Nip44Error, match="conversation key"):
        nip44.encrypt("x", bytes(31))
    with pytest.raises(Nip44Error, match="nonce"):
        nip44.encrypt("x", key, bytes(16))
    with pytest.raises(Nip44Error, match="payload must be a string"):
        nip44.decrypt(None, key)  # type: ignore[arg-type]
    assert issubclass(Nip44Error, NostrError)


def test_random_nonce_and_wrong_key() -> None:
    a, b, c = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    key = nip44.conversation_key(a, b.public_key)
    first, second = nip44.encrypt("same", key), nip44.encrypt("same", key)
    assert first != second
    with pytest.raises(Nip44Error, match="MAC"):
        nip44.decrypt(first, nip44.conversation_key(a, c.public_key))


def test_non_utf8_plaintext_is_refused() -> None:
    key = bytes(range(32))
    nonce = bytes(32)
    chacha_key, chacha_nonce, hmac_key = nip44.message_keys(key, nonce)
    padded = (2).to_bytes(2, "big") + b"\xff\xfe" + bytes(30)
    ciphertext = nip44._chacha20(chacha_key, chacha_nonce, padded)
    payload = base64.b64encode(b"\x02" + nonce + ciphertext + nip44._mac(hmac_key, nonce, ciphertext)).decode()
    with pytest.raises(Nip44Error, match="UTF-8"):
        nip44.decrypt(payload, key)


def test_looks_like() -> None:
    payload = nip44.encrypt("hi", bytes(32))
    assert nip44.looks_like_nip44(payload)
    assert not nip44.looks_like_nip44("abc?iv=def")
    assert not nip44.looks_like_nip44("B" + payload[1:])
    assert not nip44.looks_like_nip44(payload[:-1])
    assert not nip44.looks_like_nip44(None)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=400) | st.binary(min_size=99, max_size=400).map(lambda b: base64.b64encode(b"\x02" + b).decode())
)
def test_garbage_payloads(payload: str) -> None:
    with pytest.raises(Nip44Error):
        nip44.decrypt(payload, bytes(32))


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=500))
def test_round_trip(text: str) -> None:
    key = bytes(range(32))
    assert nip44.decrypt(nip44.encrypt(text, key), key) == text
