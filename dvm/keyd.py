"""The model owner's key daemon (``cdvm keyd``): releases a model key only to an attested enclave.

Protocol (NIP-17 DMs; every content is a JSON object with ``"cdvm": 1``, a ``type`` and the
``job`` it belongs to, like the other cdvm messages; README "For model owners"):

  enclave K -> keyd   ``model_key_request``  {nonce, pubkey K, dvm, request (the customer's signed job
                                              request event), model {file_sha256, key_id, name},
                                              evidence, collateral}
  keyd -> enclave K   ``model_key``          {nonce, key_id, key (64 hex)}
  keyd -> enclave K   ``model_key_refused``  {nonce, reason}

The evidence's REPORTDATA binds (attest.binding) K, the job id, the enclave's fresh random
key-request nonce (in place of a client nonce) and the SHA-256 of the *encrypted* model file.
The key travels inside the NIP-17 DM only: its seal is NIP-44 v2 under the conversation key of
(keyd, K) and its gift wrap NIP-44 v2 to K, so only K can read it; a third NIP-44 layer would
use that very conversation key again and add nothing.

Checks, cheapest first (:func:`precheck`, then :func:`evidence_refusal`): the DM's sender is K;
the job request is a validly signed NIP-90 request (kind 5000-5999) whose id is ``job``, that
``p``-tags ``dvm``, and is at most ``max_request_age_s`` old; ``dvm`` is an allowed operator
within its quotas (``max_jobs`` in all, ``max_jobs_per_day`` in any rolling 24 h); the key id is
one keyd holds and the file digest is allowed for it; the key for ``job`` was not released to
another enclave before (a repeat of the same request gets the same answer, uncounted); then
the evidence verifies and satisfies the owner's attestation policy (attest.policy), and
REPORTDATA binds the request. Every decision is appended (without the key) to the release log,
a JSON-lines file, before the answer is sent: quotas are counted from it, across restarts.

:class:`KeyDaemon` is the thin asyncio shell over dvm.pool; everything else here is sans-I/O.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from attest.binding import check_report_data
from attest.collateral import collateral_from_json
from attest.errors import AttestError
from attest.evidence import Evidence
from attest.policy import Policy
from attest.verify import verify_evidence_online
from dvm.config import ConfigError, RelaysConfig
from dvm.errors import CdvmError
from dvm.keys import PrivateKey, PublicKey
from dvm.nip01 import Event
from dvm.nip17 import build_dm, dm_relay_list, open_dm
from dvm.nip59 import GIFT_WRAP_KIND
from dvm.nip90 import REQUEST_KINDS
from dvm.nostr_errors import InvalidKey, NostrError
from dvm.paths import state_dir
from dvm.pool import PublishFailed, RelayPool
from dvm.relay import GIFT_WRAP_RESUME_MARGIN, RelayError
from dvm.wire import Filter
from jobs.cmodel import ModelCryptoError, ModelKey
from jobs.messages import PROTOCOL_VERSION, ProtocolError, parse_message

log = logging.getLogger(__name__)

REQUEST_TYPE = "model_key_request"
KEY_TYPE = "model_key"
REFUSED_TYPE = "model_key_refused"
DAY_S = 86400
STALE_MARGIN_S = 120
_HEX = "0123456789abcdef"


class KeydError(CdvmError):
    """The key daemon cannot run as configured (bad config, unreadable key or log)."""


class ModelKeyRefused(CdvmError):
    """The model owner's key daemon refused to release the key; the message is its reason."""


