"""A model owner's encrypted model end to end: a real relay, a real `cdvm keyd` process, a real
`cdvm worker` process with bubblewrap sandboxes and the simulated TEE, real llama.cpp, the real
client.

The model is the embedded default GGUF with a random canary written over its ``general.name``
metadata value (same length, so llama.cpp loads it as usual and it still answers correctly). The
patched plaintext exists only in this test process's memory and inside the sandbox's memfd:
the test streams it straight into the encryptor, so a canary found on disk anywhere but inside
the (encrypted) ``.cgguf`` would be a leak by cdvm.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import secrets
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dvm.client import AskError, AskOptions, ConfidentialJob
from dvm.config import relays_from_urls
from dvm.keys import PrivateKey, PublicKey
from dvm.localrelay import LocalRelay
from jobs.cmodel import ModelKey, encrypt_stream
from jobs.model import resolve_model
from workerproc import WorkerProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NAME_KEY = b"general.name"
GGUF_STRING = 8


class PatchedModel(io.RawIOBase):
    """The model file as a stream, with ``replacement`` over the bytes at ``offset``."""

    def __init__(self, path: Path, offset: int, replacement: bytes) -> None:
        self._file = open(path, "rb")
        self._offset, self._replacement = offset, replacement

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, position: int, whence: int = 0) -> int:
        return self._file.seek(position, whence)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        start = self._file.tell()
        n = self._file.readinto(buffer)
        low, high = max(start, self._offset), min(start + n, self._offset + len(self._replacement))
        if low < high:
            memoryview(buffer)[low - start:high - start] = self._replacement[low - self._offset:high - self._offset]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _name_value(path: Path) -> tuple[int, int]:
    """Offset and length of the GGUF ``general.name`` string value."""
    head = path.read_bytes()[:1 << 16] if path.stat().st_size < 1 << 16 else open(path, "rb").read(1 << 16)
    at = head.index(NAME_KEY) + len(NAME_KEY)
    kind, length = struct.unpack_from("<IQ", head, at)
    assert kind == GGUF_STRING
    return at + 12, length


class KeydProcess:
    """``cdvm keyd`` in a subprocess with its own config; its log says why it refused."""

    def __init__(self, base: Path, name: str, owner: PrivateKey, relay: str, config: str) -> None:
        self.config_path = base / f"keyd-{name}.toml"
        self.config_path.write_text(config)
        self.log_path = base / f"keyd-{name}.log"
        env = {**os.environ, "CDVM_NSEC": owner.secret_hex(), "PYTHONPATH": str(ROOT)}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dvm.cli", "keyd", "--config", str(self.config_path), "--relay", relay],
                stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while "keyd ready" not in self.log_path.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"keyd did not start:\n{self.log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("model-owner")
    model = resolve_model(None)
    offset, length = _name_value(model.path)
    canary = ("CNRY" + secrets.token_hex(length))[:length].encode()
    key = ModelKey.generate()
    key.write(base / "model.key")
    encrypted = base / "model.cgguf"
    with PatchedModel(model.path, offset, canary) as source, open(encrypted, "wb") as out:
        header = encrypt_stream(source, out, key, name="gemma-owner-test")
    with PatchedModel(model.path, offset, canary) as source:
        patched_sha256 = hashlib.file_digest(source, "sha256").hexdigest()
    assert header.sha256 == patched_sha256 != model.sha256
    owner = PrivateKey.generate()
    (base / "accept.toml").write_text("allow_simulated = true\n")
    (base / "refuse.toml").write_text("allow_simulated = false\n")
    with LocalRelay(base / "relay") as relay:
        worker_toml = (
            "[worker]\nwarm_pool = 1\n[timeouts]\nattestation = 60\n"
            f'[sandbox]\nmodel = "{encrypted}"\nmodel_key_owner = "{owner.public_key.npub()}"\nmodel_key_timeout_s = 30\n'
        )
        worker = WorkerProcess([relay.url], base / "worker-state", tee="sim", config_toml=worker_toml)
        worker.start()
        try:
            yield {"base": base, "relay": relay, "worker": worker, "owner": owner, "canary": canary,
                   "sha256": patched_sha256, "encrypted": encrypted, "header": header}
        finally:
            worker.stop()


def _keyd_config(stack: dict, name: str, policy: str, max_jobs: int | None = None) -> str:
    quota = f"max_jobs = {max_jobs}\n" if max_jobs is not None else ""
    return (f'policy = "{policy}"\nrelease_log = "{name}-releases.jsonl"\n[[model]]\nkey_file = "model.key"\n'
            f'[[operator]]\npubkey = "{PublicKey.from_hex(stack["worker"].pubkey).npub()}"\n{quota}')


def _ask(stack: dict, prompt: str, documents: list[tuple[str, bytes]]) -> object:
    job = ConfidentialJob(PrivateKey.generate(), PublicKey.from_hex(stack["worker"].pubkey),
                          relays_from_urls([stack["relay"].url]),
                          AskOptions(allow_simulated=True, timeout=180, params={"max_tokens": "24"}))
    return asyncio.run(job.run(prompt, documents))


def test_released_key_answers_and_the_canary_stays_in_memory(stack: dict) -> None:
    keyd = KeydProcess(stack["base"], "accept", stack["owner"], stack["relay"].url,
                       _keyd_config(stack, "accept", "accept.toml", max_jobs=10))
    since = time.time()
    try:
        code = f"{secrets.randbelow(9000) + 1000}-{secrets.token_hex(2).upper()}"
        fact = f"The access code for the Zorblat vault is {code}. It is changed every spring."
        result = _ask(stack, "What is the access code for the Zorblat vault?", [("vault.txt", fact.encode())])
    finally:
        keyd.stop()
    assert code in result.answer
    assert result.model_sha256 == stack["sha256"], "the customer sees the digest of the model the sandbox decrypted"
    released = [json.loads(line) for line in (stack["base"] / "accept-releases.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in released] == ["released"]
    assert released[0]["job"] == result.job_id and released[0]["enclave"] == result.enclave
    assert released[0]["operator"] == stack["worker"].pubkey and released[0]["tee"] == "sim"
    canary, encrypted = stack["canary"], stack["encrypted"]
    assert canary not in encrypted.read_bytes()
    relay, worker = stack["relay"], stack["worker"]
    places = [relay.db_path, *relay.db_path.parent.glob("relay.sqlite3*"), relay.log_path, worker.log_path,
              *[p for p in stack["base"].rglob("*") if p.is_file() and p != encrypted],
              *[p for p in Path(os.environ["CDVM_CACHE_DIR"]).rglob("*") if p.is_file()],
              *[p for p in Path(os.environ.get("TMPDIR", "/tmp")).rglob("*") if _recent_file(p, since)]]
    for place in places:
        try:
            data = place.read_bytes()
        except OSError:
            continue
        assert canary not in data, f"the model canary leaked into {place}"


def _recent_file(path: Path, since: float) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since and path.stat().st_size < 512 << 20
    except OSError:
        return False


def test_refusing_policy_reaches_the_customer(stack: dict) -> None:
    keyd = KeydProcess(stack["base"], "refuse", stack["owner"], stack["relay"].url,
                       _keyd_config(stack, "refuse", "refuse.toml"))
    try:
        with pytest.raises(AskError, match="refused the model key: attestation rejected.*simulated"):
            _ask(stack, "What is in the document?", [("d.txt", b"nothing much")])
    finally:
        keyd.stop()
    outcomes = [json.loads(line)["outcome"] for line in (stack["base"] / "refuse-releases.jsonl").read_text().splitlines()]
    assert "released" not in outcomes and "refused" in outcomes


def test_exhausted_quota_reaches_the_customer(stack: dict) -> None:
    earlier = {"ts": int(time.time()) - 60, "outcome": "released", "job": "00" * 32, "operator": stack["worker"].pubkey}
    (stack["base"] / "quota-releases.jsonl").write_text(json.dumps(earlier) + "\n")
    keyd = KeydProcess(stack["base"], "quota", stack["owner"], stack["relay"].url,
                       _keyd_config(stack, "quota", "accept.toml", max_jobs=1))
    try:
        with pytest.raises(AskError, match="refused the model key: quota exhausted"):
            _ask(stack, "What is in the document?", [("d.txt", b"nothing much")])
    finally:
        keyd.stop()
