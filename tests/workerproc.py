"""A real ``cdvm worker`` process for end-to-end tests (started the way an operator starts it),
and the customers' side of plain jobs against it."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from dvm.config import relays_from_urls
from dvm.journal import FINAL_STATES, Journal
from dvm.keys import PrivateKey
from dvm.nip01 import Event
from dvm.nip90 import FEEDBACK_KIND, RESULT_KIND_OFFSET, JobInput, build_job_request, parse_feedback
from dvm.pool import PoolSubscription, RelayPool
from dvm.wire import Filter

READY_MARK = "worker ready "


class WorkerProcess:
    """``cdvm worker`` in a subprocess; its stderr (the operator's log) goes to ``log_path``."""

    def __init__(self, relay_urls: list[str], state_dir: Path, *, tee: str | None = "sim", extra_args: tuple[str, ...] = (),
                 config_toml: str | None = None, identity: PrivateKey | None = None) -> None:
        self.identity = identity or PrivateKey.generate()
        self.relay_urls = relay_urls
        self.state_dir = state_dir
        self.log_path = state_dir.parent / f"{state_dir.name}-worker.log"
        self.tee = tee
        self.extra_args = extra_args
        self.config_path: Path | None = None
        if config_toml is not None:
            self.config_path = state_dir.parent / f"{state_dir.name}-worker.toml"
            self.config_path.write_text(config_toml)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:
        env = {k: v for k, v in os.environ.items() if k != "CDVM_STATE_DIR"}
        env["CDVM_NSEC"] = self.identity.secret_hex()
        argv = [sys.executable, "-m", "dvm.cli", "-v", "worker", "--state-dir", str(self.state_dir)]
        if self.tee is not None:
            argv += ["--tee", self.tee]
        for url in self.relay_urls:
            argv += ["--relay", url]
        if self.config_path:
            argv += ["--config", str(self.config_path)]
        argv += list(self.extra_args)
        start_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_MARK in self.log_path.read_text(errors="replace")[start_offset:]:
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL the worker alone (its sandboxes are left for the next start to reap)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    @property
    def pubkey(self) -> str:
        return self.identity.public_key.hex()


def worker_toml(*, worker: dict[str, object] | None = None, sandbox: dict[str, object] | None = None,
                timeouts: dict[str, object] | None = None) -> str:
    """A worker config TOML with these ``[worker]``, ``[sandbox]`` and ``[timeouts]`` keys."""
    lines = []
    for table, values in (("worker", worker), ("sandbox", sandbox), ("timeouts", timeouts)):
        if values:
            lines.append(f"[{table}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


class JobWatch:
    """The customers' side of plain NIP-90 jobs in worker tests: publishes requests from any key
    and records every feedback the DVM sends and every result, by request id."""

    def __init__(self, relay_urls: list[str], dvm_pubkey: str) -> None:
        self.dvm = dvm_pubkey
        self.pool = RelayPool.from_config(relays_from_urls(relay_urls))
        self.feedback: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.results: dict[str, list[Event]] = defaultdict(list)
        self._changed = asyncio.Event()
        self._pumps: list[asyncio.Task[None]] = []

    async def start(self) -> JobWatch:
        await self.pool.start(wait=10)
        since = int(time.time()) - 5
        feedback = await self.pool.subscribe([Filter(kinds=(FEEDBACK_KIND,), authors=(self.dvm,), since=since)])
        results = await self.pool.subscribe([Filter(kinds=(5050 + RESULT_KIND_OFFSET,), since=since)])
        self._pumps = [asyncio.create_task(self._pump(feedback)), asyncio.create_task(self._pump(results))]
        await asyncio.gather(feedback.wait_eose(5), results.wait_eose(5))
        return self

    async def _pump(self, subscription: PoolSubscription) -> None:
        async for event in subscription:
            if event.kind == FEEDBACK_KIND:
                feedback = parse_feedback(event)
                self.feedback[feedback.request_id].append((feedback.status, feedback.extra_info))
            else:
                for request_id in event.tag_values("e")[:1]:
                    self.results[request_id].append(event)
            self._changed.set()

    def request(self, customer: PrivateKey, text: str) -> Event:
        """A plain request for the DVM whose text input is ``text`` (a tests.scripted_runner script);
        a random tag makes every request distinct, even the same text from one key in one second."""
        return build_job_request(customer, 5050, inputs=[JobInput(text, "text")], targets=[self.dvm],
                                 extra_tags=[["alt", f"test job {secrets.token_hex(8)}"]])

    async def submit(self, customer: PrivateKey, text: str) -> str:
        request = self.request(customer, text)
        await self.pool.publish(request)
        return request.id

    def statuses(self, request_id: str) -> list[str]:
        return [status for status, _ in self.feedback.get(request_id, [])]

    def final(self, request_id: str) -> tuple[str, str] | None:
        """The job's last ``success`` or ``error`` feedback."""
        return next(((s, i) for s, i in reversed(self.feedback.get(request_id, [])) if s in ("success", "error")), None)

    async def wait_for(self, condition: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        """Wait until ``condition()`` holds (checked whenever an event arrives, and every second)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._changed.wait()

    async def close(self) -> None:
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await self.pool.close()


def journal_state(state_dir: Path, job_id: str) -> str | None:
    """A job's state in the worker's journal (read from the test process)."""
    journal = Journal(state_dir / "journal.sqlite3", owner="test")
    try:
        record = journal.get(job_id)
    finally:
        journal.close()
    return record.state if record else None


def sandbox_dirs(state_dir: Path) -> list[Path]:
    """The per-sandbox state directories the process backend keeps (``sandboxes/<label>``)."""
    root = state_dir / "sandboxes"
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.exists() else []


async def settled_state(state_dir: Path, job_id: str, timeout: float = 30.0) -> str | None:
    """The job's journal state once it is final (done, failed, rejected), or its state at ``timeout``."""
    deadline = time.monotonic() + timeout
    while (state := journal_state(state_dir, job_id)) not in FINAL_STATES and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return state
