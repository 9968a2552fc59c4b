"""Least slack first: ordering, placement by predicted TTFT / completion, unattainable SLOs, traps."""

from __future__ import annotations

import random
from collections import Counter

from sagesched.core import Assignment, RejectCode, Rejection
from sagesched.policies.base import LoadLedger
from sagesched.policies.slo_aware import SloAwarePolicy, slack_s


def test_least_slack_first_not_arrival(make_request, make_view, check_decisions):
    queue = [
        make_request("loose", ttft_ms=5000, arrival_s=0.0),
        make_request("tight", ttft_ms=300, arrival_s=0.1),
        make_request("none", arrival_s=-1.0),
    ]
    instances = [make_view("a", max_inflight=1)]
    assigned, _ = check_decisions(SloAwarePolicy().schedule(0.1, queue, instances), queue, instances)
    assert assigned == ["tight"]
    instances = [make_view("a", max_inflight=2)]
    assigned, _ = check_decisions(SloAwarePolicy().schedule(0.1, queue, instances), queue, instances)
    assert assigned == ["tight", "loose"]  # requests with an SLO before those without


def test_slack_counts_every_objective(make_request, make_view):
    view = make_view("a", prefill_tokens_per_s=1000, decode_step_s=0.02)
    ledger = LoadLedger([view])
    # 100 prompt tokens at 1000/s = 0.1 s TTFT; 50 decode steps at 0.02 = 1.0 s more.
    assert abs(slack_s(ledger, "a", make_request("t", ttft_ms=400), 0.0) - 0.3) < 1e-9
    assert abs(slack_s(ledger, "a", make_request("e", e2e_ms=2000), 0.5) - 0.4) < 1e-9
    assert abs(slack_s(ledger, "a", make_request("p", tpot_ms=30), 0.0) - 0.01 * 49) < 1e-9
    both = make_request("b", ttft_ms=400, e2e_ms=1150)
    assert abs(slack_s(ledger, "a", both, 0.0) - 0.05) < 1e-9  # the end-to-end objective binds
    assert slack_s(ledger, "a", make_request("n"), 0.0) == float("inf")


def test_placed_where_predicted_ttft_is_lowest(make_request, make_view):
    instances = [
        make_view("idle-slow", prefill_tokens_per_s=1_000),
        make_view("busy-fast", prefill_tokens_per_s=50_000, queued_prefill_tokens=10_000),
        make_view("idle-fast", prefill_tokens_per_s=20_000),
    ]
    (d,) = SloAwarePolicy().schedule(0.0, [make_request("r", prompt_tokens=2000, ttft_ms=1000)], instances)
    assert d.instance_id == "idle-fast"


def test_e2e_slo_weighs_decode_speed(make_request, make_view):
    instances = [
        make_view("fast-prefill", prefill_tokens_per_s=100_000, decode_step_s=0.05),
        make_view("fast-decode", decode_step_s=0.01),
    ]
    (d,) = SloAwarePolicy().schedule(0.0, [make_request("r", max_tokens=200, e2e_ms=20_000)], instances)
    assert d.instance_id == "fast-decode"


def test_unattainable_moves_behind_attainable_and_best_effort(make_request, make_view, check_decisions):
    queue = [
        make_request("doomed", ttft_ms=100, arrival_s=0.0),  # at t=1 its TTFT deadline has passed
        make_request("none", arrival_s=0.5),
        make_request("ok", ttft_ms=2000, arrival_s=0.9),
    ]
    for slots, expected in [(1, ["ok"]), (2, ["ok", "none"]), (3, ["ok", "none", "doomed"])]:
        instances = [make_view("a", max_inflight=slots)]
        decisions = SloAwarePolicy().schedule(1.0, queue, instances)
        assigned, rejected = check_decisions(decisions, queue, instances)
        assert (assigned, rejected) == (expected, [])
    (last,) = [d for d in decisions if d.request_ids == ("doomed",)]
    assert "no longer attainable" in last.reason


def test_shedding_rejects_unattainable_with_code(make_request, make_view, check_decisions):
    queue = [make_request("doomed", ttft_ms=100, arrival_s=0.0), make_request("ok", ttft_ms=2000, arrival_s=0.9)]
    instances = [make_view("a", max_inflight=4)]
    decisions = SloAwarePolicy(shed_unattainable=True).schedule(1.0, queue, instances)
    assigned, rejected = check_decisions(decisions, queue, instances)
    assert (assigned, rejected) == (["ok"], ["doomed"])
    (rej,) = [d for d in decisions if isinstance(d, Rejection)]
    assert rej.code == RejectCode.SLO_UNATTAINABLE and "slack" in rej.reason


def test_shedding_keeps_what_a_busy_instance_could_still_make(make_request, make_view, check_decisions):
    # "slow" has a free slot but 10 s of queued prefill; "fast" could make the SLO but is full.
    instances = [
        make_view("slow", queued_prefill_tokens=100_000),
        make_view("fast", max_inflight=1, running=1),
    ]
    queue = [make_request("r", ttft_ms=500)]
    for shed in (True, False):
        decisions = SloAwarePolicy(shed_unattainable=shed).schedule(0.0, queue, instances)
        check_decisions(decisions, queue, instances)
        if shed:
            assert decisions == []  # neither shed (attainable on "fast") nor sent where it would miss
        else:
            assert [d.instance_id for d in decisions] == ["slow"]


def test_all_compatible_down_keeps_queued_even_when_shedding(make_request, make_view):
    instances = [make_view("a", healthy=False), make_view("b", models=["B"])]
    assert (
        SloAwarePolicy(shed_unattainable=True).schedule(5.0, [make_request("r", ttft_ms=1, arrival_s=0)], instances)
        == []
    )


def test_one_call_spreads_and_respects_model_kind_capacity(make_request, make_view, check_decisions):
    queue = [make_request(f"r{i}", ttft_ms=1000 + i, arrival_s=i * 0.01) for i in range(8)]
    queue += [
        make_request("e", kind="embedding", model="E", ttft_ms=50, arrival_s=0.09),
        make_request("b", model="B", e2e_ms=10_000),
    ]
    instances = [
        make_view("a1"),
        make_view("a2"),
        make_view("down", healthy=False),
        make_view("mixed", kind="llm_embedding", models=["B", "E"], max_inflight=2, running=1),
    ]
    decisions = SloAwarePolicy().schedule(0.1, queue, instances)
    assigned, _ = check_decisions(decisions, queue, instances)
    by_instance = Counter(d.instance_id for d in decisions)
    assert by_instance["a1"] == by_instance["a2"] == 4
    assert by_instance["mixed"] == 1 and len(assigned) == 9  # one slot left on "mixed": "e" (less slack) gets it
    assert ("e",) in [d.request_ids for d in decisions if d.instance_id == "mixed"]


def test_decisions_keyed_by_id_not_position(make_request, make_view):
    queue = [
        make_request(f"r{i}", ttft_ms=[None, 300, 900, 5000][i % 4], arrival_s=i * 0.05, prompt_tokens=200 + 37 * i)
        for i in range(16)
    ]
    instances = [make_view("a", max_inflight=5), make_view("b", max_inflight=6, prefill_tokens_per_s=4000)]
    expected = set(SloAwarePolicy().schedule(1.0, queue, instances))
    rng = random.Random(11)
    for _ in range(5):
        rng.shuffle(queue)
        assert set(SloAwarePolicy().schedule(1.0, queue, instances)) == expected
    assert len(expected) == 11 and all(isinstance(d, Assignment) for d in expected)
