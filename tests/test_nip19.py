"""dvm.nip19: the NIP-19 examples, round trips, and typed errors for every malformed input."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvm import nip19
from dvm.nostr_errors import Nip19Error

PUB = "7e7e9c42a91bfef19fa929e5fda1b72e0ebc1a4c1141673e2794234d86addf4e"
NPUB = "npub10elfcs4fr0l0r8af98jlmgdh9c8tcxjvz9qkw038js35mp4dma8qzvjptg"
SEC = "67dea2ed018072d675f5415ecfaed7d2597555e202d85b3d65ea4e58d2d92ffa"
NSEC = "nsec1vl029mgpspedva04g90vltkh6fvh240zqtv9k0t9af8935ke9laqsnlfe5"
NPROFILE = (
    "nprofile1qqsrhuxx8l9ex335q7he0f09aej04zpazpl0ne2cgukyawd24mayt8gpp4mhxue69uhhytnc9e3k7mgpz4mhxue6"
    "9uhkg6nzv9ejuumpv34kytnrdaksjlyr9p"
)


def test_spec_examples() -> None:
    assert nip19.npub_encode(PUB) == NPUB
    assert nip19.decode(NPUB) == nip19.Decoded(kind="npub", hex=PUB)
    assert nip19.nsec_encode(SEC) == NSEC
    assert nip19.nsec_encode(bytes.fromhex(SEC)) == NSEC
    assert nip19.decode(NSEC).hex == SEC
    profile = nip19.decode(NPROFILE)
    assert profile.kind == "nprofile"
    assert profile.hex == "3bf0c63fcb93463407af97a5e5ee64fa883d107ef9e558472c4eb9aaaefa459d"
    assert profile.relays == ("wss://r.x.com", "wss://djbas.sadkb.com")
    assert nip19.nprofile_encode(profile.hex, profile.relays) == NPROFILE


def test_nsec_repr_hides_secret() -> None:
    assert SEC not in repr(nip19.decode(NSEC))
    assert PUB in repr(nip19.decode(NPUB))


def test_note_and_nevent_round_trip() -> None:
    note = nip19.note_encode(PUB)
    assert note.startswith("note1")
    assert nip19.decode(note) == nip19.Decoded(kind="note", hex=PUB)
    nevent = nip19.nevent_encode(PUB, ["wss://a.example", "wss://b.example/ü"], author=SEC, kind=5999)
    decoded = nip19.decode(nevent)
    assert decoded == nip19.Decoded(
        kind="nevent", hex=PUB, relays=("wss://a.example", "wss://b.example/ü"), author=SEC, event_kind=5999
    )
    bare = nip19.decode(nip19.nevent_encode(PUB))
    assert (bare.relays, bare.author, bare.event_kind) == ((), None, None)


def test_nostr_uri_and_case() -> None:
    assert nip19.decode("nostr:" + NPUB).hex == PUB
    assert nip19.decode("NOSTR:" + NPUB.upper()).hex == PUB
    assert nip19.decode(f"  {NPUB}\n").hex == PUB


def test_unknown_tlv_types_are_ignored() -> None:
    data = bytes([9, 2, 1, 2]) + bytes([0, 32]) + bytes.fromhex(PUB) + bytes([1, 3]) + b"wss"
    decoded = nip19.decode(nip19.bech32_encode("nprofile", data))
    assert decoded.hex == PUB
    assert decoded.relays == ("wss",)


def _flip(text: str, index: int) -> str:
    char = "q" if text[index] != "q" else "p"
    return text[:index] + char + text[index + 1 :]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_flip(NPUB, 10), "checksum"),
        (_flip(NPUB, len(NPUB) - 1), "checksum"),
        (NPUB[:-1], "checksum"),
        (NPUB[:5] + NPUB[5:].upper(), "mixes"),
        ("npub1", "too short"),
        ("1qqqqqqqq", "prefix"),
        ("nobech32here", "prefix"),
        (NPUB[:-6] + "bbbbbi", "invalid character"),
        (NPUB + "x" * 6000, "longer"),
        (nip19.bech32_encode("naddr", b"\x00" * 40), "unsupported"),
        (nip19.bech32_encode("xyz", bytes(32)), "unsupported"),
        (nip19.bech32_encode("npub", bytes(31)), "32 bytes"),
        (nip19.bech32_encode("nsec", bytes(33)), "32 bytes"),
        (nip19.bech32_encode("note", b""), "32 bytes"),
        (nip19.bech32_encode("nprofile", bytes([1, 3]) + b"wss"), "TLV 0"),
        (nip19.bech32_encode("nprofile", bytes([0, 31]) + bytes(31)), "TLV 0 must be 32"),
        (nip19.bech32_encode("nprofile", bytes([0, 32]) + bytes(30)), "truncated"),
        (nip19.bech32_encode("nprofile", bytes([0, 32]) + bytes(32) + bytes([1])), "truncated"),
        (nip19.bech32_encode("nprofile", bytes([0, 32]) + bytes(32) + bytes([1, 2]) + b"\xff\xfe"), "UTF-8"),
        (nip19.bech32_encode("nevent", bytes([0, 32]) + bytes(32) + bytes([2, 3, 1, 2, 3])), "author"),
        (nip19.bech32_encode("nevent", bytes([0, 32]) + bytes(32) + bytes([3, 2, 1, 2])), "kind"),
    ],
)
def test_decode_errors(text: str, message: str) -> None:
    with pytest.raises(Nip19Error, match=message):
        nip19.decode(text)


def test_bad_padding_is_rejected() -> None:
    # 52 data words = 260 bits: 4 padding bits must be zero.
    good = nip19.bech32_encode("npub", bytes(32))
    hrp, words = "npub", [0] * 51 + [1]
    polymod = nip19._polymod(nip19._hrp_expand(hrp) + words + [0] * 6) ^ 1
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    bad = hrp + "1" + "".join(nip19._CHARSET[w] for w in words + checksum)
    assert len(bad) == len(good)
    with pytest.raises(Nip19Error, match="padding"):
        nip19.decode(bad)


@pytest.mark.parametrize(
    "call",
    [
        lambda: nip19.npub_encode("ab" * 31),
        lambda: nip19.npub_encode("zz" * 32),
        lambda: nip19.nsec_encode(bytes(31)),
        lambda: nip19.note_encode(5),
        lambda: nip19.nprofile_encode(PUB, ["wss://" + "x" * 300]),
        lambda: nip19.nprofile_encode(PUB, [5]),
        lambda: nip19.nevent_encode(PUB, kind=-1),
        lambda: nip19.nevent_encode(PUB, kind=True),
        lambda: nip19.nevent_encode(PUB, author="nope"),
        lambda: nip19.decode(None),
        lambda: nip19.bech32_decode(b"npub1"),
    ],
)
def test_encode_errors(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Nip19Error):
        call()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_garbage_text(text: str) -> None:
    with contextlib.suppress(Nip19Error):
        nip19.decode(text)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["npub", "nsec", "note", "nprofile", "nevent", "naddr"]), st.binary(max_size=120))
def test_random_payloads_under_real_prefixes(hrp: str, data: bytes) -> None:
    text = nip19.bech32_encode(hrp, data)
    try:
        decoded = nip19.decode(text)
    except Nip19Error:
        return
    assert decoded.kind == hrp
    assert len(decoded.hex) == 64
