"""Retrieval for private-document Q&A: chunking, BM25 and embedding search, prompt assembly.

Documents are split into paragraphs, paragraphs into sentences, and sentences packed into
windows of about ``max_tokens`` tokens (by the sum of their sentences' counts) that overlap
by up to ``overlap`` tokens of whole trailing sentences. Token counts come from a pluggable counter (``LoadedModel.count_tokens``
in production, :func:`approx_tokens` where no model is loaded).

BM25 is Okapi BM25 (Robertson & Zaragoza, "The Probabilistic Relevance Framework", 2009,
eq. 3.15) with k1 = 1.2, b = 0.75 and the non-negative idf ln(1 + (N - n + 0.5)/(n + 0.5))
used by Lucene; terms are NFKC-normalized, case-folded runs of Unicode word characters.

:func:`build_prompt` renders a completion prompt that a base model (no chat template)
continues with the answer — passages in rank order, best first, each whole:

    Passage 1: <best chunk>

    Passage 2: <next chunk>

    Question: <question>
    Answer:

Chosen by experiment on gemma-3-270m (greedy, 12 fact questions, top-3 BM25 passages, one
fact document among ten distractors): this numbered form answered 11/12; "Context: …
Question: … Answer:" 10/12; an instruction line first 7-8/12; the question also before
the context 2/12; a one-shot example did not help (10-11/12). Generate with
``stop=ANSWER_STOP`` and take :func:`answer_text` of the completion.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from jobs.errors import RagError

if TYPE_CHECKING:
    from jobs.llm import LoadedModel

TokenCounter = Callable[[str], int]

PASSAGE_TEMPLATE = "Passage {number}: {text}\n\n"
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
ANSWER_STOP = ("\n\n", "\nQuestion:", "\nPassage ")

_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")
_TERM = re.compile(r"\w+")


def approx_tokens(text: str) -> int:
    """A model-free token estimate: one token per 4 UTF-8 bytes, rounded up."""
    return -(-len(text.encode("utf-8")) // 4)


@dataclass(frozen=True)
class Chunk:
    """A window of one document. ``index`` counts the document's chunks from 0."""

    doc_id: str
    index: int
    text: str = field(repr=False)
    tokens: int


@dataclass(frozen=True)
class Passage:
    """A retrieved chunk and its score (BM25 score or cosine similarity)."""

    chunk: Chunk
    score: float


def _fit(text: str, max_tokens: int, count: TokenCounter) -> list[str]:
    """Split ``text`` at the whitespace nearest its middle (or the middle) until every piece fits."""
    if count(text) <= max_tokens or len(text) < 2:
        return [text]
    middle = len(text) // 2
    spaces = [m.start() for m in re.finditer(r"\s", text)]
    cut = min(spaces, key=lambda i: abs(i - middle)) if spaces else middle
    left, right = text[:cut].strip(), text[cut:].strip()
    if not left or not right:
        left, right = text[:middle], text[middle:]
    return _fit(left, max_tokens, count) + _fit(right, max_tokens, count)


def _units(text: str, max_tokens: int, count: TokenCounter) -> list[tuple[str, int, bool]]:
    """(sentence, tokens, starts a paragraph) for every sentence, over-long ones split to fit."""
    units = []
    for paragraph in _PARAGRAPH.split(text):
        first = True
        for sentence in _SENTENCE_END.split(paragraph.strip()):
            for piece in _fit(" ".join(sentence.split()), max_tokens, count):
                if piece:
                    units.append((piece, count(piece), first))
                    first = False
    return units


def chunk_document(
    doc_id: str, text: str, *, count_tokens: TokenCounter, max_tokens: int = 200, overlap: int = 40
) -> list[Chunk]:
    """Pack the document's sentences into windows of about ``max_tokens`` tokens.

    Consecutive windows share their boundary sentences, up to ``overlap`` tokens of them.
    """
    if not isinstance(doc_id, str) or not isinstance(text, str):
        raise RagError("a document must be an id and a text, both strings")
    if max_tokens < 8 or not 0 <= overlap < max_tokens:
        raise RagError(f"chunking needs max_tokens >= 8 and 0 <= overlap < max_tokens, got {max_tokens}/{overlap}")
    units = _units(text, max_tokens, count_tokens)
    windows: list[list[tuple[str, int, bool]]] = []
    current: list[tuple[str, int, bool]] = []
    used = 0
    for unit in units:
        if current and used + unit[1] > max_tokens:
            windows.append(current)
            carried: list[tuple[str, int, bool]] = []
            carried_tokens = 0
            for previous in reversed(current[1:]):
                if carried_tokens + previous[1] > overlap or carried_tokens + previous[1] + unit[1] > max_tokens:
                    break
                carried.insert(0, previous)
                carried_tokens += previous[1]
            current, used = carried, carried_tokens
        current.append(unit)
        used += unit[1]
    if current:
        windows.append(current)
    chunks = []
    for index, window in enumerate(windows):
        body = "".join(
            ("\n" if starts and i else " " if i else "") + piece
            for i, (piece, _, starts) in enumerate(window)
        )
        chunks.append(Chunk(doc_id=doc_id, index=index, text=body, tokens=count_tokens(body)))
    return chunks


