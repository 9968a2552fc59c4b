"""The working state of one `HybridPolicy.schedule` call (shared by its LLM and embedding halves).

Split from `hybrid.py` so that both halves of the policy (`hybrid_embeddings.EmbeddingBatching`:
embedding batches; `hybrid.HybridPolicy`: claim order and LLM placement) read one definition of
what a call knows: the load placed so far (a `LoadLedger`), the decisions made, and what is still
queued per type and model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sagesched.core import Decision, GatewayQueue, InstanceView, Request
from sagesched.core.queue import ClassKey
from sagesched.policies.base import LoadLedger
from sagesched.policies.hybrid_config import EMBEDDING, LLM


@dataclass(slots=True)
class _Call:
    """The working state of one `schedule` call: load so far and what is still queued.

    Built positionally by `HybridPolicy._run` (once per call): keep the field order.
    """

    now: float
    views: Sequence[InstanceView]
    ledger: LoadLedger
    decisions: list[Decision]
    # Embedding requests still queued, per model, in ranking order.
    groups: dict[str, list[Request]]
    # The ranking key (`EmbeddingBatching._ranker`) that ordered them: read for each model's head.
    rank: Callable[[Request], tuple[int, float, str]]
    # Arrival of the oldest queued embedding request per model at the start of the call: once it has
    # waited the window, the model's queue is flushed in batches for the whole call.
    oldest: dict[str, float]
    llm: list[Request]
    # How many LLM requests are still queued; `llm` is built only when a fallback call needs it
    # (`llm_list`): past saturation most calls find no LLM room and never read it.
    llm_n: int
    # Indexed calls: the queue and its servable LLM classes (`llm` not built yet: `llm_built`), and
    # the LLM requests this call placed or rejected (no longer offered to the fallback).
    llm_queue: GatewayQueue | None
    llm_classes: list[ClassKey]
    llm_built: bool
    llm_done: set[str]
    # Queued requests per type, per model (LLM / EMBEDDING -> model -> count).
    waiting: dict[str, dict[str, int]]
    embedding_hint: int | None
    order_reason: str

    def llm_list(self) -> list[Request]:
        """The queued LLM requests in arrival order (built from the queue's index on first use)."""
        if not self.llm_built:
            assert self.llm_queue is not None
            done = self.llm_done
            self.llm = [r for r in self.llm_queue.in_arrival_order(self.llm_classes) if r.id not in done]
            self.llm_built = True
        return self.llm

    def unqueue(self, kind: str, requests: Iterable[Request]) -> None:
        for request in requests:
            self.waiting[kind][request.model] -= 1

    def other_waits(self, kind: str, view: InstanceView) -> bool:
        """Whether the other type has queued work `view` could serve (it then caps `kind`)."""
        other = self.waiting[LLM if kind == EMBEDDING else EMBEDDING]
        if not other:
            return False
        return any(other.get(model, 0) > 0 for model in view.models)


def _count_by_model(requests: Iterable[Request]) -> dict[str, int]:
    """How many of `requests` ask for each model (a plain dict: cheaper than a Counter per call)."""
    counts: dict[str, int] = {}
    for request in requests:
        counts[request.model] = counts.get(request.model, 0) + 1
    return counts


__all__ = ["_Call", "_count_by_model"]
