"""NIP-90 job request parameters for text generation.

NIP-90 carries job parameters as ``["param", key, value]`` tags — in the request event, or,
for an encrypted request, in the decrypted JSON list of tags (NIP-90 "Encrypted Params").
Values in tags are strings; JSON may also carry numbers. Recognized keys (aliases in the
same row are interchangeable; giving two spellings of one key is an error):

==========================  =======================  ======================================
key                         default                  range
==========================  =======================  ======================================
``max_tokens``/``max-tokens``  256 (or the cap, if lower)  1 .. ``max_tokens_cap`` (default 1024)
``temperature``             0.0 (greedy)             0 .. 2
``top_k``/``top-k``         40                       0 .. 1000 (0: no top-k cut)
``top_p``/``top-p``         0.95                     0 .. 1 (1: no top-p cut)
``seed``                    none (random)            0 .. 2**32 - 2
``model``                   none (operator default)  a name: 1..128 of ``A-Za-z0-9._:/-``
``ignore_eos``/``ignore-eos``  false                 ``true``/``false``/``1``/``0``: generate exactly
                                                     ``max_tokens`` (no end token, no stop
                                                     string), for benchmarks
==========================  =======================  ======================================

Temperature defaults to 0 because the default model is a 270M base model: greedy decoding
is what makes it answer from the supplied context instead of wandering. ``model`` is only a
name: the runner maps it to an operator-configured file and never treats it as a path.
Other keys are left to the job kind that defines them and ignored here.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from jobs.errors import ParamError

DEFAULT_MAX_TOKENS_CAP = 1024
DEFAULT_MAX_TOKENS = 256
SEED_MAX = 2**32 - 2  # 0xFFFFFFFF means "random" to llama.cpp
_MODEL_NAME = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
_INT = re.compile(r"[+-]?[0-9]{1,12}")
_FLOAT = re.compile(r"[+-]?(?:[0-9]{1,12}(?:\.[0-9]{0,12})?|\.[0-9]{1,12})(?:[eE][+-]?[0-9]{1,3})?")
_ALIASES = {
    "max_tokens": "max_tokens",
    "max-tokens": "max_tokens",
    "temperature": "temperature",
    "top_k": "top_k",
    "top-k": "top_k",
    "top_p": "top_p",
    "top-p": "top_p",
    "seed": "seed",
    "model": "model",
    "ignore_eos": "ignore_eos",
    "ignore-eos": "ignore_eos",
}


@dataclass(frozen=True)
class GenerationParams:
    """Validated sampling settings of one job (see the module docstring for ranges)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int | None = None
    model: str | None = None
    ignore_eos: bool = False


def _as_int(key: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ParamError(f"param {key} must be an integer, got {type(value).__name__}")
    if isinstance(value, str):
        if not _INT.fullmatch(value.strip()):
            raise ParamError(f"param {key} must be an integer, got {value[:40]!r}")
        value = int(value.strip())
    if not low <= value <= high:
        raise ParamError(f"param {key} must be between {low} and {high}, got {value}")
    return value


def _as_float(key: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ParamError(f"param {key} must be a number, got {type(value).__name__}")
    if isinstance(value, str):
        if not _FLOAT.fullmatch(value.strip()):
            raise ParamError(f"param {key} must be a number, got {value[:40]!r}")
        value = float(value.strip())
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise ParamError(f"param {key} must be between {low:g} and {high:g}, got {value}")
    return number


def _as_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _BOOLEANS:
        return _BOOLEANS[value.lower()]
    raise ParamError(f"param {key} must be true or false, got {repr(value)[:40]}")


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _pairs(source: Iterable[object] | Mapping[str, object]) -> Iterable[tuple[str, object]]:
    """(key, value) of every ``param`` tag, or of every mapping item."""
    if isinstance(source, Mapping):
        for key, value in source.items():
            if not isinstance(key, str):
                raise ParamError(f"param names must be strings, got {type(key).__name__}")
            yield key, value
        return
    if isinstance(source, str | bytes) or not isinstance(source, Iterable):
        raise ParamError("params must be a list of tags or a JSON object")
    for tag in source:
        if isinstance(tag, str | bytes) or not isinstance(tag, Sequence):
            raise ParamError("every tag must be a list of strings")
        if len(tag) == 0 or tag[0] != "param":
            continue
        if len(tag) < 3 or not isinstance(tag[1], str):
            raise ParamError('a param tag must be ["param", <key>, <value>]')
        yield tag[1], tag[2]


def parse_params(
    source: Iterable[object] | Mapping[str, object] = (),
    *,
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
) -> GenerationParams:
    """Validate the ``param`` tags (or a decrypted params object) of a job request.

    ``source`` is a list of tags (non-``param`` tags are skipped) or a mapping of key to
    value. Raises :class:`ParamError` naming the offending key on any malformed value.
    """
    if max_tokens_cap < 1:
        raise ParamError(f"max_tokens_cap must be at least 1, got {max_tokens_cap}")
    seen: dict[str, str] = {}
    values: dict[str, object] = {}
    for key, raw in _pairs(source):
        name = _ALIASES.get(key)
        if name is None:
            continue
        if name in seen:
            raise ParamError(f"param {key} given twice (also as {seen[name]})")
        seen[name] = key
        if name == "max_tokens":
            values[name] = _as_int(key, raw, 1, max_tokens_cap)
        elif name == "temperature":
            values[name] = _as_float(key, raw, 0.0, 2.0)
        elif name == "top_k":
            values[name] = _as_int(key, raw, 0, 1000)
        elif name == "top_p":
            values[name] = _as_float(key, raw, 0.0, 1.0)
        elif name == "seed":
            values[name] = _as_int(key, raw, 0, SEED_MAX)
        elif name == "ignore_eos":
            values[name] = _as_bool(key, raw)
        elif not isinstance(raw, str) or not _MODEL_NAME.fullmatch(raw):
            raise ParamError(f"param {key} must be a model name of 1-128 characters from A-Za-z0-9._:/-")
        else:
            values[name] = raw
    values.setdefault("max_tokens", min(DEFAULT_MAX_TOKENS, max_tokens_cap))
    return GenerationParams(**values)  # type: ignore[arg-type]
