"""Encrypted model files (``.cgguf``): AES-256-GCM in independently authenticated chunks.

Layout (all integers big-endian)::

    magic        8 bytes   b"CDVMENC1"
    header_len   4 bytes   length of the header JSON (at most 64 KiB)
    header       JSON      {"version": 1, "cipher": "AES-256-GCM", "chunk_size", "chunks", "size",
                            "sha256", "name", "key_id", "file_id"}   (UTF-8, sorted keys)
    chunk 0..N-1           nonce (12 random bytes) ‖ ciphertext ‖ GCM tag (16 bytes)

``size`` and ``sha256`` describe the *plaintext* GGUF; ``key_id`` names the key (the first 16
bytes of SHA-256("cdvm-model-key-id-v1" ‖ key), so a wrong key is reported as such without
trying it); ``file_id`` is 16 random bytes that make every encryption of a model unique.
Every chunk but the last holds ``chunk_size`` plaintext bytes (4 MiB by default); the last
holds the rest (a model of 0 bytes still has one, empty, chunk). The associated data of
chunk *i* is::

    b"cdvm-model-v1" ‖ SHA-256(magic ‖ header_len ‖ header) ‖ u64 i ‖ u64 N ‖ u8 (1 if i == N-1)

so a changed header (name, digest, size, count) fails chunk 0, a moved or swapped chunk fails
its index, a chunk from another file fails the header digest (``file_id``), and dropping the
tail is caught by the count and the final flag. Decryption streams chunk by chunk into a
caller's sink (an anonymous memfd inside the sandbox: :func:`decrypt_to_memfd`) while hashing
the plaintext, and the plaintext digest must equal the header's. AES-GCM comes from
``cryptography`` (OpenSSL, AES-NI/VAES + CLMUL), decrypting in place into one reused buffer.

The header is readable without the key (the operator announces the plaintext digest from it)
but only trustworthy once a chunk has authenticated against it.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import secrets
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from jobs.errors import ModelError
from jobs.model import ModelRef

MAGIC = b"CDVMENC1"
VERSION = 1
CIPHER = "AES-256-GCM"
KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
CHUNK_SIZE = 4 << 20
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 64 << 20
MAX_HEADER = 64 << 10
AAD_DOMAIN = b"cdvm-model-v1"
KEY_ID_DOMAIN = b"cdvm-model-key-id-v1"
KEY_FILE_MODE = 0o600
_PREFIX = struct.Struct(">8sI")
_AAD_TAIL = struct.Struct(">QQB")
_HEADER_KEYS = {"version", "cipher", "chunk_size", "chunks", "size", "sha256", "name", "key_id", "file_id"}
_HASH_BLOCK = 1 << 20


class ModelCryptoError(ModelError):
    """An encrypted model is malformed, truncated, tampered with, or the key does not fit it.

    ``chunk`` is the index of the first chunk that failed, when one did.
    """

    def __init__(self, message: str, chunk: int | None = None) -> None:
        super().__init__(message)
        self.chunk = chunk


class ModelKey:
    """A 256-bit AES-GCM model key. ``repr`` shows only its id."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != KEY_LEN:
            raise ModelCryptoError(f"a model key is {KEY_LEN} bytes")
        self._raw = bytes(raw)

    @classmethod
    def generate(cls) -> ModelKey:
        return cls(AESGCM.generate_key(bit_length=256))

    @classmethod
    def from_hex(cls, text: str) -> ModelKey:
        try:
            raw = bytes.fromhex(text.strip())
        except (ValueError, AttributeError):
            raise ModelCryptoError(f"a model key is {2 * KEY_LEN} hex digits") from None
        if len(raw) != KEY_LEN:
            raise ModelCryptoError(f"a model key is {2 * KEY_LEN} hex digits, got {2 * len(raw)}")
        return cls(raw)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ModelKey:
        """Read a key file (64 hex digits); it must not be readable by group or others."""
        try:
            st = os.stat(path)
            if st.st_mode & 0o077:
                raise ModelCryptoError(f"model key file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as error:
            raise ModelCryptoError(f"cannot read model key file {path}: {getattr(error, 'strerror', None) or error}") from None
        return cls.from_hex(text)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Create ``path`` (mode 0600, never overwriting) holding the key as hex."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
        except FileExistsError:
            raise ModelCryptoError(f"{path} exists; refusing to overwrite a model key") from None
        except OSError as error:
            raise ModelCryptoError(f"cannot create model key file {path}: {error.strerror}") from None
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(self._raw.hex() + "\n")

    @property
    def key_id(self) -> str:
        """Public identifier of this key (32 hex digits); reveals nothing about the key."""
        return hashlib.sha256(KEY_ID_DOMAIN + self._raw).digest()[:16].hex()

    def hex(self) -> str:
        return self._raw.hex()

    def aead(self) -> AESGCM:
        return AESGCM(self._raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelKey) and secrets.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __repr__(self) -> str:
        return f"ModelKey(id={self.key_id})"


def _int(obj: dict, key: str, low: int, high: int) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ModelCryptoError(f"encrypted model header: {key} must be an integer in {low}..{high}")
    return value


def _hexstr(obj: dict, key: str, length: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) != 2 * length or any(c not in "0123456789abcdef" for c in value):
        raise ModelCryptoError(f"encrypted model header: {key} must be {2 * length} lowercase hex digits")
    return value


@dataclass(frozen=True)
class ModelHeader:
    """The clear header of an encrypted model; ``raw`` is its exact bytes (magic to JSON end)."""

    chunk_size: int
    chunks: int
    size: int
    sha256: str
    name: str
    key_id: str
    file_id: str
    raw: bytes = field(repr=False)

    @classmethod
    def build(cls, *, size: int, sha256: str, name: str, key_id: str, chunk_size: int = CHUNK_SIZE) -> ModelHeader:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ModelCryptoError(f"chunk size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
        chunks = max(1, -(-size // chunk_size))
        body = {"version": VERSION, "cipher": CIPHER, "chunk_size": chunk_size, "chunks": chunks, "size": size,
                "sha256": sha256, "name": name, "key_id": key_id, "file_id": secrets.token_hex(16)}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        return parse_header(_PREFIX.pack(MAGIC, len(text)) + text)

    @property
    def digest(self) -> bytes:
        """SHA-256 of the header bytes, bound into every chunk's associated data."""
        return hashlib.sha256(self.raw).digest()

    def chunk_length(self, index: int) -> int:
        """Plaintext bytes in chunk ``index``."""
        return self.chunk_size if index < self.chunks - 1 else self.size - (self.chunks - 1) * self.chunk_size

    @property
    def file_size(self) -> int:
        """The exact size of a well-formed encrypted file with this header."""
        return len(self.raw) + self.size + self.chunks * (NONCE_LEN + TAG_LEN)

    def facts(self) -> dict[str, object]:
        """What ``cdvm model inspect`` prints (nothing secret)."""
        return {"format": f"cdvm encrypted model v{VERSION}", "cipher": CIPHER, "name": self.name,
                "plaintext_size": self.size, "plaintext_sha256": self.sha256, "chunk_size": self.chunk_size,
                "chunks": self.chunks, "key_id": self.key_id, "file_id": self.file_id}


def parse_header(data: bytes) -> ModelHeader:
    """Parse the header at the start of ``data`` (which may hold more bytes after it)."""
    if len(data) < _PREFIX.size:
        raise ModelCryptoError("not an encrypted cdvm model: the file is shorter than its header")
    magic, length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ModelCryptoError("not an encrypted cdvm model (no CDVMENC1 magic)")
    if not 2 <= length <= MAX_HEADER:
        raise ModelCryptoError(f"encrypted model header length {length} is out of range")
    if len(data) < _PREFIX.size + length:
        raise ModelCryptoError("encrypted model is truncated inside its header")
    try:
        body = json.loads(data[_PREFIX.size:_PREFIX.size + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ModelCryptoError("encrypted model header is not UTF-8 JSON") from None
    if not isinstance(body, dict) or set(body) != _HEADER_KEYS:
        raise ModelCryptoError(f"encrypted model header must have exactly the keys {', '.join(sorted(_HEADER_KEYS))}")
    if body["version"] != VERSION or body["cipher"] != CIPHER:
        raise ModelCryptoError(f"unsupported encrypted model version/cipher {body['version']!r}/{body['cipher']!r}")
    chunk_size = _int(body, "chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
    size = _int(body, "size", 0, 1 << 46)
    chunks = _int(body, "chunks", 1, 1 << 32)
    if chunks != max(1, -(-size // chunk_size)):
        raise ModelCryptoError(f"encrypted model header: {chunks} chunks cannot hold {size} bytes in chunks of {chunk_size}")
    name = body["name"]
    if not isinstance(name, str) or not 1 <= len(name) <= 128:
        raise ModelCryptoError("encrypted model header: name must be a string of 1..128 characters")
    return ModelHeader(chunk_size, chunks, size, _hexstr(body, "sha256", 32), name, _hexstr(body, "key_id", 16),
                       _hexstr(body, "file_id", 16), bytes(data[:_PREFIX.size + length]))


def read_header(stream: BinaryIO) -> ModelHeader:
    """Read and parse the header from the start of ``stream`` (left positioned after it)."""
    prefix = stream.read(_PREFIX.size)
    if len(prefix) == _PREFIX.size and prefix[:8] == MAGIC:
        length = _PREFIX.unpack(prefix)[1]
        if length <= MAX_HEADER:
            prefix += stream.read(length)
    return parse_header(prefix)


def is_encrypted(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` starts with the encrypted-model magic."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def chunk_aad(header_digest: bytes, index: int, count: int) -> bytes:
    """Associated data of chunk ``index`` of ``count`` (see the module docstring)."""
    return AAD_DOMAIN + header_digest + _AAD_TAIL.pack(index, count, 1 if index == count - 1 else 0)


def _read_full(stream: BinaryIO, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _hash_stream(stream: BinaryIO) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    buffer = bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    while n := _read_full(stream, view):
        digest.update(view[:n])
        size += n
    return digest.hexdigest(), size


def encrypt_stream(src: BinaryIO, dst: BinaryIO, key: ModelKey, *, name: str, chunk_size: int = CHUNK_SIZE) -> ModelHeader:
    """Encrypt the seekable plaintext ``src`` into ``dst``; returns the header written.

    ``src`` is read twice (digest first: it goes into the header, which every chunk's associated
    data binds); a source that changes between the passes is an error.
    """
    sha256, size = _hash_stream(src)
    src.seek(0)
    header = ModelHeader.build(size=size, sha256=sha256, name=name, key_id=key.key_id, chunk_size=chunk_size)
    aead, header_digest = key.aead(), header.digest
    dst.write(header.raw)
    check = hashlib.sha256()
    plain = bytearray(chunk_size)
    sealed = bytearray(chunk_size + TAG_LEN)
    for index in range(header.chunks):
        length = header.chunk_length(index)
        view = memoryview(plain)[:length]
        if _read_full(src, view) != length:
            raise ModelCryptoError("the model file changed while it was being encrypted (it got shorter)")
        check.update(view)
        nonce = secrets.token_bytes(NONCE_LEN)
        out = memoryview(sealed)[:length + TAG_LEN]
        aead.encrypt_into(nonce, view, chunk_aad(header_digest, index, header.chunks), out)
        dst.write(nonce)
        dst.write(out)
    if src.read(1) or check.hexdigest() != sha256:
        raise ModelCryptoError("the model file changed while it was being encrypted; encrypt a stable copy")
    return header


def open_plaintext(src: BinaryIO, key: ModelKey, *,
                   expected: ModelHeader | None = None) -> tuple[ModelHeader, Iterator[memoryview]]:
    """Read the header of ``src``, then authenticate and decrypt it chunk by chunk.

    The iterator yields views of one reused buffer and raises :class:`ModelCryptoError` naming
    the first chunk that is missing, tampered with or out of place, on trailing data, and when
    the plaintext digest is not the header's. With ``expected``, the header must be exactly that
    one (the file was not swapped since it was first read).
    """
    header = read_header(src)
    if expected is not None and header.raw != expected.raw:
        raise ModelCryptoError("the encrypted model's header changed since the sandbox started (file swapped)")
    if header.key_id != key.key_id:
        raise ModelCryptoError(f"the model was encrypted under key {header.key_id}, not under the given key {key.key_id}")
    return header, _chunks(src, key, header)


def _chunks(src: BinaryIO, key: ModelKey, header: ModelHeader) -> Iterator[memoryview]:
    aead, header_digest = key.aead(), header.digest
    digest = hashlib.sha256()
    sealed = bytearray(NONCE_LEN + header.chunk_size + TAG_LEN)
    plain = bytearray(header.chunk_size)
    for index in range(header.chunks):
        length = header.chunk_length(index)
        record = memoryview(sealed)[:NONCE_LEN + length + TAG_LEN]
        if _read_full(src, record) != len(record):
            raise ModelCryptoError(f"the encrypted model is truncated: chunk {index} of {header.chunks} is incomplete", index)
        out = memoryview(plain)[:length]
        try:
            aead.decrypt_into(bytes(record[:NONCE_LEN]), record[NONCE_LEN:], chunk_aad(header_digest, index, header.chunks), out)
        except InvalidTag:
            raise ModelCryptoError(
                f"chunk {index} of {header.chunks} failed authentication (tampered with, reordered or from another file)", index
            ) from None
        digest.update(out)
        yield out
    if src.read(1):
        raise ModelCryptoError(f"the encrypted model has data after its last chunk ({header.chunks} chunks)")
    if digest.hexdigest() != header.sha256:
        raise ModelCryptoError("the decrypted model's SHA-256 differs from its header's (the owner encrypted it wrongly)")


def decrypt_stream(src: BinaryIO, key: ModelKey, sink: Callable[[memoryview], object], *,
                   expected: ModelHeader | None = None) -> str:
    """Decrypt ``src`` into ``sink``; returns the plaintext SHA-256 (hex), computed while decrypting
    and equal to the header's (or an error is raised)."""
    header, blocks = open_plaintext(src, key, expected=expected)
    for block in blocks:
        sink(block)
    return header.sha256


def verify_file(path: str | os.PathLike[str], key: ModelKey) -> ModelHeader:
    """Authenticate every chunk of ``path`` (nothing is written); raises on the first bad one."""
    with open(path, "rb") as src:
        header, blocks = open_plaintext(src, key)
        for _ in blocks:
            pass
    return header


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (the encrypted model's identity in key requests)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass(frozen=True)
class SealedModel:
    """An encrypted model as the sandbox sees it before the key arrives."""

    path: Path
    header: ModelHeader
    file_sha256: str

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SealedModel:
        """Read the header and hash the whole encrypted file."""
        try:
            with open(path, "rb") as handle:
                header = read_header(handle)
                handle.seek(0)
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as error:
            raise ModelError(f"cannot read encrypted model {path}: {error.strerror}") from None
        if os.stat(path).st_size != header.file_size:
            raise ModelCryptoError(f"encrypted model {path} has {os.stat(path).st_size} bytes, its header says {header.file_size}")
        return cls(Path(path), header, digest)


class MemoryModel:
    """A decrypted model in an anonymous memfd, visible only as ``/proc/self/fd/N`` of this process.

    :meth:`wipe` zeroes and truncates it; the kernel frees it when the process (the sandbox) ends.
    """

    def __init__(self, fd: int, ref: ModelRef) -> None:
        self.fd = fd
        self.ref = ref

    def __repr__(self) -> str:
        return f"MemoryModel(fd={self.fd}, name={self.ref.name!r}, size={self.ref.size})"

    def wipe(self) -> None:
        if self.fd < 0:
            return
        zeros = bytes(_HASH_BLOCK)
        for offset in range(0, self.ref.size, len(zeros)):
            os.pwrite(self.fd, zeros[: min(len(zeros), self.ref.size - offset)], offset)
        os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = -1


def _write_all(fd: int, block: memoryview) -> None:
    while block:
        block = block[os.write(fd, block):]


def decrypt_to_memfd(sealed: SealedModel, key: ModelKey) -> MemoryModel:
    """Decrypt ``sealed`` into a fresh memfd; the ModelRef carries the plaintext digest computed on the way."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and sealed.header.size > limit:
        raise ModelError(f"the model has {sealed.header.size} bytes but the sandbox may write files of at most {limit} "
                         "bytes; raise [sandbox] tmpfs_mb")
    fd = os.memfd_create(f"cdvm-model-{sealed.header.name}", os.MFD_CLOEXEC)
    try:
        with open(sealed.path, "rb") as src:
            sha256 = decrypt_stream(src, key, lambda block: _write_all(fd, block), expected=sealed.header)
        path = Path(f"/proc/self/fd/{fd}")
        st = os.stat(path)
        ref = ModelRef(path=path, sha256=sha256, name=sealed.header.name, size=st.st_size,
                       fingerprint=(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev))
    except BaseException:
        os.close(fd)
        raise
    return MemoryModel(fd, ref)
