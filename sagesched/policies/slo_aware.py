"""Least slack first: serve the request closest to missing its SLO, where it will finish soonest.

Slack of a request on an instance is the time it could still lose and meet every objective it has,
using the instance's own estimates (through the `LoadLedger`, so this call's placements count):

- TTFT (or, for embeddings, the result): ``ttft_deadline - now - predicted_ttft``;
- end to end: ``deadline - now - (predicted wait + predicted service)``;
- TPOT: ``(tpot - decode_step_s) * (max_tokens - 1)``, the decode time it may lose overall.

The request's slack is the smallest of these; its *best* slack is the largest over the instances
that could serve it. The queue is ranked:

1. requests with an SLO that can still be met (best slack >= 0), least slack first;
2. requests without an SLO, in arrival order;
3. requests whose SLO can no longer be met on any healthy instance (best slack < 0), in arrival
   order, so they never block work that can still succeed. With ``shed_unattainable`` they are
   rejected instead (`RejectCode.SLO_UNATTAINABLE`), freeing capacity for the rest; one that is
   unattainable on every free instance but not on a full one waits for a slot there instead.

With ``admission`` (see `sagesched.policies.admission`) the late ones are shed within a budget
(``max_shed_fraction`` of the requests seen, code ``queue_full``: 429 + Retry-After live) and the
rest served right after the urgent attainable requests, before those with more than
``defer_slack_s`` of slack: tails stay bounded instead of growing with the backlog.

Each request goes to the candidate with the most slack (i.e. the lowest predicted TTFT or
completion time for the objective that binds); requests without an SLO to the one with the
earliest predicted completion. A request that turns unattainable only because of this call's own
placements is moved to the back in the same way. Predictions are lower bounds (a full instance
also makes a request wait at the gateway), so "unattainable" is never claimed too early.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sagesched.core import Decision, GatewayQueue, InstanceView, RejectCode, Rejection, Request
from sagesched.policies.admission import AdmissionConfig, AdmissionControl
from sagesched.policies.base import LoadLedger, Policy, PolicyConfig, arrival_order, reject_unservable, use_index
from sagesched.policies.fair_share import FairShare, FairShareConfig
from sagesched.policies.registry import register
from sagesched.policies.slack import schedule_admission_indexed, schedule_indexed


def has_slo(request: Request) -> bool:
    return not request.slo.empty


def slack_s(ledger: LoadLedger, instance_id: str, request: Request, now: float, ttft_factor: float = 1.0) -> float:
    """Seconds `request` could still lose on `instance_id` and meet all its objectives (inf: no SLO).

    `ttft_factor` (`SloAwareConfig.ttft_margin_factor`): an LLM request's predicted TTFT counts this
    many times over in its TTFT term (1: as predicted; embeddings always as predicted)."""
    view = ledger.views[instance_id]
    slo = request.slo
    slack = math.inf
    ttft_deadline = request.ttft_deadline_s
    if slo.ttft_ms is not None and ttft_deadline is not None:
        ttft = ledger.predicted_ttft_s(instance_id, request)
        if ttft_factor != 1.0 and not request.is_embedding:
            ttft = ttft_factor * ttft
        slack = min(slack, ttft_deadline - now - ttft)
    deadline = request.deadline_s
    if deadline is not None:
        slack = min(slack, deadline - now - predicted_completion_s(ledger, instance_id, request))
    if slo.tpot_ms is not None and not request.is_embedding and request.max_tokens > 1:
        slack = min(slack, (slo.tpot_ms / 1000.0 - view.decode_step_s) * (request.max_tokens - 1))
    return slack


def predicted_completion_s(ledger: LoadLedger, instance_id: str, request: Request) -> float:
    """Seconds from now until `request` would finish on `instance_id`: predicted wait plus service."""
    return ledger.predicted_wait_s(instance_id) + ledger.views[instance_id].predicted_service_s(request)


def best_slack_s(ledger: LoadLedger, request: Request, now: float, ttft_factor: float = 1.0) -> float | None:
    """The largest slack over healthy compatible instances (full or not); None when none is healthy."""
    slacks = [
        slack_s(ledger, v.id, request, now, ttft_factor)
        for v in ledger.views.values()
        if v.healthy and v.can_serve(request)
    ]
    return max(slacks) if slacks else None


@dataclass(frozen=True)
class SloAwareConfig(PolicyConfig):
    """Configuration of the least-slack policy.

    shed_unattainable: reject (code ``slo_unattainable``) every request whose SLO cannot be met on
        any healthy compatible instance even if it started now, instead of serving it after every
        request that still can succeed. Unbounded: under overload it may shed a large share.
    admission: SLO-aware admission with a shed budget and bounded tails (`sagesched.policies.admission`):
        late requests are shed (code ``queue_full``: 429 + Retry-After live) while at most
        ``max_shed_fraction`` of the requests seen have been shed, most hopeless first; the rest
        are served before attainable requests with more than ``defer_slack_s`` of slack, in
        (priority, arrival) order, instead of after everything. Off by default (the baseline).
    max_shed_fraction, defer_slack_s, protect_priority, late_first_priority, late_first_wait_s: the
        admission knobs (see `AdmissionConfig`).
    fair_share: per-tenant weighted fair share (`sagesched.policies.fair_share`): the least-served
        backlogged tenant places next, each tenant's requests in the order above (admission's
        order, shedding only with ``admission``). With ``tenant_weights`` (default 1 per tenant).
    ttft_margin_factor: a proportional slack margin, for the order only (needs ``admission``): an
        LLM request's TTFT slack is ``ttft_deadline - now - factor x predicted TTFT``, so a request
        counts as late (admission serves it ahead of long-slack work, urgent classes first) once
        its predicted TTFT, stretched by the factor, no longer fits, and attainable requests are
        ranked by that slack. Shedding reads the slack at factor 1: only a request late as
        predicted may be refused. Why: the prediction prices a prompt at the engine's isolated
        prefill rate, while past saturation each step also carries the running decodes, so a
        prompt (and the prefill queued ahead of it) takes 1.3-2x that; the error grows with the
        prediction, which a fixed margin (hybrid's ``slack_margin_ms``) does not follow. 1 (the
        default) is off; embeddings' slacks never change. Without admission late requests go last,
        where a margin would send the requests nearest their deadline to the back: refused there.
        Measured as hybrid's order on the policy benchmark, it gained nothing beyond noise, so
        hybrid leaves it off (docs/policies/admission.md).
    """

    shed_unattainable: bool = False
    admission: bool = False
    max_shed_fraction: float = 0.05
    defer_slack_s: float = 5.0
    protect_priority: int = 0
    late_first_priority: int = 1
    late_first_wait_s: float = 0.0
    fair_share: bool = False
    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    ttft_margin_factor: float = 1.0

    def __post_init__(self) -> None:
        factor = self.ttft_margin_factor
        if isinstance(factor, bool) or not (
            isinstance(factor, int | float) and math.isfinite(factor) and factor >= 1.0
        ):
            raise ValueError(f"ttft_margin_factor must be a finite number >= 1 (1 = off), got {factor!r}")
        if factor != 1.0 and not self.admission:
            raise ValueError(
                "ttft_margin_factor needs admission=true (without it late requests are served last, so the "
                "margin would push the requests nearest their deadline to the back); set admission or factor 1"
            )
        object.__setattr__(self, "ttft_margin_factor", float(factor))
        self.admission_config()  # validates
        FairShareConfig(tenant_weights=self.tenant_weights)  # validates

    def admission_config(self) -> AdmissionConfig:
        return AdmissionConfig(
            self.max_shed_fraction,
            self.defer_slack_s,
            self.protect_priority,
            late_first_priority=self.late_first_priority,
            late_first_wait_s=self.late_first_wait_s,
        )


@register
class SloAwarePolicy(Policy):
    name = "slo_aware"
    Config = SloAwareConfig
    config: SloAwareConfig

    def __init__(self, config: PolicyConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        c = self.config
        self.admission = AdmissionControl(c.admission_config()) if c.admission else None
        self.fair = FairShare(c.tenant_weights) if c.fair_share else None
        self.ttft_factor = c.ttft_margin_factor

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        if use_index(queue) and isinstance(queue, GatewayQueue):
            if self.admission is None and self.fair is None:  # the same decisions, off the indexes
                return schedule_indexed(self, now, queue, instances)
            if self.fair is None:  # with admission: the same decisions, off the indexes too
                return schedule_admission_indexed(self, now, queue, instances)
            queue = list(queue)  # fair share ranks requests itself (no indexed path yet)
        if len(queue) == 1 and self.admission is not None and self.fair is None:
            return self._schedule_lone(now, queue[0], instances)
        return self._schedule_list(now, queue, instances)

    def _schedule_list(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        """`schedule` on a plain sequence (the reference every shortcut is checked against)."""
        rejections, servable = reject_unservable(queue, instances, self.name)
        decisions: list[Decision] = list(rejections)
        if not servable:
            return decisions
        admission = self.admission
        if admission is not None:
            admission.observe(servable)
        ledger = LoadLedger(instances)
        attainable: list[tuple[float, Request]] = []
        best_effort: list[Request] = []
        late: list[tuple[float, Request]] = []
        for request in servable:
            if not has_slo(request):
                best_effort.append(request)
                continue
            best = best_slack_s(ledger, request, now, self.ttft_factor)
            if best is None:
                continue  # every compatible instance is down: keep it queued until one returns
            if best >= 0:
                attainable.append((best, request))
            else:
                late.append((best, request))
        attainable.sort(key=lambda x: (x[0], x[1].arrival_s, x[1].id))
        best_effort.sort(key=arrival_order)

        if admission is not None or self.fair is not None:
            # Bounded tails: late requests of urgent classes, urgent attainable work, the other late
            # requests not shed, then work with plenty of slack, then work without an SLO.
            if admission is not None:
                shed, kept = admission.split_late(self._shed_slacks(ledger, late, now), self.name)
                decisions.extend(shed)
                config = admission.config
            else:
                config = self.config.admission_config()
                kept = sorted((r for _, r in late), key=lambda r: (int(r.priority), r.arrival_s, r.id))
            horizon = config.defer_slack_s
            first = [config.goes_first(r, now) for r in kept]
            plan: list[tuple[Request, str]] = [(r, _LATE_FIRST) for r, f in zip(kept, first, strict=True) if f]
            plan += [(r, _SLACK) for slack, r in attainable if slack <= horizon]
            plan += [(r, _LATE) for r, f in zip(kept, first, strict=True) if not f]
            plan += [(r, _SLACK) for slack, r in attainable if slack > horizon]
            plan += [(r, _NO_SLO) for r in best_effort]
            if self.fair is None:
                for request, how in plan:
                    self._place(ledger, request, how, now, decisions)
                return decisions
            # Fair share: the least-served backlogged tenant places next, in the plan's order.
            step = {r.id: (i, how) for i, (r, how) in enumerate(plan)}
            fair = self.fair
            order = fair.order([r for r, _ in plan], key=lambda r: step[r.id][0])
            try:
                request = next(order)
                while True:
                    placed = self._place(ledger, request, step[request.id][1], now, decisions)
                    if placed:
                        fair.charge(request)
                    request = order.send(not placed)
            except StopIteration:
                pass
            return decisions

        deferred: list[Request] = []
        for _, request in attainable:
            self._place_by_slack(ledger, request, now, decisions, deferred)
        for request in best_effort:
            self._place_soonest(ledger, request, decisions, "no SLO: arrival order, earliest predicted completion")

        late_requests = [r for _, r in late] + deferred
        late_requests.sort(key=arrival_order)
        for request in late_requests:
            best = best_slack_s(ledger, request, now)
            if self.config.shed_unattainable and best is not None and best < 0:
                decisions.append(
                    Rejection(
                        request.id,
                        f"SLO cannot be met on any instance (best predicted slack {best * 1000:.0f} ms); shed",
                        RejectCode.SLO_UNATTAINABLE,
                        self.name,
                    )
                )
                continue
            if self.config.shed_unattainable:
                continue  # still attainable on a busy instance: it waits for a slot there
            self._place_soonest(
                ledger, request, decisions, "SLO no longer attainable: served after requests that can still meet theirs"
            )
        return decisions

    def _schedule_lone(self, now: float, request: Request, instances: Sequence[InstanceView]) -> list[Decision]:
        """`_schedule_list` with admission on, for a queue of one request: the same decisions.

        The light-load case (hybrid's default fallback sees one LLM request per call): no ranking
        to do, and the slacks `best_slack_s` computes are the ones `_place_by_slack` needs (nothing
        is placed in between), so each instance's slack is computed once, not twice.
        """
        rejections, servable = reject_unservable((request,), instances, self.name)
        if not servable:
            return list(rejections)
        ledger = LoadLedger(instances)
        answer = self.lone_answer(ledger, request, now)
        if answer is None:
            return []
        if isinstance(answer, Rejection):
            return [answer]
        slacks, reason = answer
        candidates = ledger.candidates(request)
        if slacks is not None:
            target = min(candidates, key=lambda v: (-slacks[v.id], ledger.inflight(v.id), v.id))
        else:
            target = min(
                candidates, key=lambda v: (predicted_completion_s(ledger, v.id, request), ledger.inflight(v.id), v.id)
            )
        return [ledger.assign(target, [request], self.name, reason, priority_hint=int(request.priority))]

    def lone_answer(
        self,
        ledger: LoadLedger,
        request: Request,
        now: float,
        placeable: bool | None = None,
        best: InstanceView | None = None,
    ) -> Rejection | tuple[dict[str, float] | None, str] | None:
        """What a call with `request` queued alone decides (admission on, fair share off), short of
        picking the instance; `ledger` holds no placements. Counts the request as seen.

        None: it stays queued (no free instance, or none healthy). A `Rejection`: shed. Otherwise
        (slacks, reason) of the assignment: placed by slack (`slacks`: per healthy compatible
        instance) or, with None, on the earliest predicted completion. Split from `_schedule_lone`
        so that hybrid, which re-targets the fallback's assignment anyway, is told the answer
        without the fallback choosing an instance it would discard. `placeable`: whether `ledger`
        has a candidate for `request` (`LoadLedger.candidates`), when the caller already knows.
        `best`: a candidate the caller knows has the most slack of every healthy compatible instance
        (an idle one in a pool of equal rates: no wait, the same service), so only its slack is
        computed; `slacks` then holds just it.
        """
        admission = self.admission
        assert admission is not None
        admission.observe_one(request.id)
        if not has_slo(request):
            if placeable is None:
                placeable = _placeable(ledger, request)
            return (None, _REASONS[_NO_SLO]) if placeable else None
        if best is not None:
            slacks = {best.id: slack_s(ledger, best.id, request, now, self.ttft_factor)}
        else:
            slacks = {
                v.id: slack_s(ledger, v.id, request, now, self.ttft_factor)
                for v in ledger.views.values()
                if v.healthy and v.can_serve(request)
            }
        if not slacks:
            return None  # every compatible instance is down: it stays queued
        top = max(list(slacks.values()))
        if top >= 0:
            if best is not None:
                most = top  # `best` is a candidate, and no instance has more slack
            else:
                candidates = ledger.candidates(request)
                if not candidates:
                    return None
                # The reason `_place_by_slack` gives: the slack of its target, the most of any candidate.
                most = max([slacks[v.id] for v in candidates])
            return slacks, f"least slack first: {most * 1000:.0f} ms slack here, the most of any instance"
        if self.ttft_factor != 1.0:  # shedding reads the slack as predicted (factor 1), same instances
            top = max([slack_s(ledger, vid, request, now) for vid in slacks])
        shed, _kept = admission.split_late([(top, request)], self.name)
        if shed:
            return shed[0]
        how = _LATE_FIRST if admission.config.goes_first(request, now) else _LATE
        if placeable is None:
            placeable = _placeable(ledger, request)
        return (None, _REASONS[how]) if placeable else None

    def _place_by_slack(
        self,
        ledger: LoadLedger,
        request: Request,
        now: float,
        decisions: list[Decision],
        deferred: list[Request] | None,
        known: dict[str, float] | None = None,
    ) -> bool:
        """The candidate with the most slack; with `deferred`, a request no free instance can serve
        in time any more (this call's placements used its slack) is deferred there instead.
        `known`: slacks already computed on this ledger (a superset of the candidates').
        Whether it was placed."""
        candidates = ledger.candidates(request)
        if not candidates:
            return False
        if known is None:
            slacks = {v.id: slack_s(ledger, v.id, request, now, self.ttft_factor) for v in candidates}
        else:
            slacks = {v.id: known[v.id] for v in candidates}
        target = min(candidates, key=lambda v: (-slacks[v.id], ledger.inflight(v.id), v.id))
        if deferred is not None and slacks[target.id] < 0:
            deferred.append(request)
            return False
        decisions.append(
            ledger.assign(
                target,
                [request],
                self.name,
                f"least slack first: {slacks[target.id] * 1000:.0f} ms slack here, the most of any instance",
                priority_hint=int(request.priority),
            )
        )
        return True

    def _shed_slacks(
        self, ledger: LoadLedger, late: list[tuple[float, Request]], now: float
    ) -> list[tuple[float, Request]]:
        """`late` ((best slack, request) under `ttft_factor`) with the best slacks admission's shedding
        reads: at factor 1 (only a request late as predicted may be shed, and the most hopeless by
        that measure go first). Unchanged at factor 1 or when nothing may be shed now."""
        admission = self.admission
        if self.ttft_factor == 1.0 or admission is None or admission.budget() <= 0:
            return late
        out = []
        for _, request in late:
            best = best_slack_s(ledger, request, now)
            assert best is not None  # late: some healthy instance serves it
            out.append((best, request))
        return out

    def _place_soonest(self, ledger: LoadLedger, request: Request, decisions: list[Decision], reason: str) -> bool:
        """The candidate with the earliest predicted completion; whether it was placed."""
        candidates = ledger.candidates(request)
        if not candidates:
            return False
        target = min(
            candidates, key=lambda v: (predicted_completion_s(ledger, v.id, request), ledger.inflight(v.id), v.id)
        )
        decisions.append(ledger.assign(target, [request], self.name, reason, priority_hint=int(request.priority)))
        return True

    def _place(self, ledger: LoadLedger, request: Request, how: str, now: float, decisions: list[Decision]) -> bool:
        """Place `request` by the rule its place in the bounded order calls for."""
        if how == _SLACK:
            return self._place_by_slack(ledger, request, now, decisions, None)
        return self._place_soonest(ledger, request, decisions, _REASONS[how])


def _placeable(ledger: LoadLedger, request: Request) -> bool:
    """``bool(ledger.candidates(request))``, without the list for an LLM request (the common case)."""
    return bool(ledger.candidates(request)) if request.is_embedding else ledger.has_room(request)


_LATE_FIRST, _SLACK, _LATE, _NO_SLO = "late-first", "slack", "late", "no-slo"
_REASONS = {
    _LATE_FIRST: "SLO lost, urgent class: served first (admission)",
    _LATE: "SLO lost: served before long-slack work (admission)",
    _NO_SLO: "no SLO: arrival order, earliest predicted completion",
}
