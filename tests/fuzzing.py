"""Shared machinery of the fuzz properties (tests/test_fuzz_*.py) and their long run (bench/fuzz.py).

Every property feeds hostile input to one parser and calls it through :func:`attempt`, which
allows exactly two outcomes: a result, or a :class:`dvm.errors.CdvmError` with a short,
non-empty message. Anything else fails the property: another exception type, a call that
runs longer than :data:`TIMEOUT_S` (a hang), or one that grows the process's peak memory by
more than :data:`MEMORY_SLACK` plus a multiple of the input size (unbounded memory).

Inputs come from two kinds of strategies: random values, and mutations of real data
(:func:`mutated_bytes`, :func:`mutated_text`, :func:`mutated_json`) — real evidence from the
vectors directory, real signed events — which reach far deeper into a parser than random bytes.

``CDVM_FUZZ_SCALE`` (or :data:`SCALE`, set before the property modules are imported)
multiplies every property's example count: 1 in CI, more in ``cdvm bench fuzz``.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import resource
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from dvm.errors import CdvmError

SCALE = float(os.environ.get("CDVM_FUZZ_SCALE", "1"))
"""Multiplier of every property's ``max_examples`` (read when a property module is imported)."""
VECTORS = Path(os.environ.get("CDVM_VECTORS", Path(__file__).resolve().parents[2] / "shared" / "vectors"))
"""Where the real evidence lives (the ``vectors`` fixture's directory; bench/fuzz.py may repoint it)."""
TIMEOUT_S = 10.0
"""Longest one parser call may take before it counts as a hang (generous: CI machines are shared)."""
MEMORY_SLACK = 64 * 2**20
"""Peak-memory growth one call may cause beyond :data:`MEMORY_PER_INPUT_BYTE` times its input."""
MEMORY_PER_INPUT_BYTE = 64
MAX_MESSAGE_CHARS = 2000
"""An error message longer than this is not readable (it probably echoes the input)."""

EXAMPLES = [0]
"""Parser calls made through :func:`attempt` so far (bench/fuzz.py reports examples per second)."""


def fuzz_settings(max_examples: int) -> settings:
    """Settings of one property: ``max_examples`` times :data:`SCALE`, no deadline (the per-call
    timeout of :func:`attempt` guards against hangs instead), no example database."""
    return settings(
        max_examples=max(1, round(max_examples * SCALE)),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


@dataclass(frozen=True, slots=True)
class Rejected:
    """The typed error a parser raised for an input."""

    error: CdvmError


class Hang(BaseException):
    """Raised in the main thread when a call exceeds :data:`TIMEOUT_S` (a BaseException, so a
    parser's ``except Exception`` cannot swallow it)."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise Hang()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _size(value: object) -> int:
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    if isinstance(value, (dict, list, tuple)):
        try:
            return len(json.dumps(value, default=str))
        except (TypeError, ValueError, RecursionError):
            return 0
    return 0


def attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``: its result, or :class:`Rejected` holding the typed error it raised.

    Fails (AssertionError) on an untyped exception, an empty or unreadably long message, a
    call longer than :data:`TIMEOUT_S`, or too much peak-memory growth.
    """
    EXAMPLES[0] += 1
    name = getattr(fn, "__qualname__", repr(fn))
    before = _peak_bytes()
    try:
        # Libraries warn about odd but parseable input (a negative certificate serial): not a failure.
        with _time_limit(TIMEOUT_S), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fn(*args, **kwargs)
    except Hang:
        raise AssertionError(f"{name} did not return within {TIMEOUT_S} s (hang)") from None
    except CdvmError as error:
        message = str(error)
        assert message.strip(), f"{name} raised {type(error).__name__} with an empty message"
        assert len(message) <= MAX_MESSAGE_CHARS, (
            f"{name} raised {type(error).__name__} with a {len(message)}-character message: {message[:200]}...")
        result = Rejected(error)
    except Exception as error:
        raise AssertionError(f"{name} raised untyped {type(error).__name__}: {error}"[:1000]) from error
    grown = _peak_bytes() - before
    budget = MEMORY_SLACK + MEMORY_PER_INPUT_BYTE * sum(_size(a) for a in (*args, *kwargs.values()))
    assert grown <= budget, f"{name} grew peak memory by {grown >> 20} MiB (budget {budget >> 20} MiB)"
    return result


def ok(result: object) -> bool:
    """True when :func:`attempt` returned a result rather than a typed rejection."""
    return not isinstance(result, Rejected)


@functools.cache
def vector_bytes(relative: str) -> bytes:
    """A file from the vectors directory (cached: strategies read it on every draw)."""
    return (VECTORS / relative).read_bytes()


def vector_text(relative: str) -> str:
    return vector_bytes(relative).decode("utf-8")


def vector_json(relative: str) -> Any:
    return json.loads(vector_bytes(relative))


# ---------------------------------------------------------------------------- byte and text mutations

INTERESTING_INTS = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFF_FFFF,
                    0x8000_0000, 0xFFFF_FFFF, 2**63 - 1, 2**64 - 1)
