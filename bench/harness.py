"""Benchmark harness for ``cdvm bench``: suites, interleaved timing, statistics, reports.

Shared machines are noisy, so results are medians and 95th percentiles over many rounds,
and comparisons are ratios taken round by round: ``interleaved`` alternates the two sides
(A B, B A, A B, ...) so a load change hits both equally, and the ratio of each round's
pair is summarized. A suite is a function ``fn(ctx) -> dict`` (or a coroutine function)
registered with :func:`suite`; it measures through ``ctx.measure``/``ctx.interleaved`` and
reports through ``ctx.record``. Raising :class:`Skip` ends a suite with a clear message.

Output: a JSON object (each metric key → number or null, each metric group → object of
numbers, plus ``machine``, ``suites``, ``table``, ``notes``), a markdown report with one
table per suite, and matplotlib plots.
"""
from __future__ import annotations

import asyncio
import gc
import importlib
import inspect
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from dvm.errors import CdvmError

Better = Literal["lower", "higher"]
SuiteFn = Callable[["Context"], Any]

RESERVED_KEYS = frozenset({"schema", "created", "quick", "argv", "machine", "suites", "table", "notes"})
"""Top-level JSON keys the harness owns; no metric may use them."""

_UNIT_SCALE = {"s": 1.0, "ms": 1e3, "us": 1e6, "x": 1.0, "": 1.0}
_MAX_INNER = 100_000
_LIBRARIES = ("cryptography", "secp256k1", "nostr-sdk", "dcap-qvl", "websockets", "llama-cpp-python")


class BenchError(CdvmError):
    """The benchmark cannot run as asked (unknown suite, unwritable output, misuse of the harness)."""


class Skip(BenchError):
    """Raised by a suite that cannot run here (missing vectors or hardware); the message says why."""


# ---------------------------------------------------------------------------- statistics


@dataclass(frozen=True, slots=True)
class Stats:
    """Summary of per-operation samples: seconds for timings, plain numbers for ratios."""

    median: float
    p95: float
    p5: float
    mean: float
    min: float
    max: float
    n: int
    samples: tuple[float, ...] = field(repr=False)


def summarize(samples: Sequence[float]) -> Stats:
    """Median, 5th/95th percentile (inclusive method), mean, extremes and count of ``samples``."""
    if not samples:
        raise BenchError("no samples to summarize")
    values = tuple(float(v) for v in samples)
    if len(values) == 1:
        p5 = p95 = values[0]
    else:
        cuts = statistics.quantiles(values, n=20, method="inclusive")
        p5, p95 = cuts[0], cuts[18]
    return Stats(median=statistics.median(values), p95=p95, p5=p5, mean=statistics.fmean(values),
                 min=min(values), max=max(values), n=len(values), samples=values)


@dataclass(frozen=True, slots=True)
class Comparison:
    """Two interleaved measurements and their round-by-round ratio ``a / b``."""

    a: Stats
    b: Stats
    ratio: Stats


def _sample(fn: Callable[[], object], inner: int, setup: Callable[[], object] | None) -> float:
    """Seconds per call of ``fn`` over ``inner`` calls; ``setup`` (untimed) runs before each call."""
    if setup is None:
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - start) / inner
    total = 0.0
    for _ in range(inner):
        setup()
        start = time.perf_counter()
        fn()
        total += time.perf_counter() - start
    return total / inner


def _calibrate(fn: Callable[[], object], setup: Callable[[], object] | None, min_round_s: float) -> int:
    """Calls per round so that one round lasts at least ``min_round_s`` (1 when a setup runs per call)."""
    if setup is not None:
        return 1
    elapsed = _sample(fn, 1, None)
    return max(1, min(_MAX_INNER, math.ceil(min_round_s / max(elapsed, 1e-9))))


def _check_rounds(rounds: int, warmup: int) -> None:
    if rounds < 1 or warmup < 0:
        raise BenchError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds} warmup={warmup}")


def measure(fn: Callable[[], object], rounds: int, warmup: int = 2, *, inner: int | None = None,
            setup: Callable[[], object] | None = None, min_round_s: float = 0.002) -> Stats:
    """Time ``fn``: ``warmup`` untimed calls, then ``rounds`` rounds of ``inner`` calls each
    (auto: enough for ``min_round_s`` per round). Samples are seconds per call."""
    _check_rounds(rounds, warmup)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    calls = inner or _calibrate(fn, setup, min_round_s)
    gc.collect()
    return summarize([_sample(fn, calls, setup) for _ in range(rounds)])


