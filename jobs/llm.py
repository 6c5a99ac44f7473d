"""A thin wrapper over llama.cpp (llama-cpp-python): load a GGUF, generate, count tokens, embed.

Generation runs its own decode loop over ``Llama.eval`` with a native llama.cpp sampler
chain (logit bias → top-k → top-p → temperature → seeded draw; greedy at temperature 0),
so that every token can be streamed to a callback, a fixed seed reproduces the output,
and ``ignore_eos`` (a -inf logit bias on every end-of-generation token, as llama.cpp's
own ``--ignore-eos``) costs nothing per token.

User text (prompts, documents) is tokenized with ``special=False``: a document containing
``<end_of_turn>`` stays text and cannot inject control tokens. llama.cpp's log output is
dropped (only its last error line is kept, to explain load failures); this module never
logs prompts or outputs, and ``Generation.text`` is left out of ``repr``.
"""
from __future__ import annotations

import codecs
import contextlib
import ctypes
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import llama_cpp

from jobs.errors import ModelError
from jobs.model import ModelRef
from jobs.params import GenerationParams

# "stop": an end-of-generation token or a stop string; "length": max_tokens reached or the context is full.
FinishReason = Literal["stop", "length"]

_GGML_LOG_LEVEL_ERROR = 4
_last_error: list[str] = [""]


