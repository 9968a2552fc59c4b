"""The indexed gateway queue changes speed, never results.

Each policy is run twice on the same saturating workload: once handed the simulator's
`GatewayQueue` (the indexed fast paths) and once a plain list (the reference: what every policy
got before the indexes existed). Every record must match: placement, order, timestamps.
"""

from __future__ import annotations

import dataclasses
import random

import pandas as pd
import pytest
from tiny_perf import make_provider

from sagesched.core import SLO, GatewayQueue, Priority, Request, RequestType
from sagesched.policies import make_policy
from sagesched.sim import ClusterConfig, InstanceConfig, SimConfig, simulate

POLICIES = [
    "fifo",
    "fifo:head_of_line_blocking",
    "priority",
    "round_robin",
    "random",
    "least_loaded",
    "power_of_two",
    "slo_aware",
    "slo_aware:shed_unattainable",
    "slo_aware:admission",
    "slo_aware:admission=true,late_first_wait_s=0.3",  # late urgent work first only after a wait
    "fair_share",
    "adaptive",
    "hybrid",
    # hybrid's indexed path (LLM backlog read only when its fallback is called) in each claim order,
    # with a fallback that takes its lone-request shortcut, and with the fallback placing LLM work.
    "hybrid:embedding_priority=high",
    "hybrid:embedding_priority=low",
    "hybrid:llm_fallback_policy=fifo",
    "hybrid:prefer_specialized_instances=false",
    # late urgent work first at once (the wait off), and after a wait shorter than the default's
    "hybrid:late_first_wait_ms=0",
    "hybrid:late_first_wait_ms=300",
]


def _value(text: str) -> object:
    """A spec's value: true / false, a number, else the text itself."""
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text)
    except ValueError:
        return text


def build(spec: str):
    """``name``, ``name:flag`` (a boolean config field set to True) or ``name:field=value[,field=value]``."""
    name, _, flag = spec.partition(":")
    if "=" in flag:
        fields = dict(item.partition("=")[::2] for item in flag.split(","))
        return make_policy(name, **{key: _value(value) for key, value in fields.items()})
    return make_policy(name, **({flag: True} if flag else {}))


def saturating_workload(n: int = 400, seed: int = 3) -> list[Request]:
    """Chats and embeddings for two models, arriving faster than a small pool serves them, with
    ties in arrival time and ids that sort differently as strings and as numbers."""
    rng = random.Random(seed)
    reqs: list[Request] = []
    t = 0.0
    for i in range(n):
        if rng.random() < 0.7:
            t += rng.expovariate(40.0)
        kind = rng.random()
        slo = rng.choice([SLO(ttft_ms=300, tpot_ms=60), SLO(e2e_ms=4000), SLO(), SLO(ttft_ms=2000, tpot_ms=100)])
        prio = Priority(rng.randrange(5))
        if kind < 0.25:
            reqs.append(
                Request(
                    id=f"e{i}",
                    type=RequestType.EMBEDDING,
                    model="emb",
                    arrival_s=t,
                    embedding_inputs=rng.randint(1, 4),
                    embedding_tokens=rng.randint(20, 400),
                    priority=prio,
                    slo=SLO(e2e_ms=100) if rng.random() < 0.5 else SLO(),
                )
            )
        else:
            out = rng.randint(1, 200)
            reqs.append(
                Request(
                    id=f"r{i}",
                    type=RequestType.LLM_CHAT,
                    model="llm-a" if kind < 0.85 else "llm-b",
                    arrival_s=t,
                    prompt_tokens=rng.randint(10, 1500),
                    max_tokens=out,
                    output_tokens=out,
                    priority=prio,
                    slo=slo,
                )
            )
    return reqs


def cluster() -> ClusterConfig:
    return ClusterConfig(
        (
            InstanceConfig(id="a0", model="llm-a", max_inflight=3),
            InstanceConfig(id="a1", model="llm-a", max_inflight=2),
            InstanceConfig(id="mix", kind="llm_embedding", model="llm-a", embedding_model="emb", max_inflight=3),
            InstanceConfig(id="tei", kind="embedding", embedding_model="emb", max_inflight=2),
        )
    )


