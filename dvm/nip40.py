"""NIP-40 expiration: ``["expiration", "<unix seconds>"]``; relays and clients drop expired events.

A tag whose value is not a plain decimal integer is ignored (as rust-nostr does), so such an
event never counts as expired. An event is expired once ``now`` is past the timestamp.
"""

from __future__ import annotations

from typing import Protocol

from dvm.nip01 import MAX_CREATED_AT
from dvm.nostr_errors import InvalidEvent

TAG = "expiration"


class _Tagged(Protocol):
    def tag_values(self, name: str) -> list[str]: ...


def expiration(event: _Tagged) -> int | None:
    """The first well-formed expiration timestamp of an event or rumor, or ``None``."""
    for value in event.tag_values(TAG):
        if value.isascii() and value.isdigit() and len(value) <= 12:
            return int(value)
    return None


def is_expired(event: _Tagged, now: int) -> bool:
    """``True`` when the event carries an expiration strictly before ``now``."""
    when = expiration(event)
    return when is not None and when < now


def expiration_tag(timestamp: int) -> tuple[str, str]:
    """The tag that makes an event expire at ``timestamp``."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 <= timestamp <= MAX_CREATED_AT:
        raise InvalidEvent(f"expiration must be an integer in 0 .. {MAX_CREATED_AT}")
    return (TAG, str(timestamp))
