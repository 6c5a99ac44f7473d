"""The job journal (dvm/journal.py) on real SQLite files: exactly-once admission and takeover,
also across Journal instances and processes sharing one file; recovery; counts; typed errors."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dvm.journal import ACTIVE_STATES, Journal, JournalError, owner_alive, process_owner

REPO = Path(__file__).resolve().parents[1]
DEAD = "999999999:1"
IDS = [f"{i:064x}" for i in range(300)]

RACER = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from dvm.journal import Journal
path, action, start_at = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
journal = Journal(path)
ids = [f"{{i:064x}}" for i in range(300)]
while time.time() < start_at:
    time.sleep(0.001)
if action == "admit":
    won = [job for job in ids if journal.admit(job, "c" * 64, 5050)]
else:
    won = [record.id for record in journal.claim_interrupted()]
print("\\n".join(won))
"""


def _race(path: Path, action: str, processes: int = 3) -> list[list[str]]:
    """Run ``processes`` processes doing ``action`` on the same journal at the same moment."""
    start_at = time.time() + 1.5
    code = RACER.format(repo=str(REPO))
    racers = [subprocess.Popen([sys.executable, "-c", code, str(path), action, str(start_at)],
                               stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    outputs = [racer.communicate(timeout=60)[0] for racer in racers]
    assert all(racer.returncode == 0 for racer in racers)
    return [output.split() for output in outputs]


def test_admission_is_exactly_once(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    assert journal.admit("a" * 64, "c" * 64, 5050)
    assert not journal.admit("a" * 64, "c" * 64, 5050)
    other = Journal(tmp_path / "journal.sqlite3", owner="another:worker")
    assert not other.admit("a" * 64, "d" * 64, 5051)
    assert other.admit("b" * 64, "d" * 64, 5051)
    assert not journal.admit("b" * 64, "d" * 64, 5051)
    record = journal.get("a" * 64)
    assert record is not None and (record.customer, record.kind, record.state, record.owner) == ("c" * 64, 5050, "queued", journal.owner)
    assert journal.get("f" * 64) is None
    assert stat.S_IMODE(os.stat(tmp_path / "journal.sqlite3").st_mode) == 0o600
    journal.close()
    other.close()


@pytest.mark.slow
def test_admission_is_exactly_once_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    won = _race(path, "admit")
    assert sorted(job for racer in won for job in racer) == IDS, "every request admitted by exactly one process"


def test_recover_interrupted_takes_only_jobs_of_dead_workers(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    dead = Journal(path, owner=DEAD)
    for index, state in enumerate(ACTIVE_STATES):
        dead.admit(f"{index:064x}", "c" * 64, 5050)
        dead.advance(f"{index:064x}", state)
    dead.admit("d" * 64, "c" * 64, 5050)
    dead.advance("d" * 64, "done")
    dead.admit("e" * 64, "c" * 64, 5050)
    dead.advance("e" * 64, "rejected", "busy")
    live = Journal(path, owner=f"1:{open('/proc/1/stat').read().rsplit(')', 1)[1].split()[19]}")
    live.admit("a" * 64, "c" * 64, 5050)
    me = Journal(path)
    me.admit("b" * 64, "c" * 64, 5050)
    recovered = me.recover_interrupted("restarted")
    assert sorted(r.id for r in recovered) == sorted([f"{i:064x}" for i in range(len(ACTIVE_STATES))] + ["b" * 64])
    assert {r.state for r in recovered} == set(ACTIVE_STATES)
    for record in recovered:
        after = me.get(record.id)
        assert after is not None and (after.state, after.reason, after.owner) == ("failed", "restarted", me.owner)
    assert me.get("a" * 64).state == "queued", "a live worker's job is left alone"  # type: ignore[union-attr]
    assert me.get("d" * 64).state == "done" and me.get("e" * 64).reason == "busy"  # type: ignore[union-attr]
    assert me.recover_interrupted("again") == []


def test_a_claimed_job_stays_active_until_told(tmp_path: Path) -> None:
    """A worker dying between claiming a job and telling its customer leaves it for the next start."""
    path = tmp_path / "journal.sqlite3"
    Journal(path, owner=DEAD).admit("a" * 64, "c" * 64, 5050)
    first = Journal(path, owner="1000000001:7")  # a claimer that dies (its pid does not exist)
    assert [r.id for r in first.claim_interrupted()] == ["a" * 64]
    assert first.get("a" * 64).state == "queued"  # type: ignore[union-attr]
    second = Journal(path)
    assert [r.id for r in second.claim_interrupted()] == ["a" * 64]
    assert second.get("a" * 64).owner == second.owner  # type: ignore[union-attr]
    assert Journal(path, owner="x:y").claim_interrupted() == [], "a live claimer keeps its job"


@pytest.mark.slow
def test_takeover_is_exactly_once_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    dead = Journal(path, owner=DEAD)
    for job in IDS:
        dead.admit(job, "c" * 64, 5050)
    dead.close()
    won = _race(path, "claim")
    assert sorted(job for racer in won for job in racer) == IDS, "every interrupted job taken over by exactly one process"


def test_counts(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    for index, customer in enumerate(["a", "a", "b", "b", "b"]):
        journal.admit(f"{index:064x}", customer * 64, 5050)
    journal.advance(f"{0:064x}", "generating")
    journal.advance(f"{1:064x}", "done")
    journal.advance(f"{2:064x}", "failed", "timed out")
    assert journal.count_active() == 3
    assert journal.count_active("a" * 64) == 1 and journal.count_active("b" * 64) == 2
    assert journal.count_active("z" * 64) == 0
    assert journal.count_states() == {"generating": 1, "done": 1, "failed": 1, "queued": 2}
    assert [r.id for r in journal.active()] == [f"{i:064x}" for i in (0, 3, 4)]


def test_errors_are_typed(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    with pytest.raises(JournalError, match="unknown job state"):
        journal.advance("a" * 64, "exploded")
    journal.close()
    with pytest.raises(JournalError):
        journal.admit("a" * 64, "c" * 64, 5050)
    (tmp_path / "garbage.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError, match="cannot open the job journal"):
        Journal(tmp_path / "garbage.sqlite3")
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(JournalError):
        Journal(tmp_path / "a-directory")


def test_owner_identity() -> None:
    assert owner_alive(process_owner())
    assert not owner_alive(DEAD)
    assert not owner_alive("garbage") and not owner_alive("") and not owner_alive("12:")
