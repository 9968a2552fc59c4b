"""Hybrid's LLM placement: where one LLM request (or one fallback assignment) goes.

`HybridPolicy` (in `hybrid.py`) decides the claim order and asks its fallback for the LLM order;
this mixin holds the placement rule it re-targets every assignment with (``prefer_specialized_
instances``, docs/policies/hybrid.md): the lowest normalised load (outstanding LLM token work over
the LLM speed the instance may count on, its ``hybrid_instance_ratio`` share on a mixed GPU that
also serves embeddings), the LLM holdback, and the two lone-request shortcuts that skip the
fallback when one LLM request is queued (the common case at light load; tests/sim/
test_slo_aware_lone.py checks they decide as asking the fallback does).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sagesched.core import Assignment, InstanceKind, InstanceView, Priority, Rejection, Request
from sagesched.core.pool import InstancePool
from sagesched.policies.base import Policy
from sagesched.policies.hybrid_call import _Call
from sagesched.policies.hybrid_config import _EPS, _LLM_ONLY, _MIXED, EMBEDDING, LLM, HybridConfig
from sagesched.policies.slo_aware import SloAwarePolicy

# Two raw loads further apart than this round (to 9 decimals) to different values, in the same order.
_ROUNDING_GAP = 2e-9
_HIGH = int(Priority.HIGH)  # the least urgent class `llm_holdback_ms` never holds
# `kind.value` for the reasons: an enum's `.value` is a Python-level descriptor, read on every placement.
_KIND_NAMES = {kind: kind.value for kind in InstanceKind}


def _load_key(view: InstanceView, raw: float, added: dict[str, int]) -> tuple[float, bool, int, str]:
    """`_llm_target`'s order: the load rounded to 9 decimals, then LLM-only first, then fewer in flight, then id."""
    load = round(raw, 9) if raw != math.inf else math.inf
    return (load, view.kind is not _LLM_ONLY, view.running + view.waiting + added[view.id], view.id)


