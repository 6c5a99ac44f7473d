"""The confidential job end to end: a real `cdvm worker` process, a real relay, real sandboxes
(bubblewrap), the simulated TEE, real llama.cpp on the embedded model, and the real client."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from pathlib import Path

import pytest

from attest.policy import Policy
from dvm import nip04, nip44
from dvm.client import AskError, AskOptions, AttestationRejected, ConfidentialJob
from dvm.config import relays_from_urls
from dvm.keys import PrivateKey, PublicKey
from dvm.localrelay import LocalRelay
from dvm.nip90 import JobInput, build_job_request, encrypted_params_plaintext
from dvm.pool import RelayPool
from dvm.wire import Filter
from workerproc import WorkerProcess

pytestmark = pytest.mark.slow

DISTRACTORS = [
    "The cafeteria opens at 7:30 and closes after lunch at 14:00 on weekdays.",
    "Parking permits are renewed every January at the facilities office on the ground floor.",
    "The library lends laptops for up to three days; late returns are reported to the team lead.",
    "Fire drills happen twice a year; the assembly point is the north car park.",
    "The gym on level minus one is open to staff from six in the morning until ten at night.",
    "Travel expenses must be filed within thirty days with receipts attached.",
    "The print room on the third floor has two color printers and one large-format plotter.",
    "New starters receive their badge and laptop from the front desk on the first morning.",
    "The rooftop garden is closed during storms and whenever the wind exceeds fifty kilometres per hour.",
    "Meeting rooms can be booked for at most four hours at a time through the intranet calendar.",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """One relay and one sim worker (warm pool of one) shared by this module's jobs."""
    base = tmp_path_factory.mktemp("e2e")
    with LocalRelay(base / "relay") as relay:
        worker = WorkerProcess([relay.url], base / "worker-state", tee="sim")
        worker.start()
        try:
            yield relay, worker
        finally:
            worker.stop()


def _ask(relay: LocalRelay, worker: WorkerProcess, customer: PrivateKey, prompt: str,
         documents: list[tuple[str, bytes]], **options: object) -> object:
    job = ConfidentialJob(
        customer,
        PublicKey.from_hex(worker.pubkey),
        relays_from_urls([relay.url]),
        AskOptions(allow_simulated=True, timeout=240, params={"max_tokens": "24"}, **options),  # type: ignore[arg-type]
    )
    return asyncio.run(job.run(prompt, documents))


def test_answer_comes_from_the_private_document(stack) -> None:
    relay, worker = stack
    code = f"{secrets.randbelow(9000) + 1000}-{secrets.token_hex(2).upper()}"
    fact = f"The access code for the Zorblat vault is {code}. It is changed every spring."
    documents = [(f"note-{i}.txt", text.encode()) for i, text in enumerate(DISTRACTORS)]
    documents.insert(4, ("vault.txt", fact.encode()))
    result = _ask(relay, worker, PrivateKey.generate(), "What is the access code for the Zorblat vault?", documents)
    assert code in result.answer
    assert result.verdict.simulated and not result.verdict.confidential
    assert result.usage["completion_tokens"] > 0
    assert set(result.timings_ms) >= {"posted", "attestation_received", "attestation_verified", "documents_sent", "result_received"}


def test_secrets_never_leave_the_sandbox_in_clear(stack) -> None:
    """Canaries in the prompt, a document and the answer appear nowhere outside the two endpoints."""
    relay, worker = stack
    answer_canary = f"CANARYANSWER{secrets.token_hex(6)}"
    prompt_canary = f"canaryprompt{secrets.token_hex(6)}"
    doc_canary = f"CanaryDocument{secrets.token_hex(6)}"
    document = (f"The password of the {prompt_canary} account is {answer_canary}.\n\n"
                f"Unrelated remark: {doc_canary} is the name of the office plant.")
    since = time.time()
    result = _ask(relay, worker, PrivateKey.generate(), f"What is the password of the {prompt_canary} account?",
                  [("secret.txt", document.encode())])
    assert answer_canary in result.answer or doc_canary in result.answer, "the answer must carry a random string"
    canaries = [c.encode() for c in (answer_canary, prompt_canary, doc_canary, result.answer.strip())]
    places = [relay.db_path, *relay.db_path.parent.glob("relay.sqlite3*"), relay.log_path, worker.log_path,
              *[p for p in worker.state_dir.rglob("*") if p.is_file()]]
    temp_root = Path(os.environ.get("TMPDIR", "/tmp"))
    places += [p for p in temp_root.rglob("*") if _recent_file(p, since)]
    for place in places:
        try:
            data = place.read_bytes()
        except OSError:
            continue
        for canary in canaries:
            assert canary not in data, f"{canary!r} leaked into {place}"


