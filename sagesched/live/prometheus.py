"""Prometheus metrics for the gateway, under the `sagesched_` prefix, in a registry per app.

Why per app: tests and multi-app processes build several gateways in one interpreter, and the
global default registry would refuse the second set of metric names.

Why mostly at scrape time: latency histograms, policy decisions and rejections are folded in from
the executor's per-request records when `/metrics` is read, and the gauges are read from the
executor's snapshot then. The request hot path pays for one counter increment, nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Latency buckets (seconds) spanning embedding calls (ms) to long generations (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

__all__ = ["CONTENT_TYPE_LATEST", "GatewayMetrics"]


class GatewayMetrics:
    """The gateway's metric families; `render()` produces the text exposition format."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sagesched_requests", "HTTP requests answered by the gateway", ["endpoint", "status"], registry=r
        )
        # Decisions and rejections are counted by the executor (every decision, not only finished
        # requests); the collector exposes its counters plus the gateway's own refusals at scrape time.
        self.gateway_rejections: dict[str, int] = {}
        self.executor_decisions: Mapping[str, int] = {}
        self.executor_rejections: Mapping[str, int] = {}
        self.registry.register(_DecisionCollector(self))
        self.outcomes = Counter(
            "sagesched_request_outcomes", "Finished requests by model and outcome", ["model", "outcome"], registry=r
        )
        self.ttft = Histogram(
            "sagesched_ttft_seconds", "Time to first content token", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "sagesched_tpot_seconds",
            "Mean time per output token after the first",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "sagesched_e2e_seconds",
            "Arrival to last byte, LLM requests",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.embedding = Histogram(
            "sagesched_embedding_seconds",
            "Arrival to result, embedding requests",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.embedding_batch = Histogram(
            "sagesched_embedding_batch_size",
            "Requests merged into one embedding call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "sagesched_queue_wait_seconds",
            "Arrival to dispatch: time spent in the gateway queue",
            ["model", "type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "sagesched_prompt_tokens",
            "Prompt (or embedding input) tokens of finished requests (estimated where the backend does not say)",
            ["model", "type"],
            registry=r,
        )
        self.output_tokens = Counter(
            "sagesched_output_tokens", "Output tokens generated for finished requests", ["model"], registry=r
        )
        self.records_missed = Counter(
            "sagesched_records_missed",
            "Finished requests not folded into the histograms (more finished between two scrapes than the "
            "executor's record window holds; raise executor.max_records or scrape more often)",
            registry=r,
        )
        self.queue_length = Gauge("sagesched_queue_length", "Requests waiting in the gateway queue", registry=r)
        self.inflight = Gauge("sagesched_inflight_requests", "Requests dispatched and not yet finished", registry=r)
        self.http_inflight = Gauge("sagesched_http_inflight_requests", "HTTP requests being handled", registry=r)
        self.backend_healthy = Gauge(
            "sagesched_backend_healthy", "1 when the backend passes health checks", ["backend", "kind"], registry=r
        )
        self.backend_inflight = Gauge(
            "sagesched_backend_inflight_requests", "Requests outstanding at a backend", ["backend"], registry=r
        )
        self.policy_info = Gauge(
            "sagesched_policy_info", "The active scheduling policy (value 1)", ["policy"], registry=r
        )
        self._policy_name: str | None = None

    # -- feeding ---------------------------------------------------------------------------------
    def set_policy(self, name: str) -> None:
        if self._policy_name is not None:
            self.policy_info.remove(self._policy_name)
        self.policy_info.labels(name).set(1)
        self._policy_name = name

    def observe_records(self, records: Iterable[Any]) -> int:
        """Fold finished `RequestRecord`s into the histograms and counters; returns how many."""
        count = 0
        for record in records:
            count += 1
            model = record.model or "unknown"
            self.outcomes.labels(model, record.outcome).inc()
            if record.dispatch_s is not None:
                self.queue_wait.labels(model, record.type).observe(max(0.0, record.dispatch_s - record.arrival_s))
            if record.outcome != "completed":
                continue
            tokens = record.embedding_tokens if record.type == "embedding" else record.prompt_tokens
            if tokens:
                self.prompt_tokens.labels(model, record.type).inc(tokens)
            if record.output_tokens:
                self.output_tokens.labels(model).inc(record.output_tokens)
            e2e_ms = record.e2e_ms
            if record.type == "embedding":
                if e2e_ms is not None:
                    self.embedding.labels(model).observe(e2e_ms / 1000.0)
                self.embedding_batch.labels(model).observe(record.batch_size)
                continue
            if e2e_ms is not None:
                self.e2e.labels(model).observe(e2e_ms / 1000.0)
            if record.ttft_ms is not None:
                self.ttft.labels(model).observe(record.ttft_ms / 1000.0)
            if record.tpot_ms is not None:
                self.tpot.labels(model).observe(record.tpot_ms / 1000.0)
        return count

    def reject(self, code: str) -> None:
        """A request refused by the gateway itself before it reached the executor (auth, body, limits)."""
        self.gateway_rejections[code] = self.gateway_rejections.get(code, 0) + 1

    def update_gauges(self, snapshot: Mapping[str, Any]) -> None:
        """Set queue / in-flight / backend gauges from `LiveExecutor.snapshot()`."""
        decisions = snapshot.get("decisions")
        if isinstance(decisions, Mapping):
            self.executor_decisions = dict(decisions)
        rejections = snapshot.get("rejections")
        if isinstance(rejections, Mapping):
            self.executor_rejections = dict(rejections)
        queue = snapshot.get("queue_length", snapshot.get("queued"))
        if isinstance(queue, int | float):
            self.queue_length.set(queue)
        inflight = snapshot.get("inflight", snapshot.get("in_flight"))
        if isinstance(inflight, int | float):
            self.inflight.set(inflight)
        for backend in _backends(snapshot):
            backend_id = str(backend.get("id", backend.get("url", "?")))
            self.backend_healthy.labels(backend_id, str(backend.get("kind", ""))).set(
                1 if backend.get("healthy") else 0
            )
            value = backend.get("inflight", backend.get("in_flight"))
            if isinstance(value, int | float):
                self.backend_inflight.labels(backend_id).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _backends(snapshot: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    backends = snapshot.get("backends") or snapshot.get("instances") or []
    if isinstance(backends, Mapping):
        return [{"id": key, **value} for key, value in backends.items() if isinstance(value, Mapping)]
    return [b for b in backends if isinstance(b, Mapping)]


class _DecisionCollector(Collector):
    """Exposes the executor's decision/rejection counters (already cumulative) as Prometheus counters."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return [
            CounterMetricFamily(
                "sagesched_policy_decisions", "Requests decided by the policy, by rule", labels=["rule"]
            ),
            CounterMetricFamily("sagesched_rejections", "Requests refused, by code", labels=["code", "source"]),
        ]

    def collect(self) -> Iterable[Any]:
        decisions = CounterMetricFamily(
            "sagesched_policy_decisions", "Requests decided by the policy, by rule", labels=["rule"]
        )
        for rule, value in sorted(self.metrics.executor_decisions.items()):
            decisions.add_metric([str(rule)], float(value))
        rejections = CounterMetricFamily("sagesched_rejections", "Requests refused, by code", labels=["code", "source"])
        for code, value in sorted(self.metrics.executor_rejections.items()):
            rejections.add_metric([str(code), "executor"], float(value))
        for code, value in sorted(self.metrics.gateway_rejections.items()):
            rejections.add_metric([str(code), "gateway"], float(value))
        yield decisions
        yield rejections
