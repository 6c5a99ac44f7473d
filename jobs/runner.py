"""The in-sandbox runner: one process, one job, one one-time key.

Started by a sandbox backend as ``python -m jobs.runner``; it speaks to the worker only
through channel frames on stdin/stdout (jobs.channel), with these ops (docs/protocol.md):

  runner -> host  ready      {model: {name, sha256}}            model hashed and loaded; waiting
  host -> runner  job        {request, opened_tags, dvm}        the one job this sandbox serves
  runner -> host  subscribe  {filter}                           deliver me events matching this
  host -> runner  event      {event}                            one event from the relays
  runner -> host  publish    {event, role, recipient}           publish this signed event
  runner -> host  phase      {phase}                            progress (no private data)
  host -> runner  cancel     {reason}                           stop now (timeout, shutdown)
  runner -> host  done       {usage, timings_ms} | failed {reason}

The one-time key, the documents, the prompt and the answer never leave this process in
clear: what crosses the pipe is signed events whose private parts are encrypted to the
customer, and non-secret progress.

An **encrypted model** (jobs.cmodel, with ``--model-key-owner``) is only hashed before the job
(``ready`` reports the plaintext name and digest its header claims). Once the job and its
one-time key exist, the runner DMs the owner's key daemon a key request whose evidence binds
the one-time key, the job, a fresh key-request nonce and the encrypted file's SHA-256
(dvm.keyd), waits ``--model-key-timeout`` seconds for the answer (DMs from the owner's key
only), decrypts the model into an anonymous memfd (never a file the host can see), loads it
from ``/proc/self/fd/N``, and attests to the customer the plaintext SHA-256 computed while
decrypting. A refusal fails the job with the owner's reason. The memfd is zeroed before exit.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attest import sim
from attest.binding import build_report_data
from attest.collateral import collateral_to_json
from attest.errors import AttestError
from attest.evidence import Evidence
from attest.providers import evidence_report_data, get_evidence
from dvm import nip04, nip44
from dvm.errors import CdvmError
from dvm.keyd import KeyRequest, ModelKeyRefused, parse_key_answer
from dvm.keys import PrivateKey, PublicKey
from dvm.nip01 import Event
from dvm.nip17 import build_dm, open_dm
from dvm.nip59 import GIFT_WRAP_KIND
from dvm.nip90 import JobRequest, build_result, parse_job_request
from dvm.nostr_errors import NostrError
from jobs.channel import BlockingChannel
from jobs.cmodel import MemoryModel, SealedModel, decrypt_to_memfd, is_encrypted
from jobs.errors import JobError, ModelError, ParamError, RagError
from jobs.llm import LoadedModel, load
from jobs.messages import (
    Attestation,
    DocumentAssembler,
    Limits,
    ProtocolError,
    RunRequest,
    error_message,
    parse_message,
    result_content,
)
from jobs.model import ModelRef, resolve_model
from jobs.params import GenerationParams, parse_params
from jobs.settings import HOST_TEE
from jobs.rag import ANSWER_STOP, Bm25Index, EmbeddingIndex, answer_text, build_prompt, chunk_documents, prompt_budget

CDVM_TAG = "cdvm"



class Cancelled(JobError):
    """The worker cancelled the job (a phase timed out, the customer deleted the request, the
    worker is shutting down). ``missing`` lists what had not arrived (private: customer only)."""

    def __init__(self, reason: str, missing: str = "") -> None:
        super().__init__(reason)
        self.missing = missing


class PrivateFailure(JobError):
    """A confidential job failed; the details went to the customer in an encrypted DM and this
    message, which the worker publishes as `error` feedback, says only what kind of failure it was."""


_PUBLIC_CATEGORIES: tuple[tuple[type[Exception], str], ...] = (
    (ParamError, "invalid generation parameters"),
    (ProtocolError, "malformed or incomplete private messages"),
    (RagError, "the documents could not be indexed"),
    (ModelError, "the model failed"),
)


def public_reason(error: CdvmError) -> str:
    """What may be said in public about a confidential job's failure (no prompt, document or param
    value): the worker's own reasons and attestation/key-release failures verbatim, else a category."""
    if isinstance(error, (Cancelled, AttestError, ModelKeyRefused)):
        return str(error)
    category = next((text for kind, text in _PUBLIC_CATEGORIES if isinstance(error, kind)), "job error")
    return f"the job failed inside the sandbox ({category}); the details were sent to the customer privately"


