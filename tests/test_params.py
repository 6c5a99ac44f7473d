"""NIP-90 generation params: aliases, defaults, ranges, and malformed input → ParamError."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.errors import ParamError
from jobs.params import DEFAULT_MAX_TOKENS, SEED_MAX, GenerationParams, parse_params


def test_defaults() -> None:
    assert parse_params([]) == GenerationParams()
    assert parse_params([]) == GenerationParams(
        max_tokens=DEFAULT_MAX_TOKENS, temperature=0.0, top_k=40, top_p=0.95, seed=None, model=None
    )


def test_default_max_tokens_respects_a_lower_cap() -> None:
    assert parse_params([], max_tokens_cap=64).max_tokens == 64


def test_tags_with_both_spellings() -> None:
    tags = [
        ["i", "what is up?", "text"],
        ["param", "max-tokens", "64"],
        ["param", "temperature", "0.7"],
        ["param", "top-k", "12"],
        ["param", "top-p", "0.5"],
        ["param", "seed", "42"],
        ["param", "model", "gemma-3-270m"],
        ["output", "text/plain"],
    ]
    assert parse_params(tags) == GenerationParams(
        max_tokens=64, temperature=0.7, top_k=12, top_p=0.5, seed=42, model="gemma-3-270m"
    )
    underscored = [["param", "max_tokens", "64"], ["param", "top_k", "12"], ["param", "top_p", "0.5"]]
    assert parse_params(underscored) == GenerationParams(max_tokens=64, top_k=12, top_p=0.5)


def test_top_k_alias_equivalent() -> None:
    assert parse_params([["param", "top-k", "7"]]) == parse_params([["param", "top_k", "7"]])


def test_encrypted_params_json_forms() -> None:
    decrypted = json.loads('[["param", "top-k", 5], ["param", "temperature", 1], ["param", "max_tokens", 10]]')
    assert parse_params(decrypted) == GenerationParams(max_tokens=10, temperature=1.0, top_k=5)
    assert parse_params({"top-p": 0.25, "seed": "7"}) == GenerationParams(top_p=0.25, seed=7)


def test_unknown_params_ignored() -> None:
    assert parse_params([["param", "frequency_penalty", "banana"]]) == GenerationParams()


def test_boundaries_accepted() -> None:
    params = parse_params(
        {"max_tokens": 1024, "temperature": "2", "top_k": 0, "top_p": "0", "seed": SEED_MAX}
    )
    assert (params.max_tokens, params.temperature, params.top_k, params.top_p, params.seed) == (
        1024, 2.0, 0, 0.0, SEED_MAX
    )
    assert parse_params({"max_tokens": "1"}).max_tokens == 1


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("max_tokens", "0", "between 1 and 1024"),
        ("max-tokens", "1025", "between 1 and 1024"),
        ("max_tokens", "12.5", "integer"),
        ("max_tokens", "ten", "integer"),
        ("max_tokens", True, "integer"),
        ("temperature", "-0.1", "between 0 and 2"),
        ("temperature", "2.5", "between 0 and 2"),
        ("temperature", "nan", "number"),
        ("temperature", float("inf"), "between 0 and 2"),
        ("temperature", [], "number"),
        ("top_k", "-1", "between 0 and 1000"),
        ("top-k", "1001", "between 0 and 1000"),
        ("top_p", "1.01", "between 0 and 1"),
        ("top-p", None, "number"),
        ("seed", "-3", "between 0"),
        ("seed", str(2**32 - 1), "between 0"),
        ("seed", "9" * 5000, "integer"),
        ("model", "../../etc/passwd\n", "model name"),
        ("model", "", "model name"),
        ("model", 5, "model name"),
    ],
)
def test_bad_values(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ParamError, match=fragment) as info:
        parse_params([["param", key, value]])
    assert key in str(info.value)


def test_cap_is_configurable() -> None:
    assert parse_params({"max_tokens": 4000}, max_tokens_cap=4096).max_tokens == 4000
    with pytest.raises(ParamError, match="between 1 and 16"):
        parse_params({"max_tokens": 17}, max_tokens_cap=16)
    with pytest.raises(ParamError):
        parse_params([], max_tokens_cap=0)


def test_duplicate_spellings_rejected() -> None:
    with pytest.raises(ParamError, match="twice"):
        parse_params([["param", "top_k", "5"], ["param", "top-k", "5"]])
    with pytest.raises(ParamError, match="twice"):
        parse_params([["param", "seed", "1"], ["param", "seed", "1"]])


@pytest.mark.parametrize(
    "source",
    ["param", b"param", 42, None, [["param"]], [["param", "seed"]], [["param", 7, "1"]], ["param"], [5], {3: "x"}],
)
def test_malformed_containers(source: object) -> None:
    with pytest.raises(ParamError):
        parse_params(source)  # type: ignore[arg-type]


def test_params_are_frozen() -> None:
    with pytest.raises(AttributeError):
        GenerationParams().max_tokens = 5  # type: ignore[misc]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from(["max_tokens", "max-tokens", "temperature", "top_k", "top-k", "top_p", "top-p", "seed", "model", "x"])


@given(st.lists(st.tuples(_keys, _json), max_size=5) | _json)
def test_garbage_only_raises_param_error(data: object) -> None:
    source = [["param", k, v] for k, v in data] if isinstance(data, list) and all(
        isinstance(x, tuple) for x in data
    ) else data
    try:
        parse_params(source)  # type: ignore[arg-type]
    except ParamError:
        pass
