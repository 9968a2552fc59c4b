"""Adaptive: mode choice from load and SLO pressure, hysteresis and dwell, rule/reason on every decision."""

from __future__ import annotations

import random

import pytest

from sagesched.core import Assignment, RejectCode, Rejection
from sagesched.policies.adaptive import AdaptiveConfig, AdaptivePolicy

# Queue thresholds far away, so that these tests move the mode by load alone.
LOAD_ONLY = {"enter_queue_per_instance": 1000.0, "exit_queue_per_instance": 500.0}


def _cluster(make_view, load: float, n: int = 1):
    return [make_view(f"i{k}", running=round(load * 100), max_inflight=100) for k in range(n)]


def test_idle_cluster_runs_fifo_and_says_why(make_request, make_view, check_decisions):
    queue = [make_request("hi", priority="critical", arrival_s=1.0), make_request("old", priority="low", arrival_s=0.0)]
    instances = [make_view("a", max_inflight=1)]
    policy = AdaptivePolicy()
    decisions = policy.schedule(1.0, queue, instances)
    assigned, _ = check_decisions(decisions, queue, instances)
    assert assigned == ["old"]  # arrival order: fifo
    (d,) = decisions
    assert policy.mode == "fifo" and d.rule == "adaptive/fifo"
    assert "load=0.00" in d.reason and "slo_pressure=0.00" in d.reason and "queue/instance=2.0" in d.reason


def test_congestion_switches_to_priority(make_request, make_view, check_decisions):
    queue = [make_request("old", priority="low", arrival_s=0.0), make_request("hi", priority="critical", arrival_s=1.0)]
    instances = [make_view("a", running=90, max_inflight=91)]
    policy = AdaptivePolicy(**LOAD_ONLY)
    decisions = policy.schedule(1.0, queue, instances)
    assigned, _ = check_decisions(decisions, queue, instances)
    assert policy.mode == "priority" and assigned == ["hi"]
    (d,) = decisions
    assert d.rule == "adaptive/priority" and "load 0.99 >= 0.8 (entered)" in d.reason
    assert d.priority_hint == 0  # the sub-policy's own fields pass through


def test_queue_length_alone_counts_as_congestion(make_request, make_view):
    queue = [make_request(f"r{i}", arrival_s=i) for i in range(10)]
    policy = AdaptivePolicy(enter_queue_per_instance=4.0)
    policy.schedule(10.0, queue, [make_view("a"), make_view("b")])
    assert policy.mode == "priority" and policy.last_measurement.queue_per_instance == 5.0


def test_slo_pressure_switches_to_slo_aware_and_outranks_load(make_request, make_view, check_decisions):
    queue = [
        make_request("relaxed", arrival_s=0.0),
        make_request("urgent", ttft_ms=150, arrival_s=1.0),
        make_request("soon", ttft_ms=300, arrival_s=1.0),
    ]
    instances = [make_view("a", running=95, max_inflight=96)]
    policy = AdaptivePolicy()
    decisions = policy.schedule(1.0, queue, instances)
    assigned, _ = check_decisions(decisions, queue, instances)
    assert policy.mode == "slo_aware" and assigned == ["urgent"]
    assert policy.last_measurement.slo_pressure == pytest.approx(2 / 3)
    assert decisions[0].rule == "adaptive/slo_aware" and "slo_pressure 0.67 >= 0.2" in decisions[0].reason


def test_rejections_carry_the_sub_policy_rule(make_request, make_view, check_decisions):
    queue = [make_request("doomed", ttft_ms=10, arrival_s=0.0), make_request("x", model="nope", arrival_s=0.0)]
    instances = [make_view("a")]
    decisions = AdaptivePolicy(shed_unattainable=True).schedule(1.0, queue, instances)
    _, rejected = check_decisions(decisions, queue, instances)
    assert sorted(rejected) == ["doomed", "x"]
    codes = {d.request_id: (d.code, d.rule) for d in decisions if isinstance(d, Rejection)}
    assert codes == {
        "doomed": (RejectCode.SLO_UNATTAINABLE, "adaptive/slo_aware"),
        "x": (RejectCode.NO_COMPATIBLE_INSTANCE, "adaptive/slo_aware"),
    }


