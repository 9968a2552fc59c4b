"""One record per request, in the same schema for simulated and live runs.

Times are seconds on the driver's clock (simulated seconds, or seconds since the executor started).
Derived latencies are computed in one place (`RequestRecord.ttft_ms` etc.) so that the simulator,
live mode and reports can never disagree on what "TTFT" means.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields

from sagesched.core.request import Request


class Outcome(str, enum.Enum):
    COMPLETED = "completed"
    REJECTED = "rejected"  # refused by the policy or the gateway (reason says which)
    FAILED = "failed"  # accepted, then lost to a backend error or timeout (reason says which)


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    type: str
    model: str
    priority: int
    tenant: str
    arrival_s: float
    prompt_tokens: int = 0
    max_tokens: int = 0
    output_tokens: int = 0
    embedding_inputs: int = 0
    embedding_tokens: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2e_ms: float | None = None
    dispatch_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    instance_id: str | None = None
    batch_size: int = 1
    preemptions: int = 0
    cached_prompt_tokens: int = 0
    outcome: str = Outcome.COMPLETED.value
    reason: str = ""
    rule: str = ""
    workload_class: str = ""

    @classmethod
    def from_request(cls, request: Request) -> RequestRecord:
        return cls(
            request_id=request.id,
            type=request.type.value,
            model=request.model,
            priority=int(request.priority),
            tenant=request.tenant,
            arrival_s=request.arrival_s,
            prompt_tokens=request.prompt_tokens,
            max_tokens=request.max_tokens,
            embedding_inputs=request.embedding_inputs,
            embedding_tokens=request.embedding_tokens,
            slo_ttft_ms=request.slo.ttft_ms,
            slo_tpot_ms=request.slo.tpot_ms,
            slo_e2e_ms=request.slo.e2e_ms,
            workload_class=request.tags.get("class", ""),
        )

    # -- derived latencies (ms) -------------------------------------------------------------------
    @property
    def ttft_ms(self) -> float | None:
        if self.first_token_s is None:
            return None
        return (self.first_token_s - self.arrival_s) * 1000.0

    @property
    def e2e_ms(self) -> float | None:
        if self.finish_s is None:
            return None
        return (self.finish_s - self.arrival_s) * 1000.0

    @property
    def tpot_ms(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two output tokens."""
        if self.finish_s is None or self.first_token_s is None or self.output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) * 1000.0 / (self.output_tokens - 1)

    @property
    def slo_met(self) -> bool:
        """Completed and within every objective it has (a request with no SLO just has to complete)."""
        if self.outcome != Outcome.COMPLETED.value:
            return False
        checks = ((self.slo_ttft_ms, self.ttft_ms), (self.slo_tpot_ms, self.tpot_ms), (self.slo_e2e_ms, self.e2e_ms))
        return all(limit is None or value is None or value <= limit for limit, value in checks)

    def as_row(self) -> dict:
        row = asdict(self)
        row.update(ttft_ms=self.ttft_ms, tpot_ms=self.tpot_ms, e2e_ms=self.e2e_ms, slo_met=self.slo_met)
        return row


RECORD_COLUMNS: tuple[str, ...] = (*(f.name for f in fields(RequestRecord)), "ttft_ms", "tpot_ms", "e2e_ms", "slo_met")
