"""The model key daemon: message formats, config, release log, every refusal rule, real simulated
evidence against the owner's policy, and the daemon answering over a real relay."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from attest import sim
from attest.binding import build_report_data
from attest.collateral import collateral_to_json
from attest.policy import Policy
from attest.providers import get_evidence
from dvm.config import relays_from_urls
from dvm.keyd import (
    KeydConfig,
    KeyDaemon,
    KeydError,
    KeyRequest,
    ModelEntry,
    ModelKeyRefused,
    OperatorRule,
    ReleaseLog,
    check_config_file,
    key_answer,
    key_refusal,
    operator_counts,
    parse_key_answer,
    precheck,
    release_record,
    verify_request_evidence,
)
from dvm.keys import PrivateKey
from dvm.nip17 import build_dm, open_dm
from dvm.nip90 import build_job_request
from dvm.pool import RelayPool
from dvm.wire import Filter
from jobs.cmodel import ModelKey
from jobs.messages import ProtocolError, parse_message

FILE_SHA = "ab" * 32
SIM_POLICY = Policy.from_toml("allow_simulated = true\n")


def make_request(dvm: PrivateKey, enclave: PrivateKey, key: ModelKey, *, file_sha256: str = FILE_SHA,
                 evidence_file: str | None = None, nonce: str | None = None, created_at: int | None = None,
                 targets: list[str] | None = None) -> KeyRequest:
    """A key request as the runner builds it, with real simulated evidence."""
    customer = PrivateKey.generate()
    event = build_job_request(customer, 5050, targets=targets if targets is not None else [dvm.public_key.hex()],
                              extra_tags=[["cdvm", "1", secrets.token_hex(32)]], created_at=created_at)
    nonce = nonce or secrets.token_hex(32)
    report = build_report_data(enclave.public_key.raw, event.id, nonce, evidence_file or file_sha256)
    evidence = get_evidence(report, "sim", allow_sim=True)
    return KeyRequest(job=event.id, nonce=nonce, pubkey=enclave.public_key.hex(), dvm=dvm.public_key.hex(),
                      request=event.to_dict(), file_sha256=file_sha256, key_id=key.key_id, model_name="m",
                      evidence=json.loads(evidence.to_json()),
                      collateral=json.loads(collateral_to_json(sim.sim_collateral())))


def make_config(tmp_path: Path, key: ModelKey, dvm: PrivateKey, *, policy: Policy = SIM_POLICY,
                max_jobs: int | None = None, per_day: int | None = None, files: frozenset[str] = frozenset()) -> KeydConfig:
    return KeydConfig(policy, {key.key_id: ModelEntry(key, files)},
                      {dvm.public_key.hex(): OperatorRule(dvm.public_key.hex(), max_jobs, per_day)},
                      tmp_path / "releases.jsonl")


@pytest.fixture
def parties() -> tuple[PrivateKey, PrivateKey, ModelKey]:
    return PrivateKey.generate(), PrivateKey.generate(), ModelKey.generate()


def test_request_round_trip_and_malformed(parties) -> None:
    dvm, enclave, key = parties
    request = make_request(dvm, enclave, key)
    assert KeyRequest.from_message(parse_message(request.to_content(), request.job)) == request
    obj = json.loads(request.to_content())
    for field, value in (("nonce", "xyz"), ("model", []), ("evidence", None), ("collateral", 3), ("dvm", 5)):
        broken = {**obj, field: value}
        with pytest.raises(ProtocolError):
            KeyRequest.from_message(broken)
    with pytest.raises(ProtocolError):
        KeyRequest.from_message({**obj, "type": "attestation"})


def test_answers_and_refusals_parse(parties) -> None:
    _, _, key = parties
    job, nonce = "11" * 32, "22" * 32
    assert parse_key_answer(key_answer(job, nonce, key), job, nonce, key.key_id) == key
    assert parse_key_answer(key_answer(job, "33" * 32, key), job, nonce, key.key_id) is None, "another request's answer"
    assert parse_key_answer("not json", job, nonce, key.key_id) is None
    with pytest.raises(ModelKeyRefused, match="refused the model key: quota exhausted"):
        parse_key_answer(key_refusal(job, nonce, "quota exhausted"), job, nonce, key.key_id)
    with pytest.raises(ModelKeyRefused, match="needs key"):
        parse_key_answer(key_answer(job, nonce, ModelKey.generate()), job, nonce, key.key_id)
    assert key.hex() not in key_refusal(job, nonce, "no")


def test_precheck_accepts_a_good_request(tmp_path: Path, parties) -> None:
    dvm, enclave, key = parties
    config = make_config(tmp_path, key, dvm)
    request = make_request(dvm, enclave, key)
    assert precheck(config, ReleaseLog(config.release_log), request, enclave.public_key.hex(), int(time.time())) is None


def test_precheck_refusals(tmp_path: Path, parties) -> None:
    dvm, enclave, key = parties
    now = int(time.time())
    config = make_config(tmp_path, key, dvm, files=frozenset({FILE_SHA}))
    book = ReleaseLog(config.release_log)
    me = enclave.public_key.hex()

    def reason(request: KeyRequest, sender: str = me, cfg: KeydConfig = config) -> str | None:
        return precheck(cfg, book, request, sender, now)

    good = make_request(dvm, enclave, key)
    assert "not sent by the key it names" in reason(good, sender=PrivateKey.generate().public_key.hex())
    forged = KeyRequest(**{**good.__dict__, "request": {**good.request, "content": "changed"}})
    assert "validly signed" in reason(forged)
    other = make_request(dvm, enclave, key)
    assert "does not match the job id" in reason(KeyRequest(**{**good.__dict__, "job": other.job}))
    assert "does not address DVM" in reason(make_request(dvm, enclave, key, targets=[]))
    assert "older than" in reason(make_request(dvm, enclave, key, created_at=now - 7200))
    stranger = PrivateKey.generate()
    assert "is not allowed" in reason(make_request(stranger, enclave, key))
    assert "holds no key" in reason(make_request(dvm, enclave, ModelKey.generate()))
    assert "not one the owner releases keys for" in reason(make_request(dvm, enclave, key, file_sha256="cd" * 32))


def test_quotas_and_one_release_per_job(tmp_path: Path, parties) -> None:
    dvm, enclave, key = parties
    now = int(time.time())
    config = make_config(tmp_path, key, dvm, max_jobs=3, per_day=2)
    book = ReleaseLog.open(config.release_log)
    first = make_request(dvm, enclave, key)
    book.append(release_record(first, "c" * 64, "sim", None, now - 2 * 86400))
    second = make_request(dvm, enclave, key)
    assert precheck(config, book, second, enclave.public_key.hex(), now) is None
    book.append(release_record(second, "c" * 64, "sim", None, now - 10))
    assert precheck(config, book, second, enclave.public_key.hex(), now) is None, "a repeated request is answered again"
    thief = PrivateKey.generate()
    stolen = KeyRequest(**{**second.__dict__, "pubkey": thief.public_key.hex()})
    assert "already released to another enclave" in precheck(config, book, stolen, thief.public_key.hex(), now)
    third = make_request(dvm, enclave, key)
    assert precheck(config, book, third, enclave.public_key.hex(), now) is None
    book.append(release_record(third, "c" * 64, "sim", None, now))
    fourth = make_request(dvm, enclave, key)
    assert "all 3 jobs" in precheck(config, book, fourth, enclave.public_key.hex(), now)
    daily = make_config(tmp_path, key, dvm, per_day=2)
    assert "of the last 24 h" in precheck(daily, book, fourth, enclave.public_key.hex(), now)
    refused = release_record(fourth, "c" * 64, "sim", "quota", now)
    book.append(refused)
    reopened = ReleaseLog.open(config.release_log)
    assert reopened.count(dvm.public_key.hex()) == 3 and reopened.count(dvm.public_key.hex(), now - 86400) == 2
    assert operator_counts(config.release_log, now) == {dvm.public_key.hex(): {"jobs": 3, "jobs_last_24h": 2}}
    assert key.hex() not in config.release_log.read_text()


def test_corrupt_release_log_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"outcome": "released"}\nnot json\n')
    with pytest.raises(KeydError, match="line 2 is not JSON"):
        ReleaseLog.open(path)


async def test_simulated_evidence_against_the_policy(tmp_path: Path, parties) -> None:
    dvm, enclave, key = parties
    now = datetime.now(timezone.utc)
    request = make_request(dvm, enclave, key)
    assert await verify_request_evidence(make_config(tmp_path, key, dvm), request, now) == (None, "sim")
    strict = make_config(tmp_path, key, dvm, policy=Policy.default())
    reason, _ = await verify_request_evidence(strict, request, now)
    assert reason is not None and "simulated" in reason
    pinned = make_config(tmp_path, key, dvm, policy=Policy.from_toml('allow_simulated = true\n[tdx]\nmr_td = ["' + "00" * 48 + '"]\n'))
    reason, _ = await verify_request_evidence(pinned, request, now)
    assert reason is not None and "MRTD" in reason
    unbound = make_request(dvm, enclave, key, evidence_file="cd" * 32)
    reason, _ = await verify_request_evidence(make_config(tmp_path, key, dvm), unbound, now)
    assert reason is not None and "REPORTDATA" in reason


def test_config_file(tmp_path: Path) -> None:
    key, dvm = ModelKey.generate(), PrivateKey.generate()
    key.write(tmp_path / "m.key")
    (tmp_path / "policy.toml").write_text("allow_simulated = true\n")
    text = (f'policy = "policy.toml"\nrelease_log = "log.jsonl"\n[[model]]\nkey_file = "m.key"\n'
            f'file_sha256 = ["{FILE_SHA}"]\n[[operator]]\npubkey = "{dvm.public_key.npub()}"\nmax_jobs = 5\n')
    (tmp_path / "keyd.toml").write_text(text)
    config = check_config_file(tmp_path / "keyd.toml")
    assert config.policy.allow_simulated and config.release_log == tmp_path / "log.jsonl"
    assert config.models[key.key_id].file_sha256 == {FILE_SHA}
    assert config.operators[dvm.public_key.hex()].max_jobs == 5
    for bad, message in (("colour = 1\n" + text, "unknown key"), (text.replace("max_jobs = 5", "max_jobs = -1"), "quotas"),
                         ('policy = "policy.toml"\n', "no \\[\\[model\\]\\]"),
                         (text.replace(dvm.public_key.npub(), "npub1nope"), "operator"),
                         (text.replace("m.key", "missing.key"), "cannot read model key file")):
        (tmp_path / "bad.toml").write_text(bad)
        with pytest.raises(KeydError, match=message):
            check_config_file(tmp_path / "bad.toml")


async def test_daemon_answers_over_a_real_relay(tmp_path: Path, relay, parties) -> None:
    dvm, enclave, key = parties
    owner = PrivateKey.generate()
    config = make_config(tmp_path, key, dvm, max_jobs=1)
    relays = relays_from_urls([relay.url])
    stop, ready = asyncio.Event(), asyncio.Event()
    daemon = KeyDaemon(owner, relays, config, on_ready=lambda line: ready.set())
    task = asyncio.create_task(daemon.run(stop))
    pool = RelayPool.from_config(relays, private_key=enclave)
    await pool.start(wait=5)
    try:
        await asyncio.wait_for(ready.wait(), 20)
        inbox = await pool.subscribe([Filter(kinds=(1059,), tags={"p": [enclave.public_key.hex()]})])

        async def ask(request: KeyRequest) -> str:
            for wrap in build_dm(enclave, owner.public_key, request.to_content(), include_sender_copy=False):
                await pool.publish(wrap)
            while True:
                dm = open_dm(enclave, await inbox.get(timeout=20))
                if dm.sender == owner.public_key and json.loads(dm.content)["nonce"] == request.nonce:
                    return dm.content

        granted = make_request(dvm, enclave, key)
        assert parse_key_answer(await ask(granted), granted.job, granted.nonce, key.key_id) == key
        again = await ask(granted)
        assert parse_key_answer(again, granted.job, granted.nonce, key.key_id) == key, "repeats are answered, not counted"
        over = make_request(dvm, enclave, key)
        with pytest.raises(ModelKeyRefused, match="quota exhausted"):
            parse_key_answer(await ask(over), over.job, over.nonce, key.key_id)
        records = [json.loads(line) for line in config.release_log.read_text().splitlines()]
        assert [r["outcome"] for r in records] == ["released", "refused"]
        assert records[0]["operator"] == dvm.public_key.hex() and records[0]["enclave"] == enclave.public_key.hex()
        dm_relays = await pool.query([Filter(kinds=(10050,), authors=(owner.public_key.hex(),))], timeout=5)
        assert dm_relays and ["relay", relay.url] in [list(t) for t in dm_relays[0].tags]
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await pool.close()
