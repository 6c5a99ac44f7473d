"""NIP-89 handler information (kind 31990): a DVM announces the job kinds it serves.

The event is addressable (``["d", identifier]``), lists one ``["k", kind]`` per kind, and its
content is a JSON object. cdvm adds a ``cdvm`` member that names the TEE type, the
attestation policy clients should apply, the model digests it serves and whether encrypted
params are supported.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dvm.keys import PrivateKey
from dvm.nip01 import Event, sign_event
from dvm.nostr_errors import NostrError

HANDLER_KIND = 31990


class AnnouncementError(NostrError):
    """A handler announcement is malformed."""


@dataclass(frozen=True)
class Announcement:
    """What a DVM says about itself."""

    pubkey: str
    identifier: str
    kinds: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def cdvm(self) -> dict[str, Any]:
        """The cdvm member of the content (empty for other DVMs)."""
        member = self.metadata.get("cdvm")
        return member if isinstance(member, dict) else {}


def build_announcement(
    signer: PrivateKey, identifier: str, kinds: Iterable[int], metadata: dict[str, Any]
) -> Event:
    """A kind 31990 handler announcement."""
    tags = [["d", identifier]] + [["k", str(kind)] for kind in kinds]
    return sign_event(signer, HANDLER_KIND, json.dumps(metadata, separators=(",", ":"), sort_keys=True), tags)


def parse_announcement(event: Event) -> Announcement:
    """Read a kind 31990 event; malformed content raises :class:`AnnouncementError`."""
    if event.kind != HANDLER_KIND:
        raise AnnouncementError(f"kind {event.kind} is not a handler announcement (31990)")
    try:
        metadata = json.loads(event.content) if event.content else {}
    except ValueError as exc:
        raise AnnouncementError("handler announcement content is not JSON") from exc
    if not isinstance(metadata, dict):
        raise AnnouncementError("handler announcement content must be a JSON object")
    try:
        kinds = tuple(int(value) for value in event.tag_values("k"))
    except ValueError as exc:
        raise AnnouncementError("a 'k' tag is not a kind number") from exc
    identifiers = event.tag_values("d")
    return Announcement(event.pubkey, identifiers[0] if identifiers else "", kinds, metadata)
