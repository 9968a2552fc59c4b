"""Instances and the snapshot of one that a policy is allowed to see.

`InstanceView` is the whole of a policy's knowledge about a backend. The simulator fills it with
exact values; live mode fills it from its own in-flight accounting plus scraped `/metrics`, and
says how old the scraped part is (`age_s`). Anything a policy needs must be a field here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sagesched.core.request import Request, RequestType


class InstanceKind(str, enum.Enum):
    """What an instance can serve: LLM work, embeddings, or both on one GPU."""

    LLM = "llm"
    EMBEDDING = "embedding"
    LLM_EMBEDDING = "llm_embedding"

    def serves(self, request_type: RequestType) -> bool:
        # Module-level aliases: enum attribute lookups cost ~10x a global on this hot path.
        if request_type is _EMBEDDING_REQUEST:
            return self is not _LLM_KIND
        return self is not _EMBEDDING_KIND

    @classmethod
    def parse(cls, value: str | InstanceKind) -> InstanceKind:
        if isinstance(value, InstanceKind):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ValueError(f"unknown instance kind {value!r}; use one of {', '.join(k.value for k in cls)}") from None


_EMBEDDING_REQUEST = RequestType.EMBEDDING
_LLM_KIND = InstanceKind.LLM
_EMBEDDING_KIND = InstanceKind.EMBEDDING
_MIXED_KIND = InstanceKind.LLM_EMBEDDING


@dataclass(frozen=True, slots=True)
class InstanceView:
    """A read-only snapshot of one instance at the time `schedule` is called.

    Load fields count requests the driver has dispatched to the instance and not yet seen finish.
    Rates are the instance's current estimates (from the performance model in simulation, from
    observed latencies live); a policy turns them into predicted waits with the helpers below.
    """

    id: str
    kind: InstanceKind
    models: frozenset[str]
    healthy: bool = True
    # Requests the engine is executing / holding in its own queue.
    running: int = 0
    waiting: int = 0
    # Of running + waiting, how many are embedding requests (the rest are LLM requests).
    embedding_inflight: int = 0
    # Fraction of KV-cache blocks in use, 0..1 (0 for embedding-only instances).
    kv_usage: float = 0.0
    # Prompt/input tokens not yet processed, and decode tokens still expected (by max_tokens).
    queued_prefill_tokens: int = 0
    queued_decode_tokens: int = 0
    # Capacity limits. `max_inflight` is how many requests the driver lets be outstanding at the
    # instance; beyond it requests wait in the gateway queue where the policy can still reorder them.
    max_inflight: int = 256
    max_num_seqs: int = 256
    max_batch_tokens: int = 2048
    # Largest number of embedding inputs one backend call may carry (TEI's max_client_batch_size).
    max_client_batch_size: int = 32
    # Throughput estimates used to predict waits and service times.
    prefill_tokens_per_s: float = 10_000.0
    decode_step_s: float = 0.02
    embedding_tokens_per_s: float = 50_000.0
    # Seconds since the load fields were measured (0 in simulation).
    age_s: float = 0.0
    # Of `queued_prefill_tokens`, the embedding input tokens outstanding at the instance's embedding
    # engine (all of them on an embedding-only instance; on a mixed GPU the TEI / pooling engine's
    # share, which waits behind embedding work only, never behind the LLM engine's prefill queue).
    queued_embedding_tokens: int = 0
    # Embedding inputs (texts) in flight at the embedding engine, and the most it admits at once
    # (TEI's `max_concurrent_requests`, counted in inputs; beyond it TEI answers 429). 0: no cap.
    embedding_inputs_inflight: int = 0
    max_embedding_inputs: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError(f"instance {self.id}: serves no model")

    # -- compatibility ---------------------------------------------------------------------------
    def can_serve(self, request: Request) -> bool:
        """Kind and model match; says nothing about health or load."""
        return self.kind.serves(request.type) and request.model in self.models

    @property
    def inflight(self) -> int:
        return self.running + self.waiting

    @property
    def llm_inflight(self) -> int:
        return max(0, self.inflight - self.embedding_inflight)

    @property
    def free_slots(self) -> int:
        return max(0, self.max_inflight - self.inflight)

    @property
    def embedding_input_room(self) -> int:
        """Embedding inputs the embedding engine still admits (a large number when uncapped)."""
        if self.max_embedding_inputs <= 0:
            return 1 << 30
        return max(0, self.max_embedding_inputs - self.embedding_inputs_inflight)

    # -- predictions -----------------------------------------------------------------------------
    def predicted_wait_s(self, extra_prefill_tokens: int = 0, extra_decode_tokens: int = 0) -> float:
        """Time until newly arriving LLM work would start, from the outstanding tokens.

        Queued prefill drains at `prefill_tokens_per_s` (chunked prefill shares each step with
        decodes, so this is the rate the estimate carries). When every sequence slot is taken, a new
        request also waits for one to free: the mean outstanding decode per sequence, in steps,
        times `decode_step_s`, once per full round of `max_num_seqs` ahead of it. On a mixed GPU the
        embedding engine's queue (`queued_embedding_tokens`) is not ahead of LLM work. On an
        embedding-only instance this is the embedding wait (`predicted_embedding_wait_s`).
        """
        kind = self.kind
        if kind is _EMBEDDING_KIND:
            return (self.queued_prefill_tokens + extra_prefill_tokens) / self.embedding_tokens_per_s
        prefill = self.queued_prefill_tokens + extra_prefill_tokens
        if kind is _MIXED_KIND:
            prefill -= self.queued_embedding_tokens
        wait = prefill / self.prefill_tokens_per_s
        if self.inflight >= self.max_num_seqs:
            decode = self.queued_decode_tokens + extra_decode_tokens
            rounds = (self.inflight - self.max_num_seqs) // self.max_num_seqs + 1
            wait += (decode / max(1, self.inflight)) * self.decode_step_s * rounds
        return wait

    def predicted_embedding_wait_s(self, extra_tokens: int = 0) -> float:
        """Time until a newly arriving embedding would start: the embedding engine's outstanding
        tokens at its own rate (`embedding_tokens_per_s`, also on a mixed GPU). Infinite on an
        LLM-only instance, which cannot serve it."""
        kind = self.kind
        if kind is _EMBEDDING_KIND:
            return (self.queued_prefill_tokens + extra_tokens) / self.embedding_tokens_per_s
        if kind is _LLM_KIND:
            return float("inf")
        return (self.queued_embedding_tokens + extra_tokens) / self.embedding_tokens_per_s

    def predicted_service_s(self, request: Request) -> float:
        """Time to serve `request` alone once started: prefill plus `max_tokens` decode steps
        (an embedding: its tokens at the embedding engine's rate)."""
        if request.is_embedding:
            return request.work_tokens / self.embedding_tokens_per_s
        return request.prompt_tokens / self.prefill_tokens_per_s + request.max_tokens * self.decode_step_s

    def predicted_ttft_s(self, request: Request) -> float:
        """Predicted wait plus own prefill: when the first token (or the embedding) should appear."""
        if request.is_embedding:
            return self.predicted_embedding_wait_s() + request.work_tokens / self.embedding_tokens_per_s
        return self.predicted_wait_s() + request.prompt_tokens / self.prefill_tokens_per_s
