"""Backend load gauges from a Prometheus ``/metrics`` page, whichever server wrote it.

Policies weigh a backend's own view of its load (requests running and waiting, KV-cache usage)
alongside the executor's in-flight accounting; `BackendClient.scrape` fetches the page and this
module reads it. The servers name the same gauges differently:

==================  ===================================  ===========================  ==========================
gauge               vLLM                                 TEI                          llama-server
==================  ===================================  ===========================  ==========================
running             vllm:num_requests_running            te_batch_current_size        llamacpp:requests_processing
waiting             vllm:num_requests_waiting            te_queue_size                llamacpp:requests_deferred
KV-cache usage      vllm:kv_cache_usage_perc (current),  (none)                       llamacpp:kv_cache_usage_ratio
                    vllm:gpu_cache_usage_perc (older)
==================  ===================================  ===========================  ==========================

Each reading carries the loop time it was taken at, so views can say how old it is (`age_s`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

RUNNING_METRICS = ("vllm:num_requests_running", "llamacpp:requests_processing", "te_batch_current_size")
WAITING_METRICS = ("vllm:num_requests_waiting", "llamacpp:requests_deferred", "te_queue_size")
KV_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio")


@dataclass(frozen=True)
class BackendMetrics:
    """Load gauges from one scrape. None where the server does not export the gauge.

    taken_at: `time.monotonic()` when the scrape completed; `age_s(now)` says how old it is.
    raw: every sample of the scrape, summed over label sets, by metric name.
    """

    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    taken_at: float = 0.0
    raw: dict[str, float] = field(default_factory=dict)

    def age_s(self, now: float | None = None) -> float:
        return max(0.0, (time.monotonic() if now is None else now) - self.taken_at)

    def as_dict(self) -> dict[str, float | None]:
        return {"running": self.running, "waiting": self.waiting, "kv_usage": self.kv_usage}


def parse_prometheus_text(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition, summed over label sets, by sample name.

    Parsed with prometheus_client's parser. Summing is right for the load gauges read here (vLLM
    labels them per model; one engine serves one model). NaN samples are left out. A page the parser
    rejects is parsed again line by line so that one malformed line (some exporters write them)
    costs only that sample, not the whole scrape.
    """
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, float] = {}

    def add(families: Iterable[Any]) -> None:
        for family in families:
            for sample in family.samples:
                if not math.isnan(sample.value):
                    # The parser names a counter's samples `<name>_total`; keep the name the text used.
                    name = sample.name if sample.name in text else family.name
                    samples[name] = samples.get(name, 0.0) + float(sample.value)

    try:
        add(text_string_to_metric_families(text))
        return samples
    except ValueError:
        samples.clear()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        with contextlib.suppress(ValueError):
            add(text_string_to_metric_families(line + "\n"))
    return samples


def metrics_from_text(text: str, taken_at: float | None = None) -> BackendMetrics:
    """The load gauges of a `/metrics` page from vLLM (current or older names), TEI or llama-server."""
    raw = parse_prometheus_text(text)

    def first(names: Sequence[str]) -> float | None:
        for name in names:
            if name in raw:
                return raw[name]
        return None

    kv = first(KV_METRICS)
    if kv is not None and kv > 1.0:  # some exporters report percent
        kv = kv / 100.0
    return BackendMetrics(
        running=first(RUNNING_METRICS),
        waiting=first(WAITING_METRICS),
        kv_usage=kv,
        taken_at=time.monotonic() if taken_at is None else taken_at,
        raw=raw,
    )


__all__ = [
    "KV_METRICS",
    "RUNNING_METRICS",
    "WAITING_METRICS",
    "BackendMetrics",
    "metrics_from_text",
    "parse_prometheus_text",
]