def _recent_file(path: Path, since: float) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since and path.stat().st_size < 64 << 20
    except OSError:
        return False


def test_sandbox_is_gone_after_the_job(stack) -> None:
    relay, worker = stack
    _ask(relay, worker, PrivateKey.generate(), "What is the color of the sky?", [("sky.txt", b"The sky is blue.")])
    time.sleep(1)
    sandboxes = worker.state_dir / "sandboxes"
    running = [d for d in sandboxes.iterdir() if d.is_dir() and not d.name.startswith(".")] if sandboxes.exists() else []
    assert len(running) <= 1, "only the next warm sandbox may exist after a job"


def test_wrong_policy_sends_nothing_private(stack) -> None:
    relay, worker = stack
    policy = Policy.from_toml('allow_simulated = true\n[tdx]\nmr_td = ["' + "00" * 48 + '"]\n')
    customer = PrivateKey.generate()
    with pytest.raises(AttestationRejected) as rejected:
        _ask(relay, worker, customer, "secret question", [("doc.txt", b"secret document")], policy=policy)
    assert any("MRTD" in reason for reason in rejected.value.reasons)
    assert _events_from(relay, customer.public_key.hex(), kinds=(1059,)) == []
    assert _events_from(relay, customer.public_key.hex(), kinds=(5,)), "the client cancels the job"


def test_unexpected_model_is_refused(stack) -> None:
    relay, worker = stack
    customer = PrivateKey.generate()
    with pytest.raises(AttestationRejected) as rejected:
        _ask(relay, worker, customer, "q", [("d.txt", b"d")], expected_models=("ab" * 32,))
    assert any("model" in reason for reason in rejected.value.reasons)
    assert _events_from(relay, customer.public_key.hex(), kinds=(1059,)) == []


def test_simulated_evidence_is_refused_unless_allowed(stack) -> None:
    relay, worker = stack
    job = ConfidentialJob(PrivateKey.generate(), PublicKey.from_hex(worker.pubkey), relays_from_urls([relay.url]),
                          AskOptions(allow_simulated=False, timeout=120))
    with pytest.raises(AttestationRejected) as rejected:
        asyncio.run(job.run("q", [("d.txt", b"d")]))
    assert any("simulated" in reason for reason in rejected.value.reasons)


def _events_from(relay: LocalRelay, author: str, kinds: tuple[int, ...]) -> list[dict]:
    async def query() -> list[dict]:
        pool = RelayPool.from_config(relays_from_urls([relay.url]))
        await pool.start(wait=5)
        try:
            events = await pool.query([Filter(kinds=kinds, authors=(author,))], timeout=5)
        finally:
            await pool.close()
        return [e.to_dict() for e in events]
    return asyncio.run(query())


async def _plain_job(relay: LocalRelay, worker: WorkerProcess, *, encryption: str | None) -> tuple[str, PrivateKey, dict]:
    customer = PrivateKey.generate()
    dvm = PublicKey.from_hex(worker.pubkey)
    inputs = [JobInput("Complete the sentence: The capital of France is", "text")]
    params = [("max_tokens", "8")]
    if encryption is None:
        request = build_job_request(customer, 5050, inputs=inputs, params=params, targets=[dvm.hex()])
    else:
        plaintext = encrypted_params_plaintext(inputs, params)
        sealed = (nip04.encrypt(customer, dvm, plaintext) if encryption == "nip04"
                  else nip44.encrypt(plaintext, nip44.conversation_key(customer, dvm)))
        request = build_job_request(customer, 5050, targets=[dvm.hex()], encrypted_content=sealed)
    pool = RelayPool.from_config(relays_from_urls([relay.url]))
    await pool.start(wait=5)
    try:
        results = await pool.subscribe([Filter(kinds=(6050,), tags={"e": [request.id]})])
        await pool.publish(request)
        result = await results.get(timeout=180)
    finally:
        await pool.close()
    return request.id, customer, result.to_dict()


@pytest.mark.parametrize("encryption", [None, "nip04", "nip44"])
def test_plain_nip90_request_gets_a_result(stack, encryption: str | None) -> None:
    relay, worker = stack
    request_id, customer, result = asyncio.run(_plain_job(relay, worker, encryption=encryption))
    assert ["e", request_id] in result["tags"] and ["p", customer.public_key.hex()] in result["tags"]
    author = PublicKey.from_hex(result["pubkey"])
    assert author.hex() != worker.pubkey, "results are signed by the job's one-time key"
    if encryption is None:
        answer = result["content"]
        assert any(tag[0] == "request" for tag in result["tags"])
    else:
        assert ["encrypted"] in result["tags"]
        assert not any(tag[0] in ("request", "i") for tag in result["tags"]), "no plaintext input in the result"
        answer = (nip04.decrypt(customer, author, result["content"]) if encryption == "nip04"
                  else nip44.decrypt(result["content"], nip44.conversation_key(customer, author)))
    assert answer.strip()


