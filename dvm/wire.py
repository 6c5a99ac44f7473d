"""NIP-01 client/relay messages as plain data (sans-I/O).

Client → relay: ``["EVENT", event]``, ``["REQ", sub_id, filter...]``, ``["CLOSE", sub_id]``
and ``["AUTH", event]`` (NIP-42). Relay → client: ``EVENT``, ``OK``, ``EOSE``, ``CLOSED``,
``NOTICE`` and ``AUTH`` (NIP-01 "From relay to client", NIP-42). Every malformed frame ends
in :class:`WireError`; event signatures are *not* checked here (``dvm.nip01`` does that).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dvm.nostr_errors import NostrError

DEFAULT_MAX_FRAME = 4 * 1024 * 1024
"""Largest relay frame we parse (bytes); relays advertise their own limit for what we send."""

MAX_SUB_ID_LENGTH = 64
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TAG_NAME = re.compile(r"[A-Za-z]")


class WireError(NostrError):
    """A relay sent a frame that is not a well-formed NIP-01 message, or a filter is invalid."""


class _EventLike(Protocol):
    id: str
    pubkey: str
    created_at: int
    kind: int
    tags: Any


@dataclass(frozen=True)
class EventMessage:
    """``["EVENT", sub_id, event]``; ``event`` is still an unverified JSON object."""

    sub_id: str
    event: dict[str, Any]


@dataclass(frozen=True)
class Ok:
    """``["OK", event_id, accepted, message]`` (NIP-01). ``event_id`` may be empty: some
    relays (nostr-relay 1.14) answer a rejected event with ``""``."""

    event_id: str
    accepted: bool
    message: str

    @property
    def prefix(self) -> str:
        """The machine-readable prefix (``duplicate``, ``auth-required``...), or ``""``."""
        head, sep, _ = self.message.partition(":")
        return head.strip() if sep else ""


@dataclass(frozen=True)
class Eose:
    """``["EOSE", sub_id]``: stored events are done, live ones follow."""

    sub_id: str


@dataclass(frozen=True)
class Closed:
    """``["CLOSED", sub_id, message]``: the relay ended a subscription."""

    sub_id: str
    message: str


@dataclass(frozen=True)
class Notice:
    """``["NOTICE", message]``: human-readable, for logs only."""

    message: str


@dataclass(frozen=True)
class AuthChallenge:
    """``["AUTH", challenge]`` (NIP-42)."""

    challenge: str


RelayMessage = EventMessage | Ok | Eose | Closed | Notice | AuthChallenge


def _values(name: str, values: Iterable[Any] | None, kind: type) -> tuple | None:
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise WireError(f"filter field {name!r} must be a list, not {type(values).__name__}")
    items = tuple(values)
    for item in items:
        if not isinstance(item, kind) or isinstance(item, bool):
            raise WireError(f"filter field {name!r} holds {type(item).__name__}, expected {kind.__name__}")
    return items


def _hex_values(name: str, values: Iterable[Any] | None) -> tuple[str, ...] | None:
    items = _values(name, values, str)
    if items is not None:
        for item in items:
            if not _HEX64.fullmatch(item):
                raise WireError(f"filter field {name!r} needs 64 lowercase hex characters, got {item[:70]!r}")
    return items


def _optional_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WireError(f"filter field {name!r} must be a non-negative integer")
    return value


@dataclass(frozen=True)
class Filter:
    """A NIP-01 subscription filter. ``tags`` maps a single letter to accepted values
    (``{"p": [pubkey]}`` becomes ``"#p"``). Conditions within a filter are ANDed,
    values within a field ORed; ``limit`` only bounds the initial query."""

    ids: tuple[str, ...] | None = None
    authors: tuple[str, ...] | None = None
    kinds: tuple[int, ...] | None = None
    tags: tuple[tuple[str, tuple[str, ...]], ...] | Mapping[str, Iterable[str]] = field(default=())
    since: int | None = None
    until: int | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "ids", _hex_values("ids", self.ids))
        set_(self, "authors", _hex_values("authors", self.authors))
        set_(self, "kinds", _values("kinds", self.kinds, int))
        pairs = self.tags.items() if isinstance(self.tags, Mapping) else self.tags
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
            raise WireError("filter tags must map single letters to lists of values")
        tags: list[tuple[str, tuple[str, ...]]] = []
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise WireError("filter tags must be (letter, values) pairs")
            name, values = pair
            if not isinstance(name, str) or not _TAG_NAME.fullmatch(name):
                raise WireError(f"filter tag name must be a single letter a-z/A-Z, got {repr(name)[:40]}")
            tags.append((name, _values(f"#{name}", values, str) or ()))
        set_(self, "tags", tuple(sorted(tags)))
        for name in ("since", "until", "limit"):
            set_(self, name, _optional_int(name, getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object sent in a REQ."""
        out: dict[str, Any] = {}
        for name in ("ids", "authors", "kinds"):
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value)
        for name, values in self.tags:
            out[f"#{name}"] = list(values)
        for name in ("since", "until", "limit"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def matches(self, event: _EventLike) -> bool:
        """Whether ``event`` satisfies this filter (NIP-01 semantics; ``limit`` ignored)."""
        if self.ids is not None and event.id not in self.ids:
            return False
        if self.authors is not None and event.pubkey not in self.authors:
            return False
        if self.kinds is not None and event.kind not in self.kinds:
            return False
        if self.since is not None and event.created_at < self.since:
            return False
        if self.until is not None and event.created_at > self.until:
            return False
        for name, values in self.tags:
            wanted = set(values)
            if not any(len(tag) >= 2 and tag[0] == name and tag[1] in wanted for tag in event.tags):
                return False
        return True


def _dumps(message: list[Any]) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def _check_sub_id(sub_id: str) -> None:
    if not isinstance(sub_id, str) or not 0 < len(sub_id) <= MAX_SUB_ID_LENGTH:
        raise WireError(f"subscription id must be 1-{MAX_SUB_ID_LENGTH} characters")


def encode_event(event: Mapping[str, Any]) -> str:
    """``["EVENT", event]``."""
    return _dumps(["EVENT", dict(event)])


def encode_req(sub_id: str, filters: Iterable[Filter]) -> str:
    """``["REQ", sub_id, filter...]``; at least one filter."""
    _check_sub_id(sub_id)
    items = [f.to_dict() for f in filters]
    if not items:
        raise WireError("a REQ needs at least one filter")
    return _dumps(["REQ", sub_id, *items])


def encode_close(sub_id: str) -> str:
    """``["CLOSE", sub_id]``."""
    _check_sub_id(sub_id)
    return _dumps(["CLOSE", sub_id])


def encode_auth(event: Mapping[str, Any]) -> str:
    """``["AUTH", event]`` with a signed kind 22242 event (NIP-42)."""
    return _dumps(["AUTH", dict(event)])


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise WireError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _arity(message: list[Any], *allowed: int) -> None:
    if len(message) not in allowed:
        raise WireError(f"{message[0]} message has {len(message)} elements, expected {' or '.join(map(str, allowed))}")


def parse_relay_message(frame: str | bytes, max_size: int = DEFAULT_MAX_FRAME) -> RelayMessage:
    """Parse one relay→client frame; raise :class:`WireError` if it is malformed."""
    if len(frame) > max_size:
        raise WireError(f"relay frame of {len(frame)} bytes exceeds the {max_size}-byte limit")
    try:
        message = json.loads(frame)
    except (ValueError, RecursionError) as error:
        raise WireError(f"relay frame is not JSON: {error}") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise WireError("relay frame must be a JSON array starting with a message type")
    kind = message[0]
    if kind == "EVENT":
        _arity(message, 3)
        if not isinstance(message[2], dict):
            raise WireError("EVENT message must carry a JSON object")
        return EventMessage(_string(message[1], "subscription id"), message[2])
    if kind == "OK":
        _arity(message, 3, 4)
        event_id = _string(message[1], "OK event id")
        if event_id and not _HEX64.fullmatch(event_id):
            raise WireError("OK event id must be 64 lowercase hex characters")
        if not isinstance(message[2], bool):
            raise WireError("OK accepted flag must be true or false")
        text = _string(message[3], "OK message") if len(message) == 4 else ""
        return Ok(event_id, message[2], text)
    if kind == "EOSE":
        _arity(message, 2)
        return Eose(_string(message[1], "subscription id"))
    if kind == "CLOSED":
        _arity(message, 2, 3)
        text = _string(message[2], "CLOSED message") if len(message) == 3 else ""
        return Closed(_string(message[1], "subscription id"), text)
    if kind == "NOTICE":
        _arity(message, 2)
        return Notice(_string(message[1], "NOTICE message"))
    if kind == "AUTH":
        _arity(message, 2)
        return AuthChallenge(_string(message[1], "AUTH challenge"))
    raise WireError(f"unknown relay message type {kind[:32]!r}")
