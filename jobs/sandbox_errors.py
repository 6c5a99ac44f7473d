"""Typed errors of the sandbox layer (``jobs.sandbox*``) and of the host↔sandbox channel."""
from __future__ import annotations

from jobs.errors import JobError


class SandboxError(JobError):
    """A sandbox could not be used as asked (bad spec, bad label, I/O on a dead sandbox)."""


class SandboxStartError(SandboxError):
    """A sandbox could not be started: missing isolation tool, unreadable bind, spawn failure."""


class SandboxExited(SandboxError):
    """The sandbox's runner is gone; ``reason`` is a :data:`jobs.sandbox.ExitReason`."""

    def __init__(self, message: str, *, reason: str, returncode: int | None) -> None:
        super().__init__(message)
        self.reason = reason
        self.returncode = returncode


class SandboxLimitExceeded(SandboxExited):
    """The runner was stopped by a resource limit: ``limit`` is memory, cpu, timeout or pids."""

    def __init__(self, message: str, *, limit: str, returncode: int | None) -> None:
        super().__init__(message, reason=limit, returncode=returncode)
        self.limit = limit


class ChannelError(JobError):
    """A frame on the host↔sandbox channel is oversize, truncated, not UTF-8 JSON, or not an object."""