def _hex(value: object, name: str, length: int = 32) -> str:
    if not isinstance(value, str) or len(value) != 2 * length or any(c not in _HEX for c in value):
        raise ProtocolError(f"{name} must be {2 * length} lowercase hex characters")
    return value


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class KeyRequest:
    """What an enclave sends to ask for a model key."""

    job: str
    nonce: str
    pubkey: str
    dvm: str
    request: dict[str, Any]
    file_sha256: str
    key_id: str
    model_name: str
    evidence: dict[str, Any]
    collateral: dict[str, Any] | None = None

    def to_content(self) -> str:
        return _dump({
            "cdvm": PROTOCOL_VERSION, "type": REQUEST_TYPE, "job": self.job, "nonce": self.nonce,
            "pubkey": self.pubkey, "dvm": self.dvm, "request": self.request,
            "model": {"file_sha256": self.file_sha256, "key_id": self.key_id, "name": self.model_name},
            "evidence": self.evidence, "collateral": self.collateral,
        })

    @classmethod
    def from_message(cls, obj: dict[str, Any]) -> KeyRequest:
        """From a parsed message (jobs.messages.parse_message) of type ``model_key_request``."""
        if obj.get("type") != REQUEST_TYPE:
            raise ProtocolError(f"expected a {REQUEST_TYPE} message")
        model = obj.get("model")
        if not isinstance(model, dict):
            raise ProtocolError("model must be an object")
        for name in ("request", "evidence"):
            if not isinstance(obj.get(name), dict):
                raise ProtocolError(f"{name} must be an object")
        collateral = obj.get("collateral")
        if collateral is not None and not isinstance(collateral, dict):
            raise ProtocolError("collateral must be an object or null")
        name = model.get("name")
        if not isinstance(name, str) or len(name) > 128:
            raise ProtocolError("model.name must be a string of at most 128 characters")
        return cls(
            job=_hex(obj.get("job"), "job"), nonce=_hex(obj.get("nonce"), "nonce"),
            pubkey=_hex(obj.get("pubkey"), "pubkey"), dvm=_hex(obj.get("dvm"), "dvm"), request=obj["request"],
            file_sha256=_hex(model.get("file_sha256"), "model.file_sha256"),
            key_id=_hex(model.get("key_id"), "model.key_id", 16), model_name=name,
            evidence=obj["evidence"], collateral=collateral,
        )


def key_answer(job: str, nonce: str, key: ModelKey) -> str:
    return _dump({"cdvm": PROTOCOL_VERSION, "type": KEY_TYPE, "job": job, "nonce": nonce,
                  "key_id": key.key_id, "key": key.hex()})


def key_refusal(job: str, nonce: str, reason: str) -> str:
    return _dump({"cdvm": PROTOCOL_VERSION, "type": REFUSED_TYPE, "job": job, "nonce": nonce, "reason": reason})


def parse_key_answer(content: str, job: str, nonce: str, key_id: str) -> ModelKey | None:
    """The key from keyd's answer to request ``nonce``; raises :class:`ModelKeyRefused` with its reason.

    None when the message is not an answer to this request (ignore it and keep waiting).
    """
    try:
        obj = parse_message(content, job)
    except ProtocolError:
        return None
    if obj.get("nonce") != nonce:
        return None
    if obj["type"] == REFUSED_TYPE:
        reason = obj.get("reason")
        raise ModelKeyRefused(f"the model owner refused the model key: {reason if isinstance(reason, str) else 'no reason given'}")
    if obj["type"] != KEY_TYPE:
        return None
    try:
        key = ModelKey.from_hex(str(obj.get("key")))
    except ModelCryptoError:
        raise ModelKeyRefused("the model owner's answer holds a malformed key") from None
    if key.key_id != key_id:
        raise ModelKeyRefused(f"the model owner sent key {key.key_id}, but the model needs key {key_id}")
    return key


# ---- the owner's configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorRule:
    """One allowed DVM operator (its DVM pubkey) and its job quotas (None: unlimited)."""

    pubkey: str
    max_jobs: int | None = None
    max_jobs_per_day: int | None = None


@dataclass(frozen=True)
class ModelEntry:
    """A key keyd may release, and the encrypted files it may be released for (empty: any)."""

    key: ModelKey
    file_sha256: frozenset[str] = frozenset()


