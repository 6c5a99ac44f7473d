"""A real ``nostr-relay`` (PyPI, v1.14) on loopback, run as a subprocess.

Used by ``cdvm demo`` and by the tests. Its configuration is generated in a private directory:
SQLite database there, events up to ``max_event_size`` bytes of content (>= 512 KiB so large
gift wraps fit), validators ``is_signed`` and ``is_not_too_large`` only (no ``is_recent``:
NIP-59 gift wraps are back-dated by up to two days). ``restart()`` reuses the port and the
database, so stored events survive. The blocking methods have async twins (``astart``...)
that run them in a thread; ``async with LocalRelay() as relay:`` starts and stops it.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from websockets.exceptions import InvalidHandshake, InvalidURI
from websockets.sync.client import connect

from dvm.errors import CdvmError

HOST = "127.0.0.1"
MIN_EVENT_SIZE = 512 * 1024
_LAUNCH = "from nostr_relay.cli import main; main()"


class LocalRelayError(CdvmError):
    """The loopback relay could not be started."""


def free_port(host: str = HOST) -> int:
    """A TCP port the OS considers free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _config_yaml(db_path: Path, port: int, max_event_size: int, subscription_limit: int) -> str:
    # JSON is valid YAML: no PyYAML needed to write it, and paths are quoted safely.
    config = {
        "DEBUG": False,
        "relay_name": "cdvm loopback relay",
        "relay_description": "nostr-relay started by cdvm on loopback",
        "storage": {
            "sqlalchemy.url": f"sqlite+aiosqlite:///{db_path}",
            "num_concurrent_reqs": 10,
            "num_concurrent_adds": 2,
            "validators": ["nostr_relay.validators.is_not_too_large", "nostr_relay.validators.is_signed"],
        },
        "verification": {"nip05_verification": "disabled"},
        "gunicorn": {"bind": f"{HOST}:{port}", "host": HOST, "workers": 1, "loglevel": "warning", "reload": False},
        "authentication": {"enabled": False},
        "max_event_size": max_event_size,
        "message_timeout": 1800,
        "subscription_limit": subscription_limit,
        "max_limit": 6000,
        "logging": {
            "version": 1,
            "formatters": {"simple": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
            "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "simple", "stream": "ext://sys.stdout"}},
            "root": {"level": "WARNING", "handlers": ["console"]},
        },
    }
    return json.dumps(config, indent=2)


class LocalRelay:
    """One nostr-relay process; ``url`` is ``ws://127.0.0.1:PORT``, ``db_path`` its SQLite file."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        max_event_size: int = 1024 * 1024,
        subscription_limit: int = 64,
        startup_timeout: float = 30.0,
    ) -> None:
        if max_event_size < MIN_EVENT_SIZE:
            raise LocalRelayError(f"max_event_size must be at least {MIN_EVENT_SIZE} bytes")
        self._own_directory = directory is None
        self.directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="cdvm-relay-"))
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.db_path = self.directory / "relay.sqlite3"
        self.log_path = self.directory / "relay.log"
        self.config_path = self.directory / "config.yaml"
        self._fixed_port = port
        self.port = port or free_port()
        self.max_event_size = max_event_size
        self.subscription_limit = subscription_limit
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the relay and return once it accepts websocket connections."""
        if self.running:
            return
        for attempt in range(3):
            self._spawn()
            try:
                self._wait_ready()
                return
            except LocalRelayError:
                self._terminate(signal.SIGKILL)
                if self._fixed_port is not None or attempt == 2:
                    raise
                self.port = free_port()

    def _spawn(self) -> None:
        self.config_path.write_text(
            _config_yaml(self.db_path, self.port, self.max_event_size, self.subscription_limit), encoding="utf-8"
        )
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, "-c", str(self.config_path), "serve", "--use-uvicorn"],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise LocalRelayError(f"nostr-relay exited during startup (status {code}):\n{self._log_tail()}")
            try:
                with connect(self.url, open_timeout=1.0, close_timeout=0.5):
                    return
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError):
                time.sleep(0.05)
        raise LocalRelayError(f"nostr-relay did not accept connections on {self.url} within {self.startup_timeout:.0f}s")

    def _terminate(self, sig: signal.Signals, grace: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, SIGKILL after 5 s). The database stays for ``restart``."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """Kill abruptly (SIGKILL), as a crash would."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        """Stop if running, then start on the same port with the same database."""
        self.stop()
        self._fixed_port = self.port
        self.start()

    def close(self) -> None:
        """Stop and remove the directory if this object created it."""
        self.stop()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    async def arestart(self) -> None:
        await asyncio.to_thread(self.restart)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> LocalRelay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> LocalRelay:
        await self.astart()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
