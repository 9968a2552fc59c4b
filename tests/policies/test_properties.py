"""Property tests over random queues and instance sets, for every registered policy.

Each registered policy (hybrid included, automatically) must keep the contract on any input:
valid placements within capacity, each request decided at most once, unservable requests rejected
with a reason, decisions keyed by id (queue order does not matter) and reproducible for the same
inputs and seed. The priority policy's starvation bound is checked by simulating its calls.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagesched.core import Assignment, Priority, Rejection
from sagesched.policies import available_policies, config_fields, make_policy

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODELS = ["A", "B", "C"]


@st.composite
def instance_sets(draw):
    n = draw(st.integers(1, 5))
    views = []
    for k in range(n):
        running = draw(st.integers(0, 6))
        waiting = draw(st.integers(0, 4))
        views.append(
            dict(
                id=f"i{k}",
                kind=draw(st.sampled_from(["llm", "embedding", "llm_embedding"])),
                models=draw(st.sets(st.sampled_from(MODELS), min_size=1, max_size=2)),
                healthy=draw(st.booleans() | st.just(True)),
                running=running,
                waiting=waiting,
                embedding_inflight=draw(st.integers(0, running + waiting)),
                kv_usage=draw(st.floats(0, 1)),
                queued_prefill_tokens=draw(st.integers(0, 20_000)),
                queued_decode_tokens=draw(st.integers(0, 20_000)),
                max_inflight=draw(st.integers(1, 10)),
                max_num_seqs=draw(st.integers(1, 16)),
                prefill_tokens_per_s=draw(st.sampled_from([2_000.0, 10_000.0, 40_000.0])),
                decode_step_s=draw(st.sampled_from([0.01, 0.03, 0.08])),
            )
        )
    return views


@st.composite
def queues(draw):
    n = draw(st.integers(0, 25))
    out = []
    for k in range(n):
        kind = draw(st.sampled_from(["chat", "generate", "embedding"]))
        ttft = draw(st.none() | st.sampled_from([30.0, 200.0, 1000.0, 5000.0]))
        e2e = draw(st.none() | st.sampled_from([500.0, 5000.0, 30_000.0]))
        tpot = None if kind == "embedding" else draw(st.none() | st.sampled_from([20.0, 50.0, 100.0]))
        out.append(
            dict(
                id=f"r{k}",
                kind=kind,
                model=draw(st.sampled_from([*MODELS, "Z"])),  # nobody serves "Z"
                arrival_s=draw(st.floats(0.0, 10.0, allow_nan=False).map(lambda x: round(x, 3))),
                prompt_tokens=draw(st.integers(1, 4000)),
                max_tokens=draw(st.integers(1, 512)),
                priority=draw(st.integers(0, 4)),
                inputs=draw(st.integers(1, 40)),
                ttft_ms=ttft,
                tpot_ms=tpot,
                e2e_ms=e2e,
                tenant=draw(st.sampled_from(["t1", "t2"])),
            )
        )
    return out


def _build(queue_spec, instance_spec, make_request, make_view):
    return [make_request(**s) for s in queue_spec], [make_view(**s) for s in instance_spec]


def _fresh(name: str, seed: int = 0):
    return make_policy(name, seed=seed) if "seed" in config_fields(name) else make_policy(name)


def _key(decision) -> tuple:
    """A decision without its wording: what was decided, by which rule."""
    if isinstance(decision, Assignment):
        return (
            "assign",
            decision.instance_id,
            tuple(sorted(decision.request_ids)),
            decision.priority_hint,
            decision.rule,
        )
    assert isinstance(decision, Rejection)
    return ("reject", decision.request_id, decision.code, decision.rule)


def _run_calls(policy, queue, instances, now: float, check, calls: int = 3):
    """Call the policy repeatedly as a driver would, removing what it decided; check each call."""
    outputs = []
    for step in range(calls):
        t = now + 0.25 * step
        decisions = policy.schedule(t, queue, instances)
        assigned, rejected = check(decisions, queue, instances)
        wake = policy.next_wakeup(t)
        assert wake is None or math.isfinite(wake)
        outputs.append(decisions)
        done = set(assigned) | set(rejected)
        queue = [r for r in queue if r.id not in done]
    return outputs


@pytest.mark.parametrize("name", available_policies())
@SETTINGS
@given(queue=queues(), instances=instance_sets(), now=st.floats(10.0, 15.0), seed=st.integers(0, 2**16), data=st.data())
def test_contract_determinism_and_id_keying(
    name, queue, instances, now, seed, data, make_request, make_view, check_decisions
):
    """One generated case checks three things (generation dominates the cost, so they share it).

    1. Every call of a driver-like sequence keeps the contract (`check_decisions`).
    2. A second policy built with the same config and seed, fed the same calls, decides the same.
    3. A fresh policy given the same queue in another order decides the same (keyed by id).
    """
    queue, instances = _build(queue, instances, make_request, make_view)
    first = _run_calls(_fresh(name, seed), queue, instances, now, check_decisions)
    second = _run_calls(_fresh(name, seed), queue, instances, now, check_decisions)
    assert first == second, "same inputs and seed gave different decisions"
    shuffled = data.draw(st.permutations(queue), label="shuffled queue")
    reordered = _fresh(name, seed).schedule(now, shuffled, instances)
    assert sorted(map(_key, reordered)) == sorted(map(_key, first[0])), "decisions depend on queue order"


@SETTINGS
@given(
    low=st.integers(1, 4),
    stream_data=st.data(),
    aging=st.sampled_from([0.5, 1.0, 2.5, 7.0]),
    tick=st.sampled_from([0.1, 0.25, 0.5, 1.0, 1.5]),
    per_tick=st.integers(1, 3),
    backlog=st.integers(0, 5),
)
def test_priority_starvation_bound(low, stream_data, aging, tick, per_tick, backlog, make_request, make_view):
    """A LOW request behind a stream of strictly more urgent arrivals on a 1-slot instance.

    The documented bound: it is placed no later than the first call at or after
    ``t0 + p * aging_interval_s`` plus one call per request that arrived before it (the backlog),
    and once it competes at class 0 only requests that arrived before it are placed ahead of it.
    """
    stream = stream_data.draw(st.integers(0, low - 1))
    policy = make_policy("priority", aging_interval_s=aging)
    instances = [make_view("only", max_inflight=1)]
    t0 = 0.0
    queue = [make_request("low", priority=low, arrival_s=t0)]
    queue += [make_request(f"early{k}", priority=stream, arrival_s=-1.0 - k) for k in range(backlog)]
    arrived_before = {f"early{k}" for k in range(backlog)}
    first_eligible = math.ceil(low * aging / tick - 1e-9)  # index of the first call at/after t0 + p * aging
    placed_call = None
    for call in range(1, first_eligible + backlog + 3):
        now = call * tick
        queue += [make_request(f"s{call}-{j}", priority=stream, arrival_s=now) for j in range(per_tick)]
        decisions = policy.schedule(now, queue, instances)
        assert len(decisions) == 1  # the one free slot is always used
        (rid,) = decisions[0].request_ids
        if now >= t0 + low * aging - 1e-9 and rid != "low":
            assert rid in arrived_before, f"{rid} passed the aged request at t={now}"
        queue = [r for r in queue if r.id != rid]
        if rid == "low":
            placed_call = call
            break
    assert placed_call is not None, "the low-priority request starved"
    assert placed_call <= max(first_eligible, 1) + backlog
    assert int(Priority(low)) == low
