"""NIP-44 version 2 encrypted payloads: ECDH + HKDF + ChaCha20 + HMAC-SHA256, padded lengths.

``conversation_key = HKDF-extract(salt="nip44-v2", IKM=shared_x)``; per message,
``HKDF-expand(conversation_key, info=nonce, L=76)`` gives the ChaCha20 key (32), ChaCha20
nonce (12) and HMAC key (32). Payload: ``base64(0x02 ‖ nonce ‖ ciphertext ‖ mac)`` where the
MAC covers ``nonce ‖ ciphertext`` and the plaintext is prefixed with its u16 big-endian length
and zero-padded to :func:`calc_padded_len`.

Plaintexts are limited to 1..65,535 bytes. The later extended-length prefix (a zero u16
followed by a u32, for larger messages) is deliberately NOT implemented: other clients do
not understand it yet, so such payloads would be unreadable to them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from dvm.keys import PrivateKey, PublicKey
from dvm.nostr_errors import Nip44Error

VERSION = 2
MIN_PLAINTEXT_BYTES = 1
MAX_PLAINTEXT_BYTES = 65535
_SALT = b"nip44-v2"
_MIN_PAYLOAD_CHARS, _MAX_PAYLOAD_CHARS = 132, 87472
_MIN_DATA_BYTES, _MAX_DATA_BYTES = 99, 65603
_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def conversation_key(private_key: PrivateKey, public_key: PublicKey) -> bytes:
    """The 32-byte key two parties share: HKDF-extract over the ECDH x coordinate (symmetric)."""
    return hmac.new(_SALT, private_key.shared_x(public_key), hashlib.sha256).digest()


def message_keys(conversation_key: bytes, nonce: bytes) -> tuple[bytes, bytes, bytes]:
    """``(chacha_key, chacha_nonce, hmac_key)`` for one message (NIP-44 ``get_message_keys``)."""
    if not isinstance(conversation_key, bytes) or len(conversation_key) != 32:
        raise Nip44Error("conversation key must be 32 bytes")
    if not isinstance(nonce, bytes) or len(nonce) != 32:
        raise Nip44Error("nonce must be 32 bytes")
    keys = HKDFExpand(algorithm=hashes.SHA256(), length=76, info=nonce).derive(conversation_key)
    return keys[:32], keys[32:44], keys[44:]


def calc_padded_len(unpadded_len: int) -> int:
    """Padded length: 32 minimum, then chunks of 32 up to 256, then of next_power/8."""
    if unpadded_len <= 32:
        return 32
    next_power = 1 << (unpadded_len - 1).bit_length()
    chunk = 32 if next_power <= 256 else next_power // 8
    return chunk * ((unpadded_len - 1) // chunk + 1)


def _chacha20(key: bytes, nonce12: bytes, data: bytes) -> bytes:
    cipher = Cipher(algorithms.ChaCha20(key, b"\x00\x00\x00\x00" + nonce12), mode=None)
    out: bytes = cipher.encryptor().update(data)
    return out


def _mac(hmac_key: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    return hmac.new(hmac_key, nonce + ciphertext, hashlib.sha256).digest()


def encrypt(plaintext: str, conversation_key: bytes, nonce: bytes | None = None) -> str:
    """Encrypt to a base64 v2 payload; ``nonce`` (32 bytes) defaults to fresh randomness."""
    if not isinstance(plaintext, str):
        raise Nip44Error("plaintext must be a string")
    try:
        raw = plaintext.encode("utf-8")
    except UnicodeEncodeError:
        raise Nip44Error("plaintext is not encodable as UTF-8 (lone surrogate?)") from None
    if not MIN_PLAINTEXT_BYTES <= len(raw) <= MAX_PLAINTEXT_BYTES:
        raise Nip44Error(
            f"plaintext is {len(raw)} bytes; NIP-44 v2 carries {MIN_PLAINTEXT_BYTES} .. {MAX_PLAINTEXT_BYTES} bytes"
        )
    if nonce is None:
        nonce = os.urandom(32)
    chacha_key, chacha_nonce, hmac_key = message_keys(conversation_key, nonce)
    padded = len(raw).to_bytes(2, "big") + raw + bytes(calc_padded_len(len(raw)) - len(raw))
    ciphertext = _chacha20(chacha_key, chacha_nonce, padded)
    mac = _mac(hmac_key, nonce, ciphertext)
    return base64.b64encode(bytes((VERSION,)) + nonce + ciphertext + mac).decode("ascii")


def decrypt(payload: str, conversation_key: bytes) -> str:
    """Authenticate and decrypt a v2 payload; every failure raises :class:`Nip44Error`."""
    if not isinstance(payload, str):
        raise Nip44Error("payload must be a string")
    if not payload or payload[0] == "#":
        raise Nip44Error("unknown NIP-44 encryption version")
    if not _MIN_PAYLOAD_CHARS <= len(payload) <= _MAX_PAYLOAD_CHARS:
        raise Nip44Error(f"invalid NIP-44 payload length {len(payload)}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Nip44Error("NIP-44 payload is not valid base64") from None
    if not _MIN_DATA_BYTES <= len(data) <= _MAX_DATA_BYTES:
        raise Nip44Error(f"invalid NIP-44 decoded length {len(data)}")
    if data[0] != VERSION:
        raise Nip44Error(f"unknown NIP-44 encryption version {data[0]}")
    nonce, ciphertext, mac = data[1:33], data[33:-32], data[-32:]
    chacha_key, chacha_nonce, hmac_key = message_keys(conversation_key, nonce)
    if not hmac.compare_digest(_mac(hmac_key, nonce, ciphertext), mac):
        raise Nip44Error("NIP-44 MAC does not match (wrong key or tampered payload)")
    padded = _chacha20(chacha_key, chacha_nonce, ciphertext)
    unpadded_len = int.from_bytes(padded[:2], "big")
    if unpadded_len < MIN_PLAINTEXT_BYTES or len(padded) != 2 + calc_padded_len(unpadded_len):
        raise Nip44Error("NIP-44 padding is invalid")
    try:
        return padded[2 : 2 + unpadded_len].decode("utf-8")
    except UnicodeDecodeError:
        raise Nip44Error("NIP-44 plaintext is not valid UTF-8") from None


def looks_like_nip44(payload: str) -> bool:
    """Cheap shape test: a base64 string of plausible v2 length whose first byte is 0x02."""
    return (
        isinstance(payload, str)
        and _MIN_PAYLOAD_CHARS <= len(payload) <= _MAX_PAYLOAD_CHARS
        and payload[0] == "A"
        and len(payload) % 4 == 0
        and _B64_ALPHABET.issuperset(payload)
    )
