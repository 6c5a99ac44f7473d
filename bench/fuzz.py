"""Suite ``fuzz``: the hostile-input properties of tests/test_fuzz_*.py, run for much longer.

CI runs every property for a bounded number of examples (about a minute for all of them).
This suite loads the same three property modules from the source checkout's ``tests/``
(fresh copies, so a pytest session in the same process is not disturbed) and runs every
property again and again, round robin, each call drawing new random examples, until the
time box is spent: about 15 s in quick mode and 4 minutes in full mode (times ``scale``), so
that ``cdvm bench --quick`` stays within two minutes and the full run within fifteen.
A ``scale`` below 1 also shrinks each call (tests run the suite tiny). It records how many
examples ran, the example rate, and how many properties failed (the
target is 0; each failure's shrunk counterexample is in the notes, reproducible with
``@reproduce_failure`` as Hypothesis prints it).

Simulated-TEE evidence needs a state directory: the suite points ``CDVM_STATE_DIR`` and
``CDVM_CACHE_DIR`` at a temporary directory while it runs, so the user's are never touched.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.harness import Context, Skip, suite

MODULES = ("test_fuzz_nostr", "test_fuzz_jobs", "test_fuzz_attest")
FULL_SECONDS = 240.0
QUICK_SECONDS = 15.0
CALL_SCALE = {True: 0.5, False: 2.0}
"""Per mode (quick?): each call of a property runs its CI example count times this, with fresh
random examples; calls repeat until the property's share of the time box is spent."""
_TESTS = Path(__file__).resolve().parents[1] / "tests"


@dataclass
class _Property:
    """One property and what running it found."""

    module: str
    name: str
    fn: Callable[[], None]
    examples: int = 0
    calls: int = 0
    seconds: float = 0.0
    failure: str = ""
    counters: list[int] = field(default_factory=lambda: [0])


@contextmanager
def _environment(vectors: Path, state: Path, scale: float) -> Iterator[ModuleType]:
    """``tests/`` importable, the fuzz scale and vectors set, state and cache in ``state``."""
    saved_env = {name: os.environ.get(name) for name in ("CDVM_STATE_DIR", "CDVM_CACHE_DIR")}
    os.environ["CDVM_STATE_DIR"] = str(state / "state")
    os.environ["CDVM_CACHE_DIR"] = str(state / "cache")
    sys.path.insert(0, str(_TESTS))
    try:
        import fuzzing

        saved = (fuzzing.SCALE, fuzzing.VECTORS)
        fuzzing.SCALE, fuzzing.VECTORS = scale, vectors
        fuzzing.vector_bytes.cache_clear()
        try:
            yield fuzzing
        finally:
            fuzzing.SCALE, fuzzing.VECTORS = saved
            fuzzing.vector_bytes.cache_clear()
    finally:
        sys.path.remove(str(_TESTS))
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _load(module: str) -> ModuleType:
    """A fresh copy of ``tests/<module>.py`` (its properties are built with the current scale)."""
    spec = importlib.util.spec_from_file_location(f"cdvm_bench_{module}", _TESTS / f"{module}.py")
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def _properties(module: str) -> list[_Property]:
    """Every Hypothesis property of ``module``, with its inner test wrapped to count examples."""
    loaded = _load(module)
    found = []
    for name in sorted(vars(loaded)):
        fn = getattr(loaded, name)
        if not name.startswith("test_") or not hasattr(fn, "hypothesis"):
            continue
        prop = _Property(module, name, fn)
        inner = fn.hypothesis.inner_test

        def counted(*args: Any, _inner: Callable[..., Any] = inner, _count: list[int] = prop.counters,
                    **kwargs: Any) -> Any:
            _count[0] += 1
            return _inner(*args, **kwargs)

        fn.hypothesis.inner_test = counted
        found.append(prop)
    return found


