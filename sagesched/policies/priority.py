"""Strict priority classes with aging: urgent work first, yet no request waits forever.

Order. Each call ranks the queue by ``(effective class, arrival, id)`` where the effective class of
a request of priority ``p`` that has waited ``w = now - arrival_s`` seconds is

    ``max(0, p - floor(w / aging_interval_s))``

so every full ``aging_interval_s`` of waiting promotes it by one class, down to class 0 (critical).

Starvation bound (what the property tests check). A request of priority ``p`` that arrived at
``t0`` has effective class 0 at every call with ``now >= t0 + p * aging_interval_s``. From then on
the only requests ranked ahead of it are ones that arrived before it (ties broken by id): requests
arriving later rank behind it whatever their class, so a steady stream of higher-priority arrivals
can no longer pass it. Hence it is placed no later than the first call at or after
``t0 + p * aging_interval_s`` at which its compatible instances have a free slot left after the
queued requests that arrived before it have taken theirs. Behind a stream of higher-priority
arrivals with no earlier backlog, on an instance that frees a slot between calls, it is placed no
later than the first call at or after ``t0 + p * aging_interval_s``, i.e. it waits at most
``p * aging_interval_s`` plus one call interval; each request that arrived before it and still
waits adds at most one slot's turn. (Against a stream of class ``q > 0`` it gets through sooner,
after ``(p - q)`` intervals, when it ties the stream's class and wins on arrival.)

Placement. Urgent work (effective class ``<= urgent_max_priority``) goes to the compatible instance
with the lowest predicted wait (`LoadLedger.predicted_wait_s`, which counts this call's own
placements); everything else to the one with the least outstanding token work, which keeps the
fast instances free for urgent arrivals. Every assignment carries the effective class as its
``priority_hint`` so that a backend with priority scheduling (vLLM ``--scheduling-policy
priority``) honours the same order. Aged requests count as urgent once promoted far enough: they
have earned a fast start by waiting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagesched.core import Decision, InstanceView, Priority, Request
from sagesched.core.queue import ClassKey, RankedMerge
from sagesched.policies.base import LoadLedger, Policy, PolicyConfig, reject_unservable, servable_classes, use_index
from sagesched.policies.registry import register
from sagesched.typed_config import parse_with

# Slack for float rounding in wait / interval, so that a request whose wait is exactly k intervals
# (in real numbers) is promoted k classes even when the subtraction lands a hair below.
_AGING_EPSILON = 1e-9


def effective_priority(request: Request, now: float, aging_interval_s: float) -> int:
    """The class `request` competes in at `now`: its priority minus one per full aging interval waited."""
    waited = max(0.0, now - request.arrival_s)
    promoted = math.floor(waited / aging_interval_s + _AGING_EPSILON)
    return max(0, int(request.priority) - promoted)


def priority_number(value: Any) -> int:
    """A config's priority class: 0-4 or a name ("high"), as the docs promise (a bool or 1.5 is neither)."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"must be 0-4 or a priority name (critical, high, normal, low, background), got {value!r}")
    return int(Priority.parse(value))


@dataclass(frozen=True)
class PriorityConfig(PolicyConfig):
    """Configuration of the priority policy.

    aging_interval_s: seconds of waiting that promote a request by one priority class. A request
        of priority p competes as critical (class 0) after p * aging_interval_s and is then served
        in arrival order among class-0 work, which bounds its wait (see the module docstring).
        Smaller values trade strictness for fairness; must be > 0.
    urgent_max_priority: effective classes at or below this value (default 1, HIGH) are placed on
        the instance with the lowest predicted wait instead of the least outstanding work. Accepts
        0-4 or a priority name ("high").
    """

    aging_interval_s: float = 10.0
    urgent_max_priority: int = field(default=int(Priority.HIGH), metadata=parse_with(priority_number))

    def __post_init__(self) -> None:
        if not self.aging_interval_s > 0:
            raise ValueError(f"aging_interval_s must be > 0 seconds, got {self.aging_interval_s!r}")
        object.__setattr__(self, "urgent_max_priority", int(Priority.parse(self.urgent_max_priority)))


@register
class PriorityPolicy(Policy):
    name = "priority"
    Config = PriorityConfig
    config: PriorityConfig

    def effective_priority(self, request: Request, now: float) -> int:
        return effective_priority(request, now, self.config.aging_interval_s)

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        decisions: list[Decision]
        merge: RankedMerge | None = None
        if use_index(queue):
            rejections, indexed, classes = servable_classes(queue, instances, self.name)
            decisions = [*rejections]
            if not classes:
                return decisions
            # The order `sorted` gives below, read lazily off the queue's per-priority arrival
            # streams: along one stream an earlier arrival has waited longer, so its effective class
            # is never higher, and the streams merge on (class, arrival, id).
            interval = self.config.aging_interval_s
            merge = RankedMerge(indexed, classes, lambda r: (effective_priority(r, now, interval), r.arrival_s, r.id))
            ranked: Iterable[tuple[ClassKey | None, Request]] = merge
        else:
            rejections, servable = reject_unservable(queue, instances, self.name)
            decisions = [*rejections]
            if not servable:
                return decisions
            ranked = sorted(
                ((None, r) for r in servable),
                key=lambda x: (self.effective_priority(x[1], now), x[1].arrival_s, x[1].id),
            )
        ledger = LoadLedger(instances)
        for cls, request in ranked:
            candidates = ledger.candidates(request)
            if not candidates:
                if merge is not None and cls is not None and not ledger.has_room(request):
                    merge.drop(cls)  # no slot left for its class in this call: skip the rest of it
                continue
            klass = self.effective_priority(request, now)
            target: InstanceView | None
            if klass <= self.config.urgent_max_priority:
                target = min(candidates, key=lambda v: (ledger.predicted_wait_s(v.id), ledger.inflight(v.id), v.id))
                reason = f"class {klass} (priority {int(request.priority)}), urgent: lowest predicted wait"
            else:
                target = ledger.least_outstanding(request, candidates)
                reason = f"class {klass} (priority {int(request.priority)}): least outstanding work"
            if target is None:  # least_outstanding over a non-empty candidate list always picks one
                continue
            decisions.append(ledger.assign(target, [request], self.name, reason, priority_hint=klass))
        return decisions
