"""Per-tenant weighted fair share: a virtual token counter (VTC) per tenant, least-served first.

Every tenant has a counter of the service it was given, in tokens divided by its weight. Each
placement goes to the backlogged tenant (one with queued requests) whose counter is lowest, and
charges it the request's cost: ``prompt_tokens + max_tokens`` for LLM work (what a scheduler can
know at dispatch: the output cap, not the output) and the input tokens for an embedding, over the
tenant's weight. A tenant that was not backlogged at the previous call and is now is lifted to
the lowest counter among the tenants that stayed backlogged, so idling banks no credit. The idea
is Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024), applied at the gateway.

**The bound.** While two tenants a and b are both backlogged and both can be placed on the same
instances, their weighted service differs by at most one request's weighted cost:

    | S_a / w_a - S_b / w_b |  <=  max(C_max / w_a, C_max / w_b)

with S the tokens charged and C_max the largest request cost. Why: a placement always goes to the
tenant with the lowest counter, and raises it by at most C_max / w, so the spread between the
counters of tenants backlogged throughout never grows past the largest single increment (the
lift only raises a newcomer to the lowest counter, inside the spread). `tests/policies/test_fair_share.py`
checks it as a property over random tenants, weights and request sizes.

It is work-conserving: a tenant whose requests cannot be placed (no free compatible instance)
is skipped for the rest of the call, never blocks the others. Within a tenant, requests go in
(priority, arrival) order. `FairShare` is the reusable part; `FairSharePolicy` (``fair_share``)
places with it on the least-outstanding instance, and hybrid can use it as its LLM fallback.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagesched.core import Decision, GatewayQueue, InstanceView, Request
from sagesched.core.queue import ClassKey, RankedMerge
from sagesched.policies.base import LoadLedger, Policy, PolicyConfig, reject_unservable, servable_classes, use_index
from sagesched.policies.registry import register
from sagesched.typed_config import ConfigFieldError


def request_cost(request: Request) -> int:
    """Tokens a request is charged at dispatch: prompt + output cap, or an embedding's input tokens."""
    return max(1, request.work_tokens)


class FairShare:
    """Virtual token counters per tenant, and the least-served-first order they imply."""

    __slots__ = ("backlogged", "counters", "weights")

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self.weights = dict(weights or {})
        self.counters: dict[str, float] = {}
        self.backlogged: set[str] = set()

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def start_call(self, tenants: set[str]) -> None:
        """Mark `tenants` as the backlogged ones now; lift newcomers to the lowest staying counter."""
        stayed = [self.counters.get(t, 0.0) for t in tenants & self.backlogged]
        floor = min(stayed) if stayed else None
        for tenant in tenants - self.backlogged:
            own = self.counters.get(tenant, 0.0)
            self.counters[tenant] = own if floor is None else max(own, floor)
        self.backlogged = set(tenants)

    def charge(self, request: Request) -> None:
        tenant = request.tenant
        self.counters[tenant] = self.counters.get(tenant, 0.0) + request_cost(request) / self.weight(tenant)

    def order(self, queue: Sequence[Request], key: Callable[[Request], Any] | None = None):
        """Yield queued requests least-served tenant first; `charge` between yields moves the order.

        Within a tenant, requests come in `key` order (default (priority, arrival, id); slo_aware
        passes its own bounded order). The caller charges each request it places (before asking
        for the next); one it cannot place it reports by sending True into the generator, which
        then skips the rest of that tenant.
        """
        per_tenant: dict[str, list[Request]] = {}
        for request in sorted(queue, key=key or _priority_arrival):
            per_tenant.setdefault(request.tenant, []).append(request)
        self.start_call(set(per_tenant))
        heap = [(self.counters.get(t, 0.0), t) for t in per_tenant]
        heapq.heapify(heap)
        position = dict.fromkeys(per_tenant, 0)
        while heap:
            _, tenant = heapq.heappop(heap)
            requests = per_tenant[tenant]
            i = position[tenant]
            blocked = yield requests[i]
            if blocked:
                continue  # this tenant's head cannot be placed now: the others go on
            position[tenant] = i + 1
            if i + 1 < len(requests):
                heapq.heappush(heap, (self.counters.get(tenant, 0.0), tenant))

    def order_indexed(self, queue: GatewayQueue, classes: list[ClassKey]):
        """`order` over the requests of `classes` in a `GatewayQueue`, in the default order: the
        same yields and counter updates, without sorting the queue.

        The tenant set is read off the queue's columns (one pass building a set: no sort);
        each tenant's requests come from one shared lazy merge of the queue's (class, priority)
        streams in (priority, arrival, id) order, buffered per tenant, so a call reads only up to
        the last request it yields.
        """
        tenants = {r.tenant for cls in classes for r in _class_requests(queue, cls)}
        self.start_call(tenants)
        merged = iter(RankedMerge(queue, classes, key=_priority_arrival))
        buffered: dict[str, deque[Request]] = {t: deque() for t in tenants}

        def next_of(tenant: str) -> Request | None:
            own = buffered[tenant]
            if own:
                return own.popleft()
            for _, request in merged:
                if request.tenant == tenant:
                    return request
                buffered[request.tenant].append(request)
            return None

        heap = [(self.counters.get(t, 0.0), t) for t in tenants]
        heapq.heapify(heap)
        heads = {t: next_of(t) for t in sorted(tenants)} if len(tenants) > 1 else None
        while heap:
            _, tenant = heapq.heappop(heap)
            request = heads[tenant] if heads is not None else next_of(tenant)
            if heads is None:
                heads = {tenant: request}
            assert request is not None
            blocked = yield request
            if blocked:
                continue
            following = next_of(tenant)
            heads[tenant] = following
            if following is not None:
                heapq.heappush(heap, (self.counters.get(tenant, 0.0), tenant))


