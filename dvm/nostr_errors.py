"""Typed errors of the Nostr core (keys, events, NIP-04/17/19/40/42/44/59).

Every malformed input handed to the sans-I/O Nostr modules ends in one of these, with a
message that names what was wrong (never the secret that was involved).
"""

from __future__ import annotations

from dvm.errors import CdvmError


class NostrError(CdvmError):
    """Base class of every error raised by the Nostr core."""


class InvalidKey(NostrError):
    """A secret or public key is malformed or not a valid secp256k1 key."""


class InvalidEvent(NostrError):
    """An event (or rumor) has the wrong shape, or its id does not match its content."""


class InvalidSignature(InvalidEvent):
    """An event's BIP-340 signature does not verify against its pubkey and id."""


class Nip19Error(NostrError):
    """A bech32 entity (npub, nsec, note, nprofile, nevent) cannot be encoded or decoded."""


class Nip04Error(NostrError):
    """A NIP-04 payload is malformed or does not decrypt."""


class Nip44Error(NostrError):
    """A NIP-44 payload is malformed, fails authentication, or a plaintext is out of range."""


class Nip59Error(NostrError):
    """A gift wrap or seal is malformed, mis-signed, or its layers disagree."""


class Nip17Error(NostrError):
    """A private direct message or DM relay list is not what NIP-17 specifies."""


class Nip42Error(NostrError):
    """A relay AUTH event does not answer the expected relay and challenge."""