@dataclass(frozen=True)
class RunnerConfig:
    """How the worker configured this sandbox (command-line arguments of the runner)."""

    model: str | None
    tee: str
    allow_sim: bool
    n_ctx: int
    threads: int
    max_tokens_cap: int
    retrieve_k: int
    embedding_model: str | None
    model_key_owner: str | None = None
    model_key_timeout: float = 30.0
    dvm_pubkey: str | None = None


def cdvm_nonce(request: JobRequest) -> str | None:
    """The client nonce of a cdvm request (``["cdvm", "1", nonce]``), None for a plain NIP-90 request."""
    tag = request.event.first_tag(CDVM_TAG)
    if tag is None:
        return None
    if len(tag) < 3 or tag[1] != "1":
        raise ProtocolError("this worker speaks cdvm protocol version 1; the request asks for another")
    nonce = tag[2]
    if len(nonce) != 64 or any(c not in "0123456789abcdef" for c in nonce):
        raise ProtocolError("the cdvm nonce must be 64 lowercase hex characters")
    return nonce


class Runner:
    """Serves exactly one job from a loaded model, then exits."""

    def __init__(self, channel: BlockingChannel, config: RunnerConfig, model: ModelRef, llm: LoadedModel | None,
                 embedder: LoadedModel | None = None, *, sealed: SealedModel | None = None,
                 input_fd: int | None = None) -> None:
        self.channel = channel
        self.config = config
        self.model = model
        self.llm = llm
        self.embedder = embedder
        self.sealed = sealed
        self.input_fd = input_fd
        self.memory_model: MemoryModel | None = None
        self.key = PrivateKey.generate()
        self.timings: dict[str, float] = {}
        self._subscribed = False

    def _params(self, source: Any) -> GenerationParams:
        """Validated params; a ``model`` param must name the model this sandbox loaded."""
        params = parse_params(source, max_tokens_cap=self.config.max_tokens_cap)
        if params.model and params.model not in (self.model.name, Path(self.model.name).stem, self.model.sha256):
            raise ParamError(f"this DVM serves the model {self.model.name} (sha256 {self.model.sha256}), not {params.model}")
        return params

    def _phase(self, name: str) -> None:
        self.channel.send({"op": "phase", "phase": name})

    def _publish(self, event: Event, role: str, recipient: str | None = None) -> None:
        self.channel.send({"op": "publish", "event": event.to_dict(), "role": role, "recipient": recipient})

    def _dm(self, customer: PublicKey, content: str) -> None:
        for wrap in build_dm(self.key, customer, content, include_sender_copy=False):
            self._publish(wrap, "dm", customer.hex())

    def _subscribe(self) -> None:
        """Ask the worker for the gift wraps to the one-time key (once: one subscription serves all)."""
        if not self._subscribed:
            self.channel.send({"op": "subscribe", "filter": {"kinds": [GIFT_WRAP_KIND], "#p": [self.key.public_key.hex()]}})
            self._subscribed = True

    def _receive(self, deadline: float | None = None) -> dict[str, Any] | None:
        """The next frame from the worker; None once ``deadline`` (monotonic) passed first."""
        if deadline is not None and self.input_fd is not None:
            ready, _, _ = select.select([self.input_fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
        message = self.channel.recv()
        if message is None:
            raise Cancelled("the worker closed the channel")
        if message.get("op") == "cancel":
            raise Cancelled(str(message.get("reason") or "cancelled by the worker"))
        return message

    def _evidence(self, report_data: bytes) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Evidence for ``report_data`` (as a JSON envelope) and the collateral to ship with it.

        With ``--tee host`` the worker's process, in the same confidential VM, asks attest/ on the
        sandbox's behalf (the sandbox sees no TEE device); the REPORTDATA is checked here either way.
        Simulated evidence ships its collateral: the simulated PKI is private to this sandbox.
        """
        if self.config.tee == HOST_TEE:
            self.channel.send({"op": "evidence", "report_data": report_data.hex()})
            message = self._receive()
            while message is not None and message.get("op") != "evidence":
                message = self._receive()
            if message.get("error") or not isinstance(message.get("evidence"), dict):
                raise JobError(f"attestation unavailable: {message.get('error') or 'the worker sent no evidence'}")
            evidence = Evidence.from_json(json.dumps(message["evidence"]))
            if evidence_report_data(evidence.tee, evidence.raw) != report_data:
                raise JobError("attestation unavailable: the worker's evidence binds other REPORTDATA")
            collateral = message.get("collateral")
            return json.loads(evidence.to_json()), collateral if isinstance(collateral, dict) else None
        evidence = get_evidence(report_data, self.config.tee, allow_sim=self.config.allow_sim)
        collateral = json.loads(collateral_to_json(sim.sim_collateral())) if evidence.tee == "sim" else None
        return json.loads(evidence.to_json()), collateral

    def serve(self, job: dict[str, Any]) -> dict[str, Any]:
        request = parse_job_request(Event.from_dict(job["request"]))
        customer = PublicKey.from_hex(request.customer)
        if self.sealed is not None:
            self._unlock_model(request)
        nonce = cdvm_nonce(request)
        if nonce is None:
            return self._serve_plain(request, job.get("opened_tags"), customer)
        try:
            return self._serve_confidential(request, nonce, customer)
        except CdvmError as error:
            details = f"{error}; still missing: {error.missing}" if isinstance(error, Cancelled) and error.missing else str(error)
            self._dm(customer, error_message(request.id, details))
            raise PrivateFailure(public_reason(error)) from None

    def _serve_plain(self, request: JobRequest, opened_tags: list[list[str]] | None, customer: PublicKey) -> dict[str, Any]:
        """A plain NIP-90 request: the prompt came in the request (opened by the worker if encrypted)."""
        tags = [tuple(tag) for tag in opened_tags] if opened_tags else list(request.event.tags)
        params = self._params(tags)
        prompt = "\n\n".join(tag[1] for tag in tags if len(tag) >= 2 and tag[0] == "i" and (len(tag) < 3 or tag[2] == "text"))
        if not prompt.strip():
            raise ProtocolError("the job request has no text input")
        self._phase("generating")
        generation = self.llm.generate(prompt, params, ignore_eos=params.ignore_eos)
        if request.encryption == "nip04":
            content = nip04.encrypt(self.key, customer, generation.text)
        elif request.encryption == "nip44":
            content = nip44.encrypt(generation.text, nip44.conversation_key(self.key, customer))
        else:
            content = generation.text
        self._publish(build_result(self.key, request, content, encrypted=request.encryption is not None), "result")
        return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens}

    def _unlock_model(self, request: JobRequest) -> None:
        """Get the model key from its owner's key daemon, decrypt into a memfd, load it (module docstring)."""
        assert self.sealed is not None and self.config.model_key_owner is not None
        if not self.config.dvm_pubkey:
            raise JobError("an encrypted model needs the DVM's pubkey (--dvm-pubkey) for the key request")
        started = time.perf_counter()
        self._phase("attesting")
        owner = PublicKey.from_npub_or_hex(self.config.model_key_owner)
        nonce = secrets.token_hex(32)
        report_data = build_report_data(self.key.public_key.raw, request.id, nonce, self.sealed.file_sha256)
        evidence, collateral = self._evidence(report_data)
        header = self.sealed.header
        ask = KeyRequest(job=request.id, nonce=nonce, pubkey=self.key.public_key.hex(),
                         dvm=self.config.dvm_pubkey, request=request.event.to_dict(),
                         file_sha256=self.sealed.file_sha256, key_id=header.key_id, model_name=header.name,
                         evidence=evidence, collateral=collateral)
        self._subscribe()
        self._dm(owner, ask.to_content())
        deadline = time.monotonic() + self.config.model_key_timeout
        while True:
            message = self._receive(deadline)
            if message is None:
                raise JobError(f"the model owner's key daemon did not answer within {self.config.model_key_timeout:.0f} s")
            if message.get("op") != "event":
                continue
            try:
                dm = open_dm(self.key, Event.from_dict(message.get("event")))
            except NostrError:
                continue
            if dm.sender != owner:
                continue
            key = parse_key_answer(dm.content, request.id, nonce, header.key_id)
            if key is not None:
                break
        self.timings["model_key_ms"] = (time.perf_counter() - started) * 1000
        decrypting = time.perf_counter()
        self.memory_model = decrypt_to_memfd(self.sealed, key)
        self.model = self.memory_model.ref
        self.llm = load(self.model, n_ctx=self.config.n_ctx, n_threads=self.config.threads)
        self.timings["model_decrypt_ms"] = (time.perf_counter() - decrypting) * 1000

    def wipe(self) -> None:
        """Free llama.cpp's mapping and zero the decrypted model."""
        if self.memory_model is not None:
            if self.llm is not None:
                self.llm.close()
            self.memory_model.wipe()

    def _serve_confidential(self, request: JobRequest, nonce: str, customer: PublicKey) -> dict[str, Any]:
        started = time.perf_counter()
        self._phase("attesting")
        report_data = build_report_data(self.key.public_key.raw, request.id, nonce, self.model.sha256)
        evidence, collateral = self._evidence(report_data)
        limits = Limits()
        attestation = Attestation(
            job=request.id,
            nonce=nonce,
            pubkey=self.key.public_key.hex(),
            evidence=evidence,
            model_name=self.model.name,
            model_sha256=self.model.sha256,
            gpu_evidence_sha256=None,
            limits=limits,
            collateral=collateral,
        )
        self.timings["evidence_ms"] = (time.perf_counter() - started) * 1000
        self._subscribe()
        self._dm(customer, attestation.to_content())
        self._phase("waiting_documents")
        waited = time.perf_counter()
        run = self._collect(request.id, customer, limits)
        self.timings["documents_ms"] = (time.perf_counter() - waited) * 1000
        self._phase("generating")
        answer, usage = self._answer(run)
        content = nip44.encrypt(
            result_content(request.id, answer, usage, self.timings), nip44.conversation_key(self.key, customer)
        )
        self._publish(build_result(self.key, request, content, encrypted=True), "result")
        return usage

    def _collect(self, job_id: str, customer: PublicKey, limits: Limits) -> RunRequest:
        """Open DMs to the one-time key until the customer's documents and run message are whole.

        Wraps from anyone but the customer are dropped after one ECDH and one decryption.
        """
        assembler = DocumentAssembler(job_id, limits)
        while True:
            try:
                message = self._receive()
            except Cancelled as cancel:
                missing = ", ".join(assembler.missing()[:5])
                raise Cancelled(str(cancel), missing) from None
            if message.get("op") != "event":
                continue
            try:
                dm = open_dm(self.key, Event.from_dict(message.get("event")))
            except NostrError:
                continue
            if dm.sender != customer:
                continue
            ready = assembler.feed(parse_message(dm.content, job_id))
            if ready is not None:
                return ready

    def _answer(self, run: RunRequest) -> tuple[str, dict[str, int]]:
        params = self._params(run.params)
        started = time.perf_counter()
        texts = [(name, data.decode("utf-8", errors="replace")) for name, data in run.documents]
        prompt, stop = run.prompt, ()
        if texts:
            chunks = chunk_documents(texts, count_tokens=self.llm.count_tokens)
            index = EmbeddingIndex(chunks, self.embedder) if self.embedder else Bm25Index(chunks)
            passages = index.search(run.prompt, k=self.config.retrieve_k)
            budget = prompt_budget(self.llm.n_ctx, params.max_tokens)
            prompt, _ = build_prompt(run.prompt, passages, token_budget=budget, count_tokens=self.llm.count_tokens)
            stop = () if params.ignore_eos else ANSWER_STOP
        self.timings["retrieval_ms"] = (time.perf_counter() - started) * 1000
        generation = self.llm.generate(prompt, params, stop=stop, ignore_eos=params.ignore_eos)
        self.timings["prompt_ms"] = generation.timings_ms.prompt_ms
        self.timings["generation_ms"] = generation.timings_ms.generation_ms
        usage = {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens}
        return (answer_text(generation.text) if stop else generation.text.strip()), usage


def parse_args(argv: list[str] | None) -> RunnerConfig:
    parser = argparse.ArgumentParser(prog="python -m jobs.runner")
    parser.add_argument("--model", default=None)
    parser.add_argument("--tee", default="auto")
    parser.add_argument("--allow-sim", action="store_true")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))))
    parser.add_argument("--max-tokens-cap", type=int, default=1024)
    parser.add_argument("--retrieve-k", type=int, default=4)
    parser.add_argument("--embedding-model", default=None)
    parser.add_argument("--model-key-owner", default=None)
    parser.add_argument("--model-key-timeout", type=float, default=30.0)
    parser.add_argument("--dvm-pubkey", default=None)
    args = parser.parse_args(argv)
    return RunnerConfig(args.model, args.tee, args.allow_sim, args.n_ctx, args.threads, args.max_tokens_cap,
                        args.retrieve_k, args.embedding_model, args.model_key_owner, args.model_key_timeout,
                        args.dvm_pubkey)


