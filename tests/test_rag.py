"""RAG: chunking, BM25, embedding search and prompt budgets; end to end on the real model."""
from __future__ import annotations

import math
import shutil
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs import rag
from jobs.errors import RagError
from jobs.llm import LoadedModel, load
from jobs.model import ModelRef, resolve_model
from jobs.params import GenerationParams
from jobs.rag import Bm25Index, Chunk, EmbeddingIndex, Passage, approx_tokens, build_prompt

FACT = "The access code for the Zorblat vault is 7351-QX."
QUESTION = "What is the access code for the Zorblat vault?"

DOCUMENTS = {
    "lighthouse": "The Harwick lighthouse was built in 1871 on a granite outcrop at the mouth of the bay. "
    "Its lamp burned whale oil until 1902, when it was converted to kerosene. The last resident keeper, "
    "Tomas Brell, left in 1964 after the light was automated.\n\nToday the tower is a museum. Visitors "
    "climb 143 steps to the lantern room, which is open from April to October.",
    "bread": "To bake a simple sourdough loaf, mix 500 grams of flour with 350 grams of water and 100 grams "
    "of active starter. Rest the dough for an hour, then add 10 grams of salt.\n\nFold the dough every "
    "thirty minutes for two hours. Shape it, proof it overnight in the fridge, and bake it at 250 degrees "
    "Celsius in a covered pot for 20 minutes, then uncovered for 25 minutes.",
    "travel": "Employees may claim travel expenses within 30 days of the trip. Economy class is required for "
    "flights under six hours. Hotel costs are reimbursed up to 180 euros per night in capital cities and "
    "120 euros elsewhere.\n\nReceipts must be uploaded to the finance portal. Claims without receipts are "
    "rejected.",
    "volcano": "Mount Keldra is a stratovolcano that last erupted in 1783. The eruption lasted eight months "
    "and released large amounts of sulfur dioxide, which cooled the northern hemisphere the following "
    "summer.\n\nThe volcano is monitored by six seismic stations. The alert level is currently green.",
    "garden": "Tomatoes need at least six hours of direct sunlight a day. Water them deeply twice a week "
    "rather than a little every day, and mulch the soil to keep moisture in.\n\nPinch off the side shoots "
    "of cordon varieties. Feed the plants with a high-potassium fertilizer once the first fruits appear.",
    "server": "The backup server in rack 12 runs nightly snapshots at 02:00 UTC. Snapshots are kept for 14 "
    "days and then pruned automatically.\n\nIf a snapshot fails, the on-call engineer receives a page. The "
    "restore procedure is documented in the operations wiki under Disaster Recovery.",
    "vault": "The Quillon archive stores the company's historical records in a climate-controlled vault. "
    "Access requires a badge and a second person present.\n\nThe archive is audited every quarter by the "
    "records team, and the humidity is kept at 45 percent.",
    "facilities": "The new safe was installed during the renovation of the east wing. It is inspected by the "
    "facilities team twice a year, and its hinges were replaced last spring. " + FACT + " Staff must sign "
    "the register after each visit.\n\nThe east wing reopened in March after four months of work.",
    "chess": "The Sicilian Defence begins with 1.e4 c5. It is the most popular response to the king's pawn "
    "opening at the master level.\n\nThe Najdorf Variation, named after Miguel Najdorf, arises after 5...a6.",
    "library": "The Elmstead public library lends up to twelve items per card. Books are due after three "
    "weeks and can be renewed twice online.\n\nLate fees were abolished in 2019. The reading room on the "
    "second floor is reserved for quiet study.",
    "river": "The river Tavel is 412 kilometres long and flows through four provinces. Its largest tributary "
    "is the Merrow, which joins it near the town of Castlebridge.\n\nSalmon returned to the upper Tavel in "
    "2011 after two weirs were removed.",
}


def _chunk(text: str, doc_id: str = "d", index: int = 0) -> Chunk:
    return Chunk(doc_id=doc_id, index=index, text=text, tokens=approx_tokens(text))


