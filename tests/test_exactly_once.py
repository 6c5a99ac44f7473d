"""Several workers, one DVM identity: a job is taken by exactly one of them.

* In a cluster: racing claimants create the job's Lease through the real Kubernetes client
  against the fake API server (tests/k8sfake.py), which, like etcd, stores a name once
  (409 AlreadyExists) and refuses stale resourceVersions (409 Conflict).
* On one host: two real ``cdvm worker`` processes with the same identity and the same
  ``--state-dir`` (one SQLite journal) serve one relay; every request gets exactly one
  ``processing`` feedback and exactly one result.
"""
from __future__ import annotations

import asyncio
import datetime
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dvm.config import relays_from_urls
from dvm.keys import PrivateKey
from dvm.localrelay import LocalRelay
from dvm.nip90 import JobInput, build_job_request
from dvm.pool import RelayPool
from dvm.wire import Filter
from jobs.coco_lease import ANNOTATION_STATE, JobClaims, claim_manifest, lease_name
from jobs.coco_manifests import CocoSettings
from jobs.sandbox_coco import CocoBackend, KubeClients, connect
from k8sfake import FakeKube
from workerproc import WorkerProcess

IMAGE = "registry.example.org/cdvm/runner@sha256:" + "ab" * 32


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[FakeKube]:
    fake = FakeKube(tmp_path / "kubelet")
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def replicas(kube: FakeKube, tmp_path: Path) -> AsyncIterator[list[tuple[str, KubeClients]]]:
    """Eight independent clients (own HTTP sessions), as eight worker replicas would have."""
    settings = CocoSettings(image=IMAGE, kubeconfig=str(kube.kubeconfig(tmp_path / "kubeconfig.json")))
    clients = [(f"worker-{index}", await connect(settings)) for index in range(8)]
    yield clients
    for _, client in clients:
        await client.close()


async def test_racing_claimants_get_exactly_one_success(kube: FakeKube, replicas: list[tuple[str, KubeClients]]) -> None:
    for _ in range(10):
        job = secrets.token_hex(32)
        claims = [JobClaims(client, "cdvm", holder) for holder, client in replicas]
        won = await asyncio.gather(*(claim.claim(job) for claim in claims))
        assert sum(won) == 1
        lease = kube.leases[("cdvm", lease_name(job))]
        winner = replicas[won.index(True)][0]
        assert lease["spec"]["holderIdentity"] == winner
        assert not any(await asyncio.gather(*(claim.claim(job) for claim in claims))), "a claim is never taken twice"


async def test_updates_are_compare_and_swap(kube: FakeKube, replicas: list[tuple[str, KubeClients]]) -> None:
    (holder, client), (_, other) = replicas[0], replicas[1]
    job = secrets.token_hex(32)
    claims = JobClaims(client, "cdvm", holder)
    assert await claims.claim(job)
    stale = await other.coordination.read_namespaced_lease(lease_name(job), "cdvm")
    await claims.finish(job, "running")
    stale.metadata.annotations = {ANNOTATION_STATE: "stolen"}
    with pytest.raises(Exception) as conflict:
        await other.coordination.replace_namespaced_lease(lease_name(job), "cdvm", stale)
    assert getattr(conflict.value, "status", None) == 409
    writers = [JobClaims(c, "cdvm", holder) for _, c in replicas[:4]]
    await asyncio.gather(*(writer.finish(job, "done") for writer in writers))
    assert kube.leases[("cdvm", lease_name(job))]["metadata"]["annotations"][ANNOTATION_STATE] == "done"
    assert kube.requests.count(("PUT", f"/apis/coordination.k8s.io/v1/namespaces/cdvm/leases/{lease_name(job)}")) >= 5
    with pytest.raises(Exception, match="held by"):
        await JobClaims(other, "cdvm", "worker-x").finish(job, "done")


