"""A minimal Prometheus text-format registry with exact metric names.

The emulators must expose the very names the real servers do, so that the gateway's scraper is
tested against what it will meet. `prometheus_client` appends `_total` to every counter, which
matches vLLM but not TEI (whose Rust exporter writes `te_request_count` as is), so the emulators
render their own exposition text: counters, gauges and cumulative histograms, with labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

LabelKey = tuple[tuple[str, str], ...]


def _labels(labels: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


@dataclass
class Metric:
    """One metric family; `kind` is the exposition type (counter, gauge, histogram)."""

    name: str
    help: str
    kind: str
    samples: dict[LabelKey, float] = field(default_factory=dict)
    # A gauge may be read live at render time instead of being set.
    reader: Callable[[], float] | None = None
    base_labels: LabelKey = ()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self.base_labels + tuple(sorted(labels.items()))
        self.samples[key] = self.samples.get(key, 0.0) + amount

    def set(self, value: float, **labels: str) -> None:
        key = self.base_labels + tuple(sorted(labels.items()))
        self.samples[key] = float(value)

    def value(self, **labels: str) -> float:
        if self.reader is not None:
            return float(self.reader())
        return self.samples.get(self.base_labels + tuple(sorted(labels.items())), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        if self.reader is not None:
            yield f"{self.name}{_labels(self.base_labels)} {_number(self.reader())}"
            return
        samples = self.samples or {self.base_labels: 0.0}
        for key, value in samples.items():
            yield f"{self.name}{_labels(key)} {_number(value)}"


@dataclass
class Histogram:
    """A cumulative histogram with fixed bucket upper bounds (seconds, tokens, ...)."""

    name: str
    help: str
    buckets: Sequence[float]
    base_labels: LabelKey = ()
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.buckets = sorted(self.buckets)
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for bound, count in zip(self.buckets, self.counts, strict=True):
            yield f"{self.name}_bucket{_labels(self.base_labels, (('le', _number(bound)),))} {count}"
        yield f"{self.name}_bucket{_labels(self.base_labels, (('le', '+Inf'),))} {self.count}"
        yield f"{self.name}_sum{_labels(self.base_labels)} {_number(self.total)}"
        yield f"{self.name}_count{_labels(self.base_labels)} {self.count}"


class Registry:
    """Holds metric families in registration order and renders them as Prometheus text (0.0.4)."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, base_labels: dict[str, str] | None = None) -> None:
        self.base_labels: LabelKey = tuple(sorted((base_labels or {}).items()))
        self._families: dict[str, Metric | Histogram] = {}

    def _add(self, family: Metric | Histogram) -> None:
        if family.name in self._families:
            raise ValueError(f"metric {family.name!r} registered twice")
        self._families[family.name] = family

    def counter(self, name: str, help: str, reader: Callable[[], float] | None = None) -> Metric:
        metric = Metric(name, help, "counter", reader=reader, base_labels=self.base_labels)
        self._add(metric)
        return metric

    def gauge(self, name: str, help: str, reader: Callable[[], float] | None = None) -> Metric:
        metric = Metric(name, help, "gauge", reader=reader, base_labels=self.base_labels)
        self._add(metric)
        return metric

    def histogram(self, name: str, help: str, buckets: Sequence[float]) -> Histogram:
        hist = Histogram(name, help, buckets, base_labels=self.base_labels)
        self._add(hist)
        return hist

    def __getitem__(self, name: str) -> Metric | Histogram:
        return self._families[name]

    def render(self) -> str:
        lines: list[str] = []
        for family in self._families.values():
            lines.extend(family.render())
        return "\n".join(lines) + "\n"


def parse_text(text: str) -> dict[str, float]:
    """Parse exposition text into {'name{labels}': value} with prometheus_client's parser.

    Labels are written back in the order the text gives them, so keys match what `Registry.render`
    wrote; used by tests and quick inspection.
    """
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # The parser names a counter's samples `<name>_total`; keep the name the text used.
            name = sample.name if sample.name in text else family.name
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            values[f"{name}{{{labels}}}" if labels else name] = float(sample.value)
    return values
