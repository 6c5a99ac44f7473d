"""The worker's job journal (SQLite): exactly-once job admission and crash recovery.

A job's row is created when the worker accepts the request; the primary key (the request's
event id) makes a second admission impossible, even by another worker process sharing the
file (SQLite serialises writers with its file lock; ``INSERT OR IGNORE`` is one atomic
statement). Every phase change is recorded, so a worker that restarts finds the jobs it was
running when it died, takes them over (:meth:`Journal.claim_interrupted`, atomic per job, so
two restarting workers never both take one), tells those customers to resubmit, and never
runs them again. The journal holds ids, states and reasons — never a prompt, a document, an
answer or a key. Every SQLite failure surfaces as :class:`JournalError`.
"""
from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvm.errors import CdvmError

ACTIVE_STATES = ("queued", "starting", "attesting", "waiting_documents", "generating", "publishing")
FINAL_STATES = ("done", "failed", "rejected")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    customer TEXT NOT NULL,
    kind INTEGER NOT NULL,
    state TEXT NOT NULL,
    owner TEXT NOT NULL,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""
_ACTIVE_MARKS = ",".join("?" * len(ACTIVE_STATES))


class JournalError(CdvmError):
    """The journal cannot be opened or written."""


@dataclass(frozen=True)
class JobRecord:
    id: str
    customer: str
    kind: int
    state: str
    owner: str
    received_at: float
    updated_at: float
    reason: str


def process_owner() -> str:
    """This process's identity in the journal: pid and its start time (a recycled pid differs)."""
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return "?"


def owner_alive(owner: str) -> bool:
    """True while the process that wrote ``owner`` still runs."""
    pid_text, _, started = owner.partition(":")
    if not pid_text.isdigit():
        return False
    return _start_time(int(pid_text)) == started


class Journal:
    """SQLite-backed job journal; one per state directory, shared safely by several workers."""

    def __init__(self, path: Path, owner: str | None = None) -> None:
        self.path = path
        self.owner = owner or process_owner()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            os.chmod(path, 0o600)
        except (sqlite3.Error, OSError) as exc:
            raise JournalError(f"cannot open the job journal {path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise JournalError(f"the job journal {self.path} failed: {exc}") from exc

    def admit(self, job_id: str, customer: str, kind: int, state: str = "queued") -> bool:
        """Record a new job; False when any worker has already seen this request."""
        now = time.time()
        cursor = self._execute(
            "INSERT OR IGNORE INTO jobs (id, customer, kind, state, owner, received_at, updated_at) VALUES (?,?,?,?,?,?,?)",
            (job_id, customer, kind, state, self.owner, now, now),
        )
        return cursor.rowcount == 1

    def advance(self, job_id: str, state: str, reason: str = "") -> None:
        """Move a job to ``state`` (an active or final state)."""
        if state not in ACTIVE_STATES + FINAL_STATES:
            raise JournalError(f"unknown job state {state!r}")
        self._execute("UPDATE jobs SET state=?, reason=?, updated_at=? WHERE id=?", (state, reason, time.time(), job_id))

    def get(self, job_id: str) -> JobRecord | None:
        row = self._execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return JobRecord(*row) if row else None

    def active(self) -> list[JobRecord]:
        rows = self._execute(f"SELECT * FROM jobs WHERE state IN ({_ACTIVE_MARKS}) ORDER BY received_at", ACTIVE_STATES)
        return [JobRecord(*row) for row in rows]

    def claim_interrupted(self) -> list[JobRecord]:
        """Take over every active job whose owning worker is gone (or is this one, restarted).

        Each job is claimed with one conditional UPDATE, so of several workers recovering at
        once exactly one gets it. The job stays active (now owned by this process) until the
        caller has told the customer and calls :meth:`advance`: if this process dies first,
        the next start claims it again.
        """
        claimed = []
        for record in self.active():
            if record.owner != self.owner and owner_alive(record.owner):
                continue
            cursor = self._execute(
                f"UPDATE jobs SET owner=?, updated_at=? WHERE id=? AND owner=? AND state IN ({_ACTIVE_MARKS})",
                (self.owner, time.time(), record.id, record.owner, *ACTIVE_STATES),
            )
            if cursor.rowcount == 1:
                claimed.append(record)
        return claimed

    def recover_interrupted(self, reason: str) -> list[JobRecord]:
        """Claim every interrupted job and fail it with ``reason``; return them so customers can be told."""
        interrupted = self.claim_interrupted()
        for record in interrupted:
            self.advance(record.id, "failed", reason)
        return interrupted

    def count_active(self, customer: str | None = None) -> int:
        if customer is None:
            sql, args = f"SELECT COUNT(*) FROM jobs WHERE state IN ({_ACTIVE_MARKS})", ACTIVE_STATES
        else:
            sql, args = f"SELECT COUNT(*) FROM jobs WHERE customer=? AND state IN ({_ACTIVE_MARKS})", (customer, *ACTIVE_STATES)
        return int(self._execute(sql, args).fetchone()[0])

    def count_states(self) -> dict[str, int]:
        """How many jobs are in each state."""
        return {state: int(count) for state, count in self._execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
