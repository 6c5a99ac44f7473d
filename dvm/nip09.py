"""NIP-09 event deletion requests (kind 5): a customer cancels a job request it posted."""
from __future__ import annotations

from collections.abc import Iterable

from dvm.keys import PrivateKey
from dvm.nip01 import Event, sign_event

DELETION_KIND = 5


def build_deletion(signer: PrivateKey, event_ids: Iterable[str], kinds: Iterable[int] = (), reason: str = "") -> Event:
    """A deletion request for the signer's own events, with ``["e", id]`` and ``["k", kind]`` tags."""
    tags = [["e", event_id] for event_id in event_ids] + [["k", str(kind)] for kind in sorted(set(kinds))]
    return sign_event(signer, DELETION_KIND, reason, tags)


def deleted_ids(event: Event) -> list[str]:
    """The event ids a deletion request names (only the author's own events may be honoured)."""
    return event.tag_values("e") if event.kind == DELETION_KIND else []
