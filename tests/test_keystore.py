"""Key files: mode 0600, atomic, no silent overwrite, refusal of readable files; $CDVM_NSEC."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dvm.keys import PrivateKey
from dvm.keystore import KeyFileError, default_key_file, load_identity, read_key_file, write_key_file


def test_write_and_read(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    path = write_key_file(tmp_path / "sub" / "id.key", key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == key.nsec()
    assert read_key_file(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["id.key"]  # no temp file left behind


def test_refuses_overwrite_without_force(tmp_path: Path) -> None:
    first, second = PrivateKey.generate(), PrivateKey.generate()
    path = write_key_file(tmp_path / "id.key", first)
    with pytest.raises(KeyFileError, match="--force"):
        write_key_file(path, second)
    assert read_key_file(path) == first
    write_key_file(path, second, force=True)
    assert read_key_file(path) == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_refuses_readable_file(tmp_path: Path, mode: int) -> None:
    path = write_key_file(tmp_path / "id.key", PrivateKey.generate())
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_key_file(path)


def test_hex_key_file_accepted(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    path = tmp_path / "hex.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, key.secret_hex().encode() + b"\n")
    os.close(fd)
    assert read_key_file(path) == key


@pytest.mark.parametrize("content", [b"", b"garbage", b"\xff" * 40, b"npub1xyz", b"a" * 5000])
def test_malformed_key_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(KeyFileError) as info:
        read_key_file(path)
    assert "garbage" not in str(info.value)


def test_missing_and_non_regular(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cdvm keys new"):
        read_key_file(tmp_path / "none.key")
    target = write_key_file(tmp_path / "real.key", PrivateKey.generate())
    (tmp_path / "link.key").symlink_to(target)
    with pytest.raises(KeyFileError):
        read_key_file(tmp_path / "link.key")
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        read_key_file(tmp_path / "dir.key")


def test_load_identity_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDVM_STATE_DIR", str(tmp_path / "state"))
    env_key, file_key, default_key = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    write_key_file(default_key_file(), default_key)
    path = write_key_file(tmp_path / "f.key", file_key)
    assert load_identity(env={}) == default_key
    assert load_identity(env={"CDVM_NSEC": env_key.nsec()}) == env_key
    assert load_identity(env={"CDVM_NSEC": env_key.secret_hex()}) == env_key
    assert load_identity(path, env={"CDVM_NSEC": env_key.nsec()}) == file_key
    with pytest.raises(KeyFileError, match="CDVM_NSEC") as info:
        load_identity(env={"CDVM_NSEC": "nsec1notakey"})
    assert "nsec1notakey" not in str(info.value)
