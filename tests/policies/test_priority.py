"""Priority with aging: class order, the starvation bound, urgent placement, and the traps."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sagesched.core import Assignment, Priority
from sagesched.policies.priority import PriorityConfig, PriorityPolicy, effective_priority


def test_higher_class_first_even_if_later(make_request, make_view, check_decisions):
    queue = [
        make_request("low", priority="low", arrival_s=0.0),
        make_request("normal", priority="normal", arrival_s=0.5),
        make_request("high", priority="high", arrival_s=1.0),
    ]
    instances = [make_view("a", max_inflight=1)]
    assigned, _ = check_decisions(PriorityPolicy().schedule(1.0, queue, instances), queue, instances)
    assert assigned == ["high"]


def test_same_class_in_arrival_order(make_request, make_view, check_decisions):
    queue = [make_request(f"r{i}", priority="high", arrival_s=3 - i) for i in range(3)]
    instances = [make_view("a", max_inflight=2)]
    assigned, _ = check_decisions(PriorityPolicy().schedule(3.0, queue, instances), queue, instances)
    assert assigned == ["r2", "r1"]


@pytest.mark.parametrize(
    ("priority", "waited", "expected"),
    [(3, 0.0, 3), (3, 9.99, 3), (3, 10.0, 2), (3, 29.99, 1), (3, 30.0, 0), (3, 1e6, 0), (0, 50.0, 0), (4, -5.0, 4)],
)
def test_effective_priority_steps_once_per_interval(make_request, priority, waited, expected):
    request = make_request("r", priority=priority, arrival_s=100.0)
    assert effective_priority(request, 100.0 + waited, aging_interval_s=10.0) == expected


def test_effective_class_exact_at_float_boundaries(make_request):
    # 0.1 * 3 != 0.3 in floats; a request that waited p intervals in real numbers must be at class 0.
    request = make_request("r", priority="low", arrival_s=0.7)
    assert effective_priority(request, 0.7 + 3 * 0.1, aging_interval_s=0.1) == 0


def test_aged_request_beats_later_critical_arrivals(make_request, make_view, check_decisions):
    """At t0 + p * aging_interval_s the low request competes at class 0 and arrived first."""
    policy = PriorityPolicy(aging_interval_s=2.0)
    low = make_request("low", priority="background", arrival_s=0.0)  # class 4: class 0 from t = 8
    instances = [make_view("a", max_inflight=1)]
    before = [low, make_request("crit-a", priority="critical", arrival_s=7.9)]
    assigned, _ = check_decisions(policy.schedule(7.99, before, instances), before, instances)
    assert assigned == ["crit-a"]
    after = [low, make_request("crit-b", priority="critical", arrival_s=7.995)]
    assigned, _ = check_decisions(policy.schedule(8.0, after, instances), after, instances)
    assert assigned == ["low"]


@pytest.mark.parametrize("stream", [Priority.CRITICAL, Priority.HIGH])
def test_starvation_bound_under_a_steady_higher_priority_stream(make_request, make_view, stream):
    """One slot freed per tick and a new higher-priority request every tick: LOW still gets through.

    It ties with the stream's class after (LOW - stream) intervals and then wins on arrival; the
    documented bound LOW * aging_interval_s (plus one tick) holds for every stream class.
    """
    aging, tick = 4.0, 0.5
    policy = PriorityPolicy(aging_interval_s=aging)
    instances = [make_view("a", max_inflight=1)]
    queue = [make_request("low", priority="low", arrival_s=0.0)]
    placed_at = None
    for step in range(1, 100):
        now = step * tick
        queue.append(make_request(f"h{step}", priority=stream, arrival_s=now))
        decisions = policy.schedule(now, queue, instances)
        (decision,) = decisions  # one free slot each tick, always used
        queue = [r for r in queue if r.id not in decision.request_ids]
        if decision.request_ids == ("low",):
            placed_at = now
            assert decision.priority_hint == int(stream)
            break
    assert placed_at == (Priority.LOW - stream) * aging  # the first tick at which it ties the stream's class
    assert placed_at <= int(Priority.LOW) * aging + tick
    # Without aging (a huge interval) the same stream would starve it.
    strict = PriorityPolicy(aging_interval_s=1e9)
    queue = [make_request("low", priority="low", arrival_s=0.0)]
    for step in range(1, 60):
        queue.append(make_request(f"h{step}", priority="high", arrival_s=step * tick))
        (decision,) = strict.schedule(step * tick, queue, instances)
        assert decision.request_ids != ("low",)
        queue = [r for r in queue if r.id not in decision.request_ids]


def test_urgent_goes_to_lowest_predicted_wait_others_to_least_work(make_request, make_view):
    # "prefill" holds little work but all of it is prefill ahead of a new request (0.5 s wait);
    # "decode" holds more work, all of it decode of running sequences (no wait for a new one).
    instances = [
        make_view("prefill", queued_prefill_tokens=5000, prefill_tokens_per_s=10_000),
        make_view("decode", running=4, queued_decode_tokens=20_000),
    ]
    (urgent,) = PriorityPolicy().schedule(0.0, [make_request("u", priority="high")], instances)
    (normal,) = PriorityPolicy().schedule(0.0, [make_request("n", priority="normal")], instances)
    assert urgent.instance_id == "decode" and "urgent" in urgent.reason
    assert normal.instance_id == "prefill"
    (relaxed,) = PriorityPolicy(urgent_max_priority="critical").schedule(
        0.0, [make_request("u", priority="high")], instances
    )
    assert relaxed.instance_id == "prefill"


def test_priority_hint_is_the_effective_class(make_request, make_view):
    queue = [make_request("fresh", priority="low", arrival_s=10.0), make_request("aged", priority="low", arrival_s=0.0)]
    decisions = PriorityPolicy(aging_interval_s=5.0).schedule(10.0, queue, [make_view("a"), make_view("b")])
    hints = {d.request_ids[0]: d.priority_hint for d in decisions}
    assert hints == {"fresh": 3, "aged": 1}


def test_spread_model_kind_capacity_and_health(make_request, make_view, check_decisions):
    queue = [make_request(f"c{i}", priority=i % 5, arrival_s=i) for i in range(8)]
    queue += [make_request("b", model="B"), make_request("e", kind="embedding", model="E", priority="critical")]
    instances = [
        make_view("a1", max_inflight=4),
        make_view("a2", max_inflight=4),
        make_view("down", healthy=False),
        make_view("b", models=["B"], kind="llm_embedding", running=1, max_inflight=1),
        make_view("tei", kind="embedding", models=["E"]),
    ]
    decisions = PriorityPolicy().schedule(9.0, queue, instances)
    assigned, rejected = check_decisions(decisions, queue, instances)
    assert sorted(assigned) == sorted([f"c{i}" for i in range(8)] + ["e"])  # "b" waits: its instance is full
    assert rejected == []
    assert Counter(d.instance_id for d in decisions) == {"a1": 4, "a2": 4, "tei": 1}


def test_decisions_keyed_by_id_not_position(make_request, make_view):
    queue = [make_request(f"r{i}", priority=i % 5, arrival_s=(i * 7) % 5) for i in range(15)]
    instances = [make_view("a", max_inflight=3), make_view("b", max_inflight=4, queued_prefill_tokens=300)]
    expected = set(PriorityPolicy().schedule(6.0, queue, instances))
    rng = random.Random(3)
    for _ in range(5):
        rng.shuffle(queue)
        assert set(PriorityPolicy().schedule(6.0, queue, instances)) == expected
    assert all(isinstance(d, Assignment) for d in expected) and len(expected) == 7


def test_config_validation_names_the_fix():
    with pytest.raises(ValueError, match="aging_interval_s must be > 0"):
        PriorityConfig(aging_interval_s=0)
    with pytest.raises(ValueError, match="unknown priority 'urgentest'"):
        PriorityConfig(urgent_max_priority="urgentest")
    assert PriorityConfig(urgent_max_priority="normal").urgent_max_priority == 2
