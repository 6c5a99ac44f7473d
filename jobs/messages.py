"""cdvm-v1 private messages between a customer's client and a job's enclave (sans-I/O).

Every message is the content of a NIP-17 DM (a kind 14 rumor inside a NIP-59 gift wrap):
a JSON object with ``"cdvm": 1``, a ``"type"`` and the ``"job"`` (request event id) it
belongs to. The order is fixed (docs/protocol.md):

  enclave -> customer   attestation  (evidence, one-time key, model digest, limits)
  customer -> enclave   chunk*       (a piece of a document, base64, with its SHA-256)
  customer -> enclave   manifest     (every document: name, size, SHA-256, chunk count)
  customer -> enclave   run          (prompt and generation params)
  enclave -> customer   error        (only when the job fails inside the enclave)

The result itself is the NIP-90 result event, its content NIP-44-encrypted (``result``).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from jobs.errors import JobError

PROTOCOL_VERSION = 1
MAX_MESSAGE_CHARS = 65_000
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ProtocolError(JobError):
    """A cdvm message is malformed, out of order, or does not belong to this job."""


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _hex32(value: object, name: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ProtocolError(f"{name} must be 64 lowercase hex characters")
    return value


def _int(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"{name} must be an integer in {low}..{high}")
    return value


def _str(value: object, name: str, max_len: int) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"{name} must be a string of at most {max_len} characters")
    return value


def parse_message(content: str, job_id: str) -> dict[str, Any]:
    """Decode a DM's content; it must be a cdvm-v1 object for ``job_id``."""
    if len(content) > MAX_MESSAGE_CHARS * 2:
        raise ProtocolError("message too large")
    try:
        obj = json.loads(content)
    except (ValueError, RecursionError):
        raise ProtocolError("message is not JSON") from None
    if not isinstance(obj, dict) or obj.get("cdvm") != PROTOCOL_VERSION:
        raise ProtocolError(f"not a cdvm v{PROTOCOL_VERSION} message")
    if obj.get("job") != job_id:
        raise ProtocolError("message belongs to another job")
    if not isinstance(obj.get("type"), str):
        raise ProtocolError("message has no type")
    return obj


@dataclass(frozen=True)
class Limits:
    """What the enclave accepts; announced in the attestation message."""

    max_documents: int = 64
    max_total_bytes: int = 16 * 1024 * 1024
    max_chunks: int = 4096

    def to_dict(self) -> dict[str, int]:
        return {"max_documents": self.max_documents, "max_total_bytes": self.max_total_bytes, "max_chunks": self.max_chunks}

    @classmethod
    def from_dict(cls, obj: object) -> Limits:
        if not isinstance(obj, dict):
            raise ProtocolError("limits must be an object")
        return cls(
            _int(obj.get("max_documents"), "limits.max_documents", 0, 1 << 20),
            _int(obj.get("max_total_bytes"), "limits.max_total_bytes", 0, 1 << 40),
            _int(obj.get("max_chunks"), "limits.max_chunks", 0, 1 << 24),
        )


