"""A burst of 300 job requests from 50 keys against a real `cdvm worker`: every request hears
back, one greedy key cannot starve the others, memory stays bounded, nothing crashes. Also the
fair slot scheduler on its own."""
from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import psutil
import pytest

from dvm.keys import PrivateKey
from dvm.localrelay import LocalRelay
from dvm.nip09 import build_deletion
from dvm.worker import CANCEL_REASON, FairSlots, JobFailed
from workerproc import JobWatch, WorkerProcess, worker_toml

MAX_CONCURRENT, MAX_QUEUED, PER_CUSTOMER = 4, 16, 2
CONFIG = worker_toml(
    worker={"max_concurrent": MAX_CONCURRENT, "max_queued": MAX_QUEUED, "per_customer": PER_CUSTOMER, "warm_pool": 2},
    sandbox={"runner_module": "tests.scripted_runner"},
)
RSS_GROWTH_LIMIT = 64 * 1024 * 1024
"""What the burst may add to the worker's resident memory: at most MAX_CONCURRENT + MAX_QUEUED jobs
are held (each at most 2 × MAX_REQUEST_BYTES), refused requests are not kept."""


@pytest.mark.slow
async def test_burst_of_300_requests_from_50_keys(tmp_path: Path) -> None:
    relay = LocalRelay(tmp_path / "relay")
    await relay.astart()
    worker = WorkerProcess([relay.url], tmp_path / "worker-state", config_toml=CONFIG)
    await asyncio.to_thread(worker.start)
    watch = await JobWatch([relay.url], worker.pubkey).start()
    assert worker.process is not None
    process = psutil.Process(worker.process.pid)
    baseline = process.memory_info().rss
    peak = baseline

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, process.memory_info().rss)
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    greedy = PrivateKey.generate()
    others = [PrivateKey.generate() for _ in range(49)]
    requests = [(greedy, watch.request(greedy, "generate")) for _ in range(100)]
    requests += [(key, watch.request(key, "echo")) for key in others for _ in range(4)]
    requests += [(key, watch.request(key, "echo")) for key in random.sample(others, 4)]
    random.shuffle(requests)
    owner = {request.id: key for key, request in requests}
    try:
        async with asyncio.timeout(100):
            started = time.monotonic()
            gate = asyncio.Semaphore(64)

            async def publish(request) -> None:
                async with gate:
                    await watch.pool.publish(request)

            await asyncio.gather(*(publish(request) for _, request in requests))
            published_in = time.monotonic() - started
            await watch.wait_for(lambda: all(watch.feedback.get(job) for job in owner), 60, "feedback on every request")
            first = {job: watch.feedback[job][0] for job in owner}
            admitted = [job for job, (status, _) in first.items() if status == "processing"]
            for job, (status, info) in first.items():
                assert status == "processing" or (status == "error" and info.startswith("busy: ")), (status, info)
            greedy_jobs = [job for job in owner if owner[job] is greedy]
            greedy_admitted = [job for job in greedy_jobs if job in admitted]
            assert len(greedy_admitted) == PER_CUSTOMER, "the greedy key holds at most per_customer jobs"
            others_admitted = [job for job in admitted if owner[job] is not greedy]
            assert len(others_admitted) >= MAX_CONCURRENT + MAX_QUEUED - PER_CUSTOMER
            assert len({owner[job] for job in others_admitted}) >= (MAX_CONCURRENT + MAX_QUEUED) // PER_CUSTOMER - 1
            await watch.wait_for(lambda: all(watch.final(job) for job in others_admitted), 60, "the admitted jobs")
            assert all(watch.final(job) == ("success", "sandbox destroyed") for job in others_admitted)
            await watch.pool.publish(build_deletion(greedy, greedy_admitted, [5050], "enough"))
            await watch.wait_for(lambda: all(watch.final(job) for job in greedy_admitted), 30, "the greedy jobs to stop")
            assert all(watch.final(job) == ("error", CANCEL_REASON) for job in greedy_admitted)
        assert published_in < 30
        assert worker.process.poll() is None
        assert peak - baseline < RSS_GROWTH_LIMIT, f"worker RSS grew by {(peak - baseline) / 2**20:.1f} MiB"
        assert "internal error" not in worker.log()
        print(f"burst: published in {published_in:.1f} s, {len(admitted)} admitted, "
              f"RSS {baseline / 2**20:.0f} -> peak {peak / 2**20:.0f} MiB")
    finally:
        sampler.cancel()
        await watch.close()
        await asyncio.to_thread(worker.stop)
        await relay.aclose()


async def test_fair_slots_prefer_the_customer_with_fewest_running_jobs() -> None:
    slots = FairSlots(1)
    order: list[str] = []

    async def job(customer: str, hold: float = 0.01) -> None:
        await slots.acquire(customer)
        order.append(customer)
        await asyncio.sleep(hold)
        slots.release(customer)

    async with asyncio.timeout(5):
        first = asyncio.create_task(job("a", 0.05))
        await asyncio.sleep(0)
        greedy = [asyncio.create_task(job("a")) for _ in range(3)]
        await asyncio.sleep(0)
        late = [asyncio.create_task(job("b")), asyncio.create_task(job("c"))]
        await asyncio.gather(first, *greedy, *late)
    assert order[:2] == ["a", "a"] and set(order[2:4]) == {"b", "c"}, order
    assert slots.running == {} and slots.free


async def test_fair_slots_close_fails_waiters_and_cancel_frees_the_slot() -> None:
    slots = FairSlots(1)
    async with asyncio.timeout(5):
        await slots.acquire("a")
        waiting = asyncio.create_task(slots.acquire("b"))
        cancelled = asyncio.create_task(slots.acquire("c"))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        slots.close(JobFailed("shutting down"))
        with pytest.raises(JobFailed):
            await waiting
        slots.release("a")
        assert slots.running == {} and slots.free
        with pytest.raises(JobFailed):
            await slots.acquire("d")
