"""The decision core: one meaning for a policy's decisions, and for a policy that misbehaves."""

from __future__ import annotations

from collections.abc import Sequence

from sagesched.core import Assignment, InstanceKind, InstanceView, Rejection, Request, RequestType
from sagesched.core.decisions import INVALID_DECISION, POLICY_ERROR, decide
from sagesched.policies import make_policy


def req(rid: str, kind: RequestType = RequestType.LLM_CHAT, model: str = "m") -> Request:
    if kind is RequestType.EMBEDDING:
        return Request(rid, kind, model, 0.0, embedding_inputs=1, embedding_tokens=8)
    return Request(rid, kind, model, 0.0, prompt_tokens=10, max_tokens=5)


def view(vid: str, kind: InstanceKind = InstanceKind.LLM, models=("m",), healthy: bool = True) -> InstanceView:
    return InstanceView(vid, kind, frozenset(models), healthy=healthy)


class Scripted:
    """A policy that answers with whatever `answer(queue)` returns (or raises)."""

    name = "scripted"

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls: list[list[str]] = []

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]):
        self.calls.append([r.id for r in queue])
        return self.answer(queue)


def test_valid_assignment_and_rejection() -> None:
    q = [req("a"), req("b"), req("c")]
    pol = Scripted(lambda queue: [Assignment("i1", ("a", "b"), rule="r"), Rejection("c", "no", "slo_unattainable")])
    d = decide(pol, 0.0, q, [view("i1")])
    assert [(p.instance_id, [r.id for r in p.requests]) for p in d.placements] == [("i1", ["a", "b"])]
    assert [(v.request.id, v.outcome, v.code) for v in d.verdicts] == [("c", "rejected", "slo_unattainable")]
    assert d.verdicts[0].message == "slo_unattainable: no"


def test_unknown_and_incompatible_instances_fail_only_those_requests() -> None:
    q = [req("a"), req("e", RequestType.EMBEDDING), req("x", model="other"), req("ok")]
    pol = Scripted(
        lambda queue: [
            Assignment("nope", ("a",)),
            Assignment("i1", ("e", "x", "ok")),
        ]
    )
    d = decide(pol, 0.0, q, [view("i1")])
    failed = {v.request.id: v for v in d.verdicts}
    assert set(failed) == {"a", "e", "x"}
    assert all(v.outcome == "failed" and v.code == INVALID_DECISION for v in failed.values())
    assert "unknown instance 'nope'" in failed["a"].reason
    assert [r.id for p in d.placements for r in p.requests] == ["ok"]


def test_unhealthy_instance_holds_and_unqueued_ids_are_ignored() -> None:
    q = [req("a"), req("b")]
    pol = Scripted(lambda queue: [Assignment("down", ("a",)), Assignment("i1", ("ghost", "b")), Rejection("b", "dup")])
    d = decide(pol, 0.0, q, [view("down", healthy=False), view("i1")])
    assert d.held_unhealthy == 1
    assert [r.id for p in d.placements for r in p.requests] == ["b"]
    assert d.verdicts == []  # the second decision about b is ignored: the first wins
    assert len(d.ignored) == 2


def test_policy_raising_on_one_request_fails_only_it() -> None:
    def answer(queue):
        if any(r.id == "poison" for r in queue):
            raise OverflowError("int too large to convert to float")
        return [Assignment("i1", (r.id,)) for r in queue]

    q = [req(f"r{i}") for i in range(7)] + [req("poison")] + [req(f"s{i}") for i in range(6)]
    d = decide(Scripted(answer), 0.0, q, [view("i1")])
    assert [(v.request.id, v.outcome, v.code) for v in d.verdicts] == [("poison", "failed", POLICY_ERROR)]
    assert "OverflowError" in d.verdicts[0].reason
    assert sorted(r.id for p in d.placements for r in p.requests) == sorted(r.id for r in q if r.id != "poison")
    assert d.policy_errors >= 2


def test_garbage_answers_are_policy_errors() -> None:
    for garbage in (None, "x", [object()], [Assignment("i1", ("a",)), 42]):
        d = decide(Scripted(lambda queue, g=garbage: g), 0.0, [req("a"), req("b")], [view("i1")])
        assert {v.request.id for v in d.verdicts} == {"a", "b"}
        assert all(v.code == POLICY_ERROR for v in d.verdicts)
        assert d.placements == []


def test_policy_failing_only_on_a_combination_fails_that_call_only() -> None:
    d = decide(
        Scripted(lambda queue: (_ for _ in ()).throw(RuntimeError("pair")) if len(queue) == 2 else []),
        0.0,
        [req("a"), req("b")],
        [view("i1")],
    )
    assert {v.request.id for v in d.verdicts} == {"a", "b"}


def test_real_policy_passes_through_unchanged() -> None:
    pol = make_policy("fifo")
    q = [req("a"), req("b", RequestType.EMBEDDING, model="e")]
    views = [view("i1"), view("t1", InstanceKind.EMBEDDING, models=("e",))]
    d = decide(pol, 0.0, q, views)
    placed = {r.id: p.instance_id for p in d.placements for r in p.requests}
    assert placed == {"a": "i1", "b": "t1"}
    assert d.verdicts == [] and d.policy_errors == 0


def test_a_view_list_decides_as_the_plain_list_it_is():
    """The simulator's `ViewList` (a list that also shares one id map per call) gives the decisions a
    plain list gives, built with `ViewList.of` or directly, including an invalid target."""
    from sagesched.core.pool import ViewList

    views = [view("a"), view("b", InstanceKind.EMBEDDING, models=("e",)), view("c", healthy=False)]
    queue = [req("r1"), req("r2"), req("r3")]

    class Fixed:
        name = "fixed"

        def schedule(self, now, q, vs):
            return [Assignment("a", ("r1",)), Assignment("b", ("r2",)), Assignment("c", ("r3",))]

    want = decide(Fixed(), 0.0, queue, views)
    for shown in (ViewList(views), ViewList.of(views, serves_class={})):
        got = decide(Fixed(), 0.0, queue, shown)
        assert got.placements == want.placements and got.verdicts == want.verdicts
        assert got.held_unhealthy == want.held_unhealthy == 1
        assert shown.by_id() == {v.id: v for v in views} and shown.idle_ids is None
    assert [p.instance_id for p in want.placements] == ["a"] and want.verdicts[0].code == INVALID_DECISION