def interleaved(a: Callable[[], object], b: Callable[[], object], rounds: int, warmup: int = 2, *,
                inner: int | None = None, setup_a: Callable[[], object] | None = None,
                setup_b: Callable[[], object] | None = None, min_round_s: float = 0.002) -> Comparison:
    """Time ``a`` and ``b`` in alternating rounds (A B, B A, ...) so load changes hit both;
    the ratio is taken per round (a/b) and then summarized."""
    _check_rounds(rounds, warmup)
    for _ in range(warmup):
        for fn, setup in ((a, setup_a), (b, setup_b)):
            if setup is not None:
                setup()
            fn()
    calls_a = inner or _calibrate(a, setup_a, min_round_s)
    calls_b = inner or _calibrate(b, setup_b, min_round_s)
    gc.collect()
    times_a: list[float] = []
    times_b: list[float] = []
    for index in range(rounds):
        if index % 2 == 0:
            times_a.append(_sample(a, calls_a, setup_a))
            times_b.append(_sample(b, calls_b, setup_b))
        else:
            times_b.append(_sample(b, calls_b, setup_b))
            times_a.append(_sample(a, calls_a, setup_a))
    ratios = [x / y if y > 0 else math.inf for x, y in zip(times_a, times_b)]
    return Comparison(a=summarize(times_a), b=summarize(times_b), ratio=summarize(ratios))


# ---------------------------------------------------------------------------- metrics and context


@dataclass(frozen=True, slots=True)
class Metric:
    """One row of the report: a number (or None when it could not be measured) and its target."""

    suite: str
    key: str
    value: float | None
    unit: str = ""
    target: float | None = None
    better: Better = "lower"
    note: str = ""

    @property
    def passed(self) -> bool | None:
        """Whether the value meets the target; None without a target or a value."""
        if self.target is None or self.value is None:
            return None
        return self.value <= self.target if self.better == "lower" else self.value >= self.target

    def to_dict(self) -> dict[str, Any]:
        """JSON form of the table row."""
        return {"suite": self.suite, "key": self.key, "value": self.value, "unit": self.unit,
                "target": self.target, "better": self.better, "passed": self.passed, "note": self.note}