def test_error_feedback_for_a_garbled_encrypted_request(stack) -> None:
    relay, worker = stack

    async def run() -> dict:
        customer = PrivateKey.generate()
        request = build_job_request(customer, 5050, targets=[worker.pubkey], encrypted_content="bm90IGEgY2lwaGVydGV4dA==?iv=AAAAAAAAAAAAAAAAAAAAAA==")
        pool = RelayPool.from_config(relays_from_urls([relay.url]))
        await pool.start(wait=5)
        try:
            feedback = await pool.subscribe([Filter(kinds=(7000,), tags={"e": [request.id]})])
            await pool.publish(request)
            return (await feedback.get(timeout=30)).to_dict()
        finally:
            await pool.close()

    feedback = asyncio.run(run())
    status = next(tag for tag in feedback["tags"] if tag[0] == "status")
    assert status[1] == "error" and "encrypted" in status[2]


def test_ask_json_cli(stack) -> None:
    import subprocess
    import sys

    relay, worker = stack
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    doc = Path(os.environ["CDVM_STATE_DIR"]).parent / "cli-doc.txt"
    doc.write_text("The badge number of Doctor Okafor is 7731. Badges are renewed every year.")
    out = subprocess.run(
        [sys.executable, "-m", "dvm.cli", "ask", "--dvm", PublicKey.from_hex(worker.pubkey).npub(), "--relay", relay.url,
         "--doc", str(doc), "--allow-simulated", "--param", "max_tokens=16", "--json", "What is the badge number of Doctor Okafor?"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {"answer", "verdict", "usage", "timings"} <= set(result)
    assert result["verdict"]["tee"] == "sim" and result["verdict"]["confidential"] is False
    assert "7731" in result["answer"]
    assert "attestation verified" in out.stderr


def test_ask_reports_an_unreachable_dvm_clearly(tmp_path: Path) -> None:
    with LocalRelay(tmp_path / "relay") as relay:
        job = ConfidentialJob(PrivateKey.generate(), PrivateKey.generate().public_key, relays_from_urls([relay.url]),
                              AskOptions(allow_simulated=True, timeout=3))
        with pytest.raises(AskError, match="no answer within 3 s"):
            asyncio.run(job.run("q", []))


def test_worker_supplies_evidence_to_process_sandboxes(tmp_path: Path) -> None:
    """``--tee host``: the sandbox asks the worker (same confidential VM) for evidence over the
    channel; the customer still verifies a quote binding the sandbox's own one-time key."""
    from workerproc import worker_toml

    with LocalRelay(tmp_path / "relay") as relay:
        config = worker_toml(worker={"tee": "sim", "warm_pool": 1}, sandbox={"tee": "host"})
        worker = WorkerProcess([relay.url], tmp_path / "state", tee=None, config_toml=config)
        worker.start()
        try:
            result = _ask(relay, worker, PrivateKey.generate(), "What is the badge number of Doctor Okafor?",
                          [("badge.txt", b"The badge number of Doctor Okafor is 7731.")])
        finally:
            worker.stop()
    assert "7731" in result.answer
    assert result.verdict.tee == "sim" and result.verdict.verified
    assert result.verdict.report_data[:64] == result.enclave


def test_private_failure_details_go_only_to_the_customer(stack) -> None:
    relay, worker = stack
    secret_value = f"SECRETPARAM{secrets.token_hex(4)}"
    customer = PrivateKey.generate()
    job = ConfidentialJob(customer, PublicKey.from_hex(worker.pubkey), relays_from_urls([relay.url]),
                          AskOptions(allow_simulated=True, timeout=120, params={"temperature": secret_value}))
    with pytest.raises(AskError) as failed:
        asyncio.run(job.run("q", [("d.txt", b"some document")]))
    assert "temperature" in str(failed.value)
    time.sleep(1)
    public = _events_from(relay, worker.pubkey, kinds=(7000,))
    errors = [tag for event in public for tag in event["tags"] if tag[:2] == ["status", "error"]]
    assert any("invalid generation parameters" in tag[2] for tag in errors)
    assert not any(secret_value in json.dumps(event) for event in public)
