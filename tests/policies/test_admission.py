"""SLO-aware admission: shed late requests within a budget, serve the rest before long-slack work."""

from __future__ import annotations

import random

import pytest

from sagesched.core import Assignment, GatewayQueue, RejectCode, Rejection
from sagesched.core.queue import class_of
from sagesched.policies import make_policy
from sagesched.policies.admission import AdmissionConfig, AdmissionControl


def test_budget_grows_with_requests_seen_and_sheds_the_most_hopeless_first(make_request):
    control = AdmissionControl(AdmissionConfig(max_shed_fraction=0.1))
    requests = [make_request(f"r{i}") for i in range(30)]
    control.observe(requests)
    control.observe(requests[:10])  # seen twice counts once
    assert control.budget() == 3
    late = [
        (-0.5, make_request("high", priority="high")),
        (-0.1, make_request("low-a", priority="low")),
        (-2.0, make_request("low-b", priority="low")),
        (-0.2, make_request("bg", priority="background")),
        (-9.0, make_request("crit", priority="critical")),
    ]
    shed, kept = control.split_late(late, "t")
    # The latest first (the tail a served-late request would make); critical is never shed.
    assert [r.request_id for r in shed] == ["low-b", "high", "bg"]
    assert all(r.code == RejectCode.QUEUE_FULL and "retry after" in r.reason for r in shed)
    assert [r.id for r in kept] == ["crit", "low-a"]  # (priority, arrival) order
    assert control.budget() == 0 and control.shed_fraction == pytest.approx(0.1)
    shed, kept = control.split_late([(-1.0, make_request("late2", priority="low"))], "t")
    assert shed == [] and [r.id for r in kept] == ["late2"]  # budget spent: served, not shed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_shed_fraction": 1.5}, "[0, 1]"), ({"defer_slack_s": -1}, ">= 0"), ({"protect_priority": 7}, "0-4")],
)
def test_bad_admission_config_names_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_policy("slo_aware", admission=True, **kwargs)


def _overloaded(make_request, make_view):
    """One busy GPU; a chat 2 s past its 500 ms TTFT deadline, a batch job with minutes of slack,
    and 40 on-time chats that make the shed budget (5% of 42 = 2) non-zero."""
    late = make_request("late", arrival_s=0.0, ttft_ms=500.0, priority="normal")
    relaxed = make_request("relaxed", arrival_s=2.0, e2e_ms=120_000.0, priority="low")
    fresh = [make_request(f"f{i}", arrival_s=2.5, ttft_ms=500.0, max_tokens=10) for i in range(40)]
    views = [make_view("gpu", "llm", max_inflight=64, running=10)]
    return [late, relaxed, *fresh], views


def test_slo_aware_admission_sheds_a_late_request_with_a_429_reason(make_request, make_view, check_decisions):
    queue, views = _overloaded(make_request, make_view)
    decisions = make_policy("slo_aware", admission=True).schedule(2.5, queue, views)
    check_decisions(decisions, queue, views)
    (rejection,) = [d for d in decisions if isinstance(d, Rejection)]
    assert rejection.request_id == "late" and rejection.code == RejectCode.QUEUE_FULL
    # The baseline keeps it (and serves it after everything that can still make its SLO).
    baseline = make_policy("slo_aware").schedule(2.5, queue, views)
    assert not [d for d in baseline if isinstance(d, Rejection)]
    order = [i for d in baseline if isinstance(d, Assignment) for i in d.request_ids]
    assert order.index("late") > order.index("relaxed")


def test_a_late_request_not_shed_goes_before_long_slack_work(make_request, make_view):
    queue, views = _overloaded(make_request, make_view)
    decisions = make_policy("slo_aware", admission=True, max_shed_fraction=0.0).schedule(2.5, queue, views)
    order = [i for d in decisions if isinstance(d, Assignment) for i in d.request_ids]
    assert order.index("late") < order.index("relaxed")


def test_hybrid_sheds_late_llm_work_through_its_fallback(make_request, make_view):
    queue, views = _overloaded(make_request, make_view)
    decisions = make_policy("hybrid").schedule(2.5, queue, views)
    assert [(d.request_id, d.code) for d in decisions if isinstance(d, Rejection)] == [("late", RejectCode.QUEUE_FULL)]
    assert not [
        d for d in make_policy("hybrid", admission=False).schedule(2.5, queue, views) if isinstance(d, Rejection)
    ]


def test_observe_queue_counts_what_observe_ids_counts(make_request):
    """Counting the requests added since the last call (`observe_queue`), or one lone request
    (`observe_one`), gives the set arithmetic's count, whatever mix of calls (queue-wide, explicit
    ids, one id) and queue changes comes between."""
    rng = random.Random(4)
    fast = AdmissionControl(AdmissionConfig())
    ref = AdmissionControl(AdmissionConfig())
    q = GatewayQueue()
    classes = [(False, "a"), (False, "b")]
    n = 0
    for _ in range(600):
        for _ in range(rng.randrange(4)):
            n += 1
            q.add(make_request(f"r{n}", model=rng.choice(["a", "b"]), arrival_s=float(n)))
        for victim in [r.id for r in q if rng.random() < 0.2]:
            q.pop(victim)
        if not len(q):
            continue
        offered = [c for c in classes if any(class_of(r) == c for r in q)]
        # What a call places before asking admission (it leaves the queue after the call).
        exclude = {r.id for r in q if rng.random() < 0.1}
        if rng.random() < 0.7:
            ids = {r.id for r in q if class_of(r) in offered} - exclude
            columns = [(c, q.columns(c)) for c in offered]
            assert fast.observe_queue(q, columns, exclude) == bool(ids)
            if ids:
                ref.observe_ids(ids)
        elif rng.random() < 0.5:  # a short queue's plain path: explicit ids
            ids = {r.id for r in q if class_of(r) in offered}
            fast.observe_ids(set(ids))
            ref.observe_ids(ids)
        else:  # a lone request (`observe_one`)
            rid = rng.choice([r.id for r in q])
            fast.observe_one(rid)
            ref.observe_ids({rid})
        assert fast.seen_count == ref.seen_count
        for rid in exclude:
            q.pop(rid)
    assert fast.seen_count > 500
