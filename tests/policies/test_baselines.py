"""Baselines: round robin, seeded random, least loaded, power of two choices."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sagesched.core import Assignment
from sagesched.policies.baselines import LeastLoadedPolicy, PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy

BASELINES = [RoundRobinPolicy, RandomPolicy, LeastLoadedPolicy, PowerOfTwoPolicy]


def _placements(decisions):
    return [(d.request_ids[0], d.instance_id) for d in decisions if isinstance(d, Assignment)]


def test_round_robin_rotates_within_and_across_calls(make_request, make_view):
    instances = [make_view(x) for x in "cab"]  # listed out of order: rotation follows ids
    policy = RoundRobinPolicy()
    first = policy.schedule(0.0, [make_request(f"r{i}", arrival_s=i) for i in range(4)], instances)
    assert [i for _, i in _placements(first)] == ["a", "b", "c", "a"]
    second = policy.schedule(9.0, [make_request("s0"), make_request("s1")], instances)
    assert [i for _, i in _placements(second)] == ["b", "c"]


def test_round_robin_skips_full_incompatible_and_unhealthy(make_request, make_view):
    instances = [
        make_view("a"),
        make_view("b", max_inflight=1, running=1),
        make_view("c", models=["other"]),
        make_view("d", healthy=False),
        make_view("e"),
    ]
    decisions = RoundRobinPolicy().schedule(0.0, [make_request(f"r{i}", arrival_s=i) for i in range(4)], instances)
    assert [i for _, i in _placements(decisions)] == ["a", "e", "a", "e"]


def test_least_loaded_counts_running_waiting_and_this_call(make_request, make_view):
    instances = [make_view("a", running=2, waiting=1), make_view("b", running=1), make_view("c", waiting=4)]
    decisions = LeastLoadedPolicy().schedule(0.0, [make_request(f"r{i}", arrival_s=i) for i in range(5)], instances)
    # in flight a=3 b=1 c=4: b, b; a/b tie at 3 goes to a (b now holds this call's token work);
    # then b (3 < 4); at a=b=c=4 the one without any token work, c.
    assert [i for _, i in _placements(decisions)] == ["b", "b", "a", "b", "c"]


def test_random_is_seeded_and_uses_every_instance(make_request, make_view):
    instances = [make_view(x) for x in "abcd"]
    queue = [make_request(f"r{i}", arrival_s=i) for i in range(40)]
    same = [_placements(RandomPolicy(seed=3).schedule(0.0, queue, instances)) for _ in range(2)]
    other = _placements(RandomPolicy(seed=4).schedule(0.0, queue, instances))
    assert same[0] == same[1] and other != same[0]
    assert set(Counter(i for _, i in same[0])) == set("abcd")
    # State carries across calls: the second call continues the stream rather than repeating it.
    policy = RandomPolicy(seed=3)
    assert _placements(policy.schedule(0.0, queue, instances)) != _placements(policy.schedule(0.0, queue, instances))


def test_power_of_two_never_picks_the_worse_of_its_pair(make_request, make_view):
    # Fresh views each call: the unique most loaded instance can only lose a comparison.
    instances = [make_view(x, running=k) for k, x in enumerate("abcd")] + [make_view("hot", running=200)]
    policy = PowerOfTwoPolicy(seed=1)
    picks = Counter()
    for step in range(200):
        (d,) = policy.schedule(float(step), [make_request(f"r{step}")], instances)
        picks[d.instance_id] += 1
    assert picks["hot"] == 0 and picks["a"] > picks["c"] > 0
    with_two = [make_view("x", running=5), make_view("y", running=1)]
    assert all(policy.schedule(0.0, [make_request(f"q{i}")], with_two)[0].instance_id == "y" for i in range(10))


def test_power_of_two_is_seeded(make_request, make_view):
    instances = [make_view(x) for x in "abcdef"]
    queue = [make_request(f"r{i}", arrival_s=i) for i in range(30)]
    runs = [_placements(PowerOfTwoPolicy(seed=9).schedule(0.0, queue, instances)) for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("cls", BASELINES, ids=lambda c: c.name)
def test_traps_model_kind_health_capacity_unservable(cls, make_request, make_view, check_decisions):
    queue = [make_request(f"a{i}", model="A", arrival_s=i) for i in range(6)]
    queue += [
        make_request("emb", kind="embedding", model="E"),
        make_request("b", model="B"),
        make_request("lost", model="Z"),
    ]
    instances = [
        make_view("a1", models=["A"], max_inflight=2, running=1),
        make_view("a2", models=["A"], max_inflight=3),
        make_view("a-down", models=["A"], healthy=False),
        make_view("ab", kind="llm_embedding", models=["A", "B", "E"], max_inflight=2),
        make_view("e-only-llm", models=["E"]),
    ]
    decisions = cls().schedule(10.0, queue, instances)
    assigned, rejected = check_decisions(decisions, queue, instances)
    assert rejected == ["lost"]
    placed = dict(_placements(decisions))
    assert placed.get("emb") in (None, "ab") and placed.get("b") in (None, "ab")
    assert len(assigned) == 6  # exactly the six free slots (1 + 3 + 2) are filled, never more


@pytest.mark.parametrize("cls", BASELINES, ids=lambda c: c.name)
def test_one_call_spreads_evenly_over_equal_instances(cls, make_request, make_view):
    instances = [make_view(x, max_inflight=4) for x in "abc"]
    decisions = cls().schedule(0.0, [make_request(f"r{i}", arrival_s=i) for i in range(12)], instances)
    assert Counter(d.instance_id for d in decisions) == {"a": 4, "b": 4, "c": 4}  # capacity forces it for all
    if cls in (RoundRobinPolicy, LeastLoadedPolicy):
        roomy = [make_view(x) for x in "abc"]
        decisions = cls().schedule(0.0, [make_request(f"r{i}", arrival_s=i) for i in range(9)], roomy)
        assert Counter(d.instance_id for d in decisions) == {"a": 3, "b": 3, "c": 3}


@pytest.mark.parametrize("cls", BASELINES, ids=lambda c: c.name)
def test_decisions_keyed_by_id_not_position(cls, make_request, make_view):
    queue = [make_request(f"r{i}", arrival_s=(i * 5) % 7, model="AB"[i % 2]) for i in range(14)]
    instances = [make_view("a", models=["A", "B"], max_inflight=5), make_view("b", models=["B"]), make_view("c")]
    expected = set(cls().schedule(1.0, queue, instances))
    rng = random.Random(2)
    for _ in range(4):
        rng.shuffle(queue)
        assert set(cls().schedule(1.0, queue, instances)) == expected