@dataclass
class Context:
    """What a suite sees: the mode, where the vectors are, and the measuring/recording helpers.

    ``scale`` shrinks every size given to :meth:`n` (tests run suites with a tiny scale).
    """

    quick: bool = False
    scale: float = 1.0
    vectors: Path | None = None
    suite: str = ""
    metrics: list[Metric] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    distributions: list[tuple[str, str, tuple[tuple[str, Stats], ...]]] = field(default_factory=list)

    @property
    def min_round_s(self) -> float:
        """Shortest timed round: calls are batched until a round lasts this long."""
        return 0.002 if self.quick else 0.005

    def n(self, full: int, quick: int, minimum: int = 2) -> int:
        """A size or round count for this mode: ``quick`` or ``full``, times ``scale``, at least ``minimum``."""
        return max(minimum, round((quick if self.quick else full) * self.scale))

    def measure(self, fn: Callable[[], object], rounds: int, warmup: int = 2, *, inner: int | None = None,
                setup: Callable[[], object] | None = None, label: str | None = None,
                name: str = "cdvm") -> Stats:
        """:func:`measure`; with ``label`` the samples also go to the timing plot."""
        stats = measure(fn, rounds, warmup, inner=inner, setup=setup, min_round_s=self.min_round_s)
        if label is not None:
            self.distributions.append((self.suite, label, ((name, stats),)))
        return stats

    def interleaved(self, a: Callable[[], object], b: Callable[[], object], rounds: int, warmup: int = 2, *,
                    inner: int | None = None, setup_a: Callable[[], object] | None = None,
                    setup_b: Callable[[], object] | None = None, label: str | None = None,
                    names: tuple[str, str] = ("cdvm", "reference")) -> Comparison:
        """:func:`interleaved`; with ``label`` both sides' samples also go to the timing plot."""
        comparison = interleaved(a, b, rounds, warmup, inner=inner, setup_a=setup_a, setup_b=setup_b,
                                 min_round_s=self.min_round_s)
        if label is not None:
            self.distributions.append((self.suite, label, ((names[0], comparison.a), (names[1], comparison.b))))
        return comparison

    def record(self, key: str, value: float | int | Stats | None, target: float | None = None,
               better: Better = "lower", *, unit: str = "", note: str = "") -> None:
        """Add ``key`` to the JSON and the table. A :class:`Stats` value records its median under
        ``key`` and its 95th percentile under ``key + "_p95"``, scaled from seconds to ``unit``
        (``s``, ``ms``, ``us``; ``x`` or empty for ratios). ``None`` means not measured: say why in ``note``."""
        if better not in ("lower", "higher"):
            raise BenchError(f"better must be 'lower' or 'higher', got {better!r}")
        if isinstance(value, Stats):
            if unit not in _UNIT_SCALE:
                raise BenchError(f"cannot scale Stats to unit {unit!r} (one of {', '.join(_UNIT_SCALE)})")
            scale = _UNIT_SCALE[unit]
            self._add(Metric(self.suite, key, value.median * scale, unit, target, better, note))
            self._add(Metric(self.suite, key + "_p95", value.p95 * scale, unit, None, better, ""))
            return
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BenchError(f"metric {key!r} must be a number, Stats or None, got {type(value).__name__}")
        self._add(Metric(self.suite, key, None if value is None else float(value), unit, target, better, note))

    def record_map(self, key: str, values: Mapping[str, float | int | Stats | None], target: float | None = None,
                   better: Better = "lower", *, unit: str = "", note: str = "") -> None:
        """Record a group of related numbers (one per phase, per concurrency level, ...): each
        entry is a table row ``key.name`` (recorded as :meth:`record` does) and the JSON holds
        ``key`` as an object ``{name: value}`` (``name_p95`` too for a :class:`Stats` entry)."""
        if not values:
            raise BenchError(f"metric group {key!r} has no entries")
        for name, value in values.items():
            if not isinstance(name, str) or not name or "." in name:
                raise BenchError(f"metric group {key!r}: entry names must be non-empty and without '.', got {name!r}")
            self.record(f"{key}.{name}", value, target, better, unit=unit, note=note)

    def note(self, text: str) -> None:
        """A sentence for the report saying what this suite measured, or what it left out and why."""
        self.notes.setdefault(self.suite, []).append(text)

    def _add(self, metric: Metric) -> None:
        head = metric.key.partition(".")[0]
        if head in RESERVED_KEYS:
            raise BenchError(f"metric key {metric.key!r} is reserved for the report")
        if any(existing.key == metric.key for existing in self.metrics):
            raise BenchError(f"metric {metric.key!r} recorded twice")
        if any(existing.key == head or existing.key.partition(".")[0] == metric.key for existing in self.metrics):
            raise BenchError(f"metric {metric.key!r} clashes with a metric group of the same name")
        if metric.value is not None and not math.isfinite(metric.value):
            metric = Metric(metric.suite, metric.key, None, metric.unit, metric.target, metric.better,
                            (metric.note + "; " if metric.note else "") + "not finite")
        self.metrics.append(metric)


# ---------------------------------------------------------------------------- suites


@dataclass(frozen=True, slots=True)
class Suite:
    """A named benchmark: ``fn(ctx)`` records metrics and may return extra numbers to record."""

    name: str
    fn: SuiteFn
    description: str


SUITE_MODULES = ("bench.crypto", "bench.attestation", "bench.models", "bench.jobs", "bench.fuzz")
"""Modules that register suites when imported; :func:`load_suites` imports them in this order."""

SUITES: dict[str, Suite] = {}


def suite(name: str, description: str) -> Callable[[SuiteFn], SuiteFn]:
    """Decorator registering ``fn(ctx)`` (plain or async) as suite ``name``."""
    def register(fn: SuiteFn) -> SuiteFn:
        if name in SUITES and SUITES[name].fn is not fn:
            raise BenchError(f"benchmark suite {name!r} is registered twice")
        SUITES[name] = Suite(name, fn, description)
        return fn
    return register


def load_suites(modules: Sequence[str] = SUITE_MODULES) -> dict[str, Suite]:
    """Import the suite modules and return the registry (in registration order)."""
    for module in modules:
        importlib.import_module(module)
    return SUITES


@dataclass(frozen=True, slots=True)
class SuiteResult:
    """How a suite ended: ``ok``, ``skipped`` (with the reason) or ``error`` (with the error)."""

    name: str
    status: Literal["ok", "skipped", "error"]
    seconds: float
    message: str = ""


