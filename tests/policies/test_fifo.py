"""FIFO: arrival order, least outstanding work, and the seed's traps on hand-built cases."""

from __future__ import annotations

import random
from collections import Counter

from sagesched.core import Assignment, RejectCode, Rejection
from sagesched.policies.fifo import FifoPolicy


def test_arrival_order_decides_who_gets_the_only_slot(make_request, make_view, check_decisions):
    queue = [
        make_request("late", arrival_s=3.0),
        make_request("first", arrival_s=1.0),
        make_request("mid", arrival_s=2.0),
    ]
    instances = [make_view("a", max_inflight=1)]
    decisions = FifoPolicy().schedule(5.0, queue, instances)
    assigned, rejected = check_decisions(decisions, queue, instances)
    assert assigned == ["first"] and rejected == []


def test_least_outstanding_work_wins(make_request, make_view):
    instances = [make_view("busy", queued_prefill_tokens=5000), make_view("idle")]
    (decision,) = FifoPolicy().schedule(0.0, [make_request("r")], instances)
    assert decision.instance_id == "idle"


def test_one_call_spreads_over_equal_instances(make_request, make_view, check_decisions):
    queue = [make_request(f"r{i}", arrival_s=i) for i in range(9)]
    instances = [make_view(x) for x in "abc"]
    decisions = FifoPolicy().schedule(10.0, queue, instances)
    assigned, _ = check_decisions(decisions, queue, instances)
    assert len(assigned) == 9
    assert Counter(d.instance_id for d in decisions) == {"a": 3, "b": 3, "c": 3}


def test_model_and_kind_match(make_request, make_view, check_decisions):
    queue = [
        make_request("chat-b", model="B"),
        make_request("emb", kind="embedding", model="E"),
        make_request("chat-a", model="A"),
    ]
    instances = [
        make_view("llm-a", models=["A"]),
        make_view("llm-b", models=["B"]),
        make_view("tei", "embedding", ["E"]),
    ]
    decisions = FifoPolicy().schedule(0.0, queue, instances)
    check_decisions(decisions, queue, instances)
    placed = {d.request_ids[0]: d.instance_id for d in decisions}
    assert placed == {"chat-b": "llm-b", "emb": "tei", "chat-a": "llm-a"}


def test_unservable_rejected_unhealthy_kept_queued(make_request, make_view, check_decisions):
    queue = [make_request("nobody-serves", model="X"), make_request("down", model="A"), make_request("ok", model="B")]
    instances = [make_view("a", models=["A"], healthy=False), make_view("b", models=["B"])]
    decisions = FifoPolicy().schedule(0.0, queue, instances)
    assigned, rejected = check_decisions(decisions, queue, instances)
    assert assigned == ["ok"]
    assert rejected == ["nobody-serves"]
    (rej,) = [d for d in decisions if isinstance(d, Rejection)]
    assert rej.code == RejectCode.NO_COMPATIBLE_INSTANCE and "'X'" in rej.reason


def test_capacity_counts_this_calls_assignments(make_request, make_view, check_decisions):
    queue = [make_request(f"r{i}", arrival_s=i) for i in range(5)]
    instances = [make_view("a", max_inflight=3, running=1)]
    assigned, _ = check_decisions(FifoPolicy().schedule(9.0, queue, instances), queue, instances)
    assert assigned == ["r0", "r1"]


def test_decisions_keyed_by_id_not_position(make_request, make_view):
    queue = [make_request(f"r{i}", arrival_s=i * 0.1, model="AB"[i % 2], prompt_tokens=10 * i) for i in range(12)]
    instances = [make_view("a", models=["A"], max_inflight=4), make_view("ab", models=["A", "B"], max_inflight=5)]
    expected = set(FifoPolicy().schedule(2.0, queue, instances))
    rng = random.Random(7)
    for _ in range(5):
        shuffled = queue[:]
        rng.shuffle(shuffled)
        assert set(FifoPolicy().schedule(2.0, shuffled, instances)) == expected


def test_head_of_line_blocking_holds_later_requests(make_request, make_view):
    queue = [make_request("a1", model="A", arrival_s=0), make_request("b1", model="B", arrival_s=1)]
    instances = [make_view("a", models=["A"], max_inflight=1, running=1), make_view("b", models=["B"])]
    passing = FifoPolicy().schedule(2.0, queue, instances)
    assert [d.request_ids for d in passing if isinstance(d, Assignment)] == [("b1",)]
    assert FifoPolicy(head_of_line_blocking=True).schedule(2.0, queue, instances) == []
