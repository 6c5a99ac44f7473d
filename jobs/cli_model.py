"""``cdvm model keygen|encrypt|inspect`` and ``cdvm keyd``: the model owner's commands.

    cdvm model keygen KEYFILE                       a fresh AES-256-GCM key (file mode 0600)
    cdvm model encrypt IN.gguf OUT.cgguf --key KEYFILE [--name NAME]
    cdvm model inspect FILE [--key KEYFILE] [--json] header facts; with the key, authenticate
                                                    every chunk (exit 1 naming the first bad one)
    cdvm keyd --config keyd.toml [--relay URL]...   release the key to attested enclaves
    cdvm keyd --config keyd.toml --stats            keys released per operator (from the log)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

from dvm.cli import run_async
from dvm.config import load_relays_config
from dvm.keyd import KeyDaemon, check_config_file, operator_counts
from dvm.keystore import load_identity
from jobs.cmodel import ModelCryptoError, ModelKey, encrypt_stream, file_sha256, parse_header, verify_file
from jobs.errors import ModelError
from jobs.model import GGUF_MAGIC


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="encrypt models whose key only attested enclaves get (model owners)")
    commands = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    keygen = commands.add_parser("keygen", help="write a fresh model key (mode 0600)")
    keygen.add_argument("keyfile", type=Path, metavar="KEYFILE")
    keygen.set_defaults(handler=_keygen)
    encrypt = commands.add_parser("encrypt", help="encrypt a GGUF model into a .cgguf file")
    encrypt.add_argument("source", type=Path, metavar="IN.gguf")
    encrypt.add_argument("target", type=Path, metavar="OUT.cgguf")
    encrypt.add_argument("--key", type=Path, required=True, metavar="KEYFILE")
    encrypt.add_argument("--name", help="model name in the header (default: the file name without .gguf)")
    encrypt.set_defaults(handler=_encrypt)
    inspect = commands.add_parser("inspect", help="print an encrypted model's header; with --key verify every chunk")
    inspect.add_argument("file", type=Path, metavar="FILE")
    inspect.add_argument("--key", type=Path, metavar="KEYFILE")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=_inspect)

    keyd = subparsers.add_parser("keyd", help="model owner's key daemon: release model keys to attested enclaves")
    keyd.add_argument("--config", type=Path, required=True, metavar="FILE", help="keyd TOML (policy, [[model]], [[operator]])")
    keyd.add_argument("--relay", action="append", default=[], metavar="URL", help="relay URL (repeatable; replaces relays.toml)")
    keyd.add_argument("--relays-config", metavar="FILE", help="relays TOML")
    keyd.add_argument("--key-file", metavar="FILE", help="keyd's Nostr identity (default: $CDVM_NSEC or the state dir's)")
    keyd.add_argument("--stats", action="store_true", help="print keys released per operator and exit")
    keyd.set_defaults(handler=_keyd)


def _keygen(args: argparse.Namespace) -> int:
    key = ModelKey.generate()
    key.write(args.keyfile)
    print(f"model key {key.key_id} written to {args.keyfile} (mode 0600); keep it secret, it is the model")
    return 0


def _encrypt(args: argparse.Namespace) -> int:
    key = ModelKey.from_file(args.key)
    name = args.name or args.source.name.removesuffix(".gguf")
    try:
        src = open(args.source, "rb")
    except OSError as error:
        raise ModelError(f"cannot read {args.source}: {error.strerror}") from None
    with src:
        if src.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ModelError(f"{args.source} is not a GGUF model file")
        src.seek(0)
        target = args.target.resolve()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as dst:
                header = encrypt_stream(src, dst, key, name=name)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    print(f"encrypted {header.name}: plaintext sha256 {header.sha256} ({header.size} bytes, {header.chunks} chunks)")
    print(f"encrypted file sha256 {file_sha256(target)} -> {target}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb") as handle:
            header = parse_header(handle.read(64 << 10))
    except OSError as error:
        raise ModelError(f"cannot read {args.file}: {error.strerror}") from None
    facts = {**header.facts(), "file_size": os.stat(args.file).st_size, "expected_file_size": header.file_size,
             "file_sha256": file_sha256(args.file)}
    status = 0
    if args.key is not None:
        try:
            verify_file(args.file, ModelKey.from_file(args.key))
            facts["verified"] = f"all {header.chunks} chunks authentic; plaintext SHA-256 matches the header"
        except ModelCryptoError as error:
            facts["verified"] = False
            facts["error"] = str(error)
            facts["bad_chunk"] = error.chunk
            status = 1
    else:
        facts["verified"] = None
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        for name, value in facts.items():
            print(f"{name}: {value}")
        if args.key is None:
            print("(header not authenticated: give --key to verify every chunk)")
    if status:
        print(f"cdvm: error: {facts['error']}", file=sys.stderr)
    return status


def _keyd(args: argparse.Namespace) -> int:
    config = check_config_file(args.config)
    if args.stats:
        print(json.dumps(operator_counts(config.release_log), indent=2))
        return 0
    identity = load_identity(args.key_file)
    relays = load_relays_config(args.relays_config, args.relay)
    return run_async(_serve_keyd(KeyDaemon(identity, relays, config,
                                           on_ready=lambda line: print(line, file=sys.stderr, flush=True))))


async def _serve_keyd(daemon: KeyDaemon) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await daemon.run(stop)
    return 0