def _summary(error: BaseException) -> str:
    """The error's first line and Hypothesis's falsifying example (kept in the exception's notes)."""
    lines = f"{type(error).__name__}: {error}".strip().splitlines()
    notes = [note for note in getattr(error, "__notes__", ()) if "Falsifying" in note or "reproduce" in note]
    return " | ".join([lines[0][:300], *(note.replace("\n", " ")[:500] for note in notes)])


def _run_slice(prop: _Property, seconds: float) -> None:
    """Call the property until ``seconds`` have passed (at least once); stop at its first failure."""
    deadline = time.perf_counter() + seconds
    while not prop.failure:
        start = time.perf_counter()
        try:
            prop.fn()
        except Exception as error:  # noqa: BLE001 - a failing property is the finding this suite reports
            prop.failure = _summary(error)
        prop.calls += 1
        prop.seconds += time.perf_counter() - start
        if time.perf_counter() >= deadline:
            break
    prop.examples = prop.counters[0]


@suite("fuzz", "hostile input: the fuzz properties of tests/test_fuzz_*.py, many more examples, time-boxed")
def run(ctx: Context) -> None:
    """Run every fuzz property round robin until the time box is spent; record rates and failures."""
    if not (_TESTS / "fuzzing.py").is_file():
        raise Skip(f"the fuzz properties live in the source checkout's tests/ ({_TESTS} not found)")
    if ctx.vectors is None:
        raise Skip("the fuzz properties mutate the real evidence in the vectors directory; set CDVM_VECTORS")
    budget = (QUICK_SECONDS if ctx.quick else FULL_SECONDS) * ctx.scale
    call_scale = CALL_SCALE[ctx.quick] * min(1.0, ctx.scale)
    with tempfile.TemporaryDirectory(prefix="cdvm-fuzz-") as state, _environment(ctx.vectors, Path(state), call_scale) as fuzzing:
        calls_before = fuzzing.EXAMPLES[0]
        properties = [prop for module in MODULES for prop in _properties(module)]
        started = time.perf_counter()
        rounds = 0
        while time.perf_counter() - started < budget and any(not p.failure for p in properties):
            remaining = budget - (time.perf_counter() - started)
            alive = [p for p in properties if not p.failure]
            for prop in alive:
                _run_slice(prop, max(remaining / len(alive), 0.0))
            rounds += 1
        elapsed = time.perf_counter() - started
        parser_calls = fuzzing.EXAMPLES[0] - calls_before
    examples = sum(p.examples for p in properties)
    failures = [p for p in properties if p.failure]
    ctx.record("fuzz_properties", len(properties), note="Hypothesis properties in tests/test_fuzz_*.py")
    ctx.record("fuzz_examples", examples, better="higher", note=f"{rounds} round(s) over every property")
    ctx.record("fuzz_parser_calls", parser_calls, better="higher", note="hostile inputs handed to a parser")
    ctx.record("fuzz_examples_per_s", examples / elapsed if elapsed else None, better="higher", unit="1/s")
    ctx.record("fuzz_failures", len(failures), target=0, note="properties that found an untyped error, hang or broken invariant")
    ctx.record("fuzz_seconds", elapsed, unit="s")
    for module in MODULES:
        props = [p for p in properties if p.module == module]
        seconds = sum(p.seconds for p in props)
        ctx.record(f"{module.removeprefix('test_')}_examples_per_s",
                   sum(p.examples for p in props) / seconds if seconds else None, better="higher", unit="1/s")
    ctx.note(f"Ran {len(properties)} properties for {elapsed:.0f} s ({examples} examples, {parser_calls} parser "
             f"calls); each call of a property draws {call_scale:g}x its CI example count of fresh random examples.")
    slowest = sorted(properties, key=lambda p: p.examples / p.seconds if p.seconds else 0)[:3]
    ctx.note("Slowest properties (examples/s): " + ", ".join(
        f"{p.name} {p.examples / p.seconds:.0f}" for p in slowest if p.seconds))
    for prop in failures:
        ctx.note(f"FAILED {prop.module}::{prop.name}: {prop.failure}")