def chunk_documents(
    documents: Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    count_tokens: TokenCounter,
    max_tokens: int = 200,
    overlap: int = 40,
) -> list[Chunk]:
    """Chunk every ``(doc_id, text)`` pair, in order."""
    pairs = documents.items() if isinstance(documents, Mapping) else documents
    chunks: list[Chunk] = []
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise RagError("documents must be (id, text) pairs of strings")
        doc_id, text = pair
        chunks.extend(chunk_document(doc_id, text, count_tokens=count_tokens, max_tokens=max_tokens, overlap=overlap))
    return chunks


def terms(text: str) -> list[str]:
    """BM25 terms: NFKC-normalized, case-folded runs of Unicode word characters."""
    return _TERM.findall(unicodedata.normalize("NFKC", text).casefold())


class Bm25Index:
    """Okapi BM25 over a fixed list of chunks."""

    def __init__(self, chunks: Sequence[Chunk], *, k1: float = 1.2, b: float = 0.75) -> None:
        self.chunks = list(chunks)
        self._k1, self._b = k1, b
        self._tf = [Counter(terms(c.text)) for c in self.chunks]
        self._len = [sum(tf.values()) for tf in self._tf]
        self._avg = (sum(self._len) / len(self._len)) if self._len else 0.0
        df: Counter[str] = Counter()
        for tf in self._tf:
            df.update(tf.keys())
        n = len(self.chunks)
        self._idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}

    def search(self, query: str, k: int = 4) -> list[Passage]:
        """The ``k`` best chunks with a positive score, best first (ties keep document order)."""
        if not isinstance(query, str):
            raise RagError("the query must be a string")
        query_terms = [t for t in set(terms(query)) if t in self._idf]
        scored = []
        for i, tf in enumerate(self._tf):
            score = 0.0
            norm = self._k1 * (1 - self._b + self._b * self._len[i] / self._avg) if self._avg else self._k1
            for t in query_terms:
                f = tf.get(t, 0)
                if f:
                    score += self._idf[t] * f * (self._k1 + 1) / (f + norm)
            if score > 0:
                scored.append((score, i))
        scored.sort(key=lambda s: (-s[0], s[1]))
        return [Passage(self.chunks[i], score) for score, i in scored[:k]]


class EmbeddingIndex:
    """Cosine-similarity search over chunk embeddings from a model loaded with ``embedding=True``."""

    def __init__(self, chunks: Sequence[Chunk], model: LoadedModel) -> None:
        self.chunks = list(chunks)
        self._model = model
        vectors = model.embed([c.text for c in self.chunks])
        self._matrix = np.asarray(vectors, dtype=np.float32).reshape(len(self.chunks), -1)

    def search(self, query: str, k: int = 4) -> list[Passage]:
        """The ``k`` chunks most similar to ``query``, best first."""
        if not self.chunks:
            return []
        query_vector = np.asarray(self._model.embed([query])[0], dtype=np.float32)
        similarities = self._matrix @ query_vector
        order = np.argsort(-similarities, kind="stable")[:k]
        return [Passage(self.chunks[i], float(similarities[i])) for i in order]


def prompt_budget(n_ctx: int, max_tokens: int) -> int:
    """Tokens a prompt may take: the context minus the completion minus the BOS token."""
    return n_ctx - max_tokens - 1


def _render(question: str, texts: Sequence[str]) -> str:
    passages = "".join(PASSAGE_TEMPLATE.format(number=n, text=t) for n, t in enumerate(texts, 1))
    return passages + QUESTION_TEMPLATE.format(question=question)


def build_prompt(
    question: str, passages: Sequence[Passage], *, token_budget: int, count_tokens: TokenCounter
) -> tuple[str, list[Passage]]:
    """Render the completion prompt with as many passages (in rank order, whole) as fit the budget.

    A passage that does not fit is skipped and later, shorter ones are still tried.
    The returned prompt never exceeds ``token_budget`` tokens by ``count_tokens``; raises
    :class:`RagError` if even the bare question does not fit.
    """
    if not isinstance(question, str):
        raise RagError("the question must be a string")
    question = " ".join(question.split())
    if not question:
        raise RagError("the question is empty")
    spent = count_tokens(_render(question, []))
    if spent > token_budget:
        raise RagError(f"the question needs {spent} prompt tokens but only {token_budget} are available")
    used: list[Passage] = []
    for passage in passages:
        cost = count_tokens(PASSAGE_TEMPLATE.format(number=len(used) + 1, text=passage.chunk.text))
        if spent + cost <= token_budget:
            used.append(passage)
            spent += cost
    prompt = _render(question, [p.chunk.text for p in used])
    while used and count_tokens(prompt) > token_budget:
        used.pop()
        prompt = _render(question, [p.chunk.text for p in used])
    return prompt, used


def answer_text(completion: str) -> str:
    """The answer in a completion of a :func:`build_prompt` prompt: its first non-blank line."""
    return next((line.strip() for line in completion.splitlines() if line.strip()), "")
