"""The sandbox layer's interface: what a job's sandbox is asked to be, and how it is driven.

Every NIP-90 job runs in a fresh sandbox that is never reused: a backend starts the
in-sandbox runner (``SandboxSpec.argv``), the host exchanges channel frames with it
(:mod:`jobs.channel`) over a plain byte stream, and :meth:`Sandbox.destroy` removes the
whole process tree and every file. Backends register by name in :func:`get_backend`;
``process`` (Linux namespaces, :mod:`jobs.sandbox_process`) is the default, and
``microvm`` / ``coco`` plug in behind the same interface without touching the runner.
"""
from __future__ import annotations

import importlib
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Literal

from jobs.channel import DEFAULT_MAX_FRAME
from jobs.sandbox_errors import SandboxError

ExitReason = Literal["exited", "killed", "memory", "cpu", "timeout", "pids"]
LIMIT_REASONS: frozenset[str] = frozenset({"memory", "cpu", "timeout", "pids"})

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class SandboxSpec:
    """What to run and under which limits.

    ``env`` is the runner's whole environment: nothing is inherited from the worker.
    ``ro_binds`` are host paths (code, virtual environment, interpreter, model file) made
    visible read-only at the same path; backends add the system directories themselves.
    """

    argv: tuple[str, ...]
    ro_binds: tuple[Path, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    memory_bytes: int = 2 * 1024**3
    cpu_seconds: int = 600
    wall_timeout_s: float = 900.0
    max_processes: int = 64
    tmpfs_bytes: int = 64 * 1024**2
    max_frame: int = DEFAULT_MAX_FRAME

    def __post_init__(self) -> None:
        argv = tuple(self.argv)
        if not argv or not all(isinstance(a, str) and a and "\0" not in a for a in argv):
            raise SandboxError("sandbox argv must be a non-empty list of non-empty strings without NUL")
        binds = tuple(Path(p) for p in self.ro_binds)
        for path in binds:
            if not path.is_absolute():
                raise SandboxError(f"sandbox bind {path} must be an absolute path")
        env = dict(self.env)
        for name, value in env.items():
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                raise SandboxError(f"sandbox environment variable name {name!r} is not valid")
            if not isinstance(value, str) or "\0" in value:
                raise SandboxError(f"sandbox environment variable {name} must be a string without NUL")
        for name in ("memory_bytes", "cpu_seconds", "max_processes", "tmpfs_bytes", "max_frame"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SandboxError(f"sandbox {name} must be a positive integer, not {value!r}")
        if not self.wall_timeout_s > 0:
            raise SandboxError(f"sandbox wall_timeout_s must be positive, not {self.wall_timeout_s!r}")
        object.__setattr__(self, "argv", argv)
        object.__setattr__(self, "ro_binds", binds)
        object.__setattr__(self, "env", MappingProxyType(env))


@dataclass(frozen=True)
class SandboxExit:
    """How a sandbox ended. ``stderr_tail`` is the runner's last stderr bytes: never log it."""

    returncode: int | None
    reason: ExitReason
    stderr_tail: bytes = field(default=b"", repr=False)


def check_label(label: str) -> str:
    """A sandbox label (a job id prefix) names host-side paths: 1-64 of ``[A-Za-z0-9_-]``."""
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise SandboxError(f"sandbox label {label!r} must be 1-64 characters of A-Z a-z 0-9 _ - (not starting with _ or -)")
    return label


def python_runtime_binds() -> tuple[Path, ...]:
    """Host paths a runner started with this interpreter (``sys.executable``) needs to see."""
    paths = [Path(sys.prefix), Path(sys.base_prefix).resolve(), Path(sys.executable).resolve().parent]
    return tuple(dict.fromkeys(p for p in paths if p.exists()))


class Sandbox(ABC):
    """One started sandbox serving exactly one job; use as ``async with`` to destroy on exit."""

    label: str

    @abstractmethod
    async def send(self, obj: dict[str, Any]) -> None:
        """Send one message to the runner; raises :class:`SandboxExited` if it is gone."""

    @abstractmethod
    async def recv(self) -> dict[str, Any]:
        """Next message from the runner; at end of stream raises :class:`SandboxExited`
        (:class:`SandboxLimitExceeded` when a limit stopped it) carrying the exit reason."""

    @abstractmethod
    async def wait(self) -> SandboxExit:
        """Wait for the runner to end (the wall timeout still applies)."""

    @abstractmethod
    async def destroy(self) -> SandboxExit:
        """Kill the whole sandbox and remove every file it had; idempotent."""

    @abstractmethod
    def reset_deadline(self) -> None:
        """Restart the wall-clock timeout now (a pre-started sandbox taking its job)."""

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.destroy()


class SandboxBackend(ABC):
    """Starts sandboxes of one kind."""

    name: str

    @abstractmethod
    async def start(self, spec: SandboxSpec, job_label: str) -> Sandbox:
        """Start a fresh sandbox running ``spec.argv``; ``job_label`` must never have been used."""

    @abstractmethod
    async def reap_orphans(self) -> int:
        """On worker start-up: destroy sandboxes left by a crashed worker; return how many."""


_BACKENDS: dict[str, str] = {
    "process": "jobs.sandbox_process:ProcessBackend",
    "microvm": "jobs.sandbox_microvm:MicroVmBackend",
    "coco": "jobs.sandbox_coco:CocoBackend",
}


def get_backend(name: str, **options: Any) -> SandboxBackend:
    """The backend registered as ``name`` (``process``), built with ``options``."""
    target = _BACKENDS.get(name)
    if target is None:
        raise SandboxError(f"unknown sandbox backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    module_name, _, class_name = target.partition(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class(**options)