@dataclass(frozen=True)
class Attestation:
    """The enclave's first message: who speaks (``pubkey``), on what evidence, with which model."""

    job: str
    nonce: str
    pubkey: str
    evidence: dict[str, Any]
    model_name: str
    model_sha256: str
    gpu_evidence_sha256: str | None
    limits: Limits
    collateral: dict[str, Any] | None = None

    def to_content(self) -> str:
        return _dump(
            {
                "cdvm": PROTOCOL_VERSION,
                "type": "attestation",
                "job": self.job,
                "nonce": self.nonce,
                "pubkey": self.pubkey,
                "evidence": self.evidence,
                "model": {"name": self.model_name, "sha256": self.model_sha256},
                "gpu_evidence_sha256": self.gpu_evidence_sha256,
                "limits": self.limits.to_dict(),
                "collateral": self.collateral,
            }
        )

    @classmethod
    def from_message(cls, obj: dict[str, Any]) -> Attestation:
        if obj.get("type") != "attestation":
            raise ProtocolError("expected an attestation message")
        model = obj.get("model")
        if not isinstance(model, dict):
            raise ProtocolError("attestation.model must be an object")
        evidence = obj.get("evidence")
        if not isinstance(evidence, dict):
            raise ProtocolError("attestation.evidence must be an object")
        gpu = obj.get("gpu_evidence_sha256")
        collateral = obj.get("collateral")
        if collateral is not None and not isinstance(collateral, dict):
            raise ProtocolError("attestation.collateral must be an object or null")
        return cls(
            job=_hex32(obj.get("job"), "job"),
            nonce=_hex32(obj.get("nonce"), "nonce"),
            pubkey=_hex32(obj.get("pubkey"), "pubkey"),
            evidence=evidence,
            model_name=_str(model.get("name"), "model.name", 256),
            model_sha256=_hex32(model.get("sha256"), "model.sha256"),
            gpu_evidence_sha256=None if gpu is None else _hex32(gpu, "gpu_evidence_sha256"),
            limits=Limits.from_dict(obj.get("limits")),
            collateral=collateral,
        )


def chunk_message(job: str, doc: int, seq: int, data: bytes) -> str:
    """One piece of document ``doc``; ``sha256`` lets the enclave reject a damaged piece at once."""
    return _dump(
        {
            "cdvm": PROTOCOL_VERSION,
            "type": "chunk",
            "job": job,
            "doc": doc,
            "seq": seq,
            "sha256": hashlib.sha256(data).hexdigest(),
            "data": base64.b64encode(data).decode("ascii"),
        }
    )


@dataclass(frozen=True)
class DocumentEntry:
    """A manifest line: the whole document's name, size, digest and chunk count."""

    name: str
    size: int
    sha256: str
    chunks: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "chunks": self.chunks}


def manifest_message(job: str, documents: list[DocumentEntry]) -> str:
    return _dump({"cdvm": PROTOCOL_VERSION, "type": "manifest", "job": job, "docs": [d.to_dict() for d in documents]})


def run_message(job: str, prompt: str, params: dict[str, str]) -> str:
    return _dump({"cdvm": PROTOCOL_VERSION, "type": "run", "job": job, "prompt": prompt, "params": params})


def error_message(job: str, message: str) -> str:
    return _dump({"cdvm": PROTOCOL_VERSION, "type": "error", "job": job, "message": message})


def result_content(job: str, answer: str, usage: dict[str, int], timings_ms: dict[str, float]) -> str:
    """The plaintext of a cdvm result event's (NIP-44 encrypted) content."""
    return _dump(
        {"cdvm": PROTOCOL_VERSION, "type": "result", "job": job, "answer": answer, "usage": usage, "timings_ms": timings_ms}
    )


def split_document(data: bytes, max_chunk_bytes: int) -> list[bytes]:
    """Cut a document into pieces of at most ``max_chunk_bytes`` (an empty document is one empty piece)."""
    if max_chunk_bytes < 1:
        raise ProtocolError("chunk size must be positive")
    return [data[i : i + max_chunk_bytes] for i in range(0, len(data), max_chunk_bytes)] or [b""]


@dataclass
class RunRequest:
    """What the enclave needs to answer, once every document arrived whole."""

    prompt: str = field(repr=False)
    params: dict[str, str]
    documents: list[tuple[str, bytes]] = field(repr=False)