@dataclass(frozen=True)
class KeydConfig:
    """``keyd.toml``: policy, models (keys), operators and quotas, release log."""

    policy: Policy
    models: dict[str, ModelEntry]
    operators: dict[str, OperatorRule]
    release_log: Path
    max_request_age_s: int = 3600

    @classmethod
    def from_toml(cls, path: Path) -> KeydConfig:
        """Load a keyd config; relative paths are relative to the file's directory."""
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise KeydError(f"cannot read keyd config {path}: {error}") from None
        unknown = set(document) - {"policy", "release_log", "max_request_age_s", "model", "operator"}
        if unknown:
            raise KeydError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
        base = path.parent

        def resolve(value: object, name: str) -> Path:
            if not isinstance(value, str) or not value:
                raise KeydError(f"{path}: {name} must be a path string")
            return (base / Path(value).expanduser()).resolve()

        policy = Policy.from_toml(resolve(document["policy"], "policy")) if "policy" in document else Policy.default()
        models: dict[str, ModelEntry] = {}
        for index, table in enumerate(document.get("model", [])):
            if not isinstance(table, dict) or set(table) - {"key_file", "file_sha256"} or "key_file" not in table:
                raise KeydError(f"{path}: [[model]] #{index + 1} takes key_file and optional file_sha256 only")
            key = ModelKey.from_file(resolve(table["key_file"], "model.key_file"))
            digests = table.get("file_sha256", [])
            if not isinstance(digests, list) or not all(isinstance(d, str) and len(d) == 64 for d in digests):
                raise KeydError(f"{path}: [[model]] #{index + 1}: file_sha256 must be a list of 64-hex digests")
            models[key.key_id] = ModelEntry(key, frozenset(d.lower() for d in digests))
        if not models:
            raise KeydError(f"{path}: no [[model]] with a key_file: keyd would have nothing to release")
        operators: dict[str, OperatorRule] = {}
        for index, table in enumerate(document.get("operator", [])):
            if not isinstance(table, dict) or set(table) - {"pubkey", "max_jobs", "max_jobs_per_day"} or "pubkey" not in table:
                raise KeydError(f"{path}: [[operator]] #{index + 1} takes pubkey, max_jobs, max_jobs_per_day")
            try:
                pubkey = PublicKey.from_npub_or_hex(str(table["pubkey"])).hex()
            except (InvalidKey, NostrError) as error:
                raise KeydError(f"{path}: [[operator]] #{index + 1}: {error}") from None
            limits = [table.get("max_jobs"), table.get("max_jobs_per_day")]
            if any(v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0) for v in limits):
                raise KeydError(f"{path}: [[operator]] #{index + 1}: quotas must be integers >= 0")
            operators[pubkey] = OperatorRule(pubkey, *limits)
        age = document.get("max_request_age_s", 3600)
        if isinstance(age, bool) or not isinstance(age, int) or age < 1:
            raise KeydError(f"{path}: max_request_age_s must be a positive integer")
        log_path = resolve(document["release_log"], "release_log") if "release_log" in document else state_dir() / "keyd-releases.jsonl"
        return cls(policy, models, operators, log_path, age)


# ---- the release log ----------------------------------------------------------------------------