async def test_old_claims_are_collected_with_a_precondition(kube: FakeKube, replicas: list[tuple[str, KubeClients]]) -> None:
    holder, client = replicas[0]
    old, fresh = secrets.token_hex(32), secrets.token_hex(32)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    await client.coordination.create_namespaced_lease("cdvm", claim_manifest(old, "cdvm", holder, past, 3600))
    claims = JobClaims(client, "cdvm", holder)
    assert await claims.claim(fresh)
    assert await claims.collect(retention_s=86400) == 1
    assert set(kube.leases) == {("cdvm", lease_name(fresh))}


async def test_backend_hands_out_claims(kube: FakeKube, tmp_path: Path) -> None:
    settings = CocoSettings(image=IMAGE, worker_id="replica-1", kubeconfig=str(kube.kubeconfig(tmp_path / "kc.json")),
                            python=sys.executable)
    backend = CocoBackend(settings)
    try:
        claims = await backend.job_claims()
        job = secrets.token_hex(32)
        assert await claims.claim(job) and not await claims.claim(job)
        assert kube.leases[("cdvm", lease_name(job))]["spec"]["holderIdentity"] == "replica-1"
    finally:
        await backend.close()


# ---- two real workers on one host ----------------------------------------------------------------

WORKER_TOML = """
[worker]
warm_pool = 1
announce = false
max_concurrent = 2

[sandbox]
threads = 1
n_ctx = 512
max_tokens_cap = 8
"""


@pytest.mark.slow
def test_two_workers_same_identity_take_each_job_once(tmp_path: Path) -> None:
    identity = PrivateKey.generate()
    state = tmp_path / "shared-state"
    with LocalRelay(tmp_path / "relay") as relay:
        workers = [WorkerProcess([relay.url], state, identity=identity, config_toml=WORKER_TOML)]
        workers.append(WorkerProcess([relay.url], state, identity=identity, config_toml=WORKER_TOML))
        workers[1].log_path = tmp_path / "second-worker.log"
        try:
            for worker in workers:
                worker.start()
            counts = asyncio.run(_run_jobs(relay, identity, jobs=4))
        finally:
            for worker in workers:
                worker.stop()
    for request_id, (processing, results) in counts.items():
        assert processing == 1, f"job {request_id[:12]}: {processing} processing feedbacks"
        assert results == 1, f"job {request_id[:12]}: {results} results"


async def _run_jobs(relay: LocalRelay, identity: PrivateKey, jobs: int) -> dict[str, tuple[int, int]]:
    pool = RelayPool.from_config(relays_from_urls([relay.url]))
    await pool.start(wait=5)
    try:
        requests = [build_job_request(PrivateKey.generate(), 5050, inputs=[JobInput(f"Count to {n}.", "text")],
                                      params=[("max_tokens", "2")], targets=[identity.public_key.hex()])
                    for n in range(jobs)]
        results = await pool.subscribe([Filter(kinds=(6050,), tags={"e": [r.id for r in requests]})])
        for request in requests:
            await pool.publish(request)
        seen: set[str] = set()
        async with asyncio.timeout(180):
            while len(seen) < jobs:
                event = await results.get(timeout=180)
                seen.add(next(tag[1] for tag in event.tags if tag[0] == "e"))
        await asyncio.sleep(3.0)
        ids = [r.id for r in requests]
        feedback = await pool.query([Filter(kinds=(7000,), authors=(identity.public_key.hex(),), tags={"e": ids})], timeout=5)
        produced = await pool.query([Filter(kinds=(6050,), tags={"e": ids})], timeout=5)
    finally:
        await pool.close()

    def count(events: list, request_id: str, status: str | None) -> int:
        return sum(1 for e in events if ["e", request_id] in [list(t[:2]) for t in e.tags]
                   and (status is None or any(t[0] == "status" and t[1] == status for t in e.tags)))

    return {rid: (count(feedback, rid, "processing"), count(produced, rid, None)) for rid in ids}