class DocumentAssembler:
    """Collects chunk, manifest and run messages for one job and checks the documents arrived whole.

    Pure state machine: feed it parsed messages (:func:`parse_message`) in any order the
    relays deliver them; :meth:`feed` returns a :class:`RunRequest` when the job can run.
    """

    def __init__(self, job: str, limits: Limits) -> None:
        self.job = job
        self.limits = limits
        self._chunks: dict[tuple[int, int], bytes] = {}
        self._bytes = 0
        self._manifest: list[DocumentEntry] | None = None
        self._run: tuple[str, dict[str, str]] | None = None

    def feed(self, obj: dict[str, Any]) -> RunRequest | None:
        kind = obj["type"]
        if kind == "chunk":
            self._add_chunk(obj)
        elif kind == "manifest":
            self._set_manifest(obj)
        elif kind == "run":
            self._set_run(obj)
        else:
            raise ProtocolError(f"unexpected message type {kind[:40]!r} from the customer")
        return self._ready()

    def _add_chunk(self, obj: dict[str, Any]) -> None:
        doc = _int(obj.get("doc"), "chunk.doc", 0, self.limits.max_documents - 1)
        seq = _int(obj.get("seq"), "chunk.seq", 0, self.limits.max_chunks - 1)
        digest = _hex32(obj.get("sha256"), "chunk.sha256")
        encoded = obj.get("data")
        if not isinstance(encoded, str):
            raise ProtocolError("chunk.data must be base64 text")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError(f"chunk {doc}/{seq} is not valid base64") from exc
        if hashlib.sha256(data).hexdigest() != digest:
            raise ProtocolError(f"chunk {doc}/{seq} is damaged: its SHA-256 does not match")
        if (doc, seq) in self._chunks:
            return
        if len(self._chunks) >= self.limits.max_chunks or self._bytes + len(data) > self.limits.max_total_bytes:
            raise ProtocolError(
                f"documents exceed the enclave's limits ({self.limits.max_total_bytes} bytes, {self.limits.max_chunks} chunks)"
            )
        self._chunks[(doc, seq)] = data
        self._bytes += len(data)

    def _set_manifest(self, obj: dict[str, Any]) -> None:
        docs = obj.get("docs")
        if not isinstance(docs, list) or len(docs) > self.limits.max_documents:
            raise ProtocolError(f"manifest.docs must list at most {self.limits.max_documents} documents")
        entries = []
        for index, entry in enumerate(docs):
            if not isinstance(entry, dict):
                raise ProtocolError(f"manifest entry {index} must be an object")
            entries.append(
                DocumentEntry(
                    name=_str(entry.get("name"), f"manifest.docs[{index}].name", 1024),
                    size=_int(entry.get("size"), f"manifest.docs[{index}].size", 0, self.limits.max_total_bytes),
                    sha256=_hex32(entry.get("sha256"), f"manifest.docs[{index}].sha256"),
                    chunks=_int(entry.get("chunks"), f"manifest.docs[{index}].chunks", 1, self.limits.max_chunks),
                )
            )
        self._manifest = entries

    def _set_run(self, obj: dict[str, Any]) -> None:
        prompt = _str(obj.get("prompt"), "run.prompt", MAX_MESSAGE_CHARS)
        params = obj.get("params", {})
        if not isinstance(params, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
            raise ProtocolError("run.params must map strings to strings")
        self._run = (prompt, params)

    def missing(self) -> list[str]:
        """Human-readable list of what has not arrived yet (for a timeout message)."""
        if self._manifest is None:
            return ["the manifest"] + ([] if self._run else ["the run message"])
        gaps = [
            f"{entry.name} chunk {seq}"
            for index, entry in enumerate(self._manifest)
            for seq in range(entry.chunks)
            if (index, seq) not in self._chunks
        ]
        return gaps + ([] if self._run else ["the run message"])

    def _ready(self) -> RunRequest | None:
        if self._manifest is None or self._run is None or self.missing():
            return None
        documents = []
        for index, entry in enumerate(self._manifest):
            data = b"".join(self._chunks[(index, seq)] for seq in range(entry.chunks))
            if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
                raise ProtocolError(f"document {entry.name!r} arrived damaged: size or SHA-256 differs from the manifest")
            documents.append((entry.name, data))
        prompt, params = self._run
        return RunRequest(prompt, params, documents)
