"""NIP-01 events: shape validation, canonical serialization, ids and BIP-340 signatures.

The id is SHA-256 of the UTF-8 JSON array ``[0, pubkey, created_at, kind, tags, content]``
with no whitespace, non-ASCII characters written verbatim, and only the escapes NIP-01
lists (``\\n \\" \\\\ \\r \\t \\b \\f``, other control characters as ``\\u00XX``) — exactly
what ``json.dumps(..., separators=(",", ":"), ensure_ascii=False)`` produces.

Rumors (NIP-59) are events without a signature; they share the validation below.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dvm.keys import PrivateKey, PublicKey
from dvm.nostr_errors import InvalidEvent, InvalidKey, InvalidSignature

MAX_KIND = 65535
MAX_CREATED_AT = 2**32 - 1
"""Upper bound on ``created_at`` (year 2106); NIP-01 gives none, but larger values are junk."""

Tags = tuple[tuple[str, ...], ...]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_EVENT_FIELDS = ("id", "pubkey", "created_at", "kind", "tags", "content", "sig")
_RUMOR_FIELDS = ("pubkey", "created_at", "kind", "tags", "content")


def _check_hex(value: object, name: str, pattern: re.Pattern[str], length: int) -> None:
    if type(value) is not str or not pattern.fullmatch(value):
        raise InvalidEvent(f"event field {name!r} must be {length} lowercase hex characters")


def _check_int(value: object, name: str, maximum: int) -> None:
    if type(value) is not int or not 0 <= value <= maximum:
        raise InvalidEvent(f"event field {name!r} must be an integer in 0 .. {maximum}")


def normalize_tags(tags: object) -> Tags:
    """Tags as a tuple of tuples of strings; anything else raises :class:`InvalidEvent`."""
    if isinstance(tags, (str, bytes)) or not isinstance(tags, (list, tuple)):
        raise InvalidEvent("event field 'tags' must be a list of lists of strings")
    out = []
    for tag in tags:
        if isinstance(tag, (str, bytes)) or not isinstance(tag, (list, tuple)):
            raise InvalidEvent("event field 'tags' must be a list of lists of strings")
        for item in tag:
            if type(item) is not str:
                raise InvalidEvent("event field 'tags' must contain only strings")
        out.append(tuple(tag))
    return tuple(out)


def _checked(pubkey: object, created_at: object, kind: object, tags: object, content: object) -> Tags:
    """Validate the fields shared by events and rumors; return the normalized tags."""
    _check_hex(pubkey, "pubkey", _HEX64, 64)
    _check_int(created_at, "created_at", MAX_CREATED_AT)
    _check_int(kind, "kind", MAX_KIND)
    if type(content) is not str:
        raise InvalidEvent("event field 'content' must be a string")
    if not isinstance(tags, (list, tuple, str, bytes, Mapping)) and isinstance(tags, Iterable):
        tags = list(tags)
    return normalize_tags(tags)


def _mapping(data: object) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise InvalidEvent("event must be a JSON object")
    return data


def _fields(data: Mapping[str, Any], names: tuple[str, ...]) -> list[Any]:
    try:
        return [data[name] for name in names]
    except KeyError as exc:
        raise InvalidEvent(f"event lacks field {exc.args[0]!r}") from None


def _loads(text: str | bytes) -> object:
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError) as exc:
        raise InvalidEvent(f"event is not valid JSON: {exc.__class__.__name__}") from None


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def serialize_for_id(pubkey: str, created_at: int, kind: int, tags: Iterable[Iterable[str]], content: str) -> bytes:
    """The NIP-01 canonical serialization whose SHA-256 is the event id."""
    try:
        return _dumps([0, pubkey, created_at, kind, tags, content]).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEvent("event content or tags are not encodable as UTF-8 (lone surrogate?)") from None
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"event fields cannot be serialized as JSON: {exc}") from None


def _id_digest(pubkey: str, created_at: int, kind: int, tags: Iterable[Iterable[str]], content: str) -> bytes:
    return hashlib.sha256(serialize_for_id(pubkey, created_at, kind, tags, content)).digest()


def compute_id(pubkey: str, created_at: int, kind: int, tags: Iterable[Iterable[str]], content: str) -> str:
    """The event id: lowercase hex SHA-256 of :func:`serialize_for_id`."""
    return _id_digest(pubkey, created_at, kind, tags, content).hex()


class _TaggedBase:
    """Tag helpers shared by :class:`Event` and :class:`Rumor`."""

    __slots__ = ()
    pubkey: str
    created_at: int
    kind: int
    tags: Tags
    content: str

    def tag_values(self, name: str) -> list[str]:
        """The second element of every tag named ``name``, in order."""
        return [tag[1] for tag in self.tags if len(tag) >= 2 and tag[0] == name]

    def first_tag(self, name: str) -> tuple[str, ...] | None:
        """The first tag named ``name``, or ``None``."""
        for tag in self.tags:
            if tag and tag[0] == name:
                return tag
        return None


@dataclass(frozen=True, slots=True)
class Event(_TaggedBase):
    """A signed NIP-01 event. Construction validates its shape; :meth:`verify` checks id and signature."""

    id: str
    pubkey: str
    created_at: int
    kind: int
    tags: Tags
    content: str
    sig: str

    def __post_init__(self) -> None:
        _check_hex(self.id, "id", _HEX64, 64)
        tags = _checked(self.pubkey, self.created_at, self.kind, self.tags, self.content)
        object.__setattr__(self, "tags", tags)
        _check_hex(self.sig, "sig", _HEX128, 128)

    @classmethod
    def from_dict(cls, data: object) -> Event:
        """Build from a decoded JSON object; wrong shape raises :class:`InvalidEvent` naming the field."""
        return cls(*_fields(_mapping(data), _EVENT_FIELDS))

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        """Parse JSON text, then :meth:`from_dict`."""
        return cls.from_dict(_loads(text))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tags as lists)."""
        return {
            "id": self.id,
            "pubkey": self.pubkey,
            "created_at": self.created_at,
            "kind": self.kind,
            "tags": [list(tag) for tag in self.tags],
            "content": self.content,
            "sig": self.sig,
        }

    def to_json(self) -> str:
        """Compact JSON, non-ASCII verbatim."""
        return _dumps(self.to_dict())

    def verify(self) -> None:
        """Recompute the id and check the BIP-340 signature by ``pubkey`` (NIP-01)."""
        digest = _id_digest(self.pubkey, self.created_at, self.kind, self.tags, self.content)
        if digest.hex() != self.id:
            raise InvalidEvent(f"event id does not match its content (id {self.id})")
        try:
            public_key = PublicKey.from_hex(self.pubkey)
        except InvalidKey as exc:
            raise InvalidSignature(f"event {self.id}: pubkey is not a valid key") from exc
        if not public_key.verify_schnorr(digest, bytes.fromhex(self.sig)):
            raise InvalidSignature(f"event {self.id}: signature does not verify")

    def is_valid(self) -> bool:
        """``True`` when :meth:`verify` passes."""
        try:
            self.verify()
        except InvalidEvent:
            return False
        return True


