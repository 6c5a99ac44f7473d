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
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attest import sim
from attest.binding import build_report_data
from attest.collateral import collateral_to_json
from attest.providers import get_evidence
from dvm import nip04, nip44
from dvm.errors import CdvmError
from dvm.keys import PrivateKey, PublicKey
from dvm.nip01 import Event
from dvm.nip17 import build_dm, open_dm
from dvm.nip59 import GIFT_WRAP_KIND
from dvm.nip90 import JobRequest, build_result, parse_job_request
from dvm.nostr_errors import NostrError
from jobs.channel import BlockingChannel
from jobs.errors import JobError, ParamError
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
from jobs.rag import ANSWER_STOP, Bm25Index, EmbeddingIndex, answer_text, build_prompt, chunk_documents, prompt_budget

CDVM_TAG = "cdvm"


class Cancelled(JobError):
    """The worker cancelled the job (a phase timed out or the worker is shutting down)."""


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

    def __init__(self, channel: BlockingChannel, config: RunnerConfig, model: ModelRef, llm: LoadedModel,
                 embedder: LoadedModel | None = None) -> None:
        self.channel = channel
        self.config = config
        self.model = model
        self.llm = llm
        self.embedder = embedder
        self.key = PrivateKey.generate()
        self.timings: dict[str, float] = {}

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

    def _receive(self) -> dict[str, Any]:
        message = self.channel.recv()
        if message is None:
            raise Cancelled("the worker closed the channel")
        if message.get("op") == "cancel":
            raise Cancelled(str(message.get("reason") or "cancelled by the worker"))
        return message

    def serve(self, job: dict[str, Any]) -> dict[str, Any]:
        request = parse_job_request(Event.from_dict(job["request"]))
        customer = PublicKey.from_hex(request.customer)
        nonce = cdvm_nonce(request)
        if nonce is None:
            return self._serve_plain(request, job.get("opened_tags"), customer)
        try:
            return self._serve_confidential(request, nonce, customer)
        except CdvmError as error:
            self._dm(customer, error_message(request.id, str(error)))
            raise

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

    def _serve_confidential(self, request: JobRequest, nonce: str, customer: PublicKey) -> dict[str, Any]:
        started = time.perf_counter()
        self._phase("attesting")
        report_data = build_report_data(self.key.public_key.raw, request.id, nonce, self.model.sha256)
        evidence = get_evidence(report_data, self.config.tee, allow_sim=self.config.allow_sim)
        limits = Limits()
        collateral = json.loads(collateral_to_json(sim.sim_collateral())) if evidence.tee == "sim" else None
        attestation = Attestation(
            job=request.id,
            nonce=nonce,
            pubkey=self.key.public_key.hex(),
            evidence=json.loads(evidence.to_json()),
            model_name=self.model.name,
            model_sha256=self.model.sha256,
            gpu_evidence_sha256=None,
            limits=limits,
            collateral=collateral,
        )
        self.timings["evidence_ms"] = (time.perf_counter() - started) * 1000
        self.channel.send({"op": "subscribe", "filter": {"kinds": [GIFT_WRAP_KIND], "#p": [self.key.public_key.hex()]}})
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
                raise Cancelled(f"{cancel}; still missing: {missing}") from None
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
    args = parser.parse_args(argv)
    return RunnerConfig(args.model, args.tee, args.allow_sim, args.n_ctx, args.threads, args.max_tokens_cap,
                        args.retrieve_k, args.embedding_model)


def main(argv: list[str] | None = None) -> int:
    """Entry point inside the sandbox. Frames use the original stdout; anything printed goes to stderr."""
    frames_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    channel = BlockingChannel(sys.stdin.buffer, frames_out)
    config = parse_args(argv)
    try:
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
        runner = Runner(channel, config, model, llm, embedder)
        usage = runner.serve(job)
        channel.send({"op": "done", "usage": usage, "timings_ms": runner.timings})
        return 0
    except CdvmError as error:
        channel.send({"op": "failed", "reason": str(error)})
        return 1


if __name__ == "__main__":
    sys.exit(main())
