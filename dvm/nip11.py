"""NIP-11 relay information documents.

A relay answers an HTTP GET on its websocket URL (``ws``→``http``, ``wss``→``https``) carrying
``Accept: application/nostr+json`` with a JSON object; its ``limitation`` object bounds what
clients may send (``max_message_length``, ``max_content_length``, ``auth_required``...).
Parsing is lenient the way the spec is: every field is optional, and a field of the wrong
type is treated as absent. Only a document that is not a JSON object is an error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from dvm.nostr_errors import NostrError

ACCEPT = "application/nostr+json"
MAX_DOCUMENT = 256 * 1024


class RelayInfoError(NostrError):
    """The relay information document could not be fetched or is not a JSON object."""


def _int(obj: dict[str, Any], name: str) -> int | None:
    value = obj.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _bool(obj: dict[str, Any], name: str) -> bool | None:
    value = obj.get(name)
    return value if isinstance(value, bool) else None


def _str(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class RelayLimits:
    """The ``limitation`` object (NIP-11 "Server Limitations"); ``None`` = not advertised."""

    max_message_length: int | None = None
    max_subscriptions: int | None = None
    max_limit: int | None = None
    max_subid_length: int | None = None
    max_event_tags: int | None = None
    max_content_length: int | None = None
    min_pow_difficulty: int | None = None
    auth_required: bool | None = None
    payment_required: bool | None = None
    restricted_writes: bool | None = None
    created_at_lower_limit: int | None = None
    created_at_upper_limit: int | None = None

    @classmethod
    def from_dict(cls, obj: Any) -> RelayLimits:
        if not isinstance(obj, dict):
            return cls()
        return cls(
            max_message_length=_int(obj, "max_message_length"),
            max_subscriptions=_int(obj, "max_subscriptions"),
            max_limit=_int(obj, "max_limit"),
            max_subid_length=_int(obj, "max_subid_length"),
            max_event_tags=_int(obj, "max_event_tags"),
            max_content_length=_int(obj, "max_content_length"),
            min_pow_difficulty=_int(obj, "min_pow_difficulty"),
            auth_required=_bool(obj, "auth_required"),
            payment_required=_bool(obj, "payment_required"),
            restricted_writes=_bool(obj, "restricted_writes"),
            created_at_lower_limit=_int(obj, "created_at_lower_limit"),
            created_at_upper_limit=_int(obj, "created_at_upper_limit"),
        )


@dataclass(frozen=True)
class RelayInfo:
    """A parsed NIP-11 document (the fields cdvm uses)."""

    name: str | None = None
    description: str | None = None
    pubkey: str | None = None
    contact: str | None = None
    software: str | None = None
    version: str | None = None
    supported_nips: tuple[int, ...] = ()
    limitation: RelayLimits = RelayLimits()

    @classmethod
    def from_dict(cls, obj: Any) -> RelayInfo:
        """Parse a decoded document; raise :class:`RelayInfoError` if it is not an object."""
        if not isinstance(obj, dict):
            raise RelayInfoError("relay information document is not a JSON object")
        nips = obj.get("supported_nips")
        supported = tuple(
            n for n in (nips if isinstance(nips, list) else ()) if isinstance(n, int) and not isinstance(n, bool)
        )
        return cls(
            name=_str(obj, "name"),
            description=_str(obj, "description"),
            pubkey=_str(obj, "pubkey"),
            contact=_str(obj, "contact"),
            software=_str(obj, "software"),
            version=_str(obj, "version"),
            supported_nips=supported,
            limitation=RelayLimits.from_dict(obj.get("limitation")),
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> RelayInfo:
        """Parse the raw document body."""
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as error:
            raise RelayInfoError(f"relay information document is not JSON: {error}") from None
        return cls.from_dict(obj)


def info_url(relay_url: str) -> str:
    """The HTTP(S) URL serving a relay's document: ``ws://`` → ``http://``, ``wss://`` → ``https://``."""
    if relay_url.startswith("wss://"):
        return "https://" + relay_url[len("wss://"):]
    if relay_url.startswith("ws://"):
        return "http://" + relay_url[len("ws://"):]
    raise RelayInfoError(f"not a relay URL (ws:// or wss://): {relay_url!r}")


async def fetch_relay_info(relay_url: str, timeout: float = 5.0) -> RelayInfo:
    """GET the relay's NIP-11 document; any network, HTTP or format failure is a :class:`RelayInfoError`."""
    url = info_url(relay_url)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(url, headers={"Accept": ACCEPT}) as response:
                if response.status != 200:
                    raise RelayInfoError(f"{url} answered HTTP {response.status} to the NIP-11 request")
                body = await response.content.read(MAX_DOCUMENT + 1)
    except (aiohttp.ClientError, TimeoutError) as error:
        raise RelayInfoError(f"could not fetch relay information from {url}: {error or type(error).__name__}") from None
    if len(body) > MAX_DOCUMENT:
        raise RelayInfoError(f"relay information document from {url} exceeds {MAX_DOCUMENT} bytes")
    return RelayInfo.from_json(body)