def sign_event(
    private_key: PrivateKey,
    kind: int,
    content: str,
    tags: Iterable[Iterable[str]] = (),
    created_at: int | None = None,
) -> Event:
    """Build, hash and sign an event by ``private_key``; ``created_at`` defaults to now."""
    pubkey = private_key.public_key.hex()
    when = int(time.time()) if created_at is None else created_at
    norm = _checked(pubkey, when, kind, tags, content)
    digest = _id_digest(pubkey, when, kind, norm, content)
    sig = private_key.sign_schnorr(digest)
    return Event(digest.hex(), pubkey, when, kind, norm, content, sig.hex())


@dataclass(frozen=True, slots=True)
class Rumor(_TaggedBase):
    """An unsigned event with its id (NIP-59): deniable content carried inside a seal.

    ``repr`` omits the (private) content.
    """

    id: str
    pubkey: str
    created_at: int
    kind: int
    tags: Tags
    content: str = field(repr=False)

    def __post_init__(self) -> None:
        _check_hex(self.id, "id", _HEX64, 64)
        object.__setattr__(self, "tags", _checked(self.pubkey, self.created_at, self.kind, self.tags, self.content))

    @classmethod
    def from_dict(cls, data: object) -> Rumor:
        """Build from a decoded JSON object; a missing ``id`` is computed, a present one is kept
        (check it with :meth:`verify`)."""
        mapping = _mapping(data)
        pubkey, created_at, kind, tags, content = _fields(mapping, _RUMOR_FIELDS)
        rumor_id = mapping.get("id")
        if rumor_id is None:
            norm = _checked(pubkey, created_at, kind, tags, content)
            rumor_id = compute_id(pubkey, created_at, kind, norm, content)
        return cls(rumor_id, pubkey, created_at, kind, tags, content)

    @classmethod
    def from_json(cls, text: str | bytes) -> Rumor:
        """Parse JSON text, then :meth:`from_dict`."""
        return cls.from_dict(_loads(text))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tags as lists), without ``sig``."""
        return {
            "id": self.id,
            "pubkey": self.pubkey,
            "created_at": self.created_at,
            "kind": self.kind,
            "tags": [list(tag) for tag in self.tags],
            "content": self.content,
        }

    def to_json(self) -> str:
        """Compact JSON, non-ASCII verbatim."""
        return _dumps(self.to_dict())

    def verify(self) -> None:
        """Recompute the id; a mismatch raises :class:`InvalidEvent`."""
        if compute_id(self.pubkey, self.created_at, self.kind, self.tags, self.content) != self.id:
            raise InvalidEvent(f"rumor id does not match its content (id {self.id})")


def make_rumor(
    pubkey: str | PublicKey,
    kind: int,
    content: str,
    tags: Iterable[Iterable[str]] = (),
    created_at: int | None = None,
) -> Rumor:
    """An unsigned event with its computed id; ``created_at`` defaults to now."""
    author = pubkey.hex() if isinstance(pubkey, PublicKey) else pubkey
    when = int(time.time()) if created_at is None else created_at
    norm = _checked(author, when, kind, tags, content)
    return Rumor(compute_id(author, when, kind, norm, content), author, when, kind, norm, content)
