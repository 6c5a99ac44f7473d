"""NIP-19 bech32-encoded entities: npub, nsec, note, nprofile, nevent (and NIP-21 ``nostr:`` URIs).

Bech32 is BIP-173 (not bech32m). Bare keys and ids are 32 bytes; nprofile/nevent carry TLV
records: 0 = special (pubkey or event id, 32 bytes), 1 = relay (UTF-8), 2 = author (32 bytes),
3 = kind (32-bit big-endian). Unknown TLV types are ignored when reading, as NIP-19 asks.
BIP-173's 90-character limit is not applied (TLV entities exceed it); a generous cap stops abuse.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dvm.nostr_errors import Nip19Error

MAX_LENGTH = 5000
_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_CHARSET_REV = {c: i for i, c in enumerate(_CHARSET)}
_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BARE = ("npub", "nsec", "note")
_TLV_SPECIAL, _TLV_RELAY, _TLV_AUTHOR, _TLV_KIND = 0, 1, 2, 3


def _polymod(values: Iterable[int]) -> int:
    chk = 1
    for value in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ value
        for i in range(5):
            if (top >> i) & 1:
                chk ^= _GENERATOR[i]
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convertbits(data: Sequence[int], frombits: int, tobits: int, pad: bool) -> list[int]:
    acc = 0
    bits = 0
    out: list[int] = []
    maxv = (1 << tobits) - 1
    max_acc = (1 << (frombits + tobits - 1)) - 1
    for value in data:
        acc = ((acc << frombits) | value) & max_acc
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            out.append((acc >> bits) & maxv)
    if pad:
        if bits:
            out.append((acc << (tobits - bits)) & maxv)
    elif bits >= frombits or (acc << (tobits - bits)) & maxv:
        raise Nip19Error("bech32 data has invalid padding")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    """BIP-173 bech32 of ``data`` (8-bit bytes) under human-readable part ``hrp``."""
    words = _convertbits(data, 8, 5, True)
    polymod = _polymod(_hrp_expand(hrp) + words + [0] * 6) ^ 1
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[w] for w in words + checksum)


def bech32_decode(text: str) -> tuple[str, bytes]:
    """Split and verify a BIP-173 string; return ``(hrp, data bytes)`` or raise :class:`Nip19Error`."""
    if not isinstance(text, str):
        raise Nip19Error("bech32 input must be a string")
    if len(text) > MAX_LENGTH:
        raise Nip19Error(f"bech32 string longer than {MAX_LENGTH} characters")
    if text.lower() != text and text.upper() != text:
        raise Nip19Error("bech32 string mixes upper and lower case")
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1:
        raise Nip19Error("bech32 string has no human-readable prefix")
    if pos + 7 > len(text):
        raise Nip19Error("bech32 string too short for its checksum")
    hrp, payload = text[:pos], text[pos + 1 :]
    if any(not 33 <= ord(c) <= 126 for c in hrp):
        raise Nip19Error("bech32 prefix has invalid characters")
    try:
        words = [_CHARSET_REV[c] for c in payload]
    except KeyError as exc:
        raise Nip19Error(f"bech32 string has an invalid character {exc.args[0]!r}") from None
    if _polymod(_hrp_expand(hrp) + words) != 1:
        raise Nip19Error("bech32 checksum is wrong (mistyped or truncated?)")
    return hrp, bytes(_convertbits(words[:-6], 5, 8, False))


@dataclass(frozen=True)
class Decoded:
    """A decoded NIP-19 entity. ``hex`` is the pubkey, secret key or event id it carries."""

    kind: str
    hex: str
    relays: tuple[str, ...] = ()
    author: str | None = None
    event_kind: int | None = None

    def __repr__(self) -> str:
        shown = "<secret>" if self.kind == "nsec" else self.hex
        return (
            f"Decoded(kind={self.kind!r}, hex={shown!r}, relays={self.relays!r}, "
            f"author={self.author!r}, event_kind={self.event_kind!r})"
        )


def _hex32(value: str | bytes, what: str) -> bytes:
    if isinstance(value, bytes):
        if len(value) != 32:
            raise Nip19Error(f"{what} must be 32 bytes")
        return value
    if not isinstance(value, str) or not _HEX64.fullmatch(value.lower()):
        raise Nip19Error(f"{what} must be 64 hex characters")
    return bytes.fromhex(value)


def npub_encode(pubkey_hex: str) -> str:
    """``npub1...`` for a 32-byte public key."""
    return bech32_encode("npub", _hex32(pubkey_hex, "public key"))


def nsec_encode(secret: bytes | str) -> str:
    """``nsec1...`` for a 32-byte secret key (bytes or hex)."""
    return bech32_encode("nsec", _hex32(secret, "secret key"))


def note_encode(id_hex: str) -> str:
    """``note1...`` for a 32-byte event id."""
    return bech32_encode("note", _hex32(id_hex, "event id"))


def _tlv(tag: int, value: bytes) -> bytes:
    if len(value) > 255:
        raise Nip19Error("a TLV value is longer than 255 bytes (relay URL too long?)")
    return bytes((tag, len(value))) + value


def _relay_tlvs(relays: Iterable[str]) -> bytes:
    out = b""
    for relay in relays:
        if not isinstance(relay, str):
            raise Nip19Error("relay URLs must be strings")
        out += _tlv(_TLV_RELAY, relay.encode())
    return out


def nprofile_encode(pubkey_hex: str, relays: Iterable[str] = ()) -> str:
    """``nprofile1...``: a public key plus relay hints."""
    data = _tlv(_TLV_SPECIAL, _hex32(pubkey_hex, "public key")) + _relay_tlvs(relays)
    return bech32_encode("nprofile", data)


def nevent_encode(id_hex: str, relays: Iterable[str] = (), author: str | None = None, kind: int | None = None) -> str:
    """``nevent1...``: an event id plus optional relay hints, author and kind."""
    data = _tlv(_TLV_SPECIAL, _hex32(id_hex, "event id")) + _relay_tlvs(relays)
    if author is not None:
        data += _tlv(_TLV_AUTHOR, _hex32(author, "author"))
    if kind is not None:
        if isinstance(kind, bool) or not isinstance(kind, int) or not 0 <= kind < 2**32:
            raise Nip19Error("kind must be an integer in 0 .. 2^32-1")
        data += _tlv(_TLV_KIND, kind.to_bytes(4, "big"))
    return bech32_encode("nevent", data)


def _parse_tlv(data: bytes) -> list[tuple[int, bytes]]:
    records = []
    i = 0
    while i < len(data):
        if i + 2 > len(data):
            raise Nip19Error("TLV record truncated")
        tag, length = data[i], data[i + 1]
        value = data[i + 2 : i + 2 + length]
        if len(value) != length:
            raise Nip19Error("TLV record truncated")
        records.append((tag, value))
        i += 2 + length
    return records


def decode(text: str) -> Decoded:
    """Decode an npub/nsec/note/nprofile/nevent, optionally prefixed with ``nostr:`` (NIP-21)."""
    if not isinstance(text, str):
        raise Nip19Error("NIP-19 input must be a string")
    text = text.strip()
    if text[:6].lower() == "nostr:":
        text = text[6:]
    hrp, data = bech32_decode(text)
    if hrp in _BARE:
        if len(data) != 32:
            raise Nip19Error(f"{hrp} must carry 32 bytes, got {len(data)}")
        return Decoded(kind=hrp, hex=data.hex())
    if hrp not in ("nprofile", "nevent"):
        raise Nip19Error(f"unsupported NIP-19 prefix {hrp!r} (expected npub, nsec, note, nprofile or nevent)")
    special: bytes | None = None
    relays: list[str] = []
    author: str | None = None
    event_kind: int | None = None
    for tag, value in _parse_tlv(data):
        if tag == _TLV_SPECIAL:
            if len(value) != 32:
                raise Nip19Error(f"{hrp} TLV 0 must be 32 bytes, got {len(value)}")
            if special is None:
                special = value
        elif tag == _TLV_RELAY:
            try:
                relays.append(value.decode())
            except UnicodeDecodeError:
                raise Nip19Error(f"{hrp} relay hint is not UTF-8") from None
        elif tag == _TLV_AUTHOR and hrp == "nevent":
            if len(value) != 32:
                raise Nip19Error(f"nevent author must be 32 bytes, got {len(value)}")
            author = value.hex()
        elif tag == _TLV_KIND and hrp == "nevent":
            if len(value) != 4:
                raise Nip19Error(f"nevent kind must be 4 bytes, got {len(value)}")
            event_kind = int.from_bytes(value, "big")
    if special is None:
        raise Nip19Error(f"{hrp} lacks its TLV 0 (the {'public key' if hrp == 'nprofile' else 'event id'})")
    return Decoded(kind=hrp, hex=special.hex(), relays=tuple(relays), author=author, event_kind=event_kind)
