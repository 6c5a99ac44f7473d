"""``cdvm worker``, ``cdvm ask`` and ``cdvm demo``: the confidential job from both sides."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from attest import sim
from attest.policy import Policy
from dvm.cli import run_async
from dvm.config import ConfigError, load_relays_config, relays_from_urls
from dvm.keys import PrivateKey, PublicKey
from dvm.keystore import load_identity
from dvm.localrelay import LocalRelay
from dvm.nip19 import decode
from dvm.nostr_errors import Nip19Error
from dvm.paths import state_dir
from dvm.worker import Timeouts, Worker, WorkerConfig
from jobs.cmodel import SealedModel, is_encrypted
from jobs.model import DEFAULT_SPEC, ModelRef, resolve_model
from jobs.sandbox import get_backend
from jobs.settings import HOST_TEE, RunnerSettings, runner_spec
from jobs.warmpool import WarmPool

log = logging.getLogger(__name__)

TEE_CHOICES = ("auto", "sim", "tsm", "sev-guest", "qgs", "aa")

DEMO_DOCUMENTS = {
    "orchard-handbook.txt": (
        "Welcome to the Orchard Street research lab. Badges are issued by the front desk on your first day. "
        "The coffee machine on the second floor is cleaned every Friday.\n\n"
        "The secure archive room is on the basement level. Its door code is 4417-KESTREL, and it changes every quarter. "
        "Never share the door code by e-mail.\n\n"
        "Visitors must be escorted at all times and sign the visitor log at reception."
    ),
    "cafeteria.txt": (
        "The cafeteria serves breakfast from 7:30 to 9:30 and lunch from 11:30 to 14:00. "
        "Vegetarian options are available every day. The salad bar is closed on public holidays."
    ),
}
DEMO_QUESTION = "What is the door code of the secure archive room?"


def register(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser("worker", help="serve confidential jobs (fresh sandbox per job)")
    worker.add_argument("--config", metavar="FILE", type=Path, help="worker config TOML ([worker], [sandbox], [timeouts])")
    _relay_options(worker)
    worker.add_argument("--key-file", metavar="FILE", help="DVM identity key file (default: $CDVM_NSEC or the state dir's)")
    worker.add_argument("--tee", choices=TEE_CHOICES, help="evidence provider inside sandboxes (default: auto)")
    worker.add_argument("--model", metavar="PATH", help="GGUF model (default: the embedded gemma-3-270m)")
    worker.add_argument("--state-dir", metavar="DIR", type=Path, help="journal, sandboxes and keys (default: XDG state dir)")
    worker.add_argument("--kind", type=int, action="append", dest="kinds", help="job kind to serve (repeatable; default 5050)")
    worker.set_defaults(handler=_worker)

    ask = subparsers.add_parser("ask", help="ask a DVM a confidential question about your documents")
    ask.add_argument("prompt", metavar="PROMPT")
    ask.add_argument("--dvm", required=True, metavar="NPUB|NPROFILE", help="the DVM to ask")
    ask.add_argument("--doc", action="append", default=[], metavar="FILE", help="a private document (repeatable)")
    ask.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="generation param (max_tokens, temperature, top_k, top_p, seed)")
    ask.add_argument("--policy", type=Path, metavar="FILE", help="attestation policy TOML (default: built-in)")
    ask.add_argument("--allow-simulated", action="store_true", help="accept the SIMULATED TEE (testing only: it proves nothing)")
    ask.add_argument("--model-sha256", action="append", default=[], metavar="HEX", help="expected model digest (default: the DVM's announcement)")
    ask.add_argument("--kind", type=int, default=5050, help="job kind (default 5050)")
    ask.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    ask.add_argument("--offline", action="store_true", help="verify with cached collateral only")
    ask.add_argument("--json", action="store_true", help="print one JSON object (answer, verdict, usage, timings)")
    _relay_options(ask)
    ask.add_argument("--key-file", metavar="FILE", help="your identity key file (default: $CDVM_NSEC, else a fresh one-off key)")
    ask.set_defaults(handler=_ask)

    demo = subparsers.add_parser("demo", help="run a whole confidential job locally (loopback relay, SIMULATED TEE)")
    demo.add_argument("--json", action="store_true", help="print the ask result as JSON")
    demo.add_argument("--model", metavar="PATH", help="GGUF model (default: the embedded gemma-3-270m)")
    demo.set_defaults(handler=_demo)


def _relay_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--relay", action="append", default=[], metavar="URL", help="relay URL (repeatable; replaces relays.toml)")
    parser.add_argument("--relays-config", metavar="FILE", help="relays TOML (default: see README)")


# ---- worker -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerFile:
    """A worker TOML: ``[worker]`` (WorkerConfig), ``[sandbox]`` (RunnerSettings plus ``model`` and
    ``backend``), ``[timeouts]`` (Timeouts) and ``[backend]`` (keyword options of the sandbox
    backend, e.g. ``config = "/etc/cdvm/coco.toml"`` for ``coco``)."""

    config: WorkerConfig = field(default_factory=WorkerConfig)
    settings: RunnerSettings = field(default_factory=RunnerSettings)
    model: str | None = None
    backend: str = "process"
    backend_options: dict[str, Any] = field(default_factory=dict)


def load_worker_file(path: Path | None) -> WorkerFile:
    """Read a worker TOML (see :class:`WorkerFile`); unknown tables and keys are errors."""
    if path is None:
        return WorkerFile()
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read worker config {path}: {error}") from None
    unknown = set(document) - {"worker", "sandbox", "timeouts", "backend"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}")
    worker = dict(document.get("worker", {}))
    sandbox = dict(document.get("sandbox", {}))
    model = sandbox.pop("model", None)
    backend = sandbox.pop("backend", "process")
    if "kinds" in worker:
        worker["kinds"] = tuple(worker["kinds"])
    try:
        config = replace(WorkerConfig(), **_known(worker, WorkerConfig, path, "worker"),
                         timeouts=Timeouts(**_known(dict(document.get("timeouts", {})), Timeouts, path, "timeouts")))
        settings = replace(RunnerSettings(), **_known(sandbox, RunnerSettings, path, "sandbox"))
    except TypeError as error:
        raise ConfigError(f"{path}: {error}") from None
    return WorkerFile(config, settings, model, backend, dict(document.get("backend", {})))


def _known(table: dict[str, Any], cls: type, path: Path, name: str) -> dict[str, Any]:
    allowed = {f.name for f in fields(cls)} - {"timeouts"}
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) in [{name}]: {', '.join(sorted(unknown))}")
    return table


def _worker(args: argparse.Namespace) -> int:
    if args.state_dir:
        os.environ["CDVM_STATE_DIR"] = str(args.state_dir)
    loaded = load_worker_file(args.config)
    config, settings = loaded.config, loaded.settings
    if args.tee:
        config, settings = replace(config, tee=args.tee), replace(settings, tee=args.tee)
    if args.kinds:
        config = replace(config, kinds=tuple(args.kinds))
    identity = load_identity(args.key_file)
    relays = load_relays_config(args.relays_config, args.relay)
    return run_async(serve(identity, relays, config, settings, args.model or loaded.model, loaded.backend,
                           backend_options=loaded.backend_options))


async def serve(
    identity: PrivateKey,
    relays: Any,
    config: WorkerConfig,
    settings: RunnerSettings,
    model_spec: str | None,
    backend: str = "process",
    stop: asyncio.Event | None = None,
    on_ready: Any = None,
    backend_options: dict[str, Any] | None = None,
) -> int:
    """Run a worker until SIGINT/SIGTERM (or ``stop``).

    An encrypted model (jobs.cmodel) is announced with the plaintext name and SHA-256 from its
    header (what every sandbox attests after decrypting), plus the encrypted file's digest and
    the key owner; the sandboxes get the key from the owner's keyd, the worker never does.
    """
    model: ModelRef | SealedModel
    if model_spec not in (None, DEFAULT_SPEC) and is_encrypted(Path(model_spec).expanduser()):
        model = SealedModel.open(Path(model_spec).expanduser())
        if not settings.model_key_owner:
            raise ConfigError("an encrypted model needs [sandbox] model_key_owner (the npub of the owner's cdvm keyd)")
        owner = PublicKey.from_npub_or_hex(settings.model_key_owner).hex()
        model_info = {"name": model.header.name, "sha256": model.header.sha256, "encrypted_sha256": model.file_sha256,
                      "key_owner": owner}
    else:
        model = resolve_model(model_spec)
        model_info = {"name": model.name, "sha256": model.sha256}
    if settings.tee == "sim":
        sim.sim_root_certificate()
    if not config.policy_summary:
        config = replace(config, policy_summary=default_policy_summary(settings.tee))
    if backend == "process" and settings.tee != "sim":
        settings = replace(settings, tee=HOST_TEE)
    spec = runner_spec(settings, model, identity.public_key.hex())
    sandboxes = get_backend(backend, **(backend_options or {}))
    job_claims = getattr(sandboxes, "job_claims", None)
    claims = await job_claims() if job_claims is not None else None
    warm = WarmPool(sandboxes, spec, config.warm_pool, config.timeouts.sandbox_start)
    worker = Worker(
        identity,
        relays,
        config,
        warm,
        state_dir() / "journal.sqlite3",
        model_info=model_info,
        on_ready=on_ready or (lambda line: print(line, file=sys.stderr, flush=True)),
        claims=claims,
    )
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    await worker.run(stop)
    return 0


def default_policy_summary(tee: str) -> dict[str, Any]:
    """What the announcement tells clients to apply when the operator gave no ``[worker.policy_summary]``:
    cdvm's default attestation policy (docs/attestation.md), simulated evidence only for a sim worker."""
    default = Policy.default()
    return {
        "allow_simulated": tee == "sim",
        "tdx": {
            "allow_debug": default.tdx.allow_debug,
            "require_sept_ve_disable": default.tdx.require_sept_ve_disable,
            "accepted_tcb_statuses": list(default.tdx.accepted_tcb_statuses),
            "accepted_qe_statuses": list(default.tdx.accepted_qe_statuses),
        },
        "snp": {"allow_debug": default.snp.allow_debug},
    }


