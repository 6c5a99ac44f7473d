"""NIP-04 encrypted direct messages (deprecated by NIP-17, kept for legacy peers).

AES-256-CBC with PKCS#7 padding; the key is the raw 32-byte ECDH x coordinate (unhashed);
payload ``base64(ciphertext) + "?iv=" + base64(iv)``. There is no authentication: a wrong
key usually, but not always, shows up as bad padding or non-UTF-8 output.
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from dvm.keys import PrivateKey, PublicKey
from dvm.nostr_errors import Nip04Error

MAX_PAYLOAD_CHARS = 1_000_000
_PAYLOAD = re.compile(r"([A-Za-z0-9+/]+={0,2})\?iv=([A-Za-z0-9+/]{22}==)")


def encrypt(sender: PrivateKey, recipient: PublicKey, plaintext: str) -> str:
    """Encrypt ``plaintext`` from ``sender`` to ``recipient`` with a fresh random IV."""
    if not isinstance(plaintext, str):
        raise Nip04Error("plaintext must be a string")
    try:
        raw = plaintext.encode("utf-8")
    except UnicodeEncodeError:
        raise Nip04Error("plaintext is not encodable as UTF-8 (lone surrogate?)") from None
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(raw) + padder.finalize()
    encryptor = Cipher(algorithms.AES(sender.shared_x(recipient)), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    return f"{base64.b64encode(ciphertext).decode()}?iv={base64.b64encode(iv).decode()}"


def decrypt(recipient: PrivateKey, sender: PublicKey, payload: str) -> str:
    """Decrypt a NIP-04 payload; malformed input or a wrong key raises :class:`Nip04Error`."""
    if not isinstance(payload, str):
        raise Nip04Error("payload must be a string")
    if len(payload) > MAX_PAYLOAD_CHARS:
        raise Nip04Error(f"NIP-04 payload longer than {MAX_PAYLOAD_CHARS} characters")
    match = _PAYLOAD.fullmatch(payload)
    if match is None:
        raise Nip04Error("not a NIP-04 payload (expected base64 ciphertext '?iv=' base64 16-byte IV)")
    try:
        ciphertext = base64.b64decode(match[1], validate=True)
        iv = base64.b64decode(match[2], validate=True)
    except (binascii.Error, ValueError):
        raise Nip04Error("NIP-04 payload is not valid base64") from None
    if not ciphertext or len(ciphertext) % 16:
        raise Nip04Error("NIP-04 ciphertext is not a whole number of AES blocks")
    decryptor = Cipher(algorithms.AES(recipient.shared_x(sender)), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        raw: bytes = unpadder.update(padded) + unpadder.finalize()
        return raw.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise Nip04Error("NIP-04 payload does not decrypt (wrong key or corrupted)") from None


def looks_like_nip04(payload: str) -> bool:
    """Shape test: ``base64?iv=base64`` with a 16-byte IV."""
    return isinstance(payload, str) and len(payload) <= MAX_PAYLOAD_CHARS and _PAYLOAD.fullmatch(payload) is not None