# --- model-free -------------------------------------------------------------------------------------


def test_chunks_respect_size_overlap_and_cover_every_sentence() -> None:
    sentences = [f"Sentence number {i} talks about topic {i * 7}." for i in range(40)]
    text = " ".join(sentences[:20]) + "\n\n" + " ".join(sentences[20:])
    chunks = rag.chunk_document("doc", text, count_tokens=approx_tokens, max_tokens=60, overlap=15)
    assert len(chunks) > 3
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.tokens <= 60 + 1 for c in chunks)
    assert all(s in " ".join(c.text for c in chunks) for s in sentences)
    for before, after in zip(chunks, chunks[1:]):
        first_sentence = after.text.split(". ")[0]
        assert first_sentence in before.text  # the boundary sentence is shared
    assert any("\n" in c.text for c in chunks)  # the paragraph break is kept


def test_overlong_sentences_and_words_are_split() -> None:
    text = "x" * 2000 + " " + "word " * 300
    chunks = rag.chunk_document("doc", text, count_tokens=approx_tokens, max_tokens=50, overlap=0)
    assert all(c.tokens <= 50 for c in chunks)
    assert sum(c.text.count("x") for c in chunks) == 2000


def test_chunk_documents_accepts_pairs_and_mappings() -> None:
    as_map = rag.chunk_documents({"a": "One. Two.", "b": "Three."}, count_tokens=approx_tokens)
    as_pairs = rag.chunk_documents([("a", "One. Two."), ("b", "Three.")], count_tokens=approx_tokens)
    assert as_map == as_pairs and [c.doc_id for c in as_map] == ["a", "b"]
    assert rag.chunk_documents({"empty": ""}, count_tokens=approx_tokens) == []
    with pytest.raises(RagError):
        rag.chunk_documents([("a", b"bytes")], count_tokens=approx_tokens)  # type: ignore[list-item]
    with pytest.raises(RagError):
        rag.chunk_document("a", "text", count_tokens=approx_tokens, max_tokens=20, overlap=20)
    for garbage in ([1], [("a", "b", "c")], [(None, "text")]):
        with pytest.raises(RagError):
            rag.chunk_documents(garbage, count_tokens=approx_tokens)  # type: ignore[arg-type]


def test_terms_are_unicode_aware() -> None:
    assert rag.terms("Straße, ÉCOLE—naïve ﬁle 42") == ["strasse", "école", "naïve", "file", "42"]


def test_bm25_scores_match_the_formula() -> None:
    chunks = [_chunk("apple banana apple"), _chunk("banana cherry"), _chunk("durian")]
    (best, second) = Bm25Index(chunks).search("apple banana", k=5)
    n, avg = 3, 6 / 3

    def idf(df: int) -> float:
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    def part(f: int, length: int) -> float:
        return f * 2.2 / (f + 1.2 * (1 - 0.75 + 0.75 * length / avg))

    assert best.chunk is chunks[0]
    assert best.score == pytest.approx(idf(1) * part(2, 3) + idf(2) * part(1, 3))
    assert second.score == pytest.approx(idf(2) * part(1, 2))
    assert Bm25Index(chunks).search("nothing matches", k=5) == []
    assert Bm25Index([]).search("anything") == []


def test_bm25_finds_the_fact_chunk_first() -> None:
    chunks = rag.chunk_documents(DOCUMENTS, count_tokens=approx_tokens, max_tokens=60, overlap=10)
    hits = Bm25Index(chunks).search(QUESTION, k=3)
    assert FACT in hits[0].chunk.text and hits[0].chunk.doc_id == "facilities"


def test_build_prompt_format_and_rank_order() -> None:
    passages = [Passage(_chunk("First fact."), 3.0), Passage(_chunk("Second fact."), 2.0)]
    prompt, used = build_prompt(" What  is\nit? ", passages, token_budget=1000, count_tokens=approx_tokens)
    assert prompt == "Passage 1: First fact.\n\nPassage 2: Second fact.\n\nQuestion: What is it?\nAnswer:"
    assert used == passages


