"""NIP-42 client authentication to relays: a signed kind-22242 event answering a challenge.

Tags ``["relay", url]`` and ``["challenge", challenge]``; content empty. Relays accept it when
the signature verifies, the challenge matches, the relay URL names them, and ``created_at``
is close to now (about ten minutes).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from dvm.keys import PrivateKey
from dvm.nip01 import Event, sign_event
from dvm.nostr_errors import InvalidEvent, Nip42Error

AUTH_KIND = 22242


def build_auth_event(private_key: PrivateKey, relay_url: str, challenge: str, now: int | None = None) -> Event:
    """The AUTH event to send as ``["AUTH", event]`` after a relay's ``["AUTH", challenge]``."""
    if not isinstance(relay_url, str) or not isinstance(challenge, str):
        raise Nip42Error("relay URL and challenge must be strings")
    return sign_event(private_key, AUTH_KIND, "", [["relay", relay_url], ["challenge", challenge]], now)


def _normalize_url(url: str) -> tuple[str, str, str]:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise Nip42Error(f"relay URL {url!r} is malformed") from None
    default_port = {"ws": 80, "wss": 443}.get(parts.scheme.lower())
    netloc = (parts.hostname or "").lower()
    if port is not None and port != default_port:
        netloc += f":{port}"
    return parts.scheme.lower(), netloc, parts.path.rstrip("/")


def verify_auth_event(event: Event, relay_url: str, challenge: str, now: int, max_age: int = 600) -> None:
    """Check an AUTH event for this relay and challenge; any mismatch raises :class:`Nip42Error`."""
    if event.kind != AUTH_KIND:
        raise Nip42Error(f"AUTH event must be kind {AUTH_KIND}, got {event.kind}")
    try:
        event.verify()
    except InvalidEvent as exc:
        raise Nip42Error(f"AUTH event is not authentic: {exc}") from exc
    if event.tag_values("challenge")[:1] != [challenge]:
        raise Nip42Error("AUTH event answers a different challenge")
    relays = event.tag_values("relay")
    if not relays or _normalize_url(relays[0]) != _normalize_url(relay_url):
        raise Nip42Error(f"AUTH event is for relay {relays[0] if relays else None!r}, not {relay_url!r}")
    if abs(now - event.created_at) > max_age:
        raise Nip42Error(f"AUTH event created_at is more than {max_age} s away from now")
