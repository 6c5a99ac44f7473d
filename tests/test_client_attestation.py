"""`cdvm ask` against a lying enclave: tampered evidence, a replayed attestation, a key that is not
the one bound. The enclave here is test code speaking the real protocol over a real relay; the
client is the real one. In every case the client must send nothing private and say why."""
from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from dataclasses import replace

import pytest

from attest import sim
from attest.binding import build_report_data
from attest.collateral import collateral_to_json
from attest.providers import SimProvider
from dvm.client import AskOptions, AttestationRejected, ConfidentialJob
from dvm.config import relays_from_urls
from dvm.keys import PrivateKey, PublicKey
from dvm.localrelay import LocalRelay
from dvm.nip17 import build_dm
from dvm.nip59 import GIFT_WRAP_KIND
from dvm.pool import RelayPool
from dvm.wire import Filter
from jobs.messages import Attestation, Limits

MODEL_SHA256 = "ab" * 32

Lie = Callable[[Attestation, PrivateKey], tuple[Attestation, PrivateKey]]


def _attestation(key: PrivateKey, job: str, nonce: str, bound_job: str | None = None, bound_nonce: str | None = None) -> Attestation:
    report_data = build_report_data(key.public_key.raw, bound_job or job, bound_nonce or nonce, MODEL_SHA256)
    evidence = SimProvider().get_evidence(report_data)
    return Attestation(job=job, nonce=nonce, pubkey=key.public_key.hex(), evidence=json.loads(evidence.to_json()),
                       model_name="m.gguf", model_sha256=MODEL_SHA256, gpu_evidence_sha256=None, limits=Limits(),
                       collateral=json.loads(collateral_to_json(sim.sim_collateral())))


async def _run(relay: LocalRelay, lie: Lie) -> tuple[AttestationRejected, int]:
    """Ask a fake DVM that answers with a lying attestation; return the rejection and how many
    gift wraps reached the enclave's key afterwards."""
    dvm = PrivateKey.generate()
    relays = relays_from_urls([relay.url])
    pool = RelayPool.from_config(relays)
    await pool.start(wait=5)
    requests = await pool.subscribe([Filter(kinds=(5050,), tags={"p": [dvm.public_key.hex()]})])
    enclave_keys: list[PrivateKey] = []

    async def enclave() -> None:
        request = await requests.get(timeout=30)
        nonce = next(tag[2] for tag in request.tags if tag[0] == "cdvm")
        honest_key = PrivateKey.generate()
        attestation, sender = lie(_attestation(honest_key, request.id, nonce), honest_key)
        enclave_keys.append(sender)
        for wrap in build_dm(sender, PublicKey.from_hex(request.pubkey), attestation.to_content(), include_sender_copy=False):
            await pool.publish(wrap)

    fake = asyncio.create_task(enclave())
    job = ConfidentialJob(PrivateKey.generate(), dvm.public_key, relays,
                          AskOptions(allow_simulated=True, timeout=60, expected_models=(MODEL_SHA256,)))
    try:
        with pytest.raises(AttestationRejected) as rejected:
            await job.run("the private question", [("secret.txt", b"the private document")])
        await fake
        await asyncio.sleep(0.5)
        sent = await pool.query([Filter(kinds=(GIFT_WRAP_KIND,), tags={"p": [enclave_keys[0].public_key.hex()]})], timeout=5)
    finally:
        fake.cancel()
        await pool.close()
    return rejected.value, len(sent)


def _tamper_quote(attestation: Attestation, key: PrivateKey) -> tuple[Attestation, PrivateKey]:
    evidence = dict(attestation.evidence)
    raw = bytearray(base64.b64decode(evidence["raw"]))
    raw[200] ^= 0x01  # inside the signed TD report body (MRTD)
    evidence["raw"] = base64.b64encode(bytes(raw)).decode()
    return replace(attestation, evidence=evidence), key


def _replay_other_job(attestation: Attestation, key: PrivateKey) -> tuple[Attestation, PrivateKey]:
    other = _attestation(key, "11" * 32, "22" * 32)
    return replace(other, job=attestation.job, nonce=attestation.nonce), key


def _stale_message(attestation: Attestation, key: PrivateKey) -> tuple[Attestation, PrivateKey]:
    return replace(attestation, nonce="33" * 32), key


def _other_sender(attestation: Attestation, key: PrivateKey) -> tuple[Attestation, PrivateKey]:
    return attestation, PrivateKey.generate()


@pytest.mark.parametrize(
    ("lie", "expected"),
    [
        (_tamper_quote, "signature"),
        (_replay_other_job, "REPORTDATA[32:64]"),
        (_stale_message, "replay"),
        (_other_sender, "different key"),
    ],
    ids=["tampered-quote", "replayed-evidence", "other-nonce", "other-sender"],
)
async def test_lying_enclave_gets_nothing_private(relay: LocalRelay, lie: Lie, expected: str) -> None:
    rejected, wraps_to_enclave = await _run(relay, lie)
    assert any(expected in reason for reason in rejected.reasons), rejected.reasons
    assert wraps_to_enclave == 0