def main(argv: list[str] | None = None) -> int:
    """Entry point inside the sandbox. Frames use the original stdout; anything printed goes to stderr."""
    frames_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    frames_in = os.fdopen(os.dup(0), "rb", buffering=0)
    channel = BlockingChannel(frames_in, frames_out)
    config = parse_args(argv)
    runner: Runner | None = None
    try:
        sealed = llm = None
        if config.model_key_owner and config.model and is_encrypted(config.model):
            sealed = SealedModel.open(config.model)
            model = ModelRef(Path(config.model), sealed.header.sha256, sealed.header.name, sealed.header.size, (0, 0, 0, 0, 0))
        else:
            model = resolve_model(config.model, use_digest_cache=False)
            llm = load(model, n_ctx=config.n_ctx, n_threads=config.threads)
        embedder = None
        if config.embedding_model:
            embedder = load(resolve_model(config.embedding_model, use_digest_cache=False), n_ctx=512,
                            n_threads=config.threads, embedding=True)
        if config.tee == "sim":
            sim.sim_collateral()
        channel.send({"op": "ready", "model": {"name": model.name, "sha256": model.sha256}})
        job = channel.recv()
        if job is None or job.get("op") == "cancel":
            return 0
        if job.get("op") != "job":
            raise ProtocolError(f"expected a job, got {job.get('op')!r}")
        runner = Runner(channel, config, model, llm, embedder, sealed=sealed, input_fd=frames_in.fileno())
        usage = runner.serve(job)
        runner.wipe()
        channel.send({"op": "done", "usage": usage, "timings_ms": runner.timings})
        return 0
    except CdvmError as error:
        if runner is not None:
            runner.wipe()
        channel.send({"op": "failed", "reason": str(error)})
        return 1


if __name__ == "__main__":
    sys.exit(main())