def records(policy: str, plain: bool, mode: str = "jump", light: bool = False, tenants: int = 0) -> pd.DataFrame:
    reqs = saturating_workload()
    if tenants:  # tenants of unequal demand (fair share's order depends on who is backlogged)
        rng = random.Random(7)
        reqs = [dataclasses.replace(r, tenant=f"t{min(rng.randrange(2 * tenants), tenants - 1)}") for r in reqs]
    pool = cluster()
    if light:  # arrivals 20x sparser on a pool with several idle instances at a time
        reqs = [dataclasses.replace(r, arrival_s=20 * r.arrival_s) for r in reqs]
        pool = ClusterConfig(
            pool.instances + tuple(InstanceConfig(id=f"b{k:02d}", model="llm-a", max_inflight=2) for k in range(9))
        )
    result = simulate(
        reqs,
        pool,
        build(policy),
        SimConfig(mode=mode, timeline_interval_s=0),
        perf_provider=make_provider(60_000),
        plain_inputs=plain,
    )
    return result.records.sort_values("request_id").reset_index(drop=True)


@pytest.fixture(autouse=True, params=["lazy pool", "eager views"])
def views_mode(request, monkeypatch):
    """Run every test with the lazy `InstancePool` (forced on these small pools) and without it."""
    from sagesched.sim import cluster as sim_cluster

    monkeypatch.setattr(sim_cluster, "EAGER_VIEWS_MAX", 0 if request.param == "lazy pool" else 10_000)
    return request.param


@pytest.mark.parametrize("policy", POLICIES)
def test_indexed_queue_gives_the_reference_results(policy):
    fast, reference = records(policy, plain=False), records(policy, plain=True)
    # llm-b has no instance: those are rejected, the rest queue up well past the pool's slots.
    assert (reference.outcome == "rejected").any() and (reference.outcome == "completed").sum() > 200
    assert (reference.dispatch_s - reference.arrival_s).max() > 1.0  # the gateway queue did build up
    pd.testing.assert_frame_equal(fast, reference)


def test_fair_share_indexed_order_with_several_tenants():
    fast, reference = records("fair_share", plain=False, tenants=3), records("fair_share", plain=True, tenants=3)
    assert (reference.dispatch_s - reference.arrival_s).max() > 1.0
    pd.testing.assert_frame_equal(fast, reference)


@pytest.mark.parametrize("policy", ["fifo", "priority", "least_loaded", "slo_aware", "hybrid"])
def test_idle_index_gives_the_reference_results(policy):
    fast, reference = records(policy, plain=False, light=True), records(policy, plain=True, light=True)
    assert reference.instance_id.str.startswith("b").any()  # the extra instances took work
    pd.testing.assert_frame_equal(fast, reference)


@pytest.mark.parametrize("spread", [20.0, 2.0])
def test_hybrid_idle_shortcut_gives_the_reference_results(spread, monkeypatch, views_mode):
    """On a pool of equal LLM instances (`InstancePool.uniform_llm`) hybrid sends a lone request to
    the first idle one without reading the other views (`_place_lone_idle`); with SLOs, shedding
    and busy instances the records are those of the plain-list reference, and the shortcut is used."""
    from sagesched.policies.hybrid_llm import LlmPlacement

    taken = {"yes": 0}
    original = LlmPlacement._place_lone_idle

    def counted(self, call):
        placed = original(self, call)
        taken["yes"] += placed
        return placed

    monkeypatch.setattr(LlmPlacement, "_place_lone_idle", counted)
    reqs = [dataclasses.replace(r, arrival_s=spread * r.arrival_s) for r in saturating_workload(300, seed=9)]
    reqs = [r for r in reqs if not r.is_embedding and r.model == "llm-a"]
    pool = ClusterConfig(tuple(InstanceConfig(id=f"p{k:02d}", model="llm-a", max_inflight=2) for k in range(12)))

    def run(plain: bool) -> pd.DataFrame:
        result = simulate(
            reqs,
            pool,
            make_policy("hybrid", llm_fallback_config={"max_shed_fraction": 0.3}),
            SimConfig(timeline_interval_s=0),
            perf_provider=make_provider(60_000),
            plain_inputs=plain,
        )
        return result.records.sort_values("request_id").reset_index(drop=True)

    fast = run(False)
    if views_mode == "lazy pool":
        assert taken["yes"] > 10  # the shortcut placed requests
    else:
        assert taken["yes"] == 0  # eager views are a plain list: the scan runs
    reference = run(True)
    pd.testing.assert_frame_equal(fast, reference)


