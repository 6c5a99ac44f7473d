"""Shared fixtures: where the real evidence lives, and a real relay on loopback."""
from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from dvm.localrelay import LocalRelay

VECTORS = Path(os.environ.get("CDVM_VECTORS", Path(__file__).resolve().parents[2] / "shared" / "vectors"))


@pytest.fixture(scope="session")
def vectors() -> Path:
    """``../shared/vectors`` (override with ``CDVM_VECTORS``); tests read real evidence from here."""
    if not VECTORS.is_dir():
        pytest.fail(f"test vectors not found at {VECTORS}: clone the project beside shared/ or set CDVM_VECTORS")
    return VECTORS


@pytest.fixture(scope="session", autouse=True)
def isolated_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point cdvm's state, config and cache directories at a session temp dir: tests never
    touch the user's keys or caches. The default model is assembled once per session there."""
    base = tmp_path_factory.mktemp("cdvm-home")
    for name in ("STATE", "CONFIG", "CACHE"):
        os.environ[f"CDVM_{name}_DIR"] = str(base / name.lower())
    os.environ.pop("CDVM_NSEC", None)
    return base


@pytest.fixture
async def relay_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[LocalRelay]]]:
    """Start extra nostr-relay processes on loopback (``await relay_factory(**LocalRelay options)``);
    all are stopped at teardown."""
    started: list[LocalRelay] = []

    async def start(**options: object) -> LocalRelay:
        local = LocalRelay(tmp_path / f"relay-{len(started)}", **options)  # type: ignore[arg-type]
        started.append(local)
        await local.astart()
        return local

    yield start
    for local in started:
        await local.astop()


@pytest.fixture
async def relay(relay_factory: Callable[..., Awaitable[LocalRelay]]) -> LocalRelay:
    """A fresh real nostr-relay 1.14 on loopback (about 1 s to start); ``relay.url``, ``relay.restart()``..."""
    return await relay_factory()
