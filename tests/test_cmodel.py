"""Encrypted model files: round trips, and every way a file can be damaged ends in a typed error
naming the first bad chunk (truncation, reordering, bit flips, splicing, trailing data, wrong key)."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs import cmodel
from jobs.cmodel import (
    MIN_CHUNK_SIZE,
    NONCE_LEN,
    TAG_LEN,
    ModelCryptoError,
    ModelKey,
    SealedModel,
    decrypt_stream,
    decrypt_to_memfd,
    encrypt_stream,
    parse_header,
)

CHUNK = MIN_CHUNK_SIZE
ROOT = Path(__file__).resolve().parents[1]


def _encrypt(plaintext: bytes, key: ModelKey, chunk_size: int = CHUNK) -> tuple[bytes, cmodel.ModelHeader]:
    out = io.BytesIO()
    header = encrypt_stream(io.BytesIO(plaintext), out, key, name="test-model", chunk_size=chunk_size)
    return out.getvalue(), header


def _decrypt(blob: bytes, key: ModelKey) -> bytes:
    parts: list[bytes] = []
    digest = decrypt_stream(io.BytesIO(blob), key, lambda block: parts.append(bytes(block)))
    plaintext = b"".join(parts)
    assert digest == hashlib.sha256(plaintext).hexdigest()
    return plaintext


def _record_offsets(header: cmodel.ModelHeader) -> list[tuple[int, int]]:
    """(start, end) of each chunk record (nonce ‖ ciphertext ‖ tag) in the file."""
    offsets, position = [], len(header.raw)
    for index in range(header.chunks):
        end = position + NONCE_LEN + header.chunk_length(index) + TAG_LEN
        offsets.append((position, end))
        position = end
    return offsets


@pytest.fixture(scope="module")
def key() -> ModelKey:
    return ModelKey.generate()


@pytest.fixture(scope="module")
def sample(key: ModelKey) -> tuple[bytes, bytes, cmodel.ModelHeader]:
    plaintext = os.urandom(4 * CHUNK + 123)
    blob, header = _encrypt(plaintext, key)
    return plaintext, blob, header


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK])
def test_round_trip(key: ModelKey, size: int) -> None:
    plaintext = os.urandom(size)
    blob, header = _encrypt(plaintext, key)
    assert header.size == size and header.chunks == max(1, -(-size // CHUNK))
    assert header.sha256 == hashlib.sha256(plaintext).hexdigest() and header.key_id == key.key_id
    assert len(blob) == header.file_size
    assert _decrypt(blob, key) == plaintext
    assert plaintext[:64] not in blob[len(header.raw):] or size == 0


def test_each_encryption_is_unique(key: ModelKey) -> None:
    plaintext = os.urandom(CHUNK)
    first, h1 = _encrypt(plaintext, key)
    second, h2 = _encrypt(plaintext, key)
    assert h1.file_id != h2.file_id and first != second


def test_bit_flip_anywhere_names_the_chunk(key: ModelKey, sample: tuple) -> None:
    _, blob, header = sample
    for index, (start, end) in enumerate(_record_offsets(header)):
        for where in (start, start + NONCE_LEN + 7, end - 1):
            damaged = bytearray(blob)
            damaged[where] ^= 0x01
            with pytest.raises(ModelCryptoError, match=f"chunk {index} of {header.chunks} failed authentication") as error:
                _decrypt(bytes(damaged), key)
            assert error.value.chunk == index


def test_header_tampering_is_detected(key: ModelKey, sample: tuple) -> None:
    _, blob, header = sample
    forged = header.raw.replace(header.sha256.encode(), ("0" * 64).encode())
    with pytest.raises(ModelCryptoError, match="chunk 0 of"):
        _decrypt(forged + blob[len(header.raw):], key)
    renamed = header.raw.replace(b'"test-model"', b'"evil-model"')
    with pytest.raises(ModelCryptoError, match="chunk 0 of"):
        _decrypt(renamed + blob[len(header.raw):], key)


def test_truncation_is_detected(key: ModelKey, sample: tuple) -> None:
    _, blob, header = sample
    offsets = _record_offsets(header)
    with pytest.raises(ModelCryptoError, match=f"truncated: chunk {header.chunks - 1} of {header.chunks}"):
        _decrypt(blob[:offsets[-1][0]], key)
    with pytest.raises(ModelCryptoError, match="truncated: chunk 2"):
        _decrypt(blob[:offsets[2][0] + 100], key)
    with pytest.raises(ModelCryptoError, match="truncated inside its header|shorter than its header"):
        _decrypt(blob[:len(header.raw) - 3], key)


def test_reordered_chunks_are_detected(key: ModelKey, sample: tuple) -> None:
    _, blob, header = sample
    (a0, a1), (b0, b1) = _record_offsets(header)[1:3]
    swapped = blob[:a0] + blob[b0:b1] + blob[a0:a1] + blob[b1:]
    with pytest.raises(ModelCryptoError, match="chunk 1 of") as error:
        _decrypt(swapped, key)
    assert error.value.chunk == 1


def test_dropping_a_middle_chunk_is_detected(key: ModelKey, sample: tuple) -> None:
    _, blob, header = sample
    start, end = _record_offsets(header)[1]
    with pytest.raises(ModelCryptoError, match="chunk 1 of"):
        _decrypt(blob[:start] + blob[end:], key)


def test_chunk_spliced_from_another_file_is_detected(key: ModelKey, sample: tuple) -> None:
    plaintext, blob, header = sample
    other, other_header = _encrypt(plaintext, key)
    start, end = _record_offsets(header)[2]
    o_start, o_end = _record_offsets(other_header)[2]
    with pytest.raises(ModelCryptoError, match="chunk 2 of"):
        _decrypt(blob[:start] + other[o_start:o_end] + blob[end:], key)


def test_trailing_data_is_rejected(key: ModelKey, sample: tuple) -> None:
    _, blob, _ = sample
    with pytest.raises(ModelCryptoError, match="data after its last chunk"):
        _decrypt(blob + b"\0", key)


def test_wrong_key_is_named(sample: tuple) -> None:
    _, blob, header = sample
    other = ModelKey.generate()
    with pytest.raises(ModelCryptoError, match=f"encrypted under key {header.key_id}"):
        _decrypt(blob, other)
    forged = header.raw.replace(header.key_id.encode(), other.key_id.encode())
    with pytest.raises(ModelCryptoError, match="chunk 0 of"):
        _decrypt(forged + blob[len(header.raw):], other)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_headers_end_in_typed_errors(data: bytes) -> None:
    with pytest.raises(ModelCryptoError):
        parse_header(cmodel.MAGIC + data)


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(min_value=0, max_value=400), flip=st.integers(min_value=0, max_value=10_000))
def test_damaged_files_end_in_typed_errors(key: ModelKey, cut: int, flip: int) -> None:
    blob, _ = _encrypt(b"x" * (2 * CHUNK + 5), key)
    damaged = bytearray(blob[:len(blob) - cut] if cut else blob)
    if not cut:
        damaged[flip % len(damaged)] ^= 0x80
    with pytest.raises(ModelCryptoError):
        _decrypt(bytes(damaged), key)


def test_key_files(tmp_path: Path) -> None:
    key = ModelKey.generate()
    path = tmp_path / "model.key"
    key.write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ModelKey.from_file(path) == key
    assert key.hex() not in repr(key) and key.key_id in repr(key)
    with pytest.raises(ModelCryptoError, match="refusing to overwrite"):
        key.write(path)
    path.chmod(0o640)
    with pytest.raises(ModelCryptoError, match="readable by others"):
        ModelKey.from_file(path)
    (tmp_path / "bad.key").write_text("zz")
    (tmp_path / "bad.key").chmod(0o600)
    with pytest.raises(ModelCryptoError, match="hex"):
        ModelKey.from_file(tmp_path / "bad.key")


def test_decrypt_to_memfd_and_wipe(tmp_path: Path, key: ModelKey) -> None:
    plaintext = b"GGUF" + os.urandom(3 * CHUNK)
    path = tmp_path / "m.cgguf"
    with open(path, "wb") as out:
        encrypt_stream(io.BytesIO(plaintext), out, key, name="m", chunk_size=CHUNK)
    sealed = SealedModel.open(path)
    assert sealed.file_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    memory = decrypt_to_memfd(sealed, key)
    try:
        assert str(memory.ref.path) == f"/proc/self/fd/{memory.fd}"
        assert memory.ref.path.read_bytes() == plaintext
        assert memory.ref.sha256 == hashlib.sha256(plaintext).hexdigest() and memory.ref.unchanged()
        assert os.readlink(memory.ref.path).startswith("/memfd:"), "an anonymous memfd, no file on any filesystem"
    finally:
        fd = os.dup(memory.fd)
        memory.wipe()
    try:
        assert os.fstat(fd).st_size == 0 and memory.fd == -1
    finally:
        os.close(fd)


def test_swapped_file_is_refused_before_decrypting(tmp_path: Path, key: ModelKey) -> None:
    path = tmp_path / "m.cgguf"
    with open(path, "wb") as out:
        encrypt_stream(io.BytesIO(b"GGUF" + os.urandom(CHUNK)), out, key, name="m", chunk_size=CHUNK)
    sealed = SealedModel.open(path)
    with open(path, "wb") as out:
        encrypt_stream(io.BytesIO(b"GGUF" + os.urandom(CHUNK)), out, key, name="m", chunk_size=CHUNK)
    with pytest.raises(ModelCryptoError, match="header changed"):
        decrypt_to_memfd(sealed, key)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dvm.cli", *args], capture_output=True, text=True, env=env, timeout=60)


def test_cli_keygen_encrypt_inspect(tmp_path: Path) -> None:
    key_path, model, sealed = tmp_path / "k.key", tmp_path / "tiny.gguf", tmp_path / "tiny.cgguf"
    model.write_bytes(b"GGUF" + os.urandom(9 * (1 << 20)))
    assert _cli("model", "keygen", str(key_path)).returncode == 0
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    run = _cli("model", "encrypt", str(model), str(sealed), "--key", str(key_path))
    assert run.returncode == 0, run.stderr
    assert hashlib.sha256(model.read_bytes()).hexdigest() in run.stdout
    plain = _cli("model", "inspect", str(sealed))
    assert plain.returncode == 0 and "plaintext_sha256" in plain.stdout and "not authenticated" in plain.stdout
    good = _cli("model", "inspect", str(sealed), "--key", str(key_path))
    assert good.returncode == 0 and "all 3 chunks authentic" in good.stdout
    header = parse_header(sealed.read_bytes()[:1 << 16])
    damaged = bytearray(sealed.read_bytes())
    damaged[_record_offsets(header)[1][0] + 50] ^= 0x10
    sealed.write_bytes(bytes(damaged))
    bad = _cli("model", "inspect", str(sealed), "--key", str(key_path))
    assert bad.returncode == 1 and "chunk 1 of 3 failed authentication" in bad.stderr
    not_gguf = tmp_path / "x.bin"
    not_gguf.write_bytes(b"nope")
    refused = _cli("model", "encrypt", str(not_gguf), str(tmp_path / "x.cgguf"), "--key", str(key_path))
    assert refused.returncode == 1 and "not a GGUF" in refused.stderr


def test_bench_models_suite_reports_throughput() -> None:
    from bench.harness import Context, run_suites

    report = run_suites(["models"], Context(quick=True, scale=0.02), argv=["bench", "models"])
    assert [(r.name, r.status) for r in report.results] == [("models", "ok")]
    values = report.to_json()
    for key in ("model_decrypt_mb_per_s", "model_decrypt_memfd_mb_per_s", "raw_aes_gcm_mb_per_s",
                "model_decrypt_time_ratio_vs_raw_aes_gcm", "model_encrypt_mb_per_s"):
        assert isinstance(values[key], float) and values[key] > 0
