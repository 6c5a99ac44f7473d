"""NIP-59 gift wrap: rumor (unsigned) → seal (kind 13, by the author) → wrap (kind 1059, one-time key).

The seal's content is the rumor's JSON, NIP-44-encrypted from the author to the recipient;
its tags are empty. The wrap's content is the seal's JSON, NIP-44-encrypted from a fresh
ephemeral key, tagged ``["p", recipient]``. Seal and wrap ``created_at`` are drawn uniformly
from the two days before ``now`` to blunt timing analysis; the rumor keeps its real time.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from dvm import nip44
from dvm.keys import PrivateKey, PublicKey
from dvm.nip01 import Event, Rumor, sign_event
from dvm.nostr_errors import InvalidEvent, InvalidKey, Nip44Error, Nip59Error

SEAL_KIND = 13
GIFT_WRAP_KIND = 1059
MAX_TIME_TWEAK = 2 * 24 * 3600


def _random_past(now: int | None) -> int:
    base = int(time.time()) if now is None else now
    return max(0, base - secrets.randbelow(MAX_TIME_TWEAK + 1))


def _encrypt(sender: PrivateKey, recipient: PublicKey, plaintext: str, layer: str) -> str:
    try:
        return nip44.encrypt(plaintext, nip44.conversation_key(sender, recipient))
    except Nip44Error as exc:
        raise Nip59Error(f"cannot encrypt the {layer}: {exc}") from exc


def seal(sender: PrivateKey, rumor: Rumor, recipient: PublicKey, now: int | None = None) -> Event:
    """Kind-13 seal of ``rumor`` (whose pubkey must be the sender's) for ``recipient``."""
    if rumor.pubkey != sender.public_key.hex():
        raise Nip59Error("the rumor's pubkey must be the sealing key's (else the recipient rejects it)")
    content = _encrypt(sender, recipient, rumor.to_json(), "rumor")
    return sign_event(sender, SEAL_KIND, content, (), _random_past(now))


def gift_wrap(
    sender: PrivateKey,
    rumor: Rumor,
    recipient: PublicKey,
    *,
    now: int | None = None,
    extra_tags: Iterable[Iterable[str]] = (),
) -> Event:
    """Seal ``rumor`` and wrap it for ``recipient`` under a one-time key (kind 1059)."""
    sealed = seal(sender, rumor, recipient, now)
    ephemeral = PrivateKey.generate()
    content = _encrypt(ephemeral, recipient, sealed.to_json(), "seal")
    tags = [["p", recipient.hex()], *(list(tag) for tag in extra_tags)]
    return sign_event(ephemeral, GIFT_WRAP_KIND, content, tags, _random_past(now))


@dataclass(frozen=True)
class Unwrapped:
    """The three layers of an opened gift wrap; ``sender`` is the seal's (authenticated) author."""

    rumor: Rumor
    seal: Event
    wrap: Event
    sender: PublicKey


def _open(recipient: PrivateKey, event: Event, layer: str) -> str:
    try:
        return nip44.decrypt(event.content, nip44.conversation_key(recipient, PublicKey.from_hex(event.pubkey)))
    except (Nip44Error, InvalidKey) as exc:
        raise Nip59Error(f"cannot decrypt the {layer} {event.id}: {exc}") from exc


def unwrap(recipient: PrivateKey, wrap: Event) -> Unwrapped:
    """Open a gift wrap addressed to ``recipient``, checking every layer.

    Verifies the wrap's and seal's ids and signatures, the seal's kind, the rumor's id,
    and that the rumor's pubkey is the seal's signer (so the sender cannot be spoofed).
    """
    if wrap.kind != GIFT_WRAP_KIND:
        raise Nip59Error(f"event {wrap.id} is kind {wrap.kind}, not a gift wrap ({GIFT_WRAP_KIND})")
    try:
        wrap.verify()
    except InvalidEvent as exc:
        raise Nip59Error(f"gift wrap is not authentic: {exc}") from exc
    try:
        sealed = Event.from_json(_open(recipient, wrap, "gift wrap"))
        sealed.verify()
    except InvalidEvent as exc:
        raise Nip59Error(f"seal inside gift wrap {wrap.id} is invalid: {exc}") from exc
    if sealed.kind != SEAL_KIND:
        raise Nip59Error(f"gift wrap {wrap.id} holds a kind {sealed.kind} event, not a seal ({SEAL_KIND})")
    try:
        rumor = Rumor.from_json(_open(recipient, sealed, "seal"))
        rumor.verify()
    except InvalidEvent as exc:
        raise Nip59Error(f"rumor inside seal {sealed.id} is invalid: {exc}") from exc
    if rumor.pubkey != sealed.pubkey:
        raise Nip59Error(f"rumor author {rumor.pubkey} is not the seal signer {sealed.pubkey} (spoofed sender)")
    return Unwrapped(rumor=rumor, seal=sealed, wrap=wrap, sender=PublicKey.from_hex(sealed.pubkey))
