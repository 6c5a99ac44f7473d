"""Shared fixtures: where the real evidence lives, and a real relay on loopback."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

VECTORS = Path(os.environ.get("CDVM_VECTORS", Path(__file__).resolve().parents[2] / "shared" / "vectors"))


@pytest.fixture(scope="session")
def vectors() -> Path:
    """``../shared/vectors`` (override with ``CDVM_VECTORS``); tests read real evidence from here."""
    if not VECTORS.is_dir():
        pytest.fail(f"test vectors not found at {VECTORS}: clone the project beside shared/ or set CDVM_VECTORS")
    return VECTORS
