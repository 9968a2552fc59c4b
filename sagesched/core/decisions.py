"""The one place a policy's decisions are checked and given meaning, for both drivers.

The simulator and the live executor both call `decide(policy, now, queue, views)` and then carry out
what it returns. Because the checks live here, a decision means the same thing in simulation and
live, and so does a policy that misbehaves. The semantics (also in docs/internals.md):

- `Assignment` of queued requests to a known, healthy instance whose kind and models serve them:
  a `Placement` (one backend call when it holds several embedding requests).
- `Rejection` of a queued request: a `Verdict` with outcome ``rejected`` and the policy's code and
  reason.
- An assignment to an instance that does not exist, or that cannot serve a request (kind or model):
  that request ends with outcome ``failed``, code ``invalid_decision`` and a reason naming the
  instance. The other requests of the same assignment are unaffected.
- An assignment to an unhealthy instance: the request stays queued (counted in `held_unhealthy`);
  the driver's stranding rules apply as for any queued request.
- A decision about a request that is not queued (unknown, or already decided earlier in the same
  list): ignored, with a line in `ignored`. The first decision about a request wins.
- A policy that raises, returns something that is not a list of decisions, or a list holding
  something that is not an `Assignment` or `Rejection`: the core finds the requests whose presence
  makes it misbehave by calling it again on halves of the queue (bisection; the decisions of those
  probing calls are thrown away). Those requests end with outcome ``failed`` and code
  ``policy_error``; the policy is then called once more without them and its decisions are used.
  A policy that misbehaves on every request fails every request of the call, and nothing else.

The module is pure: no clock, no I/O, no event loop. It never raises because of the policy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple

from sagesched.core.assignment import Assignment, Rejection
from sagesched.core.instance import InstanceKind, InstanceView
from sagesched.core.pool import ViewList, views_by_id
from sagesched.core.queue import GatewayQueue
from sagesched.core.request import Request, RequestType

logger = logging.getLogger(__name__)

_EMBEDDING_REQUEST = RequestType.EMBEDDING
_LLM_KIND = InstanceKind.LLM
_EMBEDDING_KIND = InstanceKind.EMBEDDING

INVALID_DECISION = "invalid_decision"
POLICY_ERROR = "policy_error"


class Placement(NamedTuple):
    """Validated part of an `Assignment`: every request in `requests` may go to `instance_id`.

    A NamedTuple (immutable) rather than a frozen dataclass: one is built per placement on the
    request path, and a frozen dataclass's __init__ took 1.9 us against 0.4 us here.
    """

    instance_id: str
    requests: tuple[Request, ...]
    priority_hint: int | None = None
    rule: str = ""
    reason: str = ""


class Verdict(NamedTuple):
    """A request that ends now: rejected by the policy, or failed because of the policy."""

    request: Request
    outcome: Literal["rejected", "failed"]
    code: str
    reason: str
    rule: str = ""

    @property
    def message(self) -> str:
        """``code: reason``, the form records carry in their `reason` column."""
        return f"{self.code}: {self.reason}"


class Decisions:
    """What one policy call means. Requests in none of the lists stay queued.

    A plain slotted class rather than a dataclass with list factories: one is built per policy call
    (per arrival or completion live), and this halves its construction time.
    """

    __slots__ = ("held_unhealthy", "ignored", "placements", "policy_errors", "verdicts")

    def __init__(self) -> None:
        self.placements: list[Placement] = []
        self.verdicts: list[Verdict] = []
        # Requests assigned to an unhealthy instance (they stay queued).
        self.held_unhealthy = 0
        # Decisions that could not be attributed to a queued request (logged, otherwise ignored).
        self.ignored: list[str] = []
        # Number of times the policy misbehaved (raise or garbage) during this call, probes included.
        self.policy_errors = 0

    def __repr__(self) -> str:
        return (
            f"Decisions(placements={self.placements!r}, verdicts={self.verdicts!r}, "
            f"held_unhealthy={self.held_unhealthy}, ignored={self.ignored!r}, policy_errors={self.policy_errors})"
        )


class PolicyMisbehaved(Exception):
    """Internal: the policy raised or returned something that is not a list of decisions."""


def _call(policy: object, now: float, queue: Sequence[Request], views: Sequence[InstanceView]) -> list:
    try:
        # The queue goes through as given (the simulator passes an indexed queue; copying it would
        # make every call O(queue) past saturation).
        out = policy.schedule(now, queue, views)  # type: ignore[attr-defined]
    except Exception as exc:  # the policy's own bug, whatever it is
        raise PolicyMisbehaved(f"{type(exc).__name__}: {exc}") from exc
    bad = _malformed(out)
    if bad is not None:
        raise bad
    return out if type(out) is list else list(out)


def _malformed(out: object) -> PolicyMisbehaved | None:
    """What is wrong with `out` as a `schedule` result, or None when it is a list of decisions."""
    if not isinstance(out, (list, tuple)):
        return PolicyMisbehaved(f"schedule() returned {type(out).__name__}, not a list of decisions")
    for d in out:
        if not isinstance(d, (Assignment, Rejection)):
            return PolicyMisbehaved(f"schedule() returned a {type(d).__name__}; expected Assignment or Rejection")
    return None


def _offenders(
    policy: object, now: float, queue: Sequence[Request], views: Sequence[InstanceView], counter: list[int]
) -> tuple[list[tuple[Request, str]], list[Request]]:
    """Split `queue` (on which the policy misbehaves) into (offenders with the error, the rest)."""
    if len(queue) == 1:
        try:
            _call(policy, now, queue, views)
        except PolicyMisbehaved as exc:
            counter[0] += 1
            return [(queue[0], str(exc))], []
        return [], list(queue)
    half = len(queue) // 2
    bad: list[tuple[Request, str]] = []
    good: list[Request] = []
    for part in (queue[:half], queue[half:]):
        try:
            _call(policy, now, part, views)
        except PolicyMisbehaved:
            counter[0] += 1
            b, g = _offenders(policy, now, part, views, counter)
            bad.extend(b)
            good.extend(g)
        else:
            good.extend(part)
    return bad, good


def decide(policy: object, now: float, queue: Sequence[Request], views: Sequence[InstanceView]) -> Decisions:
    """Call `policy.schedule` and turn its answer into placements and verdicts (module docstring).

    Cost: the policy call plus O(decisions), never O(queue), when the policy behaves: ids are looked
    up with ``queue.get(id)`` when the queue has it (else one dict is built), and the views are
    indexed only when an assignment names an instance. `_call` is spelled out here (the same checks,
    without its frame and exception wrapping): this runs on every arrival and completion.
    """
    result = Decisions()
    first: PolicyMisbehaved | None = None
    try:
        # The queue goes through as given (the simulator passes an indexed queue; copying it would
        # make every call O(queue) past saturation).
        raw = policy.schedule(now, queue, views)  # type: ignore[attr-defined]
    except Exception as exc:  # the policy's own bug, whatever it is
        first = PolicyMisbehaved(f"{type(exc).__name__}: {exc}")
        first.__cause__ = exc
    else:
        if type(raw) is list:
            if len(raw) == 1 and type(queue) is GatewayQueue and type(raw[0]) is Assignment:
                # One assignment off the simulator's queue (at light load, almost every call): the
                # checks below and `_apply`'s own fast path, without their calls.
                _apply(raw, queue.get, views, result)
                return result
            for d in raw:
                if type(d) is not Assignment and type(d) is not Rejection:
                    first = _malformed(raw)
                    break
        else:
            first = _malformed(raw)
            if first is None:
                raw = list(raw)
    if first is not None:
        good = _isolate(policy, now, list(queue), views, first, result)
        raw = []
        if good:
            try:
                raw = _call(policy, now, good, views)
            except PolicyMisbehaved as exc:
                result.policy_errors += 1
                _fail_all(policy, good, str(exc), result)
                return result
        _apply(raw, {r.id: r for r in good}.get, views, result)
        return result
    if raw:
        if type(queue) is GatewayQueue:
            _apply(raw, queue.get, views, result)
        else:
            # A plain list has no `get` (and getattr's miss costs an exception): skip the lookup.
            getter = None if type(queue) is list else getattr(queue, "get", None)
            _apply(raw, getter if callable(getter) else {r.id: r for r in queue}.get, views, result)
    return result


def _fail_all(policy: object, requests: Sequence[Request], error: str, result: Decisions) -> None:
    name = getattr(policy, "name", type(policy).__name__)
    for request in requests:
        result.verdicts.append(
            Verdict(request, "failed", POLICY_ERROR, f"the scheduling policy {name!r} failed on this request: {error}")
        )


def _isolate(
    policy: object,
    now: float,
    queue: list[Request],
    views: Sequence[InstanceView],
    first: PolicyMisbehaved,
    result: Decisions,
) -> list[Request]:
    """Fail the requests the policy misbehaves on; return the rest (to call it again with)."""
    name = getattr(policy, "name", type(policy).__name__)
    result.policy_errors += 1
    logger.warning("policy %s misbehaved on %d queued request(s): %s; isolating", name, len(queue), first)
    counter = [0]
    bad, good = _offenders(policy, now, queue, views, counter)
    result.policy_errors += counter[0]
    if not bad:
        # Misbehaves only on the combination: nothing smaller to blame, so the whole call.
        bad, good = [(r, str(first)) for r in queue], []
    for request, error in bad:
        _fail_all(policy, [request], error, result)
    return good


def _apply(
    raw: list, lookup: Callable[[str], Request | None], view_list: Sequence[InstanceView], result: Decisions
) -> None:
    """Check each decision against the queue and the views; the first decision about a request wins."""
    if len(raw) == 1:
        # One assignment of one request that passes every check (at light load, almost every call):
        # the loop below, without its bookkeeping.
        d = raw[0]
        if type(d) is Assignment and len(d.request_ids) == 1:
            request = lookup(d.request_ids[0])
            if request is not None:
                by_id = view_list.by_id() if type(view_list) is ViewList else views_by_id(view_list)
                view = by_id.get(d.instance_id)
                # `view.can_serve(request)`, spelled out (two method calls per placed request).
                if (
                    view is not None
                    and view.healthy
                    and (
                        view.kind is not _LLM_KIND
                        if request.type is _EMBEDDING_REQUEST
                        else view.kind is not _EMBEDDING_KIND
                    )
                    and request.model in view.models
                ):
                    result.placements.append(Placement(d.instance_id, (request,), d.priority_hint, d.rule, d.reason))
                    return
    decided: set[str] = set()
    views: Mapping[str, InstanceView] | None = None
    for d in raw:
        if isinstance(d, Rejection):
            rid = d.request_id
            request = None if rid in decided else lookup(rid)
            if request is None:
                result.ignored.append(f"rejection of {rid!r}, which is not queued")
                continue
            decided.add(rid)
            result.verdicts.append(
                Verdict(request, "rejected", d.code, d.reason or "rejected by the scheduling policy", d.rule)
            )
            continue
        if views is None:
            views = views_by_id(view_list)  # lazy for an `InstancePool`: only the named views
        view = views.get(d.instance_id)
        placed: list[Request] = []
        for rid in d.request_ids:
            request = None if rid in decided else lookup(rid)
            if request is None:
                result.ignored.append(f"assignment of {rid!r}, which is not queued")
                continue
            if view is None:
                decided.add(rid)
                result.verdicts.append(
                    Verdict(
                        request,
                        "failed",
                        INVALID_DECISION,
                        f"policy assigned unknown instance {d.instance_id!r}",
                        d.rule,
                    )
                )
            elif not view.can_serve(request):
                decided.add(rid)
                result.verdicts.append(
                    Verdict(
                        request,
                        "failed",
                        INVALID_DECISION,
                        f"policy assigned instance {view.id} ({view.kind.value}, models {sorted(view.models)}), "
                        f"which cannot serve {request.type.value} for {request.model!r}",
                        d.rule,
                    )
                )
            elif not view.healthy:
                result.held_unhealthy += 1  # stays queued; a later call may place it
            else:
                decided.add(rid)
                placed.append(request)
        if placed:
            result.placements.append(Placement(d.instance_id, tuple(placed), d.priority_hint, d.rule, d.reason))
    if result.ignored:
        logger.warning("ignored %d decision(s): %s", len(result.ignored), "; ".join(result.ignored[:5]))


__all__ = ["INVALID_DECISION", "POLICY_ERROR", "Decisions", "Placement", "Verdict", "decide"]
