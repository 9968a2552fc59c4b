"""Requests as the scheduler sees them.

A `Request` is driver-neutral: the simulator builds it from a trace row, live mode from an HTTP
body. Policies read only these fields; the one exception is `output_tokens`, the ground truth a
trace knows and a real server does not, which only offline bounds may use.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestType(str, enum.Enum):
    """What kind of work a request is; decides which instances and endpoints can serve it."""

    LLM_CHAT = "llm_chat"
    LLM_GENERATE = "llm_generate"
    EMBEDDING = "embedding"

    @property
    def is_llm(self) -> bool:
        return self is not _EMBEDDING


# A module-level alias: enum attribute lookups are slow on the simulator's hot path.
_EMBEDDING = RequestType.EMBEDDING


class Priority(enum.IntEnum):
    """Smaller is more urgent. Values are stable: they appear in configs, headers and results."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3
    BACKGROUND = 4

    @classmethod
    def parse(cls, value: int | str | Priority) -> Priority:
        """Accept 0-4, a name in any case ("high"), or a Priority; raise ValueError naming the options."""
        if isinstance(value, Priority):
            return value
        if isinstance(value, str):
            text = value.strip()
            if text.lstrip("-").isdigit():
                value = int(text)
            else:
                try:
                    return cls[text.upper()]
                except KeyError:
                    raise ValueError(
                        f"unknown priority {value!r}; use one of {', '.join(p.name.lower() for p in cls)} or 0-4"
                    ) from None
        try:
            return cls(int(value))
        except ValueError:
            raise ValueError(f"priority {value!r} out of range; use 0 (critical) to 4 (background)") from None


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency objectives in milliseconds; None means no objective on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None


NO_SLO = SLO()


@dataclass(frozen=True, slots=True)
class Request:
    """One unit of work entering the gateway queue.

    Token counts are what the scheduler plans with. For embedding requests `prompt_tokens` equals
    `embedding_tokens` (the sum over all inputs) and `max_tokens` is 0.
    """

    id: str
    type: RequestType
    model: str
    arrival_s: float
    prompt_tokens: int = 0
    max_tokens: int = 0
    embedding_inputs: int = 0
    embedding_tokens: int = 0
    priority: Priority = Priority.NORMAL
    tenant: str = "default"
    slo: SLO = NO_SLO
    # Ground truth output length from a trace. Online policies must not read it; offline bounds may.
    output_tokens: int | None = None
    # Hashes of the prompt's fixed-size prefix blocks (Mooncake `hash_ids`) for prefix caching.
    prefix_hashes: tuple[int, ...] = ()
    # Free-form labels (workload class, RAG step, ...) carried into the result records.
    tags: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("request id must be a non-empty string")
        if self.prompt_tokens < 0 or self.max_tokens < 0:
            raise ValueError(f"request {self.id}: token counts must be >= 0")
        if self.type is _EMBEDDING and self.embedding_inputs < 1:
            raise ValueError(f"request {self.id}: an embedding request needs embedding_inputs >= 1")

    @property
    def is_embedding(self) -> bool:
        return self.type is _EMBEDDING

    @property
    def work_tokens(self) -> int:
        """Tokens of work a scheduler should expect: prompt plus the output cap (or the input tokens)."""
        if self.is_embedding:
            return self.embedding_tokens or self.prompt_tokens
        return self.prompt_tokens + self.max_tokens

    @property
    def deadline_s(self) -> float | None:
        """Absolute end-to-end deadline, if the SLO has one."""
        return None if self.slo.e2e_ms is None else self.arrival_s + self.slo.e2e_ms / 1000.0

    @property
    def ttft_deadline_s(self) -> float | None:
        """Absolute first-token (or, for embeddings, result) deadline, if the SLO has one."""
        if self.slo.ttft_ms is not None:
            return self.arrival_s + self.slo.ttft_ms / 1000.0
        return self.deadline_s
