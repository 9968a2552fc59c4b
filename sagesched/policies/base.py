"""The one policy contract both drivers call, and the small shared machinery policies build on.

A policy is deterministic in (now, queue, instances, its own state, its seed). It does no I/O,
reads no wall clock and imports neither simpy nor asyncio; everything it knows about instances
comes through `InstanceView`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from sagesched.core import Assignment, Decision, InstanceView, RejectCode, Rejection, Request


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Base for every policy's config. Subclasses add typed, documented fields with defaults."""


class Policy(ABC):
    """Subclasses set `name` and `Config` and implement `schedule`.

    `schedule` returns a list of `Assignment` and `Rejection`; requests it leaves out stay queued.
    `next_wakeup` returns the absolute time the policy wants to be called again even if nothing
    arrives or completes (an embedding batch window closing), or None.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[PolicyConfig]] = PolicyConfig

    def __init__(self, config: PolicyConfig | None = None, **overrides: Any) -> None:
        base = config if config is not None else self.Config()
        self.config = dataclasses.replace(base, **overrides) if overrides else base

    @abstractmethod
    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        """Decide for some of `queue` (in any order); keyed by request id."""

    def next_wakeup(self, now: float) -> float | None:
        return None

    def describe(self) -> dict[str, Any]:
        """Name and resolved config, for summaries and the admin API."""
        return {"name": self.name, **dataclasses.asdict(self.config)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dataclasses.asdict(self.config)})"


# -- shared helpers ------------------------------------------------------------------------------


def reject_unservable(
    queue: Iterable[Request], instances: Sequence[InstanceView], rule: str
) -> tuple[list[Rejection], list[Request]]:
    """Split off requests no registered instance could ever serve (any health), with the reason.

    Unhealthy-but-compatible instances keep a request queued: they may come back.
    """
    rejected: list[Rejection] = []
    servable: list[Request] = []
    for request in queue:
        if any(view.can_serve(request) for view in instances):
            servable.append(request)
        else:
            kinds = "llm or llm_embedding" if request.type.is_llm else "embedding or llm_embedding"
            rejected.append(
                Rejection(
                    request.id,
                    f"no instance of kind {kinds} serves model {request.model!r}",
                    RejectCode.NO_COMPATIBLE_INSTANCE,
                    rule,
                )
            )
    return rejected, servable


class LoadLedger:
    """The load each instance will carry once this call's assignments land.

    Every policy places through a ledger so that N requests placed in one call spread out
    instead of all landing on the instance that looked emptiest before the call.
    """

    def __init__(self, instances: Sequence[InstanceView]) -> None:
        self.views = {view.id: view for view in instances}
        self.added_requests = dict.fromkeys(self.views, 0)
        self.added_embedding = dict.fromkeys(self.views, 0)
        self.added_prefill = dict.fromkeys(self.views, 0)
        self.added_decode = dict.fromkeys(self.views, 0)

    def candidates(self, request: Request) -> list[InstanceView]:
        """Healthy, compatible instances with a free slot, in the caller's order."""
        return [v for v in self.views.values() if v.healthy and v.can_serve(request) and self.free_slots(v.id) > 0]

    def inflight(self, instance_id: str) -> int:
        return self.views[instance_id].inflight + self.added_requests[instance_id]

    def embedding_inflight(self, instance_id: str) -> int:
        return self.views[instance_id].embedding_inflight + self.added_embedding[instance_id]

    def llm_inflight(self, instance_id: str) -> int:
        return self.inflight(instance_id) - self.embedding_inflight(instance_id)

    def free_slots(self, instance_id: str) -> int:
        return max(0, self.views[instance_id].max_inflight - self.inflight(instance_id))

    def outstanding_tokens(self, instance_id: str) -> int:
        view = self.views[instance_id]
        return (
            view.queued_prefill_tokens
            + view.queued_decode_tokens
            + self.added_prefill[instance_id]
            + self.added_decode[instance_id]
        )

    def predicted_wait_s(self, instance_id: str) -> float:
        return self.views[instance_id].predicted_wait_s(self.added_prefill[instance_id], self.added_decode[instance_id])

    def predicted_ttft_s(self, instance_id: str, request: Request) -> float:
        view = self.views[instance_id]
        return self.predicted_wait_s(instance_id) + view.predicted_ttft_s(request) - view.predicted_wait_s()

    def add(self, instance_id: str, requests: Iterable[Request]) -> None:
        for request in requests:
            self.added_requests[instance_id] += 1
            if request.is_embedding:
                self.added_embedding[instance_id] += 1
                self.added_prefill[instance_id] += request.work_tokens
            else:
                self.added_prefill[instance_id] += request.prompt_tokens
                self.added_decode[instance_id] += request.max_tokens

    def least_outstanding(self, request: Request, candidates: Sequence[InstanceView] | None = None) -> InstanceView | None:
        """The candidate with the least outstanding token work (ties: fewer in flight, then id)."""
        pool = self.candidates(request) if candidates is None else candidates
        if not pool:
            return None
        return min(pool, key=lambda v: (self.outstanding_tokens(v.id), self.inflight(v.id), v.id))

    def assign(self, instance: InstanceView, requests: Sequence[Request], rule: str, reason: str = "", priority_hint: int | None = None) -> Assignment:
        """Record the load and build the Assignment in one step."""
        self.add(instance.id, requests)
        return Assignment(instance.id, tuple(r.id for r in requests), priority_hint, rule, reason)