@dataclass
class ReleaseLog:
    """Append-only JSON-lines log of every decision; counts releases per operator."""

    path: Path
    released: dict[str, dict[str, Any]] = field(default_factory=dict)
    times: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> ReleaseLog:
        book = cls(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        except (OSError, UnicodeDecodeError) as error:
            raise KeydError(f"cannot read the release log {path}: {error}") from None
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise KeydError(f"release log {path} line {number} is not JSON; repair it before starting keyd") from None
            if isinstance(record, dict) and record.get("outcome") == "released":
                book._count(record)
        return book

    def _count(self, record: dict[str, Any]) -> None:
        self.released[str(record.get("job"))] = record
        self.times.setdefault(str(record.get("operator")), []).append(int(record.get("ts", 0)))

    def count(self, operator: str, since: int | None = None) -> int:
        """Keys released for jobs of ``operator`` (since unix time ``since``)."""
        times = self.times.get(operator, [])
        return len(times) if since is None else sum(1 for t in times if t >= since)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record and fsync it; a release is counted from now on."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            raise KeydError(f"cannot append to the release log {self.path}: {error.strerror}") from None
        if record.get("outcome") == "released":
            self._count(record)


# ---- decisions (sans-I/O) -----------------------------------------------------------------------


def _verified_request(request: KeyRequest) -> Event | str:
    try:
        event = Event.from_dict(request.request)
        event.verify()
    except NostrError as error:
        return f"the job request is not a validly signed event ({error})"
    return event


def precheck(config: KeydConfig, log_book: ReleaseLog, request: KeyRequest, sender: str, now: int) -> str | None:
    """The first reason (cheap checks, before the evidence) to refuse ``request``, or None."""
    if sender != request.pubkey:
        return "the key request was not sent by the key it names"
    event = _verified_request(request)
    if isinstance(event, str):
        return event
    if event.id != request.job or event.kind not in REQUEST_KINDS:
        return "the job request does not match the job id (or is not a NIP-90 job request)"
    if request.dvm not in event.tag_values("p"):
        return f"the customer's job request does not address DVM {request.dvm}"
    if now - event.created_at > config.max_request_age_s:
        return f"the job request is older than {config.max_request_age_s} s"
    rule = config.operators.get(request.dvm)
    if rule is None:
        return f"DVM operator {request.dvm} is not allowed by the model owner"
    entry = config.models.get(request.key_id)
    if entry is None:
        return f"the model owner holds no key {request.key_id}"
    if entry.file_sha256 and request.file_sha256 not in entry.file_sha256:
        return f"the encrypted model file {request.file_sha256} is not one the owner releases keys for"
    earlier = log_book.released.get(request.job)
    if earlier is not None and (earlier.get("enclave"), earlier.get("nonce")) != (request.pubkey, request.nonce):
        return "the key for this job was already released to another enclave"
    if earlier is None:
        if rule.max_jobs is not None and log_book.count(rule.pubkey) >= rule.max_jobs:
            return f"quota exhausted: operator {rule.pubkey} has used all {rule.max_jobs} jobs"
        if rule.max_jobs_per_day is not None and log_book.count(rule.pubkey, now - DAY_S) >= rule.max_jobs_per_day:
            return f"quota exhausted: operator {rule.pubkey} has used its {rule.max_jobs_per_day} jobs of the last 24 h"
    return None


async def verify_request_evidence(config: KeydConfig, request: KeyRequest, now: datetime) -> tuple[str | None, str]:
    """(refusal reason or None, tee) after verifying the evidence against the owner's policy and the binding."""
    try:
        evidence = Evidence.from_json(json.dumps(request.evidence))
        collateral = collateral_from_json(json.dumps(request.collateral)) if request.collateral is not None else None
        verdict = await verify_evidence_online(evidence, collateral=collateral, now=now, policy=config.policy,
                                               allow_simulated=config.policy.allow_simulated)
        reasons = verdict.reasons()
        if not reasons:
            check_report_data(bytes.fromhex(verdict.report_data), request.pubkey, request.job, request.nonce,
                              request.file_sha256)
    except AttestError as error:
        return f"attestation: {error}", "unknown"
    if reasons:
        return "attestation rejected: " + "; ".join(reasons), verdict.tee
    return None, verdict.tee


def release_record(request: KeyRequest, customer: str, tee: str, reason: str | None, now: int) -> dict[str, Any]:
    """One release-log line (never the key)."""
    return {
        "ts": now, "time": datetime.fromtimestamp(now, timezone.utc).isoformat(),
        "outcome": "refused" if reason else "released", "reason": reason, "job": request.job,
        "operator": request.dvm, "customer": customer, "enclave": request.pubkey, "nonce": request.nonce,
        "tee": tee, "file_sha256": request.file_sha256, "key_id": request.key_id, "model": request.model_name,
    }


# ---- the asyncio shell --------------------------------------------------------------------------


class KeyDaemon:
    """Listens for key requests DMed to ``identity`` and answers each one."""

    def __init__(self, identity: PrivateKey, relays: RelaysConfig, config: KeydConfig,
                 on_ready: Callable[[str], None] | None = None) -> None:
        self.identity = identity
        self.config = config
        self.pool = RelayPool.from_config(relays, private_key=identity)
        self.log = ReleaseLog.open(config.release_log)
        self.on_ready = on_ready
        self.started_at = int(time.time())
        self._decide = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        await self.pool.start(wait=10)
        try:
            try:
                await self.pool.publish(dm_relay_list(self.identity, self.pool.write_urls))
            except (PublishFailed, RelayError, NostrError) as error:
                log.warning("DM relay list (kind 10050) not published: %s", error)
            inbox = await self.pool.subscribe(
                [Filter(kinds=(GIFT_WRAP_KIND,), tags={"p": [self.identity.public_key.hex()]},
                        since=self.started_at - GIFT_WRAP_RESUME_MARGIN)],
                resume_margin=GIFT_WRAP_RESUME_MARGIN,
            )
            line = (f"keyd ready {self.identity.public_key.npub()} models={','.join(self.config.models)} "
                    f"operators={len(self.config.operators)} relays={','.join(self.pool.read_urls)}")
            log.warning("%s", line)
            if self.on_ready:
                self.on_ready(line)
            reader = asyncio.create_task(self._read(inbox))
            await stop.wait()
            reader.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=10)
            await inbox.close()
        finally:
            await self.pool.close()

    async def _read(self, inbox: Any) -> None:
        async for wrap in inbox:
            task = asyncio.create_task(self._handle(wrap))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, wrap: Event) -> None:
        try:
            dm = open_dm(self.identity, wrap)
        except NostrError:
            return
        if dm.created_at < self.started_at - STALE_MARGIN_S:
            return
        try:
            obj = json.loads(dm.content)
            job = obj.get("job") if isinstance(obj, dict) else None
            request = KeyRequest.from_message(parse_message(dm.content, str(job)))
        except (ValueError, ProtocolError) as error:
            log.info("DM from %s is not a key request: %s", dm.sender.hex()[:16], error)
            return
        reason, tee = precheck(self.config, self.log, request, dm.sender.hex(), int(time.time())), "unknown"
        if reason is None:
            reason, tee = await verify_request_evidence(self.config, request, datetime.now(timezone.utc))
        customer = str(request.request.get("pubkey", ""))
        async with self._decide:
            now = int(time.time())
            if reason is None:
                reason = precheck(self.config, self.log, request, dm.sender.hex(), now)
            repeat = reason is None and request.job in self.log.released
            if not repeat:
                self.log.append(release_record(request, customer, tee, reason, now))
        if reason is None:
            log.warning("released key %s for job %s to enclave %s (operator %s)%s", request.key_id, request.job[:16],
                        request.pubkey[:16], request.dvm[:16], " again (repeated request)" if repeat else "")
            content = key_answer(request.job, request.nonce, self.config.models[request.key_id].key)
        else:
            log.warning("refused job %s (operator %s): %s", request.job[:16], request.dvm[:16], reason)
            content = key_refusal(request.job, request.nonce, reason)
        for gift in build_dm(self.identity, dm.sender, content, include_sender_copy=False):
            try:
                await self.pool.publish(gift)
            except (PublishFailed, RelayError) as error:
                log.warning("answer for job %s not published: %s", request.job[:16], error)


def operator_counts(log_path: Path, now: int | None = None) -> dict[str, dict[str, int]]:
    """Per operator: keys released in all and in the last 24 h (``cdvm keyd stats``)."""
    book = ReleaseLog.open(log_path)
    now = int(time.time()) if now is None else now
    return {op: {"jobs": book.count(op), "jobs_last_24h": book.count(op, now - DAY_S)} for op in sorted(book.times)}


def check_config_file(path: Path) -> KeydConfig:
    """Load a keyd config, turning policy and key-file errors into :class:`KeydError`."""
    try:
        return KeydConfig.from_toml(path)
    except (ConfigError, ModelCryptoError, AttestError) as error:
        raise KeydError(f"{path}: {error}") from None