@dataclass
class Report:
    """Everything one ``cdvm bench`` run measured."""

    quick: bool
    machine: dict[str, Any]
    results: list[SuiteResult]
    context: Context
    created: str
    argv: list[str]

    @property
    def metrics(self) -> list[Metric]:
        """Every recorded row, in recording order."""
        return self.context.metrics

    def to_json(self) -> dict[str, Any]:
        """The JSON object: metric keys → numbers (or null), metric groups → objects of numbers,
        plus machine, suites, table, notes."""
        out: dict[str, Any] = {"schema": 1, "created": self.created, "quick": self.quick, "argv": self.argv,
                               "machine": self.machine,
                               "suites": {r.name: {"status": r.status, "seconds": round(r.seconds, 3),
                                                   "message": r.message} for r in self.results}}
        for metric in self.metrics:
            group, dot, member = metric.key.partition(".")
            if dot:
                out.setdefault(group, {})[member] = metric.value
            else:
                out[metric.key] = metric.value
        out["table"] = [metric.to_dict() for metric in self.metrics]
        out["notes"] = self.context.notes
        return out


def machine_info() -> dict[str, Any]:
    """Cores, memory, CPU model, Python, OS, load average and library versions of this machine."""
    import psutil

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_model": _cpu_model(),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": usable,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "libraries": versions,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_vectors() -> Path | None:
    """``$CDVM_VECTORS``, else ``../shared/vectors`` beside the repository; None when absent."""
    configured = os.environ.get("CDVM_VECTORS")
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "vectors"
    return path if path.is_dir() else None


