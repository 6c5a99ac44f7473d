"""Suite ``models``: encrypted-model decryption throughput against raw AES-256-GCM.

* ``cmodel`` decrypt: :func:`jobs.cmodel.decrypt_stream` of an in-memory ``.cgguf`` (header
  parse, per-chunk associated data, AES-256-GCM ``decrypt_into`` one reused buffer, SHA-256 of
  the plaintext) into a sink that drops the bytes;
* the same into an anonymous memfd (what the sandbox does before llama.cpp loads the model);
* raw AES-256-GCM: ``AESGCM.decrypt_into`` over the same chunks with no hashing, parsing or
  copying — the ceiling. The ratio ours/raw is taken round by round (interleaved).

Sizes: 256 MiB (full), 64 MiB (quick) of random bytes, 4 MiB chunks; MB = 10^6 bytes.
"""
from __future__ import annotations

import io
import os
import secrets

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.harness import Context, suite
from jobs.cmodel import CHUNK_SIZE, NONCE_LEN, TAG_LEN, ModelKey, chunk_aad, decrypt_stream, encrypt_stream, read_header


def _write_all(fd: int, block: memoryview) -> None:
    while block:
        block = block[os.write(fd, block):]


@suite("models", "Encrypted models: AES-256-GCM chunked decrypt (+SHA-256) throughput vs raw AES-GCM")
def run(ctx: Context) -> None:
    """Measure and record the model decryption metrics (see the module docstring)."""
    size = ctx.n(full=256, quick=64, minimum=1) << 20
    plaintext = secrets.token_bytes(size)
    key = ModelKey.generate()
    encrypted = io.BytesIO()
    rounds = ctx.n(full=12, quick=5, minimum=2)
    encrypt = ctx.measure(lambda: encrypt_stream(io.BytesIO(plaintext), io.BytesIO(), key, name="bench"), rounds,
                          warmup=1, inner=1, label=f"encrypt {size >> 20} MiB")
    header = encrypt_stream(io.BytesIO(plaintext), encrypted, key, name="bench")
    blob = encrypted.getvalue()
    del plaintext
    records = []
    with io.BytesIO(blob) as src:
        read_header(src)
        for index in range(header.chunks):
            length = header.chunk_length(index)
            record = src.read(NONCE_LEN + length + TAG_LEN)
            records.append((record[:NONCE_LEN], memoryview(record)[NONCE_LEN:], chunk_aad(header.digest, index, header.chunks)))
    aead = AESGCM(bytes.fromhex(key.hex()))
    out = bytearray(CHUNK_SIZE)

    def ours() -> None:
        decrypt_stream(io.BytesIO(blob), key, lambda block: None)

    def raw() -> None:
        for nonce, sealed, aad in records:
            aead.decrypt_into(nonce, sealed, aad, memoryview(out)[:len(sealed) - TAG_LEN])

    def to_memfd() -> None:
        fd = os.memfd_create("cdvm-bench-model", os.MFD_CLOEXEC)
        try:
            decrypt_stream(io.BytesIO(blob), key, lambda block: _write_all(fd, block))
        finally:
            os.close(fd)

    comparison = ctx.interleaved(ours, raw, rounds, warmup=1, inner=1, label=f"decrypt {size >> 20} MiB",
                                 names=("cmodel decrypt+sha256", "raw AES-256-GCM"))
    memfd = ctx.measure(to_memfd, rounds, warmup=1, inner=1, label=f"decrypt {size >> 20} MiB into a memfd")
    megabytes = size / 1e6
    ctx.note(f"{size >> 20} MiB of random bytes in {header.chunks} chunks of {CHUNK_SIZE >> 20} MiB, in memory "
             "(no disk); cryptography/OpenSSL AES-256-GCM (AES-NI) on one core")
    ctx.record("model_decrypt_mb_per_s", megabytes / comparison.a.median, better="higher", unit="MB/s",
               note="decrypt + authenticate + SHA-256 of the plaintext, bytes dropped")
    ctx.record("model_decrypt_memfd_mb_per_s", megabytes / memfd.median, better="higher", unit="MB/s",
               note="as the sandbox does it: into an anonymous memfd")
    ctx.record("raw_aes_gcm_mb_per_s", megabytes / comparison.b.median, better="higher", unit="MB/s",
               note="AESGCM.decrypt_into over the same chunks: the ceiling")
    ctx.record("model_decrypt_time_ratio_vs_raw_aes_gcm", comparison.ratio, unit="x",
               note="the SHA-256 of the plaintext is most of the difference")
    ctx.record("model_encrypt_mb_per_s", megabytes / encrypt.median, better="higher", unit="MB/s",
               note="cdvm model encrypt: hash pass + encrypt pass with a second hash, in memory")