_BYTE_OPS = ("flip", "byte", "int", "truncate", "cut", "insert", "duplicate", "append")


@st.composite
def mutated_bytes(draw: st.DrawFn, seed: bytes | Callable[[], bytes], hot: Sequence[int] | Callable[[], Sequence[int]] = (),
                  max_ops: int = 4) -> bytes:
    """``seed`` after 1..``max_ops`` mutations: bit flips, random bytes, interesting integers
    written over a field, truncation, cuts, insertions, duplicated slices, appended junk.
    Positions are uniform, or (half the time, when given) one of the ``hot`` offsets —
    length and type fields that a uniform flip rarely hits."""
    data = bytearray(seed() if callable(seed) else seed)
    offsets = list(hot() if callable(hot) else hot)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(_BYTE_OPS))
        size = len(data)
        if offsets and draw(st.booleans()):
            pos = min(draw(st.sampled_from(offsets)), max(size - 1, 0))
        else:
            pos = draw(st.integers(0, max(size - 1, 0)))
        if op == "flip" and size:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and size:
            data[pos] = draw(st.integers(0, 255))
        elif op == "int":
            width = draw(st.sampled_from((1, 2, 4, 8)))
            value = draw(st.sampled_from(INTERESTING_INTS) | st.integers(0, 2**64 - 1))
            if draw(st.booleans()):
                value = (size - pos + draw(st.integers(-8, 8))) % 2**64
            data[pos:pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif op == "truncate":
            del data[pos:]
        elif op == "cut":
            del data[pos:pos + draw(st.integers(1, 256))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "duplicate":
            length = draw(st.integers(1, 512))
            data[pos:pos] = data[pos:pos + length]
        else:
            data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def mutated_text(seed: str | Callable[[], str], max_ops: int = 4) -> st.SearchStrategy[str]:
    """``seed`` mutated as UTF-8 bytes (:func:`mutated_bytes`), decoded back with replacement characters."""
    encode = (lambda: seed().encode("utf-8", "surrogatepass")) if callable(seed) else seed.encode("utf-8", "surrogatepass")
    return mutated_bytes(encode, max_ops=max_ops).map(lambda b: b.decode("utf-8", "replace"))


# ---------------------------------------------------------------------------- JSON mutations

TRICKY_STRINGS = ("", " ", "0", "-1", "1e999", "NaN", "null", "true", "\x00", "\ud800", "é", "\u202e", "a" * 300, "A" * 3000,
                  "0" * 64, "f" * 64, "F" * 64, "g" * 64, "0" * 63, "0" * 65, "0" * 128, "2025-01-01T00:00:00Z",
                  "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "ws://", "wss://h", "#", "?iv=")
TRICKY_NUMBERS = (0, -1, 1, 255, 256, 65535, 65536, 2**31, 2**32, 2**32 - 1, 2**63, 2**64, -(2**63), 10**30,
                  0.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan"))

json_scalars = (
    st.none() | st.booleans() | st.sampled_from(TRICKY_NUMBERS) | st.integers() | st.floats()
    | st.sampled_from(TRICKY_STRINGS) | st.text(max_size=24)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
"""Arbitrary JSON-like values (NaN and infinities included: ``json.dumps`` writes them)."""


def _slots(node: Any, out: list[tuple[Any, Any]]) -> None:
    if isinstance(node, dict):
        for key in list(node):
            out.append((node, key))
            _slots(node[key], out)
    elif isinstance(node, list):
        for index in range(len(node)):
            out.append((node, index))
            _slots(node[index], out)


def _tweak(draw: st.DrawFn, value: Any) -> Any:
    """A near miss of ``value``: the kind of change that slips past a shallow type check."""
    if isinstance(value, bool):
        return draw(st.sampled_from((not value, int(value), str(value).lower(), None)))
    if isinstance(value, int):
        return draw(st.sampled_from((value + 1, value - 1, -value, str(value), float(value), value * 2**32, 0, -1)))
    if isinstance(value, float):
        return draw(st.sampled_from((int(value) if value == value and abs(value) < 1e300 else 0, -value, str(value))))
    if isinstance(value, str):
        cut = draw(st.integers(0, len(value)))
        return draw(st.sampled_from((
            value[:cut], value + draw(st.text(min_size=1, max_size=4)), value.upper(), value * 2,
            value[:cut] + draw(st.sampled_from(TRICKY_STRINGS)) + value[cut + 1:], [value], value.encode("utf-8", "surrogatepass").hex(),
        )))
    if isinstance(value, list):
        if value and draw(st.booleans()):
            index = draw(st.integers(0, len(value) - 1))
            return value[:index] + value[index + 1:] if draw(st.booleans()) else value + [value[index]] * 2
        return draw(st.sampled_from(([], {}, [value], None)))
    if isinstance(value, dict):
        if value and draw(st.booleans()):
            victim = draw(st.sampled_from(sorted(value)))
            return {key: item for key, item in value.items() if key != victim}
        return draw(st.sampled_from(([], {}, [value], None)))
    return draw(json_values)


@st.composite
def mutated_json(draw: st.DrawFn, seed: Any | Callable[[], Any], max_ops: int = 3) -> Any:
    """A deep copy of the JSON value ``seed`` after 1..``max_ops`` structural mutations: a value
    replaced by a near miss or by arbitrary JSON, a key or element deleted, a key added, a
    value wrapped in a list; the root itself may be replaced too."""
    root = copy.deepcopy(seed() if callable(seed) else seed)
    for _ in range(draw(st.integers(1, max_ops))):
        slots: list[tuple[Any, Any]] = []
        _slots(root, slots)
        if not slots or draw(st.integers(0, 19)) == 0:
            root = _tweak(draw, root) if draw(st.booleans()) else draw(json_values)
            continue
        parent, key = draw(st.sampled_from(slots))
        op = draw(st.sampled_from(("tweak", "tweak", "replace", "delete", "add", "wrap")))
        if op == "tweak":
            parent[key] = _tweak(draw, parent[key])
        elif op == "replace":
            parent[key] = draw(json_values)
        elif op == "delete":
            del parent[key]
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(json_values)
        else:
            parent.insert(key, draw(json_values))
    return root


def dumps(value: Any) -> str:
    """JSON text of a (possibly mutated) value; NaN and infinities are written as JSON extensions."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def mutated_json_text(seed: Any | Callable[[], Any], max_ops: int = 3) -> st.SearchStrategy[str]:
    """Text of :func:`mutated_json` half the time, byte-mutated text of the seed the other half."""
    load = seed if callable(seed) else (lambda: seed)
    return mutated_json(load, max_ops).map(dumps) | mutated_text(lambda: dumps(load()), max_ops)


long_strings = st.tuples(st.text(min_size=1, max_size=8), st.integers(300, 600)).map(lambda t: (t[0] * t[1])[:3000]).filter(
    lambda s: len(s) > MAX_MESSAGE_CHARS)
"""Strings longer than a readable error message: an error that echoes one whole is unreadable."""


def deep_json(depth: int = 100_000) -> str:
    """A JSON array nested ``depth`` deep: overflows a recursive decoder's stack."""
    return "[" * depth + "]" * depth


# ---------------------------------------------------------------------------- TOML


def _toml_value(value: Any) -> str:
    """A TOML rendering of a JSON-like value (strings via JSON escapes, which TOML shares)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return '""'


def toml_document(tables: dict[str, Any]) -> str:
    """A TOML document: top-level keys, then ``[[name]]`` arrays of tables."""
    lines = []
    for key, value in tables.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for entry in value:
                lines.append(f"[[{json.dumps(key)}]]")
                lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in entry.items()]
        else:
            lines.insert(0, f"{json.dumps(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