def test_gateway_queue_is_the_list_it_replaces():
    reqs = saturating_workload(60)
    q = GatewayQueue(reqs)
    assert list(q) == reqs and len(q) == 60 and q[5] == reqs[5] and q[-1] == reqs[-1]
    for r in reqs[::3]:
        assert q.pop(r.id) is r
    left = [r for i, r in enumerate(reqs) if i % 3]
    assert list(q) == left and q.get(reqs[0].id) is None and q.has(reqs[1].id)
    assert reqs[1] in q and reqs[0] not in q
    by_arrival = sorted(left, key=lambda r: (r.arrival_s, r.id))
    assert list(q.in_arrival_order()) == by_arrival
    for cls in q.classes():
        assert q.of_class(cls) == [r for r in left if (r.type is RequestType.EMBEDDING, r.model) == cls]
    q.add(reqs[0])  # popped and queued again: once, at its place in arrival order
    assert list(q.in_arrival_order()).count(reqs[0]) == 1
    with pytest.raises(ValueError, match="already queued"):
        q.add(reqs[0])


def test_gateway_queue_stays_correct_through_compaction():
    rng = random.Random(7)
    reqs = saturating_workload(1500, seed=11)
    q = GatewayQueue()
    alive: dict[str, Request] = {}
    for r in reqs:
        q.add(r)
        alive[r.id] = r
        if rng.random() < 0.6:
            victim = rng.choice(list(alive))
            assert q.pop(victim) is alive.pop(victim)
    assert list(q) == list(alive.values())
    assert list(q.in_arrival_order()) == sorted(alive.values(), key=lambda r: (r.arrival_s, r.id))


def test_gateway_queue_indexes_built_on_first_read_match_the_queue():
    """The streams and columns are built on the first index read and dropped when the queue empties;
    whenever they are read (before, during and after such cycles) they give the queued requests."""
    rng = random.Random(3)
    reqs = saturating_workload(600, seed=5)
    q = GatewayQueue()
    alive: dict[str, Request] = {}
    reads = 0
    for r in reqs:
        q.add(r)
        alive[r.id] = r
        if rng.random() < 0.5:
            victim = rng.choice(list(alive))
            assert q.pop(victim) is alive.pop(victim)
        if rng.random() < 0.05:  # drain: the indexes are dropped
            for rid in list(alive):
                assert q.pop(rid) is alive.pop(rid)
            assert not q._indexed and len(q) == 0
        if rng.random() < 0.3:
            reads += 1
            want = sorted(alive.values(), key=lambda x: (x.arrival_s, x.id))
            assert list(q.in_arrival_order()) == want
            assert q._indexed
            for cls in q.classes():
                of_class = [x for x in alive.values() if (x.type is RequestType.EMBEDDING, x.model) == cls]
                assert q.of_class(cls) == of_class
                cols = q.columns(cls)
                assert [cols.requests[i].id for i in range(cols.n) if cols.alive[i]] == [x.id for x in of_class]
                for p in q.priorities(cls):
                    assert list(q.stream(cls, p)) == [x for x in want if x in of_class and int(x.priority) == p]
    assert reads > 100
    assert list(q) == list(alive.values())


def test_quiet_timeline_rows_are_the_rows_a_full_sample_gives(monkeypatch):
    """The sampler reuses the row of an instance idle and untouched since its last sample; with
    that shortcut disabled the timeline must be the same."""
    from sagesched.sim import cluster as sim_cluster

    reqs = [dataclasses.replace(r, arrival_s=20 * r.arrival_s) for r in saturating_workload()]

    def timeline() -> pd.DataFrame:
        sim = SimConfig(timeline_interval_s=0.5)
        return simulate(reqs, cluster(), build("fifo"), sim, perf_provider=make_provider(60_000)).timeline

    fast = timeline()
    full_sample = sim_cluster.Simulator._sample

    def without_shortcut(self, now):
        for inst in self.instances:
            inst.sample_quiet = None
        full_sample(self, now)

    monkeypatch.setattr(sim_cluster.Simulator, "_sample", without_shortcut)
    pd.testing.assert_frame_equal(fast, timeline())
    assert (fast.iloc[:, -1] == 0).any() and (fast.iloc[:, -1] > 0).any()
