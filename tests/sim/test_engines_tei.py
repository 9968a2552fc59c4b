"""The TEI engine core and TEI instances in the simulator: packing, 413/429, M/D/1 queueing."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_perf import TinyEmbPerf

from sagesched.core import Assignment, Request, RequestType
from sagesched.policies.fifo import FifoPolicy
from sagesched.sim import ClusterConfig, InstanceConfig, SimConfig, TeiEngineConfig, simulate
from sagesched.sim.engines import EngineRejected, EngineRequest, TeiEngineCore


def call(cid: str, *tokens: int, requests: int = 1) -> EngineRequest:
    return EngineRequest(id=cid, input_tokens=tuple(tokens), num_requests=requests)


def test_batches_pack_greedily_up_to_max_batch_tokens():
    tei = TeiEngineCore(TeiEngineConfig(max_batch_tokens=100), TinyEmbPerf())
    tei.submit(call("a", 40, 40))
    tei.submit(call("b", 30, 50))
    b1 = tei.next_batch()
    assert [t for _, t in b1.entries] == [40, 40]  # +30 would exceed 100
    assert tei.finish_batch(b1) == ["a"]
    b2 = tei.next_batch()
    assert [t for _, t in b2.entries] == [30, 50] and tei.finish_batch(b2) == ["b"]
    assert tei.next_batch() is None and tei.inflight_inputs == 0


def test_oversized_input_forms_its_own_batch_and_max_batch_requests_caps_entries():
    tei = TeiEngineCore(TeiEngineConfig(max_batch_tokens=100, max_batch_requests=2), TinyEmbPerf())
    tei.submit(call("big", 500))
    tei.submit(call("small", 1, 1, 1))
    assert [t for _, t in tei.next_batch().entries] == [500]
    tei.finish_batch(tei.batch)
    batch = tei.next_batch()
    assert batch.num_inputs == 2
    assert tei.finish_batch(batch) == []  # one input of "small" still queued
    assert tei.finish_batch(tei.next_batch()) == ["small"]


def test_413_and_429_are_raised_and_counted():
    tei = TeiEngineCore(TeiEngineConfig(max_client_batch_size=4, max_concurrent_requests=5), TinyEmbPerf())
    with pytest.raises(EngineRejected) as err:
        tei.submit(call("too-many", *([10] * 5)))
    assert err.value.status == 413 and "max_client_batch_size" in err.value.reason
    tei.submit(call("ok", 10, 10, 10, 10))
    with pytest.raises(EngineRejected) as err:
        tei.submit(call("over", 10, 10))
    assert err.value.status == 429
    assert (tei.rejected_413, tei.rejected_429) == (1, 1)
    # permits come back when the call completes
    while tei.next_batch() is not None:
        tei.finish_batch(tei.batch)
    tei.submit(call("later", 10, 10))


def emb_request(i: int, t: float, inputs: int = 1, tokens: int = 100) -> Request:
    return Request(
        id=f"e{i}",
        type=RequestType.EMBEDDING,
        model="bge-base",
        arrival_s=t,
        prompt_tokens=tokens,
        embedding_inputs=inputs,
        embedding_tokens=tokens,
    )


def tei_cluster(**tei) -> ClusterConfig:
    return ClusterConfig(
        (
            InstanceConfig(
                id="tei0",
                kind="embedding",
                model=None,
                embedding_model="bge-base",
                max_inflight=100_000,
                tei=TeiEngineConfig(**tei),
            ),
        )
    )


def tiny_provider(cfg):
    return None, TinyEmbPerf()


def test_413_and_429_reach_the_records():
    reqs = [emb_request(0, 0.0, inputs=40, tokens=400)] + [
        emb_request(i, 0.001, inputs=3, tokens=30) for i in range(1, 6)
    ]
    # A policy blind to the view's input cap sends every call at once, so TEI itself must refuse.
    res = simulate(reqs, tei_cluster(max_concurrent_requests=7), _Blind(), SimConfig(), perf_provider=tiny_provider)
    df = res.records.set_index("request_id")
    assert df.loc["e0", "outcome"] == "rejected" and df.loc["e0", "reason"].startswith("backend 413")
    rejected_429 = df[df.reason.str.startswith("backend 429")]
    assert len(rejected_429) == 3  # 2 calls of 3 inputs fit under 7, the other 3 are refused
    assert (df.outcome == "completed").sum() == 2
    stats = res.stats["instances"]["tei0"]
    assert stats["rejected_413"] == 1 and stats["rejected_429"] == 3
    assert len(df) == 6


class _Blind(FifoPolicy):
    """Every queued request to tei0 at once, whatever its views say (to reach TEI's own limits)."""

    def schedule(self, now, queue, instances):
        return [Assignment("tei0", (r.id,)) for r in sorted(queue, key=lambda r: r.arrival_s)]


def test_policies_keep_tei_inputs_within_max_concurrent_requests():
    """The view carries TEI's input cap (max_embedding_inputs), so FIFO holds calls that would be
    refused with 429 at the gateway until inputs finish: nothing is refused, all complete."""
    reqs = [emb_request(i, 0.001, inputs=3, tokens=30) for i in range(1, 6)]
    res = simulate(reqs, tei_cluster(max_concurrent_requests=7), FifoPolicy(), SimConfig(), perf_provider=tiny_provider)
    assert (res.records.outcome == "completed").all()
    assert res.stats["instances"]["tei0"]["rejected_429"] == 0


def test_tei_with_batch_size_one_matches_md1_mean_wait():
    """Poisson arrivals, one input per batch, fixed service D: Pollaczek-Khinchine gives
    Wq = rho * D / (2 (1 - rho)). At rho = 0.6 and 20,000 requests the sample mean of the waits is
    within a few percent; we allow 8%."""
    perf = TinyEmbPerf()
    service = perf.batch_time_s(1, 100, 100)
    rho = 0.6
    rng = np.random.default_rng(7)
    times = np.cumsum(rng.exponential(service / rho, size=20_000))
    reqs = [emb_request(i, float(t)) for i, t in enumerate(times)]
    res = simulate(
        reqs,
        tei_cluster(max_batch_requests=1, max_concurrent_requests=100_000),
        FifoPolicy(),
        SimConfig(timeline_interval_s=0),
        perf_provider=tiny_provider,
    )
    df = res.records
    assert (df.outcome == "completed").all()
    waits = (df.finish_s - df.arrival_s - service).to_numpy()
    assert waits.min() > -1e-9
    expected = rho * service / (2 * (1 - rho))
    assert waits.mean() == pytest.approx(expected, rel=0.08)


def test_each_input_returns_its_permit_when_embedded():
    tei = TeiEngineCore(TeiEngineConfig(max_batch_tokens=100, max_concurrent_requests=3, prefetch=False), TinyEmbPerf())
    tei.submit(call("a", 60, 60))  # two batches of one input each
    tei.finish_batch(tei.next_batch())  # a's first input done: its permit is back, a is not
    assert tei.inflight_inputs == 1 and "a" in tei.calls
    tei.submit(call("b", 10, 10))  # 1 + 2 <= 3: admitted (TEI would have refused it holding a's 2)
    with pytest.raises(EngineRejected):
        tei.submit(call("c", 10))


def test_next_batch_is_packed_while_the_current_one_runs():
    tei = TeiEngineCore(TeiEngineConfig(max_batch_tokens=100), TinyEmbPerf())
    tei.submit(call("a", 50))
    first = tei.next_batch()
    tei.submit(call("b", 10))  # arrives while `first` runs: packed at once, alone
    tei.submit(call("c", 10))  # arrives later: waits for the batch after
    assert tei.queue_size == 2 and tei.queued_tokens == 20
    tei.finish_batch(first)
    second = tei.next_batch()
    assert [c.id for c, _ in second] == ["b"]
    tei.finish_batch(second)
    assert [c.id for c, _ in tei.next_batch()] == ["c"]
    no_prefetch = TeiEngineCore(TeiEngineConfig(max_batch_tokens=100, prefetch=False), TinyEmbPerf())
    no_prefetch.submit(call("a", 50))
    no_prefetch.next_batch()
    no_prefetch.submit(call("b", 10))
    no_prefetch.submit(call("c", 10))
    no_prefetch.finish_batch(no_prefetch.batch)
    assert [c.id for c, _ in no_prefetch.next_batch()] == ["b", "c"]


def test_inputs_are_truncated_to_max_input_length():
    tei = TeiEngineCore(TeiEngineConfig(max_input_length=64), TinyEmbPerf())
    tei.submit(call("a", 500, 20))
    batch = tei.next_batch()
    assert [t for _, t in batch] == [64, 20] and batch.total_tokens == 84