@dataclass(frozen=True)
class FairShareConfig(PolicyConfig):
    """Configuration of the fair-share policy.

    tenant_weights: weight per tenant name (default 1 for any tenant not listed); a tenant with
        weight 2 receives twice the tokens of a weight-1 tenant while both are backlogged.
    """

    tenant_weights: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        weights = dict(self.tenant_weights or {})
        for tenant, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
                # (inf: the tenant is never charged, so it always goes first: not a weight)
                raise ConfigFieldError(("tenant_weights", tenant), f"must be a finite number > 0, got {weight!r}")
        object.__setattr__(self, "tenant_weights", weights)


@register
class FairSharePolicy(Policy):
    """Least-served tenant first (weighted VTC), placed on the instance with least outstanding work."""

    name = "fair_share"
    Config = FairShareConfig
    config: FairShareConfig

    def __init__(self, config: PolicyConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.fair = FairShare(self.config.tenant_weights)

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        decisions: list[Decision]
        fair = self.fair
        if use_index(queue):
            # The same order off the queue's indexes (tests/sim/test_indexed_queue.py).
            rejections, q, classes = servable_classes(queue, instances, self.name)
            decisions = list(rejections)
            if not classes:
                return decisions
            order = fair.order_indexed(q, classes)
        else:
            rejected, servable = reject_unservable(queue, instances, self.name)
            decisions = list(rejected)
            if not servable:
                return decisions
            order = fair.order(servable)
        ledger = LoadLedger(instances)
        try:
            request = next(order)
            while True:
                target = ledger.least_outstanding(request)
                if target is None:
                    request = order.send(True)
                    continue
                counter = fair.counters.get(request.tenant, 0.0)
                decisions.append(
                    ledger.assign(
                        target,
                        [request],
                        self.name,
                        f"tenant {request.tenant!r} least served ({counter:.0f} weighted tokens); "
                        "least outstanding work here",
                        priority_hint=int(request.priority),
                    )
                )
                fair.charge(request)
                request = order.send(False)
        except StopIteration:
            pass
        return decisions

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "counters": dict(self.fair.counters)}


def _priority_arrival(request: Request) -> tuple[int, float, str]:
    return (int(request.priority), request.arrival_s, request.id)


def _class_requests(queue: GatewayQueue, cls: ClassKey) -> Iterator[Request]:
    """One class's queued requests, unordered (its columns' rows: no sort)."""
    cols = queue.columns(cls)
    requests = cols.requests
    return (requests[i] for i in cols.row.values())


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n * sum x^2); 1 when all equal, 1/n when one takes all."""
    if not values:
        raise ValueError("jain_index needs at least one value")
    total = sum(values)
    squares = sum(v * v for v in values)
    return 1.0 if squares == 0 else total * total / (len(values) * squares)


__all__ = ["FairShare", "FairShareConfig", "FairSharePolicy", "jain_index", "request_cost"]