# ---- ask ----------------------------------------------------------------------------------------


def _dvm_target(text: str) -> tuple[PublicKey, list[str]]:
    try:
        decoded = decode(text) if text.startswith(("npub1", "nprofile1", "nostr:")) else None
    except Nip19Error as error:
        raise ConfigError(f"--dvm: {error}") from None
    if decoded is not None and decoded.kind == "nprofile":
        return PublicKey.from_hex(decoded.hex), list(decoded.relays)
    return PublicKey.from_npub_or_hex(text), []


def _params(pairs: list[str]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {pair!r}: expected KEY=VALUE")
        params[key] = value
    return params


def _ask(args: argparse.Namespace) -> int:
    from dvm.client import AskOptions, ConfidentialJob

    dvm, hinted = _dvm_target(args.dvm)
    relays = load_relays_config(args.relays_config, args.relay or hinted)
    identity = load_identity(args.key_file) if args.key_file or _env_identity() else PrivateKey.generate()
    documents = []
    for name in args.doc:
        try:
            documents.append((Path(name).name, Path(name).read_bytes()))
        except OSError as error:
            raise ConfigError(f"--doc {name}: {error.strerror}") from None
    options = AskOptions(
        kind=args.kind,
        params=_params(args.param),
        policy=Policy.from_toml(args.policy) if args.policy else Policy.default(),
        allow_simulated=args.allow_simulated,
        expected_models=tuple(args.model_sha256),
        offline=args.offline,
        timeout=args.timeout,
    )
    job = ConfidentialJob(identity, dvm, relays, options, progress=_progress)
    result = asyncio.run(job.run(args.prompt, documents))
    _print_result(result, args.json)
    return 0


def _env_identity() -> bool:
    return bool(os.environ.get("CDVM_NSEC"))


def _progress(line: str) -> None:
    print(f"cdvm: {line}", file=sys.stderr, flush=True)


def _print_result(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    if result.verdict.simulated:
        print("SIMULATED TEE — NOT CONFIDENTIAL (the evidence proves nothing; for testing only)", file=sys.stderr)
    print(result.answer)


# ---- demo ---------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    return run_async(demo(args.model, args.json))


async def demo(model_spec: str | None, as_json: bool) -> int:
    """Loopback relay + sim worker + one confidential ask about the sample documents."""
    from dvm.client import AskOptions, ConfidentialJob

    with tempfile.TemporaryDirectory(prefix="cdvm-demo-") as tmp, LocalRelay(Path(tmp) / "relay") as relay:
        _progress(f"loopback relay at {relay.url}")
        relays = relays_from_urls([relay.url])
        dvm_key, customer = PrivateKey.generate(), PrivateKey.generate()
        stop, ready = asyncio.Event(), asyncio.Event()
        config = WorkerConfig(tee="sim", warm_pool=1, name="cdvm demo")
        settings = RunnerSettings(tee="sim")
        worker = asyncio.create_task(
            serve(dvm_key, relays, config, settings, model_spec, stop=stop, on_ready=lambda line: (_progress(line), ready.set()))
        )
        try:
            await _wait_ready(ready, worker)
            started = time.perf_counter()
            job = ConfidentialJob(
                customer, dvm_key.public_key, relays, AskOptions(allow_simulated=True, params={"max_tokens": "48"}), progress=_progress
            )
            documents = [(name, text.encode()) for name, text in DEMO_DOCUMENTS.items()]
            result = await job.run(DEMO_QUESTION, documents)
            total = (time.perf_counter() - started) * 1000
        finally:
            stop.set()
            await asyncio.gather(worker, return_exceptions=True)
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return 0
    print("\n".join(result.verdict.render_lines()[:3]))
    print(f"\nQ: {DEMO_QUESTION}\nA: {result.answer}\n")
    phases = ", ".join(f"{name} {ms:.0f} ms" for name, ms in result.timings_ms.items())
    print(f"timings (since the job was posted): {phases}; total {total:.0f} ms")
    print(f"tokens: {result.usage}")
    return 0


async def _wait_ready(ready: asyncio.Event, worker: asyncio.Task[int]) -> None:
    waiter = asyncio.ensure_future(ready.wait())
    done, _ = await asyncio.wait({waiter, worker}, return_when=asyncio.FIRST_COMPLETED)
    if worker in done:
        waiter.cancel()
        worker.result()
        raise ConfigError("the demo worker stopped before it was ready")
