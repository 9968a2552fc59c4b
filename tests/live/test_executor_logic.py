"""The executor's own logic against in-loop fake backends: seconds, not minutes, per regression.

Requeue before the first byte, stranded requests, merged embedding batches, rate learning and health
marking. The same behaviours are exercised end to end against real llama-server backends in
test_executor.py; these tests pin the logic itself, with failures scripted on cue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import pytest
from fake_backend import FakeBackend, vector_for

from sagesched.core import Assignment, Decision, InstanceView, Request
from sagesched.live.backends import BackendConfig
from sagesched.live.errors import BackendUnavailable, NoBackendAvailable, UpstreamError
from sagesched.live.executor import ExecutorConfig, LiveExecutor
from sagesched.policies.base import LoadLedger, Policy
from sagesched.policies.fifo import FifoPolicy

pytestmark = pytest.mark.anyio

QUICK = ExecutorConfig(
    health_interval_s=0.05,
    probe_timeout_s=0.5,
    connect_timeout_s=0.5,
    request_timeout_s=10.0,
    no_backend_grace_s=0.4,
    scrape_metrics=False,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeBackend]]:
    started = [await FakeBackend(model="fake-llm").start(), await FakeBackend(model="fake-llm").start()]
    yield started
    for fake in started:
        await fake.stop()


def llm(fake: FakeBackend, name: str, **kw: object) -> BackendConfig:
    return BackendConfig(fake.url, "llm", [fake.model], id=name, scrape_metrics=False, **kw)  # type: ignore[arg-type]


def embedder(fake: FakeBackend, name: str) -> BackendConfig:
    return BackendConfig(fake.url, "embedding", ["fake-embed"], id=name, scrape_metrics=False)


def chat(n: int = 3, **kw: object) -> dict[str, object]:
    return {"model": "fake-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": n, **kw}


class FirstHealthy(Policy):
    """Everything to the first healthy compatible instance in view order (so a test knows where it goes)."""

    name = "test-first"

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        ledger = LoadLedger(instances)
        out: list[Decision] = []
        for request in queue:
            candidates = [v for v in instances if v.healthy and v.can_serve(request)]
            if candidates and ledger.free_slots(candidates[0].id) > 0:
                out.append(ledger.assign(candidates[0], [request], self.name))
        return out


class BatchWhenFull(Policy):
    """Holds embedding requests until `size` are queued, then sends them as ONE assignment."""

    name = "test-batch"

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        if len(queue) < self.size:
            return []
        target = next(v for v in instances if v.healthy)
        return [Assignment(target.id, tuple(r.id for r in sorted(queue, key=lambda r: r.arrival_s)), rule=self.name)]


async def wait_for(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def health(ex: LiveExecutor, name: str) -> bool:
    return bool(ex.snapshot()["backends"][name]["healthy"])


async def test_503_before_first_byte_requeues_to_another_backend(fakes: list[FakeBackend]) -> None:
    broken, good = fakes
    broken.status = 503
    async with LiveExecutor(FirstHealthy(), [llm(broken, "a"), llm(good, "b")], QUICK) as ex:
        response = await ex.submit(None, chat())
        assert response.instance_id == "b"
        assert response.json is not None and response.json["choices"][0]["message"]["content"].startswith("t0")
        assert broken.llm_calls == 1 and good.llm_calls == 1
        assert ex.retries == 1
        assert not health(ex, "a")  # a refused dispatch takes the backend out at once
        (record,) = ex.records
        assert record.outcome == "completed" and record.instance_id == "b"


async def test_retries_are_bounded_and_the_failure_says_so(fakes: list[FakeBackend]) -> None:
    broken = fakes[0]
    broken.status = 503
    config = ExecutorConfig(**{**QUICK.__dict__, "max_retries": 1, "no_backend_grace_s": 5.0})
    async with LiveExecutor(FirstHealthy(), [llm(broken, "a")], config) as ex:
        with pytest.raises(BackendUnavailable, match="gave up after 2 attempts"):
            await ex.submit(None, chat())
        # First attempt, health probe brings it back, second attempt, then it gives up.
        assert broken.llm_calls == 2
        (record,) = ex.records
        assert record.outcome == "failed" and "gave up" in record.reason


async def test_request_with_no_healthy_backend_fails_after_grace(fakes: list[FakeBackend]) -> None:
    down = fakes[0]
    down.healthy = False
    async with LiveExecutor(FirstHealthy(), [llm(down, "a")], QUICK) as ex:
        assert not health(ex, "a")
        started = time.monotonic()
        with pytest.raises(NoBackendAvailable, match="fake-llm"):
            await ex.submit(None, chat())
        waited = time.monotonic() - started
        assert QUICK.no_backend_grace_s * 0.9 <= waited < QUICK.no_backend_grace_s + 2.0
        assert down.llm_calls == 0
        assert ex.records[0].outcome == "failed"


async def test_stranded_request_is_served_when_its_backend_recovers_within_grace(fakes: list[FakeBackend]) -> None:
    down = fakes[0]
    down.healthy = False
    config = ExecutorConfig(**{**QUICK.__dict__, "no_backend_grace_s": 5.0})
    async with LiveExecutor(FirstHealthy(), [llm(down, "a")], config) as ex:
        task = asyncio.ensure_future(ex.submit(None, chat()))
        await asyncio.sleep(0.2)
        assert not task.done()
        down.healthy = True
        response = await asyncio.wait_for(task, 5)
        assert response.instance_id == "a"


async def test_one_assignment_is_one_backend_call_split_back_in_order() -> None:
    fake = await FakeBackend().start()
    try:
        async with LiveExecutor(BatchWhenFull(3), [embedder(fake, "e")], QUICK) as ex:
            bodies = [
                {"model": "fake-embed", "input": ["alpha", "beta"]},
                {"model": "fake-embed", "input": "gamma ray"},
                {"model": "fake-embed", "input": ["delta", "epsilon", "zeta"]},
            ]
            tasks = []
            for body in bodies:  # distinct arrival times fix the batch order
                tasks.append(asyncio.ensure_future(ex.submit(None, body, "embeddings")))
                await asyncio.sleep(0.01)
            responses = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert fake.embed_calls == [["alpha", "beta", "gamma ray", "delta", "epsilon", "zeta"]]
        for body, response in zip(bodies, responses, strict=True):
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            assert response.json is not None
            assert [d["embedding"] for d in response.json["data"]] == [vector_for(t) for t in texts]
            assert [d["index"] for d in response.json["data"]] == list(range(len(texts)))
        assert [r.batch_size for r in ex.records] == [3, 3, 3]
    finally:
        await fake.stop()


async def test_bodies_that_change_vectors_are_not_merged() -> None:
    fake = await FakeBackend().start()
    try:
        async with LiveExecutor(BatchWhenFull(3), [embedder(fake, "e")], QUICK) as ex:
            bodies = [
                {"model": "fake-embed", "input": "a"},
                {"model": "fake-embed", "input": "b", "dimensions": 2},
                {"model": "fake-embed", "input": "c"},
            ]
            await asyncio.wait_for(asyncio.gather(*(ex.submit(None, b, "embeddings") for b in bodies)), 5)
        assert sorted(map(sorted, fake.embed_calls)) == [["a", "c"], ["b"]]
    finally:
        await fake.stop()


async def test_a_4xx_in_a_merged_batch_fails_only_its_caller() -> None:
    fake = await FakeBackend(reject_input="BAD").start()
    try:
        async with LiveExecutor(BatchWhenFull(3), [embedder(fake, "e")], QUICK) as ex:
            bodies = [{"model": "fake-embed", "input": t} for t in ("good one", "BAD", "good two")]
            results = await asyncio.wait_for(
                asyncio.gather(*(ex.submit(None, b, "embeddings") for b in bodies), return_exceptions=True), 5
            )
        assert isinstance(results[1], UpstreamError) and results[1].status == 400
        for ok, text in ((results[0], "good one"), (results[2], "good two")):
            assert not isinstance(ok, BaseException)
            assert ok.json is not None and ok.json["data"][0]["embedding"] == vector_for(text)
        # One merged call, then each caller alone to find the culprit.
        assert fake.embed_calls[0] == ["good one", "BAD", "good two"]
        assert sorted(c[0] for c in fake.embed_calls[1:]) == ["BAD", "good one", "good two"]
    finally:
        await fake.stop()


async def test_decode_step_estimate_moves_towards_the_observed_rate(fakes: list[FakeBackend]) -> None:
    fake = fakes[0]
    fake.token_delay_s = 0.02
    start_estimate = 0.5
    backend = llm(fake, "a", decode_step_s=start_estimate)
    async with LiveExecutor(FifoPolicy(), [backend], QUICK) as ex:
        estimates = [start_estimate]
        for _ in range(3):
            response = await ex.submit(None, chat(n=8, stream=True))
            assert response.stream is not None
            async for _chunk in response.stream:
                pass
            await wait_for(lambda: len(ex.records) > len(estimates) - 1)
            estimates.append(ex.snapshot()["backends"]["a"]["decode_step_s"])
    # Each finished stream moves the moving average towards ~0.02 s/token, never past it.
    assert estimates == sorted(estimates, reverse=True)
    assert estimates[-1] < 0.35
    assert all(e > 0.015 for e in estimates)


async def test_health_needs_two_failed_probes_to_take_out_and_one_to_bring_back(fakes: list[FakeBackend]) -> None:
    fake = fakes[0]
    config = ExecutorConfig(**{**QUICK.__dict__, "health_interval_s": 0.1})
    async with LiveExecutor(FifoPolicy(), [llm(fake, "a")], config) as ex:
        assert health(ex, "a")
        fake.healthy = False
        probes = fake.health_calls
        await wait_for(lambda: fake.health_calls >= probes + 1)
        # One failed probe of a serving backend is not an outage ...
        if fake.health_calls == probes + 1:
            assert health(ex, "a")
        await wait_for(lambda: not health(ex, "a"))
        assert fake.health_calls >= probes + 2
        fake.healthy = True
        await wait_for(lambda: health(ex, "a"))
        response = await ex.submit(None, chat())
        assert response.instance_id == "a"
