"""The executor's knobs (`ExecutorConfig`) and what `submit` returns (`LiveResponse`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ExecutorConfig:
    """Executor knobs; every one has a default that suits a small pool on one machine.

    max_queue: requests waiting in the gateway queue; beyond it `submit` raises QueueFull (429).
    request_timeout_s: deadline from arrival to the last byte; past it the caller gets 504.
    connect_timeout_s: TCP connect limit per backend call (a dead backend is noticed this fast).
    health_interval_s: seconds between health probes (and metrics scrapes) of every backend.
    probe_timeout_s: limit for one health probe or metrics scrape.
    probe_failures_to_mark_down: consecutive failed probes before a healthy backend is taken out.
        One slow `/health` answer from a busy backend is not an outage; a refused or dropped
        dispatch still takes a backend out at once.
    scrape_metrics: read backends' ``/metrics`` load gauges into the instance views.
    max_retries: how often a request that failed before any byte was sent is re-queued.
    no_backend_grace_s: how long a request may wait while no healthy backend could serve it
        before it fails with NoBackendAvailable (503); backends often come back within seconds.
    drain_timeout_s: default time `stop()` lets queued and in-flight requests finish.
    retry_after_s: the Retry-After a QueueFull error suggests, and a backend's 503 that outlasted the
        retries when the backend sent none.
    metrics_stale_s: scraped gauges older than this are ignored (in-flight accounting only).
    min_wakeup_s: floor on the delay of a policy wake-up, so a policy asking for "now" again and
        again cannot spin the loop.
    rate_smoothing: weight of a new observation in the moving averages of backend throughput.
    max_records: finished-request records kept in `records` (the newest; ~1.7 KB each). A gateway
        runs for weeks, so the window is bounded and totals live in running counters
        (`records_total`, `outcomes`); None keeps every record (a replay of a finite trace).
    """

    max_queue: int = 1024
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 3.0
    health_interval_s: float = 2.0
    probe_timeout_s: float = 2.0
    probe_failures_to_mark_down: int = 2
    scrape_metrics: bool = True
    max_retries: int = 2
    no_backend_grace_s: float = 10.0
    drain_timeout_s: float = 30.0
    retry_after_s: float = 1.0
    metrics_stale_s: float = 10.0
    min_wakeup_s: float = 0.001
    rate_smoothing: float = 0.2
    max_records: int | None = 10_000

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        for name in ("request_timeout_s", "connect_timeout_s", "health_interval_s", "probe_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.probe_failures_to_mark_down < 1:
            raise ValueError(f"probe_failures_to_mark_down must be >= 1, got {self.probe_failures_to_mark_down}")
        if self.max_retries < 0 or self.no_backend_grace_s < 0 or self.drain_timeout_s < 0:
            raise ValueError("max_retries, no_backend_grace_s and drain_timeout_s must be >= 0")
        if self.max_records is not None and self.max_records < 1:
            raise ValueError(f"max_records must be >= 1 or None (keep all), got {self.max_records}")
        if not 0 < self.rate_smoothing <= 1:
            raise ValueError(f"rate_smoothing must be in (0, 1], got {self.rate_smoothing}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExecutorConfig:
        """Build from a mapping through the typed config layer: unknown keys and wrong types named."""
        from sagesched.typed_config import from_mapping

        return from_mapping(cls, data, "executor")


@dataclass
class LiveResponse:
    """What `submit` returns: a complete JSON body, or a stream of OpenAI chunk dicts.

    Consume `stream` to the end or `aclose()` it; the request's record is finished when it ends.
    `raw`, when set, is the backend's JSON body exactly as received (the same content as `json`),
    so a gateway can relay it without encoding it again.
    """

    request_id: str
    instance_id: str
    json: dict[str, Any] | None = None
    stream: AsyncIterator[dict[str, Any]] | None = None
    raw: bytes | None = None

    @property
    def is_stream(self) -> bool:
        return self.stream is not None


__all__ = ["ExecutorConfig", "LiveResponse"]
