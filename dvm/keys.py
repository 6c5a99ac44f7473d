"""secp256k1 keys for Nostr: BIP-340 Schnorr signatures over x-only public keys, and ECDH.

NIP-01 identifies users by 32-byte x-only public keys and signs event ids with BIP-340.
NIP-04 and NIP-44 derive their keys from the x coordinate of ``secret * P``, where ``P`` is
the peer's x-only key lifted to the point with even y (BIP-340 ``lift_x``).

Backed by libsecp256k1 through the ``secp256k1`` package's CFFI bindings; the calls go to
the library directly so that argument lengths are checked here, before C sees them.
"""

from __future__ import annotations

import functools
import hmac
import os
import re

from secp256k1 import ffi, lib

from dvm import nip19
from dvm.nostr_errors import InvalidKey, Nip19Error

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")

_CTX = lib.secp256k1_context_create(lib.SECP256K1_CONTEXT_SIGN | lib.SECP256K1_CONTEXT_VERIFY)
lib.secp256k1_context_randomize(_CTX, os.urandom(32))


class PublicKey:
    """An x-only secp256k1 public key (32 bytes), validated to lie on the curve.

    Hashable and ordered by its bytes; ``repr`` shows the hex form.
    """

    __slots__ = ("_raw", "_xonly")

    def __init__(self, raw: bytes) -> None:
        """Parse 32 raw bytes; raise :class:`InvalidKey` if they are not an x on the curve."""
        if not isinstance(raw, bytes) or len(raw) != 32:
            raise InvalidKey("public key must be 32 bytes")
        xonly = ffi.new("secp256k1_xonly_pubkey *")
        if lib.secp256k1_xonly_pubkey_parse(_CTX, xonly, raw) != 1:
            raise InvalidKey(f"public key {raw.hex()} is not a point on secp256k1")
        self._raw = raw
        self._xonly = xonly

    @classmethod
    def from_hex(cls, hex_pub: str) -> PublicKey:
        """Parse 64 hex characters (cached: relays send the same authors again and again)."""
        if not isinstance(hex_pub, str) or not _HEX64.fullmatch(hex_pub):
            raise InvalidKey("public key must be 64 hex characters")
        return _public_key_from_hex(hex_pub.lower())

    @classmethod
    def from_npub_or_hex(cls, text: str) -> PublicKey:
        """Parse an ``npub1...`` (or ``nostr:npub1...``/``nprofile1...``) or 64 hex characters."""
        if not isinstance(text, str):
            raise InvalidKey("public key must be a string")
        text = text.strip()
        if _HEX64.fullmatch(text):
            return cls.from_hex(text)
        try:
            decoded = nip19.decode(text)
        except Nip19Error as exc:
            raise InvalidKey(f"not a public key (npub or 64 hex characters): {exc}") from exc
        if decoded.kind not in ("npub", "nprofile"):
            raise InvalidKey(f"expected an npub or nprofile, got {decoded.kind}")
        return cls.from_hex(decoded.hex)

    @property
    def raw(self) -> bytes:
        """The 32-byte x coordinate."""
        return self._raw

    def hex(self) -> str:
        """Lowercase hex of the 32-byte x coordinate, as NIP-01 writes ``pubkey``."""
        return self._raw.hex()

    def npub(self) -> str:
        """The NIP-19 ``npub1...`` form."""
        return nip19.npub_encode(self._raw.hex())

    def verify_schnorr(self, message32: bytes, signature: bytes) -> bool:
        """BIP-340 verification of a 64-byte signature over a 32-byte message."""
        if len(message32) != 32 or len(signature) != 64:
            return False
        return bool(lib.secp256k1_schnorrsig_verify(_CTX, signature, message32, 32, self._xonly) == 1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other._raw == self._raw

    def __lt__(self, other: PublicKey) -> bool:
        if not isinstance(other, PublicKey):
            return NotImplemented
        return self._raw < other._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"PublicKey({self._raw.hex()})"

    __str__ = hex


@functools.lru_cache(maxsize=4096)
def _public_key_from_hex(hex_pub: str) -> PublicKey:
    return PublicKey(bytes.fromhex(hex_pub))


class PrivateKey:
    """A secp256k1 secret key (1 <= k < n). ``repr``/``str`` never show the secret.

    Export it only on purpose with :meth:`secret_bytes`, :meth:`secret_hex` or :meth:`nsec`.
    """

    __slots__ = ("_secret", "_keypair", "_public_key")

    def __init__(self, secret: bytes) -> None:
        """Use :meth:`from_bytes`, :meth:`from_hex`, :meth:`from_nsec_or_hex` or :meth:`generate`."""
        if not isinstance(secret, bytes) or len(secret) != 32:
            raise InvalidKey("secret key must be 32 bytes")
        keypair = ffi.new("secp256k1_keypair *")
        if lib.secp256k1_keypair_create(_CTX, keypair, secret) != 1:
            raise InvalidKey("secret key is out of range (must be 1 .. n-1 of secp256k1)")
        xonly = ffi.new("secp256k1_xonly_pubkey *")
        lib.secp256k1_keypair_xonly_pub(_CTX, xonly, ffi.NULL, keypair)
        out = ffi.new("unsigned char[32]")
        lib.secp256k1_xonly_pubkey_serialize(_CTX, out, xonly)
        self._secret = secret
        self._keypair = keypair
        self._public_key = _public_key_from_hex(bytes(out).hex())

    @classmethod
    def generate(cls) -> PrivateKey:
        """A fresh key from the OS CSPRNG."""
        while True:
            secret = os.urandom(32)
            if lib.secp256k1_ec_seckey_verify(_CTX, secret) == 1:
                return cls(secret)

    @classmethod
    def from_bytes(cls, secret: bytes) -> PrivateKey:
        """From 32 big-endian bytes."""
        return cls(secret)

    @classmethod
    def from_hex(cls, hex_secret: str) -> PrivateKey:
        """From 64 hex characters."""
        if not isinstance(hex_secret, str) or not _HEX64.fullmatch(hex_secret):
            raise InvalidKey("secret key must be 64 hex characters")
        return cls(bytes.fromhex(hex_secret))

    @classmethod
    def from_nsec_or_hex(cls, text: str) -> PrivateKey:
        """From an ``nsec1...`` string or 64 hex characters (surrounding whitespace ignored)."""
        if not isinstance(text, str):
            raise InvalidKey("secret key must be a string")
        text = text.strip()
        if _HEX64.fullmatch(text):
            return cls.from_hex(text)
        try:
            decoded = nip19.decode(text)
        except Nip19Error as exc:
            raise InvalidKey(f"not a secret key (nsec or 64 hex characters): {exc}") from exc
        if decoded.kind != "nsec":
            raise InvalidKey(f"expected an nsec, got {decoded.kind}")
        return cls.from_hex(decoded.hex)

    @property
    def public_key(self) -> PublicKey:
        """The x-only public key."""
        return self._public_key

    def secret_bytes(self) -> bytes:
        """The 32 secret bytes (explicit export)."""
        return self._secret

    def secret_hex(self) -> str:
        """The secret as 64 hex characters (explicit export)."""
        return self._secret.hex()

    def nsec(self) -> str:
        """The secret as NIP-19 ``nsec1...`` (explicit export)."""
        return nip19.nsec_encode(self._secret)

    def sign_schnorr(self, message32: bytes, aux_rand: bytes | None = None) -> bytes:
        """BIP-340 signature (64 bytes) over a 32-byte message; ``aux_rand`` defaults to 32 fresh random bytes."""
        if not isinstance(message32, bytes) or len(message32) != 32:
            raise InvalidKey("message to sign must be 32 bytes")
        if aux_rand is None:
            aux_rand = os.urandom(32)
        elif not isinstance(aux_rand, bytes) or len(aux_rand) != 32:
            raise InvalidKey("aux_rand must be 32 bytes")
        sig = ffi.new("unsigned char[64]")
        if lib.secp256k1_schnorrsig_sign(_CTX, sig, message32, self._keypair, aux_rand) != 1:
            raise InvalidKey("BIP-340 signing failed")
        return bytes(sig)

    def shared_x(self, public_key: PublicKey) -> bytes:
        """ECDH: the 32-byte x coordinate of ``secret * lift_x(public_key)`` (unhashed, as NIP-04/44 use it)."""
        point = ffi.new("secp256k1_pubkey *")
        if lib.secp256k1_ec_pubkey_parse(_CTX, point, b"\x02" + public_key.raw, 33) != 1:
            raise InvalidKey(f"public key {public_key.hex()} is not a point on secp256k1")
        if lib.secp256k1_ec_pubkey_tweak_mul(_CTX, point, self._secret) != 1:
            raise InvalidKey("ECDH failed")
        out = ffi.new("unsigned char[33]")
        outlen = ffi.new("size_t *", 33)
        lib.secp256k1_ec_pubkey_serialize(_CTX, out, outlen, point, lib.SECP256K1_EC_COMPRESSED)
        return bytes(out)[1:]

    def __repr__(self) -> str:
        return f"PrivateKey(public_key={self._public_key.hex()})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivateKey) and hmac.compare_digest(other._secret, self._secret)

    def __hash__(self) -> int:
        return hash(self._public_key)
