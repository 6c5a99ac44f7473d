"""relays.toml: parsing, validation, search order, --relay overrides."""
from __future__ import annotations

from pathlib import Path

import pytest

import dvm
from dvm.config import ConfigError, find_config_file, load_relays_config, parse_relays_toml, relays_from_urls

GOOD = """
[[relay]]
url = "wss://a.example"
read = true
write = false
dm = true
auth = false
max_message_length = 65536
timeout = 3

[[relay]]
url = "ws://127.0.0.1:7000"
"""


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CDVM_RELAYS", raising=False)
    monkeypatch.setenv("CDVM_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path


def test_parse() -> None:
    config = parse_relays_toml(GOOD)
    first, second = config.relays
    assert (first.read, first.write, first.dm, first.auth) == (True, False, True, False)
    assert first.max_message_length == 65536 and first.timeout == 3.0
    assert (second.read, second.write, second.dm, second.auth, second.max_message_length) == (True, True, False, True, None)
    assert config.read_urls == ["wss://a.example", "ws://127.0.0.1:7000"]
    assert config.write_urls == ["ws://127.0.0.1:7000"]
    assert config.dm_urls == ["wss://a.example"]


def test_repository_file_parses() -> None:
    path = Path(dvm.__file__).resolve().parent.parent / "relays.toml"
    config = parse_relays_toml(path.read_text(), path)
    assert config.write_urls and config.dm_urls


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[relay]\nurl=", "not valid TOML"),
        ("", "no \\[\\[relay\\]\\] entries"),
        ("relay = 5", "no \\[\\[relay\\]\\] entries"),
        ('[[relay]]\nread = true', "missing url"),
        ('[[relay]]\nurl = "https://x.example"', "must start with ws:// or wss://"),
        ('[[relay]]\nurl = "ws://"', "has no host"),
        ('[[relay]]\nurl = "ws://h:99999"', "not a valid URL"),
        ('[[relay]]\nurl = 5', "non-empty string"),
        ('[[relay]]\nurl = "wss://x.example"\nread = "yes"', "read must be true or false"),
        ('[[relay]]\nurl = "wss://x.example"\nmax_message_length = 0', "positive integer"),
        ('[[relay]]\nurl = "wss://x.example"\ntimeout = -1', "positive number"),
        ('[[relay]]\nurl = "wss://x.example"\ncolour = "red"', "unknown key"),
        ('[[relay]]\nurl = "wss://x.example"\n[[relay]]\nurl = "wss://x.example"', "listed twice"),
    ],
)
def test_invalid(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_relays_toml(text)


def test_override_urls() -> None:
    config = relays_from_urls(["ws://127.0.0.1:1", "ws://127.0.0.1:1", "wss://b.example"])
    assert [r.url for r in config.relays] == ["ws://127.0.0.1:1", "wss://b.example"]
    assert all(r.read and r.write and r.dm for r in config.relays)
    with pytest.raises(ConfigError):
        relays_from_urls(["http://x"])
    with pytest.raises(ConfigError):
        relays_from_urls([])


def test_search_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo_file = Path(dvm.__file__).resolve().parent.parent / "relays.toml"
    assert find_config_file() == repo_file
    user = isolated / "config" / "relays.toml"
    user.parent.mkdir(exist_ok=True)
    user.write_text(GOOD)
    assert find_config_file() == user
    local = isolated / "relays.toml"
    local.write_text(GOOD)
    assert find_config_file() == local
    env = isolated / "env.toml"
    env.write_text(GOOD)
    monkeypatch.setenv("CDVM_RELAYS", str(env))
    assert find_config_file() == env
    explicit = isolated / "explicit.toml"
    explicit.write_text('[[relay]]\nurl = "ws://127.0.0.1:9"\n')
    assert find_config_file(explicit) == explicit
    assert load_relays_config(explicit).write_urls == ["ws://127.0.0.1:9"]
    assert load_relays_config(explicit, ["ws://127.0.0.1:8"]).write_urls == ["ws://127.0.0.1:8"]


def test_missing_explicit_files(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        find_config_file(isolated / "nope.toml")
    monkeypatch.setenv("CDVM_RELAYS", str(isolated / "nope.toml"))
    with pytest.raises(ConfigError, match="CDVM_RELAYS"):
        find_config_file()


def test_unreadable_file(isolated: Path) -> None:
    bad = isolated / "bad.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="cannot read"):
        load_relays_config(bad)
