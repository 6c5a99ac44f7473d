"""The worker's job journal (SQLite): exactly-once job admission and crash recovery.

A job's row is created when the worker accepts the request; the primary key (the request's
event id) makes a second admission impossible, even by another worker process sharing the
file (SQLite serialises writers with its file lock). Every phase change is recorded, so a
worker that restarts finds the jobs it was running when it died, tells those customers to
resubmit, and never runs them again. The journal holds ids, states and reasons — never a
prompt, a document, an answer or a key.
"""
from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

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
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open the job journal {path}: {exc}") from exc
        os.chmod(path, 0o600)

    def close(self) -> None:
        self._db.close()

    def admit(self, job_id: str, customer: str, kind: int, state: str = "queued") -> bool:
        """Record a new job; False when any worker has already seen this request."""
        now = time.time()
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO jobs (id, customer, kind, state, owner, received_at, updated_at) VALUES (?,?,?,?,?,?,?)",
            (job_id, customer, kind, state, self.owner, now, now),
        )
        return cursor.rowcount == 1

    def advance(self, job_id: str, state: str, reason: str = "") -> None:
        """Move a job to ``state`` (an active or final state)."""
        if state not in ACTIVE_STATES + FINAL_STATES:
            raise JournalError(f"unknown job state {state!r}")
        self._db.execute(
            "UPDATE jobs SET state=?, reason=?, updated_at=? WHERE id=?", (state, reason, time.time(), job_id)
        )

    def get(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return JobRecord(*row) if row else None

    def active(self) -> list[JobRecord]:
        marks = ",".join("?" * len(ACTIVE_STATES))
        rows = self._db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY received_at", ACTIVE_STATES)
        return [JobRecord(*row) for row in rows]

    def recover_interrupted(self, reason: str) -> list[JobRecord]:
        """Fail every active job whose owning worker is gone; return them so customers can be told."""
        interrupted = [record for record in self.active() if not owner_alive(record.owner) or record.owner == self.owner]
        for record in interrupted:
            self.advance(record.id, "failed", reason)
        return interrupted

    def count_active(self, customer: str | None = None) -> int:
        marks = ",".join("?" * len(ACTIVE_STATES))
        if customer is None:
            sql, args = f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", ACTIVE_STATES
        else:
            sql, args = f"SELECT COUNT(*) FROM jobs WHERE customer=? AND state IN ({marks})", (customer, *ACTIVE_STATES)
        return int(self._db.execute(sql, args).fetchone()[0])
