"""The ``cdvm`` command: one entry point, one subcommand per task.

Each command module exposes ``register(subparsers)`` which adds its parser and sets
``handler`` (a function taking the parsed arguments and returning an exit code).
Typed errors (:class:`dvm.errors.CdvmError`) become one readable line on stderr and
exit status 1; a wrong command line exits 2 (argparse's convention).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Sequence

from dvm.errors import CdvmError

COMMAND_MODULES = (
    "dvm.cli_keys",
    "dvm.cli_dm",
    "attest.cli",
    "jobs.cli",
    "jobs.cli_image",
    "bench.cli",
    "jobs.cli_model",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdvm",
        description="Confidential Nostr Data Vending Machine: private AI jobs in attested sandboxes.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except CdvmError as error:
        print(f"cdvm: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cdvm: interrupted", file=sys.stderr)
        return 130


def run_async(coroutine) -> int:
    """Run a command's coroutine to completion and return its exit code."""
    return int(asyncio.run(coroutine) or 0)


if __name__ == "__main__":
    sys.exit(main())
