"""What a policy returns: assignments (request ids -> one instance) and rejections (with a reason).

Decisions are keyed by request id, never by position in the queue. A request a policy neither
assigns nor rejects stays queued; holding is a decision too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Assignment:
    """Send `request_ids` to `instance_id`.

    Several ids form ONE merged backend call (an embedding batch); drivers must honour that.
    `rule` names the policy rule that acted (e.g. ``"hybrid/embedding-batch-full"``) and `reason`
    says why in words, so a result record can explain every placement.
    """

    instance_id: str
    request_ids: tuple[str, ...]
    priority_hint: int | None = None
    rule: str = ""
    reason: str = ""

    def __post_init__(self) -> None:
        ids = self.request_ids
        if not ids:
            raise ValueError("an Assignment needs at least one request id")
        if len(ids) > 1 and len(set(ids)) != len(ids):  # one id (most assignments): nothing to check
            raise ValueError(f"duplicate request ids in one Assignment: {self.request_ids}")

    @property
    def is_batch(self) -> bool:
        return len(self.request_ids) > 1


class RejectCode:
    """Stable machine-readable rejection codes (they reach callers and result files)."""

    NO_COMPATIBLE_INSTANCE = "no_compatible_instance"
    SLO_UNATTAINABLE = "slo_unattainable"
    QUEUE_FULL = "queue_full"
    TOO_LARGE = "too_large"
    BACKEND_REJECTED = "backend_rejected"


@dataclass(frozen=True, slots=True)
class Rejection:
    """Refuse `request_id` now; `reason` reaches the caller (HTTP error body, result record)."""

    request_id: str
    reason: str
    code: str = RejectCode.NO_COMPATIBLE_INSTANCE
    rule: str = ""


Decision = Assignment | Rejection
