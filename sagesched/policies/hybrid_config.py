"""The hybrid policy's configuration, constants and rule names (the policy is in `hybrid.py`).

Split from the policy so that the knobs and their validation read on their own: every field of
`HybridConfig` is documented where it is declared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sagesched.core import InstanceKind
from sagesched.policies.base import PolicyConfig
from sagesched.policies.registry import config_fields, policy_class
from sagesched.typed_config import ConfigFieldError, from_mapping

EMBEDDING_PRIORITIES = ("high", "normal", "low", "adaptive")
LLM_FALLBACK_POLICIES = ("fifo", "priority", "slo_aware", "adaptive", "fair_share")
# (knob, lower bound, strictly above it, what the error says it must be) for `HybridConfig`'s checks.
_BOUNDED_KNOBS: tuple[tuple[str, float, bool, str], ...] = (
    ("embedding_holdback_ms", 0.0, False, ">= 0 ms and finite (0 = off)"),
    ("slack_margin_ms", 0.0, False, "a finite number >= 0 ms (0 = off)"),
    ("mixed_ingest_guard_ms", 0.0, False, "a finite number >= 0 ms (0 = off)"),
    ("late_first_wait_ms", 0.0, False, "a finite number >= 0 ms (0 = at once)"),
    ("llm_holdback_ms", 0.0, False, ">= 0 ms and finite (0 = off)"),
    ("colocated_embedding_slowdown", 1.0, False, ">= 1 and finite (1 = no interference)"),
    ("max_embedding_wait_ms", 0.0, False, ">= 0 ms and finite"),
    ("embedding_aging_ms", 0.0, True, "> 0 ms and finite"),
    ("embedding_target_wait_ms", 0.0, True, "> 0 ms and finite"),
    ("llm_target_wait_ms", 0.0, True, "> 0 ms and finite"),
)

EMBEDDING = "embedding"
LLM = "llm"

RULE_FULL = "hybrid/embedding-batch-full"
RULE_EXPIRED = "hybrid/embedding-wait-expired"
RULE_IDLE = "hybrid/embedding-idle"
RULE_OVERSIZE = "hybrid/embedding-oversize"
RULE_TOO_LARGE = "hybrid/embedding-too-large"

HOLD_CUT = "cut below min_embedding_batch_size by free slots"
HOLD_PARTIAL = "partial batch inside its window"

# The instance kinds, bound once: an enum member lookup (`InstanceKind.LLM`) costs about 0.1 us in
# CPython 3.11, and these are compared per instance on every call.
_LLM_ONLY = InstanceKind.LLM
_EMBEDDING_ONLY = InstanceKind.EMBEDDING
_MIXED = InstanceKind.LLM_EMBEDDING

# Slack for float rounding: a wait of exactly the window (in real numbers) counts as expired, and a
# share of exactly k slots (0.7 * 10) is k, not k - 1.
_EPS = 1e-9


@dataclass(frozen=True)
class HybridConfig(PolicyConfig):
    """Configuration of the hybrid policy (the seed's five fields plus the knobs they need).

    embedding_batch_size: most texts (summed ``embedding_inputs``) one merged embedding call may
        carry. The target instance's ``max_client_batch_size`` caps it further. A single request with
        more texts goes alone (rule ``hybrid/embedding-oversize``); it is rejected (``too_large``)
        only if it exceeds every compatible instance's ``max_client_batch_size``.
    embedding_batch_token_budget: most input tokens one merged call may carry (default 16384,
        TEI's ``max_batch_tokens``). A single request above it goes alone.
    min_embedding_batch_size: fewest texts a batch that could still grow is released with before
        its wait expires (applies to idle release and to batches cut short by the target's free
        slots). A full batch is always released: waiting cannot make it larger.
    max_embedding_wait_ms: the batching window. Once the oldest queued embedding request of a model
        has waited this long, that model's requests are released in batches of whatever size they
        have. `next_wakeup` reports when the earliest window closes.
    release_when_idle: release a partial batch of at least ``min_embedding_batch_size`` texts at
        once when its target has no embedding work in flight (an embedding-only instance: nothing in
        flight; a mixed one: no embedding in flight, whatever its LLM load). Batching only pays while
        the embedding engine is busy: an idle one would start a lone request at once, so holding it
        adds the window to its latency for nothing. On by default; ``max_embedding_wait_ms`` still
        bounds the wait while the target is busy. False: batches wait for full or expired.
    embedding_priority: how embedding batches rank against LLM requests for mixed capacity and in
        the backend's ``priority_hint``: ``high`` (embeddings claim first, hint 0), ``normal`` (the
        type whose oldest request arrived first claims first; hint = the batch's best request
        priority), ``low`` (LLM claims first, hint 4) or ``adaptive`` (the type with the larger
        queue pressure claims first; leading embeddings get hint 0, trailing ones their priority).
    embedding_aging_ms: waiting this long promotes a queued embedding request by one priority class
        when ranking which requests are batched and released first, so a low-priority embedding is
        never starved by a stream of urgent ones (it is class 0 after ``priority * aging``).
    embedding_target_wait_ms / llm_target_wait_ms: the waits that count as "on target" in the
        adaptive pressure ``sum(wait / target)`` over a type's queued requests. A request's own SLO
        (``ttft_ms``, else ``e2e_ms``) replaces the default target.
    llm_fallback_policy: the policy that orders LLM requests (and, without
        ``prefer_specialized_instances``, places them): fifo, priority, slo_aware, adaptive or fair_share.
        Default ``slo_aware`` with admission (below): least slack first, late requests shed within
        a 5% budget or served right after urgent work. The previous default, ``adaptive``, trailed
        it by up to 0.4% past saturation and kept late requests last (docs/policies/hybrid.md).
        With ``fifo``, LLM requests go in arrival order; their priority then reaches only the backend.
    llm_fallback_config: config keys for the fallback policy (checked against its Config).
    admission: with the ``slo_aware`` fallback, its SLO-aware admission (`sagesched.policies.admission`:
        shed late LLM requests within ``max_shed_fraction`` = 5% of those seen, code ``queue_full``
        = 429 + Retry-After live; serve the rest before long-slack work). An explicit
        ``llm_fallback_config.admission`` wins. Ignored by the other fallbacks.
    hybrid_instance_ratio: the LLM share of a mixed instance's ``max_inflight`` slots while
        embedding work waits for it; embeddings get ``1 - ratio`` while LLM work waits. When only one
        type waits, it may use the whole instance.
    prefer_specialized_instances: specialized instances first, mixed instances absorbing
        overflow by load: each LLM request (embedding batch) goes where its normalised load (see the
        module docstring: load over the type's share of the instance, the ratio applied on mixed
        instances while the other type is present) is lowest, ties to the LLM-only (embedding-only)
        instance. False: the fallback's own placement for LLM work, the lowest predicted time to
        result for embedding batches, all compatible instances alike. (Embedding batches go to the
        lowest predicted time to result either way; the preference only breaks ties.)
    colocated_embedding_slowdown: how much longer an embedding batch takes on a mixed GPU while its
        LLM engine is busy (the shared-GPU interference, see `sagesched.sim.engines.shared_gpu`);
        multiplies the predicted time to result there when ranking targets. 1.5 sits between the
        anchored interference model's stretch at light and heavy decode load.
    embedding_holdback_ms: priority holdback for embedding work without an SLO (bulk ingestion): it
        is sent only to an embedding engine with at most this much predicted work queued (stretched
        on a busy mixed GPU), and otherwise waits at the gateway, where SLO-bound queries overtake
        it. TEI's queue is FIFO, so a query placed behind ingestion waits for all of it; with the
        holdback it waits at most this long plus the batch in progress. 0 turns it off.
    llm_holdback_ms: priority holdback for LLM work below high priority (normal, low, background):
        it is placed only on an instance whose LLM prefill queue holds at most this much predicted
        work (queued prompt tokens at ``prefill_tokens_per_s``, this call's placements included; a
        mixed GPU's embedding queue not counted), and otherwise waits at the gateway. vLLM serves
        its own queue first come, first served, so work sent ahead of time is work an interactive
        request arriving later must wait behind, and that the admission and least-slack order can
        no longer reorder or shed. Held at the gateway, it is overtaken by urgent arrivals and
        dispatched as soon as the queue drains (the driver calls again on every completion). High
        and critical requests are never held. 50 ms is a fraction of one full prefill chunk: the
        engine keeps prefill work to batch while the backlog stays where the policy can still
        order it (docs/policies/hybrid.md, "LLM holdback", has the measurements). 0 turns it off.
    slack_margin_ms: the LLM fallback is asked as of this much after the clock, so the least-slack
        order and admission's "late first" treat a request as late once its predicted slack falls
        below the margin, not below 0; shedding still needs lateness by the clock itself
        (`AdmissionConfig.shed_margin_s`). Why: the predicted TTFT prices a prompt at the engine's
        isolated prefill rate, while past saturation every step also carries ~60 decodes, so a
        prompt takes 1.3-2x its prediction (a 1.5k-token prompt ~0.2 s instead of ~0.1 s): a
        request dispatched at slack 0 then misses by that error; with a margin it goes while it
        can still make it. 200 ms (docs/policies/hybrid.md, "Slack margin": 150-300 all gain;
        rag 2.8x +4.1%, conversation 1.8x +1.8% by mean, no cell below saturation changes).
        Applies only to a fallback with admission (the default): without it least slack serves
        late requests last, where the margin would send the requests nearest their deadline.
        0 turns it off.
    late_first_wait_ms: with the ``slo_aware`` fallback (its admission or fair-share order), a late
        high-priority request (late as the fallback ranks: its SLO predicted lost by
        ``now + slack_margin_ms``) goes ahead of the attainable urgent work only once it has waited
        this long at the gateway, as of the time the fallback ranks at (the clock plus
        ``slack_margin_ms``); before that it goes with the other late requests, after the urgent
        work that can still meet its SLO (`AdmissionConfig.late_first_wait_s`). Why: past
        saturation a late interactive chat has lost its SLO or is about to (most also miss their
        50 ms TPOT on the loaded engines: 262-276 of 305 at rag 2.8x, by policy), so serving it at
        once only moves the miss onto a standard request that could still have made its own; the
        wait bounds its tail instead (at rag 2.8x the interactive p99 TTFT stays under 0.1x
        FIFO's). 1500 ms, chosen on the
        held-out windows (seeds 3-6: 0.75, 1.5, 3 and 6 s tried; docs/policies/hybrid.md, "Late-first
        wait"), then checked on the scored ones. ``llm_fallback_config.late_first_wait_s`` wins;
        0 serves late urgent requests first at once. Exempting the requests late only within the
        margin (by the clock they can still make their TTFT) gave the gain back on the held-out
        windows (-0.5% against the wait for all, rag 2.8x -1.6% to -3.8%), so it applies to them too.
    mixed_ingest_guard_ms: embedding work without an SLO (bulk ingestion) goes to a mixed GPU's
        embedding engine only while that GPU's LLM engine has at most this much predicted prefill
        queued (its `queued_prefill_tokens` less its embedding queue, this call's placements
        included, at ``prefill_tokens_per_s``); otherwise to another target or it waits at the
        gateway. While both engines are busy each runs slower (1.5x under the anchored ``mps``
        interference), so an ingest batch started beside a prefill in progress lengthens a TTFT
        being made, for work that has no deadline. 100 ms (docs/policies/hybrid.md, "Mixed-GPU
        ingest guard": 50, 100 and 200 tried; 100 gains 1.7-6% goodput at embedding-heavy 2-4x and
        up to 1% on RAG and conversation past saturation, nothing lost elsewhere). 0 turns it off.
    """

    embedding_batch_size: int = 32
    embedding_batch_token_budget: int = 16384
    min_embedding_batch_size: int = 1
    max_embedding_wait_ms: float = 10.0
    release_when_idle: bool = True
    embedding_priority: str = "normal"
    embedding_aging_ms: float = 1000.0
    embedding_target_wait_ms: float = 50.0
    llm_target_wait_ms: float = 500.0
    llm_fallback_policy: str = "slo_aware"
    llm_fallback_config: Mapping[str, Any] = field(default_factory=dict)
    admission: bool = True
    hybrid_instance_ratio: float = 0.7
    prefer_specialized_instances: bool = True
    colocated_embedding_slowdown: float = 1.5
    embedding_holdback_ms: float = 15.0
    llm_holdback_ms: float = 50.0
    slack_margin_ms: float = 200.0
    mixed_ingest_guard_ms: float = 100.0
    late_first_wait_ms: float = 1500.0

    def __post_init__(self) -> None:
        if self.embedding_batch_size < 1:
            raise ValueError(f"embedding_batch_size must be >= 1 text, got {self.embedding_batch_size!r}")
        if self.embedding_batch_token_budget < 1:
            raise ValueError(
                f"embedding_batch_token_budget must be >= 1 token, got {self.embedding_batch_token_budget!r}"
            )
        if not 1 <= self.min_embedding_batch_size <= self.embedding_batch_size:
            raise ValueError(
                f"min_embedding_batch_size must be between 1 and embedding_batch_size "
                f"({self.embedding_batch_size}), got {self.min_embedding_batch_size!r}"
            )
        # Every time and factor is a finite number: inf is no setting (0 turns the holdbacks and guards
        # off), and an infinite window overflowed the wake-up time (requests failed).
        for name, low, strict, bound in _BOUNDED_KNOBS:
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > low if strict else value >= low)):
                raise ValueError(f"{name} must be {bound}, got {value!r}")
        if not 0.0 <= self.hybrid_instance_ratio <= 1.0:
            raise ValueError(f"hybrid_instance_ratio must be within [0, 1], got {self.hybrid_instance_ratio!r}")
        priority = str(self.embedding_priority).strip().lower()
        if priority not in EMBEDDING_PRIORITIES:
            raise ConfigFieldError(
                ("embedding_priority",),
                f"unknown embedding_priority {self.embedding_priority!r}; use one of {', '.join(EMBEDDING_PRIORITIES)}",
            )
        object.__setattr__(self, "embedding_priority", priority)
        fallback = str(self.llm_fallback_policy).strip().lower()
        if fallback not in LLM_FALLBACK_POLICIES:
            raise ConfigFieldError(
                ("llm_fallback_policy",),
                f"unknown llm_fallback_policy {self.llm_fallback_policy!r}; "
                f"use one of {', '.join(LLM_FALLBACK_POLICIES)}",
            )
        object.__setattr__(self, "llm_fallback_policy", fallback)
        sub_config = dict(self.llm_fallback_config or {})
        valid = set(config_fields(fallback))
        unknown = sorted(set(sub_config) - valid)
        if unknown:
            raise ConfigFieldError(
                ("llm_fallback_config", unknown[0]),
                f"unknown llm_fallback_config key(s) {', '.join(map(repr, unknown))} for fallback {fallback!r}; "
                f"valid keys: {', '.join(sorted(valid)) or '(none)'}",
            )
        object.__setattr__(self, "llm_fallback_config", sub_config)
        # The fallback's values and types, judged here so that an error names `llm_fallback_config.<key>`
        # (the policy builds it with the same keys: `fallback_config`).
        try:
            from_mapping(policy_class(fallback).Config, self.fallback_config(), "llm_fallback_config")
        except ConfigFieldError as exc:
            raise ConfigFieldError(
                ("llm_fallback_config", *exc.path), f"(fallback {fallback!r}) {exc.message}"
            ) from None

    def fallback_config(self) -> dict[str, Any]:
        """The fallback's config: `llm_fallback_config` plus, for slo_aware, hybrid's admission defaults."""
        config = dict(self.llm_fallback_config)
        if self.llm_fallback_policy == "slo_aware":
            config.setdefault("admission", self.admission)
            config.setdefault("late_first_wait_s", self.late_first_wait_ms / 1000.0)
        return config

    # -- derived -----------------------------------------------------------------------------------
    @property
    def window_s(self) -> float:
        return self.max_embedding_wait_ms / 1000.0

    def share(self, kind: str, max_inflight: int) -> int:
        """Slots of a mixed instance `kind` may hold while the other type waits for it."""
        fraction = self.hybrid_instance_ratio if kind == LLM else 1.0 - self.hybrid_instance_ratio
        return max(0, math.floor(fraction * max_inflight + _EPS))
