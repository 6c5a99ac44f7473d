"""llama.cpp wrapper on the real embedded model: determinism, limits, streaming, stops, errors."""
from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.errors import ModelError
from jobs.llm import Generation, LoadedModel, _StopFilter, load
from jobs.model import ModelRef, resolve_model
from jobs.params import GenerationParams, parse_params

pytestmark = pytest.mark.slow

PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def model_ref(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelRef]:
    cache = tmp_path_factory.mktemp("llm-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CDVM_CACHE_DIR", str(cache))
        yield resolve_model(None)
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="module")
def model(model_ref: ModelRef) -> Iterator[LoadedModel]:
    with load(model_ref, n_ctx=256, n_threads=2) as loaded:
        yield loaded


def test_greedy_is_deterministic_and_respects_max_tokens(model: LoadedModel) -> None:
    params = GenerationParams(max_tokens=8)
    first = model.generate(PROMPT, params, ignore_eos=True)
    second = model.generate(PROMPT, params, ignore_eos=True)
    assert first.text == second.text and first.text.strip()
    assert first.completion_tokens == 8 and first.finish_reason == "length"
    assert first.prompt_tokens == model.count_tokens(PROMPT) + 1  # + BOS
    assert first.timings_ms.prompt_ms > 0 and first.timings_ms.generation_ms > 0
    short = model.generate(PROMPT, GenerationParams(max_tokens=3))
    assert short.completion_tokens <= 3


def test_fixed_seed_sampling_is_reproducible(model: LoadedModel) -> None:
    params = parse_params({"temperature": 1.5, "top_k": 0, "top_p": 1, "seed": 1234, "max_tokens": 10})
    runs = {model.generate(PROMPT, params, ignore_eos=True).text for _ in range(2)}
    assert len(runs) == 1


def test_top_k_alias_gives_the_same_generation(model: LoadedModel) -> None:
    dashed = parse_params([["param", "top-k", "3"], ["param", "temperature", "1"], ["param", "seed", "9"],
                           ["param", "max-tokens", "6"]])
    underscored = parse_params([["param", "top_k", "3"], ["param", "temperature", "1"], ["param", "seed", "9"],
                                ["param", "max_tokens", "6"]])
    assert dashed == underscored
    assert model.generate(PROMPT, dashed).text == model.generate(PROMPT, underscored).text


def test_streaming_callback_receives_the_same_text(model: LoadedModel) -> None:
    pieces: list[str] = []
    result = model.generate(PROMPT, GenerationParams(max_tokens=12), on_token=pieces.append, ignore_eos=True)
    assert len(pieces) > 1
    assert "".join(pieces) == result.text


def test_stop_string_cuts_text_and_stream(model: LoadedModel) -> None:
    full = model.generate(PROMPT, GenerationParams(max_tokens=12), ignore_eos=True).text
    word = full.split()[2]
    pieces: list[str] = []
    cut = model.generate(PROMPT, GenerationParams(max_tokens=12), stop=[word], on_token=pieces.append,
                         ignore_eos=True)
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(word)]
    assert "".join(pieces) == cut.text


def test_generation_repr_hides_text(model: LoadedModel) -> None:
    result = model.generate(PROMPT, GenerationParams(max_tokens=4), ignore_eos=True)
    assert isinstance(result, Generation)
    assert result.text not in repr(result) and "text" not in repr(result)


def test_context_limits(model: LoadedModel) -> None:
    with pytest.raises(ModelError, match="context holds 256"):
        model.generate("word " * 400, GenerationParams(max_tokens=4))
    near_full = "word " * (model.n_ctx - 4)
    room = model.n_ctx - model.count_tokens(near_full) - 1
    result = model.generate(near_full, GenerationParams(max_tokens=50), ignore_eos=True)
    assert result.completion_tokens == room and result.finish_reason == "length"


def test_special_token_names_stay_text(model: LoadedModel) -> None:
    assert model.count_tokens("<end_of_turn>") > 1


def test_callback_exception_aborts(model: LoadedModel) -> None:
    class Cancelled(Exception):
        pass

    def cancel(_: str) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        model.generate(PROMPT, GenerationParams(max_tokens=8), on_token=cancel, ignore_eos=True)
    assert model.generate(PROMPT, GenerationParams(max_tokens=2), ignore_eos=True).completion_tokens == 2


def test_embeddings(model_ref: ModelRef, model: LoadedModel) -> None:
    with load(model_ref, n_ctx=128, n_threads=2, embedding=True) as embedder:
        vectors = embedder.embed(["a red apple", "a green pear"])
        assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 100
        assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-3) for v in vectors)
        assert embedder.embed([]) == []
        with pytest.raises(ModelError, match="embeddings"):
            embedder.generate(PROMPT, GenerationParams(max_tokens=2))
    with pytest.raises(ModelError, match="embedding=True"):
        model.embed(["x"])


def test_unloadable_gguf_reports_reason(tmp_path: Path, model_ref: ModelRef) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CDVM_CACHE_DIR", str(tmp_path / "cache"))
        ref = resolve_model(str(path))
    with pytest.raises(ModelError, match="could not load"):
        load(ref, n_ctx=64, n_threads=1)


def test_changed_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CDVM_CACHE_DIR", str(tmp_path / "cache"))
        ref = resolve_model(str(path))
    path.write_bytes(b"GGUF" + b"\x01" * 80)
    with pytest.raises(ModelError, match="changed since it was hashed"):
        load(ref, n_ctx=64, n_threads=1)


def test_bad_settings(model_ref: ModelRef) -> None:
    with pytest.raises(ModelError, match="n_threads"):
        load(model_ref, n_ctx=256, n_threads=0)


@pytest.mark.parametrize(
    ("pieces", "stop", "emitted", "text"),
    [
        (["Hel", "lo wo", "rld"], ["wor"], ["Hel", "lo ", ""], "Hello "),
        (["a", "b", "c"], ["bd"], ["a", "", "bc"], "abc"),
        (["x\n", "\ny"], ["\n\n"], ["x", ""], "x"),
        (["abc"], [], ["abc"], "abc"),
        (["ab", "cd"], ["", "zz"], ["ab", "cd"], "abcd"),
    ],
)
def test_stop_filter(pieces: list[str], stop: list[str], emitted: list[str], text: str) -> None:
    stops = _StopFilter(stop)
    out = []
    for piece in pieces:
        out.append(stops.feed(piece))
        if stops.stopped:
            break
    else:
        out[-1] += stops.flush()
    assert out == emitted and stops.text == text
