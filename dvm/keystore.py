"""Where our long-lived Nostr identity comes from: ``$CDVM_NSEC`` or a key file.

Secrets never come from the command line (they would land in shell history and ``ps``).
A key file holds one ``nsec1...`` line (64 hex characters are accepted on reading). It is
written atomically with mode 0600 and never overwritten unless ``force`` is given; a key file
that group or others can read is refused, with a message telling the user to ``chmod 600`` it.
"""
from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from dvm import paths
from dvm.errors import CdvmError
from dvm.keys import PrivateKey
from dvm.nostr_errors import InvalidKey

ENV_VAR = "CDVM_NSEC"
KEY_FILE_NAME = "identity.key"
MAX_KEY_FILE = 4096


class KeyFileError(CdvmError):
    """A key file is missing, unsafe, malformed, or would be overwritten."""


def default_key_file() -> Path:
    """``dvm.paths.state_dir()/identity.key``."""
    return paths.state_dir() / KEY_FILE_NAME


def write_key_file(path: str | os.PathLike[str], key: PrivateKey, *, force: bool = False) -> Path:
    """Write ``key`` to ``path`` (mode 0600, atomically); refuse an existing file unless ``force``."""
    target = Path(path)
    if target.exists() and not force:
        raise KeyFileError(f"{target} already exists; pass --force to replace it (the old key is lost)")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        raise KeyFileError(f"cannot create a key file in {target.parent}: {error.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(key.nsec() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if force:
            os.replace(temp, target)
        else:
            os.link(temp, target)
    except FileExistsError:
        raise KeyFileError(f"{target} already exists; pass --force to replace it (the old key is lost)") from None
    except OSError as error:
        raise KeyFileError(f"cannot write key file {target}: {error.strerror}") from None
    finally:
        temp.unlink(missing_ok=True)
    return target


def read_key_file(path: str | os.PathLike[str]) -> PrivateKey:
    """Load a key file, refusing one readable by group or others."""
    source = Path(path)
    try:
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise KeyFileError(f"no key file at {source}: create one with `cdvm keys new` or set ${ENV_VAR}") from None
    except OSError as error:
        raise KeyFileError(f"cannot open key file {source}: {error.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise KeyFileError(f"key file {source} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        if info.st_mode & 0o077:
            raise KeyFileError(
                f"key file {source} is accessible by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run: chmod 600 {source}"
            )
        data = handle.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"key file {source} is too large to be a key file")
    try:
        return PrivateKey.from_nsec_or_hex(data.decode("ascii"))
    except (UnicodeDecodeError, InvalidKey):
        raise KeyFileError(f"key file {source} does not hold an nsec or 64-hex secret key") from None


def load_identity(key_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> PrivateKey:
    """Our identity: an explicit ``key_file``, else ``$CDVM_NSEC`` (nsec or hex) if set, else the default key file."""
    environ = os.environ if env is None else env
    value = environ.get(ENV_VAR)
    if value and key_file is None:
        try:
            return PrivateKey.from_nsec_or_hex(value)
        except InvalidKey:
            raise KeyFileError(f"${ENV_VAR} does not hold an nsec or 64-hex secret key") from None
    return read_key_file(key_file if key_file is not None else default_key_file())
