"""Weighted fair share (virtual token counters): the service-gap bound, Jain's index, work conservation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagesched.core import Assignment
from sagesched.policies import make_policy
from sagesched.policies.fair_share import FairShare, jain_index, request_cost


def _drain(policy, queue, make_view, steps):
    """Place one request per call (one free slot), `steps` times; the tokens charged per tenant after each."""
    queue = list(queue)
    served: dict[str, int] = {}
    history = []
    for step in range(steps):
        view = make_view("gpu", "llm", max_inflight=1)
        decisions = policy.schedule(float(step), queue, [view])
        (d,) = [d for d in decisions if isinstance(d, Assignment)]
        (rid,) = d.request_ids
        request = next(r for r in queue if r.id == rid)
        queue.remove(request)
        served[request.tenant] = served.get(request.tenant, 0) + request_cost(request)
        history.append(dict(served))
    return history


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.sampled_from([1.0, 2.0, 3.0]), min_size=2, max_size=4),
    sizes=st.lists(st.integers(1, 2000), min_size=30, max_size=30),
)
def test_service_gap_between_backlogged_tenants_is_at_most_one_request(weights, sizes, make_request, make_view):
    tenants = [f"t{i}" for i in range(len(weights))]
    # Every tenant keeps a backlog longer than the run, so all stay backlogged throughout.
    queue = [
        make_request(f"{t}-{k}", tenant=t, prompt_tokens=sizes[(k + 7 * i) % len(sizes)], max_tokens=0, arrival_s=0.0)
        for i, t in enumerate(tenants)
        for k in range(40)
    ]
    c_max = max(request_cost(r) for r in queue)
    policy = make_policy("fair_share", tenant_weights=dict(zip(tenants, weights, strict=True)))
    w = dict(zip(tenants, weights, strict=True))
    for served in _drain(policy, queue, make_view, steps=30):
        for a in tenants:
            for b in tenants:
                gap = served.get(a, 0) / w[a] - served.get(b, 0) / w[b]
                assert gap <= max(c_max / w[a], c_max / w[b]) + 1e-9


def test_jain_index_over_backlogged_equal_weight_tenants(make_request, make_view):
    # One tenant floods the queue with 10x the requests of the others, all arriving first: FIFO would
    # serve it alone; fair share gives each tenant the same tokens.
    queue = [make_request(f"big-{k}", tenant="big", prompt_tokens=300, arrival_s=0.0) for k in range(200)]
    queue += [
        make_request(f"{t}-{k}", tenant=t, prompt_tokens=100 + 50 * i, arrival_s=1.0)
        for i, t in enumerate(["a", "b", "c"])
        for k in range(20)
    ]
    served = _drain(make_policy("fair_share"), queue, make_view, steps=40)[-1]
    assert jain_index([served[t] for t in ("big", "a", "b", "c")]) >= 0.95
    fifo = _drain(make_policy("fifo"), queue, make_view, steps=40)[-1]
    assert jain_index([fifo.get(t, 0) for t in ("big", "a", "b", "c")]) < 0.5  # the contrast


def test_weights_split_service_in_proportion(make_request, make_view):
    queue = [make_request(f"{t}-{k}", tenant=t, prompt_tokens=100, arrival_s=0.0) for t in "ab" for k in range(60)]
    served = _drain(make_policy("fair_share", tenant_weights={"a": 3.0}), queue, make_view, steps=40)[-1]
    assert served["a"] == 3 * served["b"]


def test_an_idle_tenant_banks_no_credit():
    fair = FairShare()
    fair.start_call({"a"})
    fair.counters["a"] = 5_000.0
    fair.start_call({"a", "b"})  # b was idle while a was served: lifted to a's counter
    assert fair.counters["b"] == 5_000.0


def test_a_blocked_tenant_does_not_block_the_others(make_request, make_view):
    # Tenant x wants a model only a full instance serves; y's request still goes.
    queue = [
        make_request("x1", tenant="x", model="other", arrival_s=0.0),
        make_request("y1", tenant="y", arrival_s=1.0),
    ]
    views = [make_view("full", "llm", models=("other",), max_inflight=1, running=1), make_view("gpu", "llm")]
    decisions = make_policy("fair_share").schedule(2.0, queue, views)
    assert [d.request_ids for d in decisions] == [("y1",)]


def test_hybrid_can_use_fair_share_for_llm_work(make_request, make_view):
    queue = [make_request(f"big-{k}", tenant="big", arrival_s=0.0) for k in range(5)]
    queue.append(make_request("small-0", tenant="small", arrival_s=1.0))
    views = [make_view("gpu", "llm", max_inflight=2)]
    decisions = make_policy("hybrid", llm_fallback_policy="fair_share").schedule(2.0, queue, views)
    placed = [i for d in decisions for i in d.request_ids]
    assert "small-0" in placed and len(placed) == 2


def test_bad_weight_names_the_fix():
    with pytest.raises(ValueError, match="tenant_weights"):
        make_policy("fair_share", tenant_weights={"a": 0})


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("slo_aware", {"fair_share": True}),
        ("slo_aware", {"fair_share": True, "admission": True}),
        ("hybrid", {"llm_fallback_config": {"fair_share": True}}),  # slo_aware + admission + fair share
    ],
)
def test_least_slack_policies_can_order_by_fair_share(name, config, make_request, make_view):
    # Every request can still meet its (generous) SLO, so least slack alone would serve the flood first.
    queue = [make_request(f"big-{k}", tenant="big", prompt_tokens=300, e2e_ms=60_000.0) for k in range(200)]
    queue += [
        make_request(f"{t}-{k}", tenant=t, prompt_tokens=300, arrival_s=1.0, e2e_ms=60_000.0)
        for t in ("a", "b", "c")
        for k in range(20)
    ]
    served = _drain(make_policy(name, **config), queue, make_view, steps=40)[-1]
    assert jain_index([served.get(t, 0) for t in ("big", "a", "b", "c")]) >= 0.95
    plain = _drain(make_policy("slo_aware"), queue, make_view, steps=40)[-1]
    assert jain_index([plain.get(t, 0) for t in ("big", "a", "b", "c")]) < 0.5


def test_hybrid_charges_a_lone_llm_request_to_its_tenant(make_request, make_view):
    policy = make_policy("hybrid", llm_fallback_policy="fair_share")
    (d,) = policy.schedule(0.0, [make_request("a-0", tenant="a", prompt_tokens=100, max_tokens=50)], [make_view("gpu")])
    assert d.request_ids == ("a-0",)
    assert policy.llm_fallback.fair.counters["a"] == 150
