"""Hybrid scheduling: LLM and embedding work on one pool, embeddings merged into real batches.

One call to `HybridPolicy.schedule` does this (docs/policies/hybrid.md has the long form):

1. Reject what can never be served: no instance of a compatible kind serves the model
   (``no_compatible_instance``), or an embedding request carries more inputs than every compatible
   instance's ``max_client_batch_size`` (``too_large``). Everything else is split by type.
2. Decide which type claims shared (``llm_embedding``) capacity first, from ``embedding_priority``:
   ``high`` embeddings first, ``low`` LLM first, ``normal`` the type whose oldest request arrived
   first, ``adaptive`` the type under more pressure (sum over its queued requests of wait / target
   wait, so that both age and queue size count).
3. Claim rounds: first type, second type, first type again. While the other type still has queued
   work a mixed instance could serve, LLM requests may hold at most ``floor(ratio * max_inflight)``
   of its slots and embeddings at most ``floor((1 - ratio) * max_inflight)``; once the other type
   has nothing left waiting, the remaining slots are free for all (work-conserving). The third
   round is what hands those slots over within the same call.

Where work goes (``prefer_specialized_instances``, default on): each LLM request (each embedding
batch) goes to the compatible instance with room whose *normalised load* after taking it is lowest;
ties go to the specialized instance (LLM-only for LLM work, embedding-only for embeddings). The
normalised load of LLM work is ``LLM requests held / LLM share``, the share being ``max_inflight`` on
an LLM-only instance and ``ratio * max_inflight`` on a mixed one while embedding work is in flight
on it or waits for it (its whole ``max_inflight`` otherwise). An embedding batch goes where its
predicted time to result is lowest: the embedding engine's own queue at its own rate (a mixed GPU's
TEI queue, never its LLM prefill queue), times ``colocated_embedding_slowdown`` on a mixed GPU whose
LLM side is busy. So mixed instances absorb overflow as soon as the specialized ones are *more
loaded* than them, not only when those are full. Without the preference the fallback places LLM work by its own rule and batches go to the
lowest predicted time to result.

Embedding batches are formed per model, in (aged priority, arrival, id) order, bounded by
``embedding_batch_size`` texts (never above the target's ``max_client_batch_size``),
``embedding_batch_token_budget`` tokens and the target's free slots (one slot per request, as the
views count them). A batch is released when it is full, when the oldest request of its model has
waited ``max_embedding_wait_ms``, or (``release_when_idle``, default on) at once when its target has
no embedding work in flight: batching only pays while the embedding engine is busy. A batch that
could still grow is never released below ``min_embedding_batch_size`` texts before the wait
expires. `next_wakeup` returns the earliest window close among held embeddings.

Modules: this one holds the claim order and the LLM half; the embedding half (batch formation,
release rules, holdback, targets, and the slot split `_room` both halves use) is the
`hybrid_embeddings.EmbeddingBatching` mixin; one call's working state is `hybrid_call._Call`; the
knobs are `hybrid_config.HybridConfig`.

LLM requests are ordered by the ``llm_fallback_policy`` (built with `make_policy`; default
``slo_aware`` with SLO-aware admission: least slack first, late requests shed within a budget or
served right after the urgent ones) over
views that already include this call's embedding placements and whose ``max_inflight`` is lowered to
the LLM share where the ratio applies; its assignments are re-labelled ``hybrid/llm/<fallback>``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sagesched.core import (
    Assignment,
    Decision,
    GatewayQueue,
    InstanceView,
    Priority,
    Rejection,
    Request,
    RequestType,
)
from sagesched.core.pool import InstancePool
from sagesched.core.queue import ClassKey
from sagesched.policies.base import (
    LoadLedger,
    Policy,
    PolicyConfig,
    arrival_order,
    is_servable,
    reject_unservable,
    servable_classes,
    use_index,
)
from sagesched.policies.hybrid_call import _Call, _count_by_model
from sagesched.policies.hybrid_config import (
    _EMBEDDING_ONLY,
    _EPS,
    _MIXED,
    EMBEDDING,
    EMBEDDING_PRIORITIES,
    LLM,
    LLM_FALLBACK_POLICIES,
    RULE_EXPIRED,
    RULE_FULL,
    RULE_IDLE,
    RULE_OVERSIZE,
    RULE_TOO_LARGE,
    HybridConfig,
)
from sagesched.policies.hybrid_embeddings import EmbeddingBatching
from sagesched.policies.hybrid_llm import LlmPlacement
from sagesched.policies.registry import make_policy, register
from sagesched.policies.slack import schedule_admission_indexed
from sagesched.policies.slo_aware import SloAwarePolicy

logger = logging.getLogger(__name__)

_EMBEDDING_REQUEST = RequestType.EMBEDDING


@register
class HybridPolicy(EmbeddingBatching, LlmPlacement, Policy):
    name = "hybrid"
    Config = HybridConfig
    config: HybridConfig

    def __init__(self, config: PolicyConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        c = self.config
        # One fallback, always shown the same instance set (every LLM-capable instance), so that a
        # stateful fallback (adaptive) measures the whole LLM side consistently from call to call.
        fallback_config = c.fallback_config()
        self.llm_fallback = make_policy(c.llm_fallback_policy, **fallback_config)
        # `slack_margin_ms`: a fallback with admission is asked as of `now + margin` (below), and
        # its admission then sheds only what is late by the clock itself. Only with admission: a
        # plain least-slack order serves late requests last, so the margin would push the requests
        # nearest their deadline to the back, and the other fallbacks do not rank by slack.
        admission = getattr(self.llm_fallback, "admission", None)
        self._slack_margin_s = c.slack_margin_ms / 1000.0 if admission is not None else 0.0
        if admission is not None and self._slack_margin_s > 0:
            admission.config = dataclasses.replace(admission.config, shed_margin_s=self._slack_margin_s)
        # A lone queued LLM request needs no ordering; when hybrid places it and the fallback could
        # not reject it (only shedding rejects: unservable requests never reach the fallback), the
        # fallback is skipped (`_place_lone_llm`).
        # A stateful order must see every request: a shedding fallback may refuse even a lone one,
        # and a fair-share one must charge it to its tenant.
        self._lone_fast_path = c.prefer_specialized_instances and not (
            fallback_config.get("shed_unattainable", False)
            or fallback_config.get("admission", False)
            or fallback_config.get("fair_share", False)
            or c.llm_fallback_policy == "fair_share"
        )
        self._held_deadlines: list[float] = []
        # slo_aware with admission (the default fallback) has a twin that reads the queue's indexes.
        fallback = self.llm_fallback
        self._fallback_indexed = (
            isinstance(fallback, SloAwarePolicy) and fallback.admission is not None and fallback.fair is None
        )
        # A lone LLM request with that fallback: hybrid asks it only what it would decide (`lone_answer`).
        self._lone_admitted = c.prefer_specialized_instances and self._fallback_indexed
        self._llm_holdback_s = c.llm_holdback_ms / 1000.0
        # `_schedule_indexed` does not serve embedding_priority=adaptive (pressure sums over every request).
        self._indexable = c.embedding_priority != "adaptive"
        # Constant per policy, so built once rather than on every call.
        self._llm_rule = f"{self.name}/llm/{c.llm_fallback_policy}"
        mode = c.embedding_priority
        self._fixed_order: dict[str, tuple[str, str]] = {
            "high": (EMBEDDING, "embedding_priority=high: embeddings claim mixed capacity first"),
            "low": (LLM, "embedding_priority=low: LLM claims mixed capacity first"),
            EMBEDDING: (EMBEDDING, f"embedding_priority={mode}: only {EMBEDDING} work is queued"),
            LLM: (LLM, f"embedding_priority={mode}: only {LLM} work is queued"),
        }
        self.last_first: str | None = None
        self.last_pressure: dict[str, float] = {}

    # -- the contract ------------------------------------------------------------------------------
    def next_wakeup(self, now: float) -> float | None:
        """When the earliest held embedding's batching window closes (after `now`), else None.

        Requests whose window already closed but that found no free capacity are not reported: the
        driver calls again when capacity frees (a completion), which is when they can go.
        """
        if not self._held_deadlines:
            return None
        upcoming = [t for t in self._held_deadlines if t > now + _EPS]
        return min(upcoming) if upcoming else None

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        if self._indexable and use_index(queue):
            assert isinstance(queue, GatewayQueue)
            return self._schedule_indexed(now, queue, instances)
        if len(queue) == 1:
            # One queued request (a light-load call): the lists below, without building them.
            for request in queue:
                if request.type is not _EMBEDDING_REQUEST and is_servable(request, instances):
                    first, order_reason = self._claim_order(now, (), (request,))
                    waiting_one = {request.model: 1}
                    return self._run(now, instances, [], [], [request], None, [], waiting_one, first, order_reason)
        rejections, servable = reject_unservable(queue, instances, self.name)
        decisions: list[Decision] = list(rejections)
        llm = [r for r in servable if r.type is not _EMBEDDING_REQUEST]
        embeddings = self._reject_too_large(servable, instances, decisions) if len(llm) < len(servable) else []
        first, order_reason = self._claim_order(now, embeddings, llm)  # (queue order: pressure sums)
        if len(llm) > 1:
            llm.sort(key=arrival_order)
        waiting = _count_by_model(llm)
        return self._run(now, instances, decisions, embeddings, llm, None, [], waiting, first, order_reason)

    def _schedule_indexed(self, now: float, queue: GatewayQueue, instances: Sequence[InstanceView]) -> list[Decision]:
        """`schedule` off the `GatewayQueue`'s indexes: the same decisions, without walking the
        LLM backlog unless the fallback is called (some LLM-capable instance has room).

        Rejections by class (`servable_classes`), LLM counts per model from the queue's counts, the
        oldest LLM request from its arrival index, and the LLM list in arrival order (what the plain
        path sorts) built only when `_place_llm` hands it to the fallback. Embeddings are read per
        class in queue order, as the plain path meets them (not indexed: a call is linear in the
        embedding backlog, docs/policies/hybrid.md). Not used with
        ``embedding_priority=adaptive``, whose pressure sums over every queued LLM request.
        """
        rejections, q, classes = servable_classes(queue, instances, self.name)
        decisions: list[Decision] = list(rejections)
        llm_classes = [cls for cls in classes if not cls[0]]
        embedding_classes = [cls for cls in classes if cls[0]]
        servable_embeddings: list[Request] = []
        if embedding_classes:
            servable_embeddings = [r for cls in embedding_classes for r in q.of_class(cls)]
            if len(embedding_classes) > 1:
                servable_embeddings.sort(key=lambda r: q.serial(r.id))
        embeddings = self._reject_too_large(servable_embeddings, instances, decisions)
        counts = q.counts()
        waiting = {cls[1]: counts[cls] for cls in llm_classes}
        llm_n = sum(waiting.values())
        # `_claim_order` reads only whether LLM work waits and its oldest (arrival_s, id) here.
        oldest = [next(iter(q.in_arrival_order(llm_classes)))] if llm_n else []
        first, order_reason = self._claim_order(now, embeddings, oldest)
        return self._run(now, instances, decisions, embeddings, [], q, llm_classes, waiting, first, order_reason)

    def _run(
        self,
        now: float,
        instances: Sequence[InstanceView],
        decisions: list[Decision],
        embeddings: list[Request],
        llm: list[Request],
        llm_queue: GatewayQueue | None,
        llm_classes: list[ClassKey],
        waiting_llm: dict[str, int],
        first: str,
        order_reason: str,
    ) -> list[Decision]:
        """The claim rounds over this call's queued work (shared by both front ends of `schedule`)."""
        self.last_first = first
        groups: dict[str, list[Request]] = {}
        oldest: dict[str, float] = {}
        rank = self._ranker(now)
        if embeddings:
            for request in sorted(embeddings, key=rank):
                groups.setdefault(request.model, []).append(request)
            oldest = {model: min(r.arrival_s for r in group) for model, group in groups.items()}
        # Positional (in `_Call`'s field order): 17 keywords cost ~0.5 us more per call to match.
        call = _Call(
            now,
            instances,
            LoadLedger(instances),
            decisions,
            groups,
            rank,
            oldest,
            llm,
            len(llm) if llm_queue is None else sum(waiting_llm.values()),
            llm_queue,
            llm_classes,
            llm_queue is None,
            set(),
            {EMBEDDING: _count_by_model(embeddings) if embeddings else {}, LLM: waiting_llm},
            self._embedding_hint_base(first) if embeddings else None,
            order_reason,
        )

        # Built on the first LLM round that needs them: on a large pool, a lone request that an idle
        # instance takes (`_place_lone_idle`) reads no other view.
        llm_views: list[InstanceView] | None = None if call.llm_n else []
        second = LLM if first == EMBEDDING else EMBEDDING
        for kind in (first, second, first):
            if kind == EMBEDDING:
                if call.groups:
                    self._place_embeddings(call)
            elif call.llm_n:
                if llm_views is None:
                    if (
                        type(instances) is InstancePool
                        and self._lone_admitted
                        and call.llm_n == 1
                        and self._place_lone_idle(call)
                    ):
                        continue
                    llm_views = [v for v in instances if v.kind is not _EMBEDDING_ONLY]
                if llm_views:
                    self._place_llm(call, llm_views)

        if call.groups:
            window_s = self.config.window_s
            self._held_deadlines = [r.arrival_s + window_s for group in call.groups.values() for r in group]
        elif self._held_deadlines:
            self._held_deadlines = []
        return decisions

    def describe(self) -> dict[str, Any]:
        """Config plus what the last call decided about the claim order (for summaries and /admin)."""
        return {**super().describe(), "last_first": self.last_first, "last_pressure": dict(self.last_pressure)}

    # -- claim order and hints ---------------------------------------------------------------------
    def _target_wait_s(self, request: Request) -> float:
        slo_ms = request.slo.ttft_ms if request.slo.ttft_ms is not None else request.slo.e2e_ms
        if slo_ms is not None and slo_ms > 0:
            return slo_ms / 1000.0
        default = self.config.embedding_target_wait_ms if request.is_embedding else self.config.llm_target_wait_ms
        return default / 1000.0

    def pressure(self, now: float, requests: Iterable[Request]) -> float:
        """Sum over `requests` of wait / target wait: grows with both the queue's age and its size."""
        return sum(max(0.0, now - r.arrival_s) / self._target_wait_s(r) for r in requests)

    def _claim_order(self, now: float, embeddings: Sequence[Request], llm: Sequence[Request]) -> tuple[str, str]:
        """Which type claims mixed capacity first this call, and why (in words for the records)."""
        mode = self.config.embedding_priority
        if self.last_pressure:
            self.last_pressure = {}
        if mode == "high" or mode == "low":
            return self._fixed_order[mode]
        if not embeddings or not llm:
            return self._fixed_order[EMBEDDING if embeddings else LLM]
        if mode == "normal":
            oldest_e = min((r.arrival_s, r.id) for r in embeddings)
            oldest_l = min((r.arrival_s, r.id) for r in llm)
            first = EMBEDDING if oldest_e[0] <= oldest_l[0] else LLM
            return first, f"embedding_priority=normal: oldest queued request is {first} ({first} claims first)"
        p_emb, p_llm = self.pressure(now, embeddings), self.pressure(now, llm)
        self.last_pressure = {EMBEDDING: p_emb, LLM: p_llm}
        first = EMBEDDING if p_emb >= p_llm else LLM
        return first, (
            f"embedding_priority=adaptive: pressure embedding {p_emb:.2f} vs llm {p_llm:.2f} "
            f"(sum of wait/target): {first} claims first"
        )

    def _embedding_hint_base(self, first: str) -> int | None:
        """The hint every embedding batch gets this call; None means "the batch's best priority"."""
        mode = self.config.embedding_priority
        if mode == "high" or (mode == "adaptive" and first == EMBEDDING and self.last_pressure):
            return int(Priority.CRITICAL)
        if mode == "low":
            return int(Priority.BACKGROUND)
        return None

    # -- what the fallback sees -------------------------------------------------------------------
    def _fallback_views(self, call: _Call, views: Sequence[InstanceView]) -> list[InstanceView] | None:
        """`views` adjusted for the fallback (see `_adjusted`), or None when none has LLM room left."""
        adjusted = []
        any_room = False
        for view in views:
            shown = self._adjusted(call, view)
            adjusted.append(shown)
            any_room = any_room or (shown.healthy and shown.free_slots > 0)
        return adjusted if any_room else None

    def _adjusted(self, call: _Call, view: InstanceView) -> InstanceView:
        """`view` as the fallback must see it: this call's load folded in, capacity cut to the LLM room.

        When this call has placed nothing on a healthy `view` and no share applies to it (the common
        case: an LLM-only instance, or a mixed one with no embedding waiting), the LLM room is simply
        its free slots, so the adjusted view would equal `view`: it is returned as is, uncopied.
        """
        ledger = call.ledger
        added = ledger.added_requests[view.id]
        if added == 0 and view.healthy and (view.kind is not _MIXED or not call.other_waits(LLM, view)):
            return view
        inflight = view.inflight + added
        room = self._room(call, view, LLM)
        return dataclasses.replace(
            view,
            waiting=view.waiting + added,
            embedding_inflight=view.embedding_inflight + ledger.added_embedding[view.id],
            queued_prefill_tokens=view.queued_prefill_tokens + ledger.added_prefill[view.id],
            queued_decode_tokens=view.queued_decode_tokens + ledger.added_decode[view.id],
            max_inflight=min(view.max_inflight, inflight + room),
        )

    # -- LLM ---------------------------------------------------------------------------------------
    def _place_llm(self, call: _Call, views: Sequence[InstanceView]) -> None:
        """Let the fallback order (and, without the preference, place) the queued LLM requests.

        The fallback sees every LLM-capable instance, adjusted for this call (see `_adjusted`). With
        ``prefer_specialized_instances`` each of its assignments, taken in its order, is re-targeted
        by `_llm_target`; an assignment that finds no room there any more stays queued.
        """
        if self._lone_fast_path and call.llm_n == 1:
            self._place_lone_llm(call, views)
            return
        if self._lone_admitted and call.llm_n == 1 and self._place_lone_admitted(call, views):
            return
        adjusted = self._fallback_views(call, views)
        if adjusted is None:
            return
        policy = self.llm_fallback
        lookup: Callable[[str], Request | None]
        if call.llm_queue is not None and not call.llm_built and self._fallback_indexed:
            # slo_aware with admission, off the queue's indexes: the same decisions as on the list
            # below (tests/sim/test_indexed_queue.py), without reading the whole LLM backlog.
            q, done_before = call.llm_queue, call.llm_done
            assert isinstance(policy, SloAwarePolicy)
            fallback_decisions = schedule_admission_indexed(
                policy, call.now + self._slack_margin_s, q, adjusted, classes=call.llm_classes, exclude=done_before
            )

            def lookup(rid: str) -> Request | None:
                found = q.get(rid)
                return None if found is None or found.is_embedding or rid in done_before else found
        else:
            queue = call.llm_list()
            lookup = {r.id: r for r in queue}.get
            fallback_decisions = policy.schedule(call.now + self._slack_margin_s, queue, adjusted)
        view_ids = {v.id for v in views}
        rule = self._llm_rule
        prefer = self.config.prefer_specialized_instances
        done: set[str] = set()
        for decision in fallback_decisions:
            if isinstance(decision, Assignment):
                looked_up = [lookup(i) for i in decision.request_ids]
                if decision.instance_id not in view_ids or any(r is None for r in looked_up):
                    raise RuntimeError(
                        f"fallback {policy.name!r} assigned outside what it was given: {decision}; this is a bug in it"
                    )
                requests = [r for r in looked_up if r is not None]
                sub_rule = f" [{decision.rule}]" if decision.rule and decision.rule != policy.name else ""
                target_id = decision.instance_id
                if prefer:
                    found = self._llm_target(call, views, requests)
                    if found is None:
                        continue
                    target, load = found
                    target_id = target.id
                    reason = (
                        f"order: {decision.reason}{sub_rule}; placed on the {target.kind.value} instance with the "
                        f"least work per LLM capacity ({load:.2f} s); {call.order_reason}"
                    )
                else:
                    reason = f"{decision.reason}{sub_rule}; {call.order_reason}"
                call.ledger.add(target_id, requests)
                hint = decision.priority_hint
                if hint is None:
                    hint = min([int(r.priority) for r in requests])
                call.decisions.append(Assignment(target_id, decision.request_ids, hint, rule, reason))
                done.update(decision.request_ids)
                call.unqueue(LLM, requests)
            elif isinstance(decision, Rejection):
                request = lookup(decision.request_id)
                if request is None:
                    continue
                # The fallback saw every LLM-capable instance, so its rejection is final.
                call.decisions.append(dataclasses.replace(decision, rule=rule))
                done.add(request.id)
                call.unqueue(LLM, [request])
        if done:
            call.llm_done.update(done)
            if call.llm_built:
                call.llm = [r for r in call.llm if r.id not in done]
            call.llm_n -= len(done)


# The rule names are re-exported: records and tests name them as `sagesched.policies.hybrid.RULE_*`.
__all__ = [
    "EMBEDDING_PRIORITIES",
    "LLM_FALLBACK_POLICIES",
    "RULE_EXPIRED",
    "RULE_FULL",
    "RULE_IDLE",
    "RULE_OVERSIZE",
    "RULE_TOO_LARGE",
    "HybridConfig",
    "HybridPolicy",
]
