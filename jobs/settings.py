"""How the worker builds each job's sandbox: runner arguments, read-only views, limits.

The runner sees only: the Python runtime, cdvm's own code, the model file (all read-only;
for an encrypted model, the ``.cgguf`` file, decrypted inside the sandbox into a memfd),
and a private tmpfs (where the simulated TEE, when used, creates its own throw-away PKI). Its
environment is built here from scratch; nothing of the worker's (such as ``CDVM_NSEC``)
leaks in.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import attest
import dvm
import jobs
from jobs.cmodel import SealedModel
from jobs.errors import ModelError
from jobs.model import ModelRef
from jobs.sandbox import SandboxSpec, python_runtime_binds

SANDBOX_HOME = "/tmp"
HOST_TEE = "host"
"""The runner's ``--tee host``: the worker obtains evidence for it (a process sandbox inside a
confidential VM sees no TEE device; docs/protocol.md §8, ``evidence``)."""


@dataclass(frozen=True)
class RunnerSettings:
    """Operator settings for every job's sandbox (``[sandbox]`` in the worker config).

    ``embedding_model`` (a GGUF embedding model) switches retrieval from BM25 to embeddings;
    ``runner_module`` replaces the in-sandbox runner (same channel protocol) for custom jobs.
    ``model_key_owner`` (npub or hex of the owner's ``cdvm keyd``) is required for an encrypted
    model; the runner waits ``model_key_timeout_s`` for the key (keep it below the
    ``[timeouts] attestation`` phase limit).
    """

    tee: str = "auto"
    threads: int = max(1, len(os.sched_getaffinity(0)))
    n_ctx: int = 2048
    max_tokens_cap: int = 1024
    retrieve_k: int = 4
    memory_mb: int = 3072
    cpu_seconds: int = 1800
    wall_timeout_s: float = 1800.0
    tmpfs_mb: int = 256
    max_processes: int = 64
    embedding_model: str | None = None
    runner_module: str = "jobs.runner"
    model_key_owner: str | None = None
    model_key_timeout_s: float = 30.0


def code_roots() -> tuple[Path, ...]:
    """The directories holding cdvm's packages (one for an editable install or a site-packages dir)."""
    return tuple(dict.fromkeys(Path(package.__file__).resolve().parent.parent for package in (dvm, jobs, attest)))


def runner_spec(settings: RunnerSettings, model: ModelRef | SealedModel, dvm_pubkey: str | None = None) -> SandboxSpec:
    """The sandbox spec of one job's runner.

    For an encrypted model the runner's file-size limit (``RLIMIT_FSIZE``, which the process
    backend sets to the tmpfs size) must admit the decrypted model in its memfd, so the tmpfs
    size is raised to the plaintext size plus 16 MiB when it is smaller.
    """
    argv = [
        sys.executable, "-m", settings.runner_module,
        "--model", str(model.path),
        "--tee", settings.tee,
        "--n-ctx", str(settings.n_ctx),
        "--threads", str(settings.threads),
        "--max-tokens-cap", str(settings.max_tokens_cap),
        "--retrieve-k", str(settings.retrieve_k),
    ]
    binds = [*python_runtime_binds(), *code_roots(), model.path.resolve()]
    if settings.embedding_model:
        embedding = Path(settings.embedding_model).resolve()
        argv += ["--embedding-model", str(embedding)]
        binds.append(embedding)
    env = {
        "PYTHONPATH": os.pathsep.join(str(root) for root in code_roots()),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": SANDBOX_HOME,
        "CDVM_CACHE_DIR": f"{SANDBOX_HOME}/cache",
        "CDVM_CONFIG_DIR": f"{SANDBOX_HOME}/config",
        "CDVM_STATE_DIR": f"{SANDBOX_HOME}/state",
        "OMP_NUM_THREADS": str(settings.threads),
    }
    if settings.tee == "sim":
        argv.append("--allow-sim")
    tmpfs_bytes = settings.tmpfs_mb * 1024 * 1024
    if isinstance(model, SealedModel):
        if not settings.model_key_owner:
            raise ModelError("an encrypted model needs [sandbox] model_key_owner (the npub of the owner's cdvm keyd)")
        argv += ["--model-key-owner", settings.model_key_owner, "--model-key-timeout", str(settings.model_key_timeout_s)]
        if dvm_pubkey:
            argv += ["--dvm-pubkey", dvm_pubkey]
        tmpfs_bytes = max(tmpfs_bytes, model.header.size + (16 << 20))
        if settings.memory_mb * 1024 * 1024 < model.header.size + (256 << 20):
            raise ModelError(f"[sandbox] memory_mb = {settings.memory_mb} cannot hold the {model.header.size}-byte "
                             "decrypted model plus llama.cpp; raise it")
    return SandboxSpec(
        argv=tuple(argv),
        ro_binds=tuple(dict.fromkeys(binds)),
        env=env,
        memory_bytes=settings.memory_mb * 1024 * 1024,
        cpu_seconds=settings.cpu_seconds,
        wall_timeout_s=settings.wall_timeout_s,
        max_processes=settings.max_processes,
        tmpfs_bytes=tmpfs_bytes,
    )