class LlmPlacement:
    """LLM placement for `HybridPolicy` (a mixin: it reads ``self.config``, the fallback, the
    holdback and the rule name set up by the policy, and `_room` from `EmbeddingBatching`)."""

    config: HybridConfig
    llm_fallback: Policy
    _llm_holdback_s: float
    _slack_margin_s: float
    _llm_rule: str

    if TYPE_CHECKING:  # provided by `EmbeddingBatching` (the slot rule both halves share)

        def _room(self, call: _Call, view: InstanceView, kind: str) -> int: ...

    # -- where work goes: normalised load ---------------------------------------------------------
    def _llm_share(self, call: _Call, view: InstanceView) -> float:
        """The fraction of `view` LLM work may count on: 1 on an LLM-only instance; on a mixed one
        ``ratio`` while embedding work is in flight on it or queued for it (its GPU is then shared),
        else 1 (an idle embedding side costs the LLM nothing)."""
        if view.kind is not _MIXED:
            return 1.0
        if call.ledger.embedding_inflight(view.id) > 0 or call.other_waits(LLM, view):
            return self.config.hybrid_instance_ratio
        return 1.0

    def _llm_target(
        self, call: _Call, views: Sequence[InstanceView], requests: Sequence[Request]
    ) -> tuple[InstanceView, float] | None:
        """The specialized-first load rule: where `requests` (one fallback assignment) go, and the load.

        Among the instances with LLM room for all of them, the lowest load after taking them: the
        outstanding LLM token work (`LoadLedger.outstanding_tokens` less a mixed GPU's embedding
        queue, plus their prompt and ``max_tokens``) over the LLM speed it may count on
        (``prefill_tokens_per_s * _llm_share``), i.e. seconds of work queued per unit of LLM
        capacity. Ties go to the LLM-only instance, then fewer in flight,
        then id. None when none has room (they stay queued).

        Runs once per placed LLM request, so the ledger's dicts are read directly (what is computed
        is `_room`, `_llm_share` and `LoadLedger.outstanding_tokens`, spelled out).
        """
        n = len(requests)
        head = requests[0]
        work = (
            head.prompt_tokens + head.max_tokens if n == 1 else sum([r.prompt_tokens + r.max_tokens for r in requests])
        )
        ledger = call.ledger
        added, prefill, decode = ledger.added_requests, ledger.added_prefill, ledger.added_decode
        # Priority holdback (``llm_holdback_ms``): work below high priority goes only where little
        # prefill is queued; elsewhere it would wait in the engine's FIFO queue, out of reach.
        hold_s = self._llm_holdback_s if int(head.priority) > _HIGH else 0.0
        added_emb = ledger.added_embedding_tokens
        best: InstanceView | None = None
        # The key is (load rounded to 9 decimals, not LLM-only, in flight, id), lowest wins. Loads
        # are compared unrounded first: rounding to 9 decimals cannot reorder two loads more than
        # `_ROUNDING_GAP` apart, so the rounded key is built only for near-ties (`round(x, 9)`,
        # ~0.3 us, was the costliest line of a light-load run when built for every view).
        best_raw = math.inf
        best_key: tuple[float, bool, int, str] | None = None  # built for near-ties only
        # `views` are LLM-capable and every request is an LLM request (`_place_llm`), so
        # `view.can_serve(r)` is whether the view serves r's model: spelled out (hot: once per view
        # per placed request).
        model = head.model if n == 1 or all(r.model == head.model for r in requests) else None
        for view in views:
            vid = view.id
            if not view.healthy:
                continue
            if model is not None:
                if model not in view.models:
                    continue
            elif not all(view.can_serve(r) for r in requests):
                continue
            # The LLM prefill queued: on a mixed GPU `queued_prefill_tokens` also counts its
            # embedding engine's queue, which runs beside the LLM engine, not ahead of its prefill
            # (the interference it causes is what `_llm_share` prices).
            ahead = view.queued_prefill_tokens + prefill[vid]
            if view.kind is _MIXED:
                ahead -= view.queued_embedding_tokens + added_emb[vid]
            if hold_s > 0.0 and ahead > hold_s * view.prefill_tokens_per_s:
                continue
            if view.kind is _LLM_ONLY:
                if view.max_inflight - view.running - view.waiting - added[vid] < n:
                    continue
                capacity = view.prefill_tokens_per_s
            else:
                if self._room(call, view, LLM) < n:
                    continue
                capacity = view.prefill_tokens_per_s * self._llm_share(call, view)
            outstanding = ahead + view.queued_decode_tokens + decode[vid]
            raw = (outstanding + work) / capacity if capacity > _EPS else math.inf
            if best is not None:
                if raw > best_raw + _ROUNDING_GAP:
                    continue  # loses on the rounded load too
                if raw >= best_raw - _ROUNDING_GAP:
                    # A near-tie: the full keys decide. Rounded so that equal loads compare equal
                    # (0.7 * x is not exact in floating point).
                    if best_key is None:
                        best_key = _load_key(best, best_raw, added)
                    key = _load_key(view, raw, added)
                    if key < best_key:
                        best, best_raw, best_key = view, raw, key
                    continue
            best, best_raw, best_key = view, raw, None  # wins on the load alone (or the first)
        if best is None:
            return None
        return best, (round(best_raw, 9) if best_raw != math.inf else math.inf)

    def _place_lone_llm(self, call: _Call, views: Sequence[InstanceView]) -> None:
        """One LLM request queued, placement by the load rule, a fallback that cannot reject: there is
        no order to decide, so the fallback is not asked (the common case at light load, and half of
        a call's cost if it were). The request goes where `_llm_target` sends it, its priority as hint.
        """
        lone = call.llm_list()
        request = lone[0]
        found = self._llm_target(call, views, lone)
        if found is None:
            return
        target, load = found
        call.decisions.append(
            call.ledger.assign(
                target,
                lone,
                self._llm_rule,
                f"the only queued LLM request; placed on the {_KIND_NAMES[target.kind]} instance with the least work "
                f"per LLM capacity ({load:.2f} s); {call.order_reason}",
                priority_hint=int(request.priority),
            )
        )
        call.unqueue(LLM, lone)
        call.llm = []
        call.llm_n = 0
        call.llm_done.add(request.id)

    def _place_lone_idle(self, call: _Call) -> bool:
        """`_place_lone_admitted` in O(1) on a pool whose instances for the request's model share one
        speed (`InstancePool.uniform_llm`) when one of them is idle: the same decisions.

        With nothing placed yet in this call and no embedding queued (so no view would be adjusted
        and no share applies), the first idle LLM-only instance in id order is where `_llm_target`
        sends the request (no instance has less work per unit of the same capacity; ties go to
        LLM-only, then fewer in flight, then id), and it also has the most slack of any instance
        (no wait, the same service), which is all the fallback's answer needs (`lone_answer`'s
        `best`). False, with nothing done, when any of that does not hold: `_place_llm` runs.
        On 256 instances this call no longer reads every view.
        """
        pool = call.views
        if type(pool) is not InstancePool or not pool.idle_ids or not pool.uniform_llm:
            return False
        if any(call.waiting[EMBEDDING].values()) or any(type(d) is Assignment for d in call.decisions):
            return False
        request = call.llm_list()[0]
        model = request.model
        if model not in pool.uniform_llm:
            return False
        views = call.ledger.views
        target: InstanceView | None = None
        for vid in pool.idle_ids:
            view = views[vid]
            if view.kind is _LLM_ONLY and model in view.models:
                target = view
                break
        if target is None:
            return False
        fallback = self.llm_fallback
        assert isinstance(fallback, SloAwarePolicy)
        answer = fallback.lone_answer(call.ledger, request, call.now + self._slack_margin_s, True, target)
        if answer is None:
            return True
        if isinstance(answer, Rejection):
            self._finish_lone(call, request, answer)
            return True
        capacity = target.prefill_tokens_per_s
        # `_llm_target`'s load for an instance with nothing outstanding, the same expression.
        load = round((0 + request.prompt_tokens + request.max_tokens) / capacity, 9) if capacity > _EPS else math.inf
        self._finish_lone(call, request, answer[1], target, load)
        return True

    def _place_lone_admitted(self, call: _Call, views: Sequence[InstanceView]) -> bool:
        """`_place_llm` for one queued LLM request and the admission fallback, when the fallback would
        see `views` unchanged (nothing placed on them yet, no share applies): the same decisions.

        The fallback's answer (`SloAwarePolicy.lone_answer`: shed, stay queued, or its assignment's
        reason) is read off this call's ledger, which equals a fresh one on these views; its choice
        of instance is not made, since `_llm_target` re-targets it. At light load this is every
        LLM placement. False (nothing done) when the views would be adjusted: the general path runs.
        """
        ledger = call.ledger
        added = ledger.added_requests
        embedding_waits = any(call.waiting[EMBEDDING].values())  # else no share applies anywhere
        request = call.llm_list()[0]
        model = request.model
        any_room = serving_room = False
        for view in views:
            if (
                added[view.id]
                or not view.healthy
                or (embedding_waits and view.kind is _MIXED and call.other_waits(LLM, view))
            ):
                return False
            if not serving_room and view.max_inflight > view.running + view.waiting:  # free_slots > 0
                any_room = True
                serving_room = model in view.models
        if not any_room:
            return True  # the fallback would not be called (`_fallback_views` is None)
        fallback = self.llm_fallback
        assert isinstance(fallback, SloAwarePolicy)
        # `serving_room`: the fallback has a candidate (healthy, a free slot, serves the request; the
        # views it does not see are embedding-only, which do not).
        answer = fallback.lone_answer(ledger, request, call.now + self._slack_margin_s, serving_room)
        if answer is None:
            return True
        if isinstance(answer, Rejection):
            self._finish_lone(call, request, answer)
            return True
        found = self._llm_target(call, views, [request])
        if found is not None:
            self._finish_lone(call, request, answer[1], *found)
        return True

    def _finish_lone(
        self,
        call: _Call,
        request: Request,
        answer: Rejection | str,
        target: InstanceView | None = None,
        load: float = 0.0,
    ) -> None:
        """The decision of a lone-request shortcut: the fallback's shed rejection under hybrid's rule,
        or the request placed on `target` with the fallback's reason (`answer`); it leaves the queue."""
        if isinstance(answer, Rejection):
            call.decisions.append(dataclasses.replace(answer, rule=self._llm_rule))
        else:
            assert target is not None
            reason = (
                f"order: {answer}; placed on the {_KIND_NAMES[target.kind]} instance with the least work per LLM "
                f"capacity ({load:.2f} s); {call.order_reason}"
            )
            if call.groups:
                call.ledger.add(target.id, (request,))
            call.decisions.append(Assignment(target.id, (request.id,), int(request.priority), self._llm_rule, reason))
        if call.groups:
            # Embedding rounds follow in this call: they read the load placed and what LLM work still
            # waits. Without them nothing reads either again (the LLM rounds end here: `llm_n` is 0).
            call.unqueue(LLM, (request,))
            call.llm_done.add(request.id)
        call.llm = []
        call.llm_n = 0
