"""dvm.nip40: reading, writing and judging expiration tags."""

from __future__ import annotations

import pytest

from dvm import nip40
from dvm.keys import PrivateKey
from dvm.nip01 import make_rumor, sign_event
from dvm.nostr_errors import InvalidEvent

KEY = PrivateKey.from_hex("3" * 64)


def test_expiration_round_trip() -> None:
    event = sign_event(KEY, 5999, "", [nip40.expiration_tag(1_700_000_600)], 1_700_000_000)
    assert event.tags == (("expiration", "1700000600"),)
    assert nip40.expiration(event) == 1_700_000_600
    assert not nip40.is_expired(event, 1_700_000_599)
    assert not nip40.is_expired(event, 1_700_000_600)
    assert nip40.is_expired(event, 1_700_000_601)


def test_no_tag_never_expires() -> None:
    event = sign_event(KEY, 1, "", [], 1)
    assert nip40.expiration(event) is None
    assert not nip40.is_expired(event, 2**32 - 1)


@pytest.mark.parametrize("value", ["", "soon", "-5", "1.5", " 12", "１２", "9" * 20])
def test_malformed_values_are_ignored(value: str) -> None:
    event = sign_event(KEY, 1, "", [["expiration", value]], 1)
    assert nip40.expiration(event) is None
    mixed = sign_event(KEY, 1, "", [["expiration", value], ["expiration", "10"]], 1)
    assert nip40.expiration(mixed) == 10


def test_works_on_rumors() -> None:
    rumor = make_rumor(KEY.public_key, 14, "", [["expiration", "100"]], 1)
    assert nip40.is_expired(rumor, 101)


@pytest.mark.parametrize("bad", [-1, 2**32, True, "100", 1.0])
def test_expiration_tag_validates(bad: object) -> None:
    with pytest.raises(InvalidEvent):
        nip40.expiration_tag(bad)  # type: ignore[arg-type]