def test_build_prompt_skips_what_does_not_fit() -> None:
    big, small = Passage(_chunk("b" * 400), 2.0), Passage(_chunk("small one"), 1.0)
    prompt, used = build_prompt("Why?", [big, small], token_budget=30, count_tokens=approx_tokens)
    assert used == [small] and approx_tokens(prompt) <= 30
    with pytest.raises(RagError, match="only 3"):
        build_prompt("a long question " * 5, [small], token_budget=3, count_tokens=approx_tokens)
    with pytest.raises(RagError, match="empty"):
        build_prompt("  ", [small], token_budget=100, count_tokens=approx_tokens)


@settings(max_examples=60, deadline=None)
@given(
    question=st.text(min_size=1, max_size=80).filter(str.strip),
    texts=st.lists(st.text(max_size=300), max_size=8),
    budget=st.integers(min_value=0, max_value=400),
)
def test_build_prompt_never_exceeds_budget(question: str, texts: list[str], budget: int) -> None:
    passages = [Passage(_chunk(t, index=i), 1.0) for i, t in enumerate(texts)]
    try:
        prompt, used = build_prompt(question, passages, token_budget=budget, count_tokens=approx_tokens)
    except RagError:
        return
    assert approx_tokens(prompt) <= budget
    assert all(p in passages for p in used)


def test_answer_text() -> None:
    assert rag.answer_text("\n  The code is 7351-QX.\nQuestion: more") == "The code is 7351-QX."
    assert rag.answer_text("") == ""


# --- real model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_ref(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelRef]:
    cache = tmp_path_factory.mktemp("rag-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CDVM_CACHE_DIR", str(cache))
        yield resolve_model(None)
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="module")
def model(model_ref: ModelRef) -> Iterator[LoadedModel]:
    with load(model_ref, n_ctx=1024, n_threads=2) as loaded:
        yield loaded


@pytest.mark.slow
def test_answer_from_retrieved_passage(model: LoadedModel) -> None:
    params = GenerationParams(max_tokens=24)
    chunks = rag.chunk_documents(DOCUMENTS, count_tokens=model.count_tokens, max_tokens=120, overlap=20)
    hits = Bm25Index(chunks).search(QUESTION, k=3)
    assert FACT in hits[0].chunk.text
    budget = rag.prompt_budget(model.n_ctx, params.max_tokens)
    prompt, used = build_prompt(QUESTION, hits, token_budget=budget, count_tokens=model.count_tokens)
    assert used == hits and model.count_tokens(prompt) <= budget
    result = model.generate(prompt, params, stop=rag.ANSWER_STOP)
    assert "7351-QX" in rag.answer_text(result.text)


@pytest.mark.slow
def test_prompt_fits_a_tight_budget_with_real_tokens(model: LoadedModel) -> None:
    chunks = rag.chunk_documents(DOCUMENTS, count_tokens=model.count_tokens, max_tokens=120, overlap=20)
    passages = Bm25Index(chunks).search("the", k=len(chunks)) or [Passage(c, 1.0) for c in chunks]
    for budget in (40, 90, 200, 333):
        prompt, used = build_prompt(QUESTION, passages, token_budget=budget, count_tokens=model.count_tokens)
        assert model.count_tokens(prompt) <= budget


@pytest.mark.slow
def test_embedding_retrieval(model_ref: ModelRef) -> None:
    with load(model_ref, n_ctx=256, n_threads=2, embedding=True) as embedder:
        chunks = rag.chunk_documents(DOCUMENTS, count_tokens=embedder.count_tokens, max_tokens=120, overlap=20)
        hits = EmbeddingIndex(chunks, embedder).search(QUESTION, k=3)
    assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
    assert FACT in hits[0].chunk.text
