"""The relay list (``relays.toml``): which relays cdvm reads from, writes to and advertises for DMs.

Search order, first found wins: an explicit path (``--relays-config``), ``$CDVM_RELAYS``,
``./relays.toml``, ``dvm.paths.config_dir()/relays.toml``, then the repository's top-level
``relays.toml``. ``--relay URL`` (``override_urls``) replaces the list for one run and gives
every relay all roles. See the top-level ``relays.toml`` for the format.
"""
from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dvm
from dvm import paths
from dvm.errors import CdvmError

ENV_VAR = "CDVM_RELAYS"
FILE_NAME = "relays.toml"
DEFAULT_TIMEOUT = 10.0
_KEYS = {"url", "read", "write", "dm", "auth", "max_message_length", "timeout"}


class ConfigError(CdvmError):
    """The relay configuration is missing or invalid."""


@dataclass(frozen=True)
class RelayConfig:
    """One ``[[relay]]`` entry."""

    url: str
    read: bool = True
    write: bool = True
    dm: bool = False
    auth: bool = True
    max_message_length: int | None = None
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class RelaysConfig:
    """The whole relay list and where it came from (``None`` for ``--relay`` overrides)."""

    relays: tuple[RelayConfig, ...]
    source: Path | None = None

    @property
    def read_urls(self) -> list[str]:
        return [r.url for r in self.relays if r.read]

    @property
    def write_urls(self) -> list[str]:
        return [r.url for r in self.relays if r.write]

    @property
    def dm_urls(self) -> list[str]:
        """Relays advertised in our kind 10050 list; the write relays if none is marked ``dm``."""
        return [r.url for r in self.relays if r.dm] or self.write_urls

    def get(self, url: str) -> RelayConfig | None:
        return next((r for r in self.relays if r.url == url), None)


def validate_relay_url(url: Any) -> str:
    """Return ``url`` if it is a ``ws://`` or ``wss://`` URL with a host, else raise :class:`ConfigError`."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("relay url must be a non-empty string")
    url = url.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"relay url {url[:100]!r} is not a valid URL") from None
    if parts.scheme not in ("ws", "wss"):
        raise ConfigError(f"relay url {url[:100]!r} must start with ws:// or wss://")
    if not parts.hostname:
        raise ConfigError(f"relay url {url[:100]!r} has no host")
    return url


def _flag(entry: dict[str, Any], name: str, default: bool, where: str) -> bool:
    value = entry.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {name} must be true or false")
    return value


def _relay_entry(entry: Any, where: str) -> RelayConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each [[relay]] must be a table")
    unknown = set(entry) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))[:200]}; allowed: {', '.join(sorted(_KEYS))}")
    if "url" not in entry:
        raise ConfigError(f"{where}: missing url")
    try:
        url = validate_relay_url(entry["url"])
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    limit = entry.get("max_message_length")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise ConfigError(f"{where}: max_message_length must be a positive integer (bytes)")
    timeout = entry.get("timeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ConfigError(f"{where}: timeout must be a positive number of seconds")
    return RelayConfig(
        url=url,
        read=_flag(entry, "read", True, where),
        write=_flag(entry, "write", True, where),
        dm=_flag(entry, "dm", False, where),
        auth=_flag(entry, "auth", True, where),
        max_message_length=limit,
        timeout=float(timeout),
    )


def parse_relays_toml(text: str, source: Path | None = None) -> RelaysConfig:
    """Parse the text of a relays.toml (sans-I/O)."""
    name = str(source) if source else FILE_NAME
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{name}: not valid TOML: {error}") from None
    except RecursionError:
        raise ConfigError(f"{name}: not valid TOML: arrays or tables nest too deeply") from None
    entries = document.get("relay")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{name}: no [[relay]] entries")
    relays = tuple(_relay_entry(entry, f"{name}, relay #{i}") for i, entry in enumerate(entries, 1))
    seen: set[str] = set()
    for relay in relays:
        if relay.url in seen:
            raise ConfigError(f"{name}: relay {relay.url} is listed twice")
        seen.add(relay.url)
    return RelaysConfig(relays, source)


def candidate_paths(explicit: str | os.PathLike[str] | None = None) -> list[Path]:
    """The files searched, in order (explicit path and ``$CDVM_RELAYS`` only when given)."""
    found: list[Path] = []
    if explicit:
        found.append(Path(explicit))
    if os.environ.get(ENV_VAR):
        found.append(Path(os.environ[ENV_VAR]))
    found += [
        Path.cwd() / FILE_NAME,
        paths.config_dir() / FILE_NAME,
        Path(dvm.__file__).resolve().parent.parent / FILE_NAME,
    ]
    return found


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The first existing relays.toml; an explicit path or ``$CDVM_RELAYS`` must exist."""
    if explicit and not Path(explicit).is_file():
        raise ConfigError(f"relay config {explicit} does not exist")
    env = os.environ.get(ENV_VAR)
    if not explicit and env and not Path(env).is_file():
        raise ConfigError(f"${ENV_VAR} points to {env}, which does not exist")
    for path in candidate_paths(explicit):
        if path.is_file():
            return path
    raise ConfigError("no relays.toml found: pass --relays-config FILE or --relay URL")


def relays_from_urls(urls: Iterable[str]) -> RelaysConfig:
    """A config from ``--relay`` URLs: every relay reads, writes and receives DMs."""
    unique = list(dict.fromkeys(validate_relay_url(u) for u in urls))
    if not unique:
        raise ConfigError("no relay URL given")
    return RelaysConfig(tuple(RelayConfig(url=u, dm=True) for u in unique))


def load_relays_config(
    explicit: str | os.PathLike[str] | None = None, override_urls: Sequence[str] = ()
) -> RelaysConfig:
    """The relay list for this run (see the module docstring for precedence)."""
    if override_urls:
        return relays_from_urls(override_urls)
    path = find_config_file(explicit)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None
    return parse_relays_toml(text, path)
