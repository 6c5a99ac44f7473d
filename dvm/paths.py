"""Where cdvm keeps its files, following the XDG base directory conventions.

``CDVM_STATE_DIR``, ``CDVM_CONFIG_DIR`` and ``CDVM_CACHE_DIR`` override the defaults
(``$XDG_STATE_HOME/cdvm``, ``$XDG_CONFIG_HOME/cdvm``, ``$XDG_CACHE_HOME/cdvm``).
Directories are created with mode 0700 because they may hold keys.
"""
from __future__ import annotations

import os
from pathlib import Path


def _directory(override_var: str, xdg_var: str, fallback: str) -> Path:
    override = os.environ.get(override_var)
    if override:
        path = Path(override)
    else:
        base = os.environ.get(xdg_var)
        path = (Path(base) if base else Path.home() / fallback) / "cdvm"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def state_dir() -> Path:
    """Keys, journals and the simulated TEE's root live here."""
    return _directory("CDVM_STATE_DIR", "XDG_STATE_HOME", ".local/state")


def config_dir() -> Path:
    """A user's relays.toml and policies live here."""
    return _directory("CDVM_CONFIG_DIR", "XDG_CONFIG_HOME", ".config")


def cache_dir() -> Path:
    """Assembled models and downloaded collateral live here."""
    return _directory("CDVM_CACHE_DIR", "XDG_CACHE_HOME", ".cache")
