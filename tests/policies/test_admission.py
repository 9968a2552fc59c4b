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


def _late_interactive(make_request, make_view):
    """A high-priority chat whose 500 ms TTFT is lost (arrived at 2.0), a standard chat that can
    still make its 2 s TTFT (urgent: slack under `defer_slack_s`), a batch job with minutes of
    slack, and enough on-time fillers for the indexed path; one roomy GPU, nothing shed."""
    late = make_request("late", arrival_s=2.0, ttft_ms=500.0, priority="high")
    urgent = make_request("urgent", arrival_s=2.8, ttft_ms=2000.0, priority="normal")
    relaxed = make_request("relaxed", arrival_s=2.8, e2e_ms=120_000.0, priority="low")
    fillers = [make_request(f"f{i}", arrival_s=2.85, e2e_ms=60_000.0, priority="low") for i in range(40)]
    views = [make_view("gpu", "llm", max_inflight=256, running=10)]
    return [late, urgent, relaxed, *fillers], views


@pytest.mark.parametrize("indexed", [False, True])
def test_late_urgent_work_goes_first_only_after_its_wait(make_request, make_view, indexed):
    """`late_first_wait_s`: a late high-priority request goes ahead of urgent attainable work once it
    has waited that long; before, right after it (and still before long-slack work)."""
    queue, views = _late_interactive(make_request, make_view)

    def order(now: float, **config) -> list[str]:
        policy = make_policy("slo_aware", admission=True, max_shed_fraction=0.0, **config)
        offered = GatewayQueue(queue) if indexed else list(queue)
        decisions = policy.schedule(now, offered, views)
        return [i for d in decisions if isinstance(d, Assignment) for i in d.request_ids]

    at_once = order(2.9)
    assert at_once.index("late") < at_once.index("urgent")  # the default: late urgent work first
    waiting = order(2.9, late_first_wait_s=1.5)  # waited 0.9 s of 1.5
    assert waiting.index("urgent") < waiting.index("late") < waiting.index("relaxed")
    waited = order(3.6, late_first_wait_s=1.5)  # waited 1.6 s
    assert waited.index("late") < waited.index("urgent")
    edge = order(3.5, late_first_wait_s=1.5)  # waited exactly 1.5 s (all three values exact in binary)
    assert edge.index("late") < edge.index("urgent")


def test_hybrid_passes_its_late_first_wait_to_the_fallback():
    assert make_policy("hybrid").llm_fallback.admission.config.late_first_wait_s == 1.5
    assert make_policy("hybrid", late_first_wait_ms=0).llm_fallback.admission.config.late_first_wait_s == 0.0
    explicit = make_policy("hybrid", llm_fallback_config={"late_first_wait_s": 0.4})
    assert explicit.llm_fallback.admission.config.late_first_wait_s == 0.4
    with pytest.raises(ValueError, match="late_first_wait_ms must be a finite number >= 0"):
        make_policy("hybrid", late_first_wait_ms=-1)
    with pytest.raises(ValueError, match="late_first_wait_s must be a finite number >= 0"):
        make_policy("slo_aware", admission=True, late_first_wait_s=float("nan"))
