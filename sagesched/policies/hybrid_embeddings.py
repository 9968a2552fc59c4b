"""Hybrid's embedding half: merging queued embedding requests into batches and placing them.

`HybridPolicy` (in `hybrid.py`) decides which type claims shared capacity first and orders and places
LLM work; this mixin holds everything about embedding batches (docs/policies/hybrid.md, "Embedding
batches"): per-model ranking with aging, first-fit batch formation bounded by texts, tokens, the
target's input cap and free slots, the release rules (full, window expired, target idle), the
priority holdback of work without an SLO, and the choice of target by predicted time to result.
It also holds the slot rule both halves share (`_room`: the ``hybrid_instance_ratio`` split of a
mixed instance while the other type waits for it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sagesched.core import Decision, InstanceView, RejectCode, Rejection, Request, RequestType
from sagesched.policies.base import LoadLedger
from sagesched.policies.hybrid_call import _Call
from sagesched.policies.hybrid_config import (
    _EMBEDDING_ONLY,
    _EPS,
    _MIXED,
    EMBEDDING,
    HOLD_CUT,
    HOLD_PARTIAL,
    LLM,
    RULE_EXPIRED,
    RULE_FULL,
    RULE_IDLE,
    RULE_OVERSIZE,
    RULE_TOO_LARGE,
    HybridConfig,
)
from sagesched.policies.priority import effective_priority


class EmbeddingBatching:
    """Embedding batch formation and placement for `HybridPolicy` (a mixin: it reads ``self.config``)."""

    config: HybridConfig

    def _reject_too_large(
        self, servable: Iterable[Request], instances: Sequence[InstanceView], decisions: list[Decision]
    ) -> list[Request]:
        """The servable embedding requests, in order, less those above every instance's input cap
        (rejected into `decisions`)."""
        embeddings: list[Request] = []
        input_limit: dict[str, int] | None = None  # built on the first embedding request only
        for request in servable:
            if not request.is_embedding:
                continue
            if input_limit is None:
                input_limit = _input_limits(instances)
            limit = input_limit[request.model]
            if request.embedding_inputs > limit:
                decisions.append(
                    Rejection(
                        request.id,
                        f"{request.embedding_inputs} inputs exceed the largest max_client_batch_size ({limit}) of "
                        f"any instance serving {request.model!r}; split the request into calls of at most {limit}",
                        RejectCode.TOO_LARGE,
                        RULE_TOO_LARGE,
                    )
                )
                continue
            embeddings.append(request)
        return embeddings

    def _ranker(self, now: float) -> Callable[[Request], tuple[int, float, str]]:
        """The ranking key of queued embedding requests at `now`: aged priority class, arrival, id.

        Computed when sorting a call's embeddings and again for each model's head (never stored per
        request: a dict of every queued request's key cost a tenth of a call with a large backlog)."""
        aging_s = self.config.embedding_aging_ms / 1000.0

        def rank(request: Request) -> tuple[int, float, str]:
            return (effective_priority(request, now, aging_s), request.arrival_s, request.id)

        return rank

    # -- capacity ----------------------------------------------------------------------------------
    def _room(self, call: _Call, view: InstanceView, kind: str) -> int:
        """Slots `kind` may still claim on `view` in this call (ratio applied on mixed instances)."""
        if not view.healthy:
            return 0
        free = call.ledger.free_slots(view.id)
        if view.kind is not _MIXED or not call.other_waits(kind, view):
            return free
        share = self.config.share(kind, view.max_inflight)
        if share == 0 and self.config.share(EMBEDDING if kind == LLM else LLM, view.max_inflight) == 0:
            # Too few slots to split (max_inflight 1 with a ratio inside (0, 1)): both shares round down
            # to 0, and holding each type back for the other would leave the slot unused for ever.
            return free
        used = call.ledger.llm_inflight(view.id) if kind == LLM else call.ledger.embedding_inflight(view.id)
        return max(0, min(free, share - used))

    # -- batches ------------------------------------------------------------------------------------
    def _embedding_targets(self, call: _Call, head: Request, ignore_inputs: bool = False) -> list[InstanceView]:
        """Instances that can take a batch starting with `head` now, best first.

        Ranked by the predicted time to `head`'s result (`LoadLedger.predicted_ttft_s`: the embedding
        engine's own queue at its own rate, this call's placements included), multiplied on a mixed
        instance whose LLM side is busy by ``colocated_embedding_slowdown`` (the interference its
        batch will see). With ``prefer_specialized_instances`` ties go to embedding-only instances.
        Then fewer in flight, then id. An instance whose embedding engine would refuse the inputs
        (TEI's ``max_concurrent_requests``, in inputs) is not a target.
        """
        ledger = call.ledger
        prefer = self.config.prefer_specialized_instances
        slowdown = self.config.colocated_embedding_slowdown
        keyed = []
        for view in call.views:
            if not view.can_serve(head):
                continue
            if not ignore_inputs and (
                view.max_client_batch_size < head.embedding_inputs
                or not ledger.fits_embedding_inputs(view, head.embedding_inputs)
            ):
                continue
            if self._room(call, view, EMBEDDING) <= 0:
                continue
            load = ledger.predicted_ttft_s(view.id, head)
            if view.kind is _MIXED and (ledger.llm_inflight(view.id) > 0 or call.other_waits(EMBEDDING, view)):
                load *= slowdown
            tier = prefer and view.kind is not _EMBEDDING_ONLY
            keyed.append(((round(load, 12), tier, ledger.inflight(view.id), view.id), view))
        keyed.sort(key=_first)
        return [view for _, view in keyed]

    def _embedding_queue_s(self, call: _Call, view: InstanceView) -> float:
        """Predicted seconds of embedding work ahead of a new call at `view`'s embedding engine,
        stretched by ``colocated_embedding_slowdown`` on a mixed GPU whose LLM side is busy."""
        wait = call.ledger.predicted_embedding_wait_s(view.id)
        if view.kind is _MIXED and call.ledger.llm_inflight(view.id) > 0:
            wait *= self.config.colocated_embedding_slowdown
        return wait

    def _llm_prefill_ms(self, call: _Call, view: InstanceView) -> float:
        """Predicted ms of LLM prefill queued at `view` (a mixed GPU's embedding queue not counted),
        this call's placements included."""
        ledger = call.ledger
        vid = view.id
        tokens = (
            view.queued_prefill_tokens
            + ledger.added_prefill[vid]
            - view.queued_embedding_tokens
            - ledger.added_embedding_tokens[vid]
        )
        return 1000.0 * tokens / view.prefill_tokens_per_s if view.prefill_tokens_per_s > 0 else math.inf

    def _place_embeddings(self, call: _Call) -> None:
        """Form and release batches, model by model, best-ranked head first, until all are held or placed."""
        if not call.groups:
            return
        c = self.config
        held_models: set[str] = set()
        aside: set[str] = set()  # heads no instance can take now (no room / too many inputs)
        # Per model: `group[:cursor]` is all aside (aside only grows in a call), so finding the next
        # head does not rescan them: with thousands of ingest requests held at the gateway, the
        # rescan made one call quadratic in the backlog (an embedding-heavy run at 8x took >20 min).
        cursor: dict[str, int] = {}
        # Per model: the input counts of requests without an SLO that the holdback held in this call.
        # Its filters do not depend on the request, and whether an instance takes a call depends on
        # the request only through its input count (this call's placements only shrink room and
        # lengthen queues), so a request with the same count is held too without ranking every
        # target again. (Not "as many or more": a call above an engine's whole input cap passes it.)
        held_background: dict[str, set[int]] = {}
        while True:
            heads = []
            for model, group in call.groups.items():
                if model in held_models:
                    continue
                i, n = cursor.get(model, 0), len(group)
                held = held_background.get(model)
                while i < n:
                    request = group[i]
                    if request.id not in aside:
                        if held is None or request.embedding_inputs not in held or not request.slo.empty:
                            break
                        # Held as its input count was, in this loop rather than as a head of its own:
                        # nothing else changes, and the set of this model's held counts cannot grow
                        # while other models' heads go first. (A backlog of 5,000 held ingest
                        # requests: this loop is ~5x cheaper per request than a round of heads.)
                        aside.add(request.id)
                    i += 1
                cursor[model] = i
                if i < n:
                    heads.append((call.rank(group[i]), model, group[i]))
            if not heads:
                return
            _, model, head = min(heads, key=lambda x: x[0])
            group = call.groups[model]
            targets = self._embedding_targets(call, head)
            if targets and head.slo.empty and c.embedding_holdback_ms > 0:
                # Priority holdback: work without an SLO joins an embedding engine's FIFO queue only
                # while that queue is short, so it never delays an SLO-bound query by more than the
                # holdback; otherwise it waits at the gateway, where urgent requests overtake it.
                targets = [t for t in targets if self._embedding_queue_s(call, t) * 1000.0 <= c.embedding_holdback_ms]
                if targets and c.mixed_ingest_guard_ms > 0:
                    # ...and a mixed GPU's embedding engine only while its LLM engine has little
                    # prefill queued: a batch there stretches the steps that are making TTFTs.
                    targets = [
                        t
                        for t in targets
                        if t.kind is not _MIXED or self._llm_prefill_ms(call, t) <= c.mixed_ingest_guard_ms
                    ]
                if not targets:
                    aside.add(head.id)  # a completion there (the driver calls again) lets it go
                    held_background.setdefault(model, set()).add(head.embedding_inputs)
                    continue
            if not targets:
                if self._embedding_targets(call, head, ignore_inputs=True):
                    aside.add(head.id)  # room exists, but not for this many inputs: the rest may still go
                else:
                    held_models.add(model)  # no room for this model anywhere: all of it waits
                continue
            for target in targets:
                batch, rule, why = self._form_batch(call, group, head, target, aside)
                if rule or why != HOLD_CUT:
                    break
                # Held only because this target's free slots cut it below the minimum: try the next.
            if not rule:
                # A partial batch waits for company; only requests too large to join it may still go.
                aside.update(r.id for r in batch)
                continue
            hint = call.embedding_hint if call.embedding_hint is not None else min(int(r.priority) for r in batch)
            texts = sum(r.embedding_inputs for r in batch)
            tokens = sum(r.work_tokens for r in batch)
            call.decisions.append(
                call.ledger.assign(
                    target,
                    batch,
                    rule,
                    f"{len(batch)} request(s), {texts} texts, {tokens} tokens of {model!r} to {target.kind.value} "
                    f"instance: {why}; {call.order_reason}",
                    priority_hint=hint,
                )
            )
            ids = {r.id for r in batch}
            call.groups[model] = [r for r in group if r.id not in ids]
            cursor[model] = 0  # a new list: its aside prefix is found again on the next round
            if not call.groups[model]:
                del call.groups[model]
            call.unqueue(EMBEDDING, batch)

    def _form_batch(
        self, call: _Call, group: list[Request], head: Request, target: InstanceView, aside: set[str]
    ) -> tuple[list[Request], str, str]:
        """The batch to release on `target` now, with its rule and reason.

        An empty rule means "hold": the returned requests form a partial batch that must wait, and
        the reason says whether only the target's free slots held it (`HOLD_CUT`).
        """
        c = self.config
        text_bound = min(c.embedding_batch_size, target.max_client_batch_size)
        input_room = max(call.ledger.embedding_input_room(target.id), head.embedding_inputs)
        room = self._room(call, target, EMBEDDING)
        if head.embedding_inputs > text_bound or head.work_tokens > c.embedding_batch_token_budget:
            return (
                [head],
                RULE_OVERSIZE,
                f"one request larger than a batch ({head.embedding_inputs} texts / {head.work_tokens} tokens vs "
                f"{text_bound} / {c.embedding_batch_token_budget}) goes alone",
            )
        natural: list[Request] = []
        texts = tokens = 0
        skipped = False
        budget = c.embedding_batch_token_budget
        for request in group:  # first fit, in ranking order, starting at the head
            if texts >= text_bound or tokens >= budget:
                break  # nothing more can fit: stop scanning a long backlog
            if request.id in aside or request.slo.empty != head.slo.empty:
                continue  # (SLO-bound and background work never share a call: holdback applies to one)
            if (
                texts + request.embedding_inputs <= text_bound
                and tokens + request.work_tokens <= budget
                and texts + request.embedding_inputs <= input_room
            ):
                natural.append(request)
                texts += request.embedding_inputs
                tokens += request.work_tokens
            elif request.embedding_inputs <= text_bound and request.work_tokens <= budget:
                # A batchable request left out: demand exceeds one batch. (An oversized one, which
                # goes alone anyway, does not make this batch full.)
                skipped = True
        full = skipped or texts >= text_bound or tokens >= budget
        batch = natural[:room]
        cut = len(batch) < len(natural)
        batch_texts = sum(r.embedding_inputs for r in batch)
        waited = call.now - call.oldest[head.model]
        if waited + _EPS >= c.window_s:
            return (
                batch,
                RULE_EXPIRED,
                f"oldest request waited {waited * 1000:.1f} ms >= {c.max_embedding_wait_ms:g} ms",
            )
        if full and (not cut or batch_texts >= c.min_embedding_batch_size):
            limit = f", cut to the {room} free slot(s)" if cut else ""
            return batch, RULE_FULL, f"batch full ({text_bound} texts / {c.embedding_batch_token_budget} tokens){limit}"
        if (
            c.release_when_idle
            and not cut
            and batch_texts >= c.min_embedding_batch_size
            and _embedding_idle(call.ledger, target)
        ):
            return batch, RULE_IDLE, f"target's embedding side idle and {batch_texts} >= min_embedding_batch_size texts"
        return natural, "", HOLD_CUT if cut else HOLD_PARTIAL


# -- small helpers -----------------------------------------------------------------------------------


def _input_limits(instances: Sequence[InstanceView]) -> dict[str, int]:
    """Per model: the largest ``max_client_batch_size`` of any embedding-capable instance serving it."""
    limits: dict[str, int] = {}
    for view in instances:
        if view.kind.serves(RequestType.EMBEDDING):
            for model in view.models:
                limits[model] = max(limits.get(model, 0), view.max_client_batch_size)
    return limits


def _first(pair: tuple) -> Any:
    return pair[0]


def _embedding_idle(ledger: LoadLedger, view: InstanceView) -> bool:
    """No embedding work in flight on `view` (on an embedding-only instance: nothing in flight)."""
    if view.kind is _EMBEDDING_ONLY:
        return ledger.inflight(view.id) == 0
    return ledger.embedding_inflight(view.id) == 0


__all__ = ["EmbeddingBatching"]