def run_suites(names: Sequence[str], ctx: Context, *, argv: Sequence[str] = (),
               progress: Callable[[str], object] | None = None) -> Report:
    """Run the named suites (all registered ones when empty) in order, each isolated: a
    :class:`Skip` or an error in one suite is reported and the next one runs."""
    registry = load_suites()
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise BenchError(f"unknown benchmark suite(s) {', '.join(unknown)}; known: {', '.join(registry)}")
    machine = machine_info()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results = []
    for name in names or list(registry):
        entry = registry[name]
        ctx.suite = name
        if progress is not None:
            progress(f"bench: {name}: {entry.description} ...")
        gc.collect()
        start = time.perf_counter()
        try:
            extra = asyncio.run(entry.fn(ctx)) if inspect.iscoroutinefunction(entry.fn) else entry.fn(ctx)
            for key, value in (extra or {}).items():
                if not any(metric.key == key for metric in ctx.metrics):
                    ctx.record(key, value)
            results.append(SuiteResult(name, "ok", time.perf_counter() - start))
        except Skip as skip:
            results.append(SuiteResult(name, "skipped", time.perf_counter() - start, str(skip)))
        except Exception as error:  # noqa: BLE001 - one failing suite must not hide the others' results
            results.append(SuiteResult(name, "error", time.perf_counter() - start,
                                       f"{type(error).__name__}: {error}"))
        if progress is not None:
            last = results[-1]
            progress(f"bench: {name}: {last.status} in {last.seconds:.1f} s" + (f" ({last.message})" if last.message else ""))
    machine["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    ctx.suite = ""
    return Report(quick=ctx.quick, machine=machine, results=results, context=ctx, created=created, argv=list(argv))


# ---------------------------------------------------------------------------- markdown and plots


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01 or value == 0:
        return f"{value:.3f}"
    return f"{value:.2e}"


def _target_text(metric: Metric) -> str:
    if metric.target is None:
        return ""
    return ("≤ " if metric.better == "lower" else "≥ ") + _fmt(metric.target)


def _result_text(metric: Metric) -> str:
    passed = metric.passed
    return "" if passed is None else ("pass" if passed else "**FAIL**")


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def suite_table(metrics: Sequence[Metric]) -> list[str]:
    """Markdown table rows (header included) for ``metrics``."""
    lines = ["| Metric | Value | Unit | Target | Result | Note |", "|---|---:|---|---|---|---|"]
    for metric in metrics:
        lines.append(f"| `{metric.key}` | {_fmt(metric.value)} | {metric.unit} | {_target_text(metric)} | "
                     f"{_result_text(metric)} | {_escape(metric.note)} |")
    return lines


def machine_lines(machine: Mapping[str, Any]) -> list[str]:
    """The machine description as markdown bullets."""
    libraries = ", ".join(f"{name} {version}" for name, version in machine["libraries"].items() if version)
    return [
        f"- CPU: {machine['cpu_model']}; {machine['cores_logical']} logical cores "
        f"({machine['cores_physical']} physical, {machine['cores_usable']} usable by this process)",
        f"- Memory: {machine['memory_gib']} GiB",
        f"- Python: {machine['python']} on {machine['platform']}",
        f"- Load average (1/5/15 min) before: {machine['load_average']}, after: "
        f"{machine.get('load_average_after', 'n/a')}",
        f"- Libraries: {libraries}",
    ]


def to_markdown(report: Report, images: Sequence[Path] = ()) -> str:
    """The report as markdown: summary of targets, machine, then one table per suite."""
    mode = "quick" if report.quick else "full"
    lines = ["# cdvm benchmarks", "",
             f"Generated by `cdvm {' '.join(report.argv) or 'bench'}` at {report.created} ({mode} mode). "
             "Times are medians over interleaved rounds with their 95th percentile (`_p95`); "
             "comparisons are the median of per-round ratios (ours / reference, below 1 = faster). "
             "Absolute times depend on the machine and its load: read the ratios.", ""]
    targeted = [m for m in report.metrics if m.target is not None]
    if targeted:
        lines += ["## Targets", "", "| Metric | Value | Target | Result |", "|---|---:|---|---|"]
        lines += [f"| `{m.key}` | {_fmt(m.value)} {m.unit} | {_target_text(m)} | {_result_text(m) or 'not measured'} |"
                  for m in targeted]
        lines.append("")
    lines += ["## Machine", "", *machine_lines(report.machine), ""]
    for image in images:
        lines += [f"![{image.stem}]({image.name})", ""]
    registry = SUITES
    for result in report.results:
        description = registry[result.name].description if result.name in registry else ""
        lines += [f"## Suite `{result.name}`: {description}", "",
                  f"Status: {result.status} ({result.seconds:.1f} s)" + (f": {result.message}" if result.message else ""),
                  ""]
        lines += [f"- {text}" for text in report.context.notes.get(result.name, [])]
        if report.context.notes.get(result.name):
            lines.append("")
        metrics = [m for m in report.metrics if m.suite == result.name]
        if metrics:
            lines += [*suite_table(metrics), ""]
    return "\n".join(lines)


def write_plots(report: Report, directory: Path, prefix: str = "bench-") -> list[Path]:
    """PNG plots next to the markdown: every targeted metric relative to its target, and the
    timing distributions of every labeled measurement (log scale). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    targeted = [m for m in report.metrics if m.target is not None and m.value is not None and m.target > 0]
    if targeted:
        # Normalized so that <= 1 passes whichever direction is better.
        values = [m.value / m.target if m.better == "lower" else m.target / max(m.value, 1e-300) for m in targeted]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(targeted) + 1.5))
        colors = ["tab:green" if m.passed else "tab:red" for m in targeted]
        ax.barh([m.key for m in targeted], values, color=colors)
        ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("relative to target (≤ 1 passes; log scale)")
        ax.set_title("cdvm benchmark targets")
        fig.tight_layout()
        path = directory / f"{prefix}targets.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    groups = report.context.distributions
    if groups:
        data, labels = [], []
        for suite_name, label, sides in groups:
            for name, stats in sides:
                data.append([s * 1e3 for s in stats.samples])
                labels.append(f"{suite_name}: {label} [{name}]")
        fig, ax = plt.subplots(figsize=(9, 0.4 * len(data) + 1.5))
        ax.boxplot(data, orientation="horizontal", showfliers=True, whis=(5, 95))
        ax.set_yticks(range(1, len(labels) + 1), labels)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("milliseconds per operation (log scale; whiskers 5th-95th percentile)")
        ax.set_title("cdvm benchmark timings (interleaved rounds)")
        fig.tight_layout()
        path = directory / f"{prefix}timings.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_docs(report: Report, path: Path) -> list[Path]:
    """Write the markdown report to ``path`` and its plots beside it; returns every file written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        images = write_plots(report, path.parent)
        path.write_text(to_markdown(report, images) + "\n", encoding="utf-8")
    except OSError as error:
        raise BenchError(f"cannot write the benchmark report {path}: {error.strerror}") from None
    return [path, *images]


def console_lines(report: Report) -> list[str]:
    """A compact text report for the terminal: per suite its status and table."""
    lines = []
    for result in report.results:
        lines.append(f"== {result.name}: {result.status} ({result.seconds:.1f} s)"
                     + (f": {result.message}" if result.message else ""))
        metrics = [m for m in report.metrics if m.suite == result.name]
        if metrics:
            lines += suite_table(metrics)
    failed = [m.key for m in report.metrics if m.passed is False]
    lines.append("targets: " + (f"FAILED {', '.join(failed)}" if failed else "all measured targets pass"))
    return lines