@llama_cpp.llama_log_callback
def _log_sink(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """Drop llama.cpp's log chatter; keep its last error line for ModelError messages."""
    if level == _GGML_LOG_LEVEL_ERROR and text:
        _last_error[0] = text.decode("utf-8", "replace").strip()


llama_cpp.llama_log_set(_log_sink, ctypes.c_void_p(0))


@dataclass(frozen=True)
class Timings:
    """Wall-clock milliseconds of one generation; callback time is excluded."""

    prompt_ms: float
    generation_ms: float


@dataclass(frozen=True)
class Generation:
    """The outcome of one ``generate`` call. ``text`` is the completion only, without the prompt."""

    text: str = field(repr=False)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    timings_ms: Timings


class _StopFilter:
    """Cuts the text at the first stop string and holds back any tail that may begin one."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Append ``piece``; return the newly safe-to-emit text."""
        if not self._stop:
            self.text += piece
            self._emitted = len(self.text)
            return piece
        start = max(0, len(self.text) - max(map(len, self._stop)) + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self.flush()
        held = max(
            (n for s in self._stop for n in range(1, len(s)) if self.text.endswith(s[:n])),
            default=0,
        )
        safe = len(self.text) - held
        out = self.text[self._emitted : safe] if safe > self._emitted else ""
        self._emitted = max(self._emitted, safe)
        return out

    def flush(self) -> str:
        out = self.text[self._emitted :]
        self._emitted = len(self.text)
        return out


class LoadedModel:
    """A model loaded into one llama.cpp context. Calls are serialized by an internal lock."""

    def __init__(self, llama: llama_cpp.Llama, ref: ModelRef, embedding: bool) -> None:
        self._llama = llama
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._lock = threading.Lock()
        self._eog: tuple[int, ...] | None = None
        self.ref = ref
        self.embedding = embedding

    def __repr__(self) -> str:
        return f"LoadedModel({self.ref.name!r}, n_ctx={self.n_ctx}, embedding={self.embedding})"

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the context and model memory."""
        self._llama.close()

    @property
    def n_ctx(self) -> int:
        """The context window in tokens (prompt plus completion)."""
        return self._llama.n_ctx()

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token names in it stay plain text."""
        try:
            return self._llama.tokenize(text.encode("utf-8", "replace"), add_bos=add_bos, special=False)
        except RuntimeError as exc:
            raise ModelError(f"tokenization failed: {exc}") from exc

    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` takes inside a prompt (no BOS)."""
        return len(self.tokenize(text))

    def _piece(self, token: int) -> bytes:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, False)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def _eog_tokens(self) -> tuple[int, ...]:
        if self._eog is None:
            self._eog = tuple(
                t for t in range(self._llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(self._vocab, t)
            )
        return self._eog

    @contextlib.contextmanager
    def _sampler(self, params: GenerationParams, ignore_eos: bool) -> Iterator[llama_cpp.llama_sampler_p]:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        try:
            if ignore_eos:
                eog = self._eog_tokens()
                biases = (llama_cpp.llama_logit_bias * len(eog))()
                for slot, token in zip(biases, eog):
                    slot.token, slot.bias = token, -math.inf
                llama_cpp.llama_sampler_chain_add(
                    chain, llama_cpp.llama_sampler_init_logit_bias(self._llama.n_vocab(), len(eog), biases)
                )
            if params.temperature == 0:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            else:
                seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed
                for stage in (
                    llama_cpp.llama_sampler_init_top_k(params.top_k),
                    llama_cpp.llama_sampler_init_top_p(params.top_p, 1),
                    llama_cpp.llama_sampler_init_temp(params.temperature),
                    llama_cpp.llama_sampler_init_dist(seed),
                ):
                    llama_cpp.llama_sampler_chain_add(chain, stage)
            yield chain
        finally:
            llama_cpp.llama_sampler_free(chain)

    def generate(
        self,
        prompt: str,
        params: GenerationParams,
        *,
        stop: Sequence[str] = (),
        on_token: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
    ) -> Generation:
        """Complete ``prompt`` (a BOS is prepended) under ``params``.

        ``on_token`` receives the completion in order, piece by piece (text that might start
        a stop string is held back until resolved); the pieces join to ``Generation.text``.
        An exception raised by ``on_token`` aborts generation and propagates unchanged.
        Generation ends at an end-of-generation token or a stop string ("stop"), or after
        ``params.max_tokens`` tokens or when the context is full ("length").
        ``ignore_eos`` forbids end-of-generation tokens (benchmarks: always ``max_tokens``).
        """
        if self.embedding:
            raise ModelError("this model was loaded for embeddings; load it again without embedding=True to generate")
        with self._lock:
            tokens = self.tokenize(prompt, add_bos=True)
            room = self.n_ctx - len(tokens)
            if room < 1:
                raise ModelError(f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx}")
            budget = min(params.max_tokens, room)
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            stops = _StopFilter(stop)
            finish: FinishReason = "length"
            produced = 0
            callback_s = 0.0
            with self._sampler(params, ignore_eos) as sampler:
                try:
                    start = time.perf_counter()
                    self._llama.reset()
                    self._llama.eval(tokens)
                    prompt_done = time.perf_counter()
                    while produced < budget:
                        token = llama_cpp.llama_sampler_sample(sampler, self._llama.ctx, -1)
                        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                            finish = "stop"
                            break
                        produced += 1
                        out = stops.feed(decoder.decode(self._piece(token)))
                        if out and on_token is not None:
                            mark = time.perf_counter()
                            on_token(out)
                            callback_s += time.perf_counter() - mark
                        if stops.stopped:
                            finish = "stop"
                            break
                        if produced < budget:
                            self._llama.eval([token])
                    tail = "" if stops.stopped else stops.feed(decoder.decode(b"", final=True)) + stops.flush()
                    if stops.stopped:
                        finish = "stop"
                    end = time.perf_counter()
                except RuntimeError as exc:
                    raise ModelError(f"llama.cpp failed while generating: {exc}") from exc
            if tail and on_token is not None:
                on_token(tail)
            return Generation(
                text=stops.text,
                prompt_tokens=len(tokens),
                completion_tokens=produced,
                finish_reason=finish,
                timings_ms=Timings(
                    prompt_ms=(prompt_done - start) * 1000,
                    generation_ms=(end - prompt_done - callback_s) * 1000,
                ),
            )

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalized embeddings of ``texts`` (each truncated to the batch size)."""
        if not self.embedding:
            raise ModelError("this model was not loaded with embedding=True")
        if not texts:
            return []
        with self._lock:
            try:
                return self._llama.embed(list(texts), normalize=True)
            except (RuntimeError, ValueError) as exc:
                raise ModelError(f"llama.cpp failed while embedding: {exc}") from exc


def load(
    model: ModelRef,
    *,
    n_ctx: int,
    n_threads: int,
    n_gpu_layers: int = 0,
    use_mmap: bool = True,
    embedding: bool = False,
    n_batch: int = 512,
) -> LoadedModel:
    """Load ``model`` into a fresh llama.cpp context; fails if the file changed since it was hashed.

    ``n_batch`` bounds prompt-eval batches (and each embedded text's length in tokens).
    """
    if n_ctx < 16 or n_threads < 1 or n_batch < 1 or n_gpu_layers < -1:
        raise ModelError(
            f"invalid llama.cpp settings: n_ctx={n_ctx} (>= 16), n_threads={n_threads} (>= 1), "
            f"n_batch={n_batch} (>= 1), n_gpu_layers={n_gpu_layers} (>= -1)"
        )
    if not model.unchanged():
        raise ModelError(f"model file {model.path} changed since it was hashed; resolve it again")
    _last_error[0] = ""
    batch = max(n_batch, n_ctx) if embedding else min(n_batch, n_ctx)
    try:
        llama = llama_cpp.Llama(
            model_path=str(model.path),
            n_ctx=n_ctx,
            n_batch=batch,
            n_ubatch=batch,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_gpu_layers=n_gpu_layers,
            use_mmap=use_mmap,
            embedding=embedding,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN if embedding else llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED,
            verbose=False,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        reason = _last_error[0] or str(exc)
        raise ModelError(f"llama.cpp could not load {model.path}: {reason}") from exc
    if not model.unchanged():
        llama.close()
        raise ModelError(f"model file {model.path} changed while it was being loaded; resolve it again")
    return LoadedModel(llama, model, embedding)
