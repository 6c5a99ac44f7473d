"""``cdvm bench``: run benchmark suites and report medians, p95s and ratios against targets.

    cdvm bench [SUITE]... [--quick] [--json FILE] [--docs FILE]

With no SUITE every registered suite runs. ``--quick`` shortens every suite (all together
well under two minutes). The table goes to stdout, progress to stderr. ``--json`` writes
the flat JSON report; ``--docs`` writes the markdown report and its PNG plots beside it
(default ``docs/benchmarks.md`` in full mode, none in quick mode). Exits 1 when a suite
failed with an error; missed targets and skipped suites are reported, not errors.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.harness import BenchError, Context, console_lines, default_vectors, run_suites, write_docs

DEFAULT_DOCS = Path("docs") / "benchmarks.md"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cdvm bench``."""
    parser = subparsers.add_parser("bench", help="benchmark Nostr crypto, attestation and jobs against references",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", metavar="SUITE", help="suites to run (default: all; e.g. crypto attest)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller batches (all suites < 2 min)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the JSON report to FILE")
    parser.add_argument("--docs", type=Path, metavar="FILE",
                        help=f"write the markdown report to FILE and plots beside it (default {DEFAULT_DOCS} "
                             "unless --quick)")
    parser.set_defaults(handler=_run)


def _command_line(args: argparse.Namespace) -> list[str]:
    argv = ["bench", *args.suites]
    if args.quick:
        argv.append("--quick")
    if args.json is not None:
        argv += ["--json", str(args.json)]
    if args.docs is not None:
        argv += ["--docs", str(args.docs)]
    return argv


def _run(args: argparse.Namespace) -> int:
    ctx = Context(quick=args.quick, vectors=default_vectors())
    report = run_suites(args.suites, ctx, argv=_command_line(args),
                        progress=lambda line: print(line, file=sys.stderr, flush=True))
    print("\n".join(console_lines(report)))
    if args.json is not None:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        except OSError as error:
            raise BenchError(f"cannot write the JSON report {args.json}: {error.strerror}") from None
        print(f"bench: JSON written to {args.json}", file=sys.stderr)
    docs = args.docs if args.docs is not None else (None if args.quick else DEFAULT_DOCS)
    if docs is not None:
        written = write_docs(report, docs)
        print(f"bench: report written to {', '.join(str(path) for path in written)}", file=sys.stderr)
    return 1 if any(result.status == "error" for result in report.results) else 0
