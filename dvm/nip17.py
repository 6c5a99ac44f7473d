"""NIP-17 private direct messages: kind-14 chat rumors delivered as NIP-59 gift wraps.

The rumor names every recipient in ``["p", pubkey]`` tags (optional ``["subject", ...]``); one
gift wrap goes to each recipient and one to the sender, so the sender's other devices see the
conversation too. Users publish where they read DMs in a kind-10050 event of ``["relay", url]``
tags. Kind 15 (file messages) is opened the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from dvm import nip59
from dvm.keys import PrivateKey, PublicKey
from dvm.nip01 import Event, Tags, make_rumor, sign_event
from dvm.nostr_errors import InvalidKey, Nip17Error

CHAT_KIND = 14
FILE_KIND = 15
DM_RELAYS_KIND = 10050


def build_dm(
    sender: PrivateKey,
    recipient: PublicKey,
    content: str,
    *,
    tags: Iterable[Iterable[str]] = (),
    subject: str | None = None,
    include_sender_copy: bool = True,
    now: int | None = None,
) -> list[Event]:
    """Gift wraps of one kind-14 message: first the recipient's, then (optionally) the sender's copy."""
    created_at = int(time.time()) if now is None else now
    rumor_tags: list[Iterable[str]] = [["p", recipient.hex()]]
    if subject is not None:
        rumor_tags.append(["subject", subject])
    rumor_tags.extend(tags)
    rumor = make_rumor(sender.public_key, CHAT_KIND, content, rumor_tags, created_at)
    wraps = [nip59.gift_wrap(sender, rumor, recipient, now=now)]
    if include_sender_copy and recipient != sender.public_key:
        wraps.append(nip59.gift_wrap(sender, rumor, sender.public_key, now=now))
    return wraps


@dataclass(frozen=True)
class DirectMessage:
    """An opened private message; ``sender`` is authenticated by the seal's signature.

    ``repr`` omits the content.
    """

    sender: PublicKey
    recipients: tuple[PublicKey, ...]
    content: str = field(repr=False)
    created_at: int
    kind: int
    tags: Tags
    rumor_id: str

    @property
    def subject(self) -> str | None:
        """The conversation subject, if the message sets one."""
        for tag in self.tags:
            if len(tag) >= 2 and tag[0] == "subject":
                return tag[1]
        return None


def open_dm(recipient: PrivateKey, wrap: Event) -> DirectMessage:
    """Unwrap a gift wrap (NIP-59 checks) and require a kind-14 or kind-15 rumor."""
    unwrapped = nip59.unwrap(recipient, wrap)
    rumor = unwrapped.rumor
    if rumor.kind not in (CHAT_KIND, FILE_KIND):
        raise Nip17Error(f"gift wrap {wrap.id} holds a kind {rumor.kind} rumor, not a direct message")
    try:
        recipients = tuple(PublicKey.from_hex(value) for value in rumor.tag_values("p"))
    except InvalidKey as exc:
        raise Nip17Error(f"direct message {rumor.id} has a malformed 'p' tag: {exc}") from exc
    return DirectMessage(
        sender=unwrapped.sender,
        recipients=recipients,
        content=rumor.content,
        created_at=rumor.created_at,
        kind=rumor.kind,
        tags=rumor.tags,
        rumor_id=rumor.id,
    )


def _is_ws_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("ws", "wss") and bool(parts.hostname)


def dm_relay_list(private_key: PrivateKey, relays: list[str], now: int | None = None) -> Event:
    """Kind-10050 event listing the relays where this key reads its DMs."""
    bad = [url for url in relays if not isinstance(url, str) or not _is_ws_url(url)]
    if bad:
        raise Nip17Error(f"DM relays must be ws:// or wss:// URLs: {bad!r}")
    return sign_event(private_key, DM_RELAYS_KIND, "", [["relay", url] for url in relays], now)


def parse_dm_relay_list(event: Event) -> list[str]:
    """The ws/wss relay URLs of a kind-10050 event, in order, without duplicates or junk.

    Verify the event (:meth:`Event.verify`) before trusting the list.
    """
    if event.kind != DM_RELAYS_KIND:
        raise Nip17Error(f"event {event.id} is kind {event.kind}, not a DM relay list ({DM_RELAYS_KIND})")
    seen: dict[str, None] = {}
    for url in event.tag_values("relay"):
        if _is_ws_url(url):
            seen.setdefault(url, None)
    return list(seen)
