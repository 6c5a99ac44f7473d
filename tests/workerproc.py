"""A real ``cdvm worker`` process for end-to-end tests (started the way an operator starts it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dvm.keys import PrivateKey

READY_MARK = "worker ready "


class WorkerProcess:
    """``cdvm worker`` in a subprocess; its stderr (the operator's log) goes to ``log_path``."""

    def __init__(self, relay_urls: list[str], state_dir: Path, *, tee: str = "sim", extra_args: tuple[str, ...] = (),
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
        argv = [sys.executable, "-m", "dvm.cli", "-v", "worker", "--tee", self.tee, "--state-dir", str(self.state_dir)]
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