def test_hysteresis_between_enter_and_exit(make_request, make_view):
    policy = AdaptivePolicy(min_dwell_s=0.0, **LOAD_ONLY)
    queue = [make_request("r")]
    modes = []
    for t, load in enumerate([0.7, 0.85, 0.7, 0.75, 0.65, 0.7, 0.5, 0.7, 0.79, 0.8]):
        policy.schedule(float(t), queue, _cluster(make_view, load))
        modes.append(policy.mode[0])
    # enters at 0.8, holds down to 0.6, leaves below it, re-enters only at 0.8 again
    assert "".join(modes) == "fppppp" + "fff" + "p"
    assert policy.switches == 3


def test_min_dwell_time_uses_policy_time(make_request, make_view):
    policy = AdaptivePolicy(min_dwell_s=5.0, **LOAD_ONLY)
    queue = [make_request("r", arrival_s=0.0)]
    policy.schedule(100.0, queue, _cluster(make_view, 0.9))
    assert policy.mode == "priority"  # the first switch is free
    (d,) = policy.schedule(101.0, queue, _cluster(make_view, 0.0))
    assert policy.mode == "priority" and "held for min_dwell_s (1.00 s < 5 s)" in d.reason
    policy.schedule(104.99, queue, _cluster(make_view, 0.0))
    assert policy.mode == "priority"
    policy.schedule(105.0, queue, _cluster(make_view, 0.0))
    assert policy.mode == "fifo"


def test_no_flapping_under_oscillating_load(make_request, make_view):
    policy = AdaptivePolicy(min_dwell_s=5.0, **LOAD_ONLY)
    queue = [make_request("r")]
    for step in range(60):
        policy.schedule(step * 0.5, queue, _cluster(make_view, 0.95 if step % 2 else 0.05))
    assert policy.switches <= 30 / 5 + 1


def test_sub_policies_are_kept_across_calls(make_request, make_view):
    policy = AdaptivePolicy(aging_interval_s=3.0, urgent_max_priority="critical", shed_unattainable=True)
    subs = dict(policy.policies)
    assert set(subs) == {"fifo", "priority", "slo_aware"}
    assert subs["priority"].config.aging_interval_s == 3.0 and subs["priority"].config.urgent_max_priority == 0
    assert subs["slo_aware"].config.shed_unattainable is True
    for t in range(5):
        policy.schedule(float(t), [make_request("r")], _cluster(make_view, 0.9 if t % 2 else 0.1))
    assert all(policy.policies[k] is subs[k] for k in subs)
    assert policy.describe()["mode"] == policy.mode


def test_spread_model_and_capacity_in_every_mode(make_request, make_view, check_decisions):
    for load, expected_mode in [(0.0, "fifo"), (0.9, "priority")]:
        queue = [make_request(f"r{i}", arrival_s=i * 0.1, priority=i % 5) for i in range(6)]
        queue.append(make_request("b", model="B"))
        instances = [
            make_view("a1", running=round(load * 10), max_inflight=10),
            make_view("a2", running=round(load * 10), max_inflight=10),
            make_view("b-down", models=["B"], healthy=False),
        ]
        policy = AdaptivePolicy(**LOAD_ONLY)
        decisions = policy.schedule(1.0, queue, instances)
        assigned, rejected = check_decisions(decisions, queue, instances)
        assert policy.mode == expected_mode and rejected == []
        per = {iid: sum(d.instance_id == iid for d in decisions) for iid in ("a1", "a2")}
        if expected_mode == "fifo":
            assert per == {"a1": 3, "a2": 3}
        else:
            assert per == {"a1": 1, "a2": 1}  # one free slot each
        assert "b" not in assigned


def test_decisions_keyed_by_id_not_position(make_request, make_view):
    queue = [make_request(f"r{i}", priority=i % 5, ttft_ms=[None, 400][i % 2], arrival_s=0.1 * i) for i in range(12)]
    instances = [make_view("a", running=8, max_inflight=10), make_view("b", max_inflight=3)]
    expected = set(AdaptivePolicy().schedule(1.2, queue, instances))
    rng = random.Random(5)
    for _ in range(4):
        rng.shuffle(queue)
        assert set(AdaptivePolicy().schedule(1.2, queue, instances)) == expected
    assert len(expected) == 5 and all(isinstance(d, Assignment) for d in expected)


@pytest.mark.parametrize("measure", ["load", "queue_per_instance", "slo_pressure"])
def test_inverted_thresholds_rejected_with_fix(measure):
    with pytest.raises(ValueError, match=f"exit_{measure} <= enter_{measure}"):
        AdaptiveConfig(**{f"enter_{measure}": 0.1, f"exit_{measure}": 0.2})
    with pytest.raises(ValueError, match="min_dwell_s"):
        AdaptiveConfig(min_dwell_s=-1)
