"""Typed workload configuration: what arrives, when, how long, of which type, class and tenant.

Every field has a default, so `WorkloadConfig()` is a runnable workload (the Azure conv trace
replayed as chat requests). `WorkloadConfig.from_dict` builds one from plain or Hydra/OmegaConf
mappings through the typed config layer (`sagesched.typed_config`): unknown keys are refused by
their path (``workload.arrival.burst_on``) with the valid ones listed, wrong types and bad values
likewise, so a typo in a sweep fails loudly, naming the override to fix, instead of silently running
the default. docs/workloads.md documents every field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sagesched.core.request import Priority, RequestType
from sagesched.sim.workloads.traces import available_traces
from sagesched.typed_config import ConfigFieldError, Path, from_mapping, parse_with, plain

ARRIVAL_PROCESSES = ("trace", "poisson", "gamma", "burst", "diurnal")
LENGTH_SOURCES = ("trace", "fixed")
REQUEST_TYPE_NAMES = {
    "chat": RequestType.LLM_CHAT,
    "llm_chat": RequestType.LLM_CHAT,
    "generate": RequestType.LLM_GENERATE,
    "llm_generate": RequestType.LLM_GENERATE,
    "embedding": RequestType.EMBEDDING,
}


def _positive(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    if isinstance(value, float) and math.isinf(value):
        raise ValueError(f"{name} must be a finite number, got {value}; set workload.{name} to a finite value")


@dataclass(frozen=True)
class ArrivalConfig:
    """When requests arrive.

    process: "trace" replays the trace's own arrivals (for ServeGen: regenerates them from its
        per-window rates and CVs); "poisson", "gamma", "burst" and "diurnal" are synthetic.
    rate_rps: mean arrival rate of the synthetic processes (the off-phase rate for "burst").
    cv: inter-arrival coefficient of variation for "gamma" (1 = Poisson, > 1 bursty).
    burst_rate_rps: the rate during the on phases of "burst".
    burst_on_s, burst_off_s: phase lengths of "burst" (off first, from t=0 of the process clock).
    diurnal_period_s, diurnal_amplitude, diurnal_phase_s: "diurnal" rate is
        rate_rps * (1 + amplitude * sin(2π (t + phase) / period)); amplitude in [0, 1].
    """

    process: str = "trace"
    rate_rps: float = 5.0
    cv: float = 1.0
    burst_rate_rps: float = 20.0
    burst_on_s: float = 10.0
    burst_off_s: float = 50.0
    diurnal_period_s: float = 3600.0
    diurnal_amplitude: float = 0.5
    diurnal_phase_s: float = 0.0

    def __post_init__(self) -> None:
        if self.process not in ARRIVAL_PROCESSES:
            raise ValueError(f"unknown arrival process {self.process!r}; use one of {', '.join(ARRIVAL_PROCESSES)}")
        _positive("arrival.rate_rps", self.rate_rps, allow_zero=self.process == "burst")
        _positive("arrival.cv", self.cv, allow_zero=True)
        _positive("arrival.burst_rate_rps", self.burst_rate_rps, allow_zero=True)
        _positive("arrival.burst_on_s", self.burst_on_s)
        _positive("arrival.burst_off_s", self.burst_off_s, allow_zero=True)
        _positive("arrival.diurnal_period_s", self.diurnal_period_s)
        if not 0.0 <= self.diurnal_amplitude <= 1.0:
            raise ValueError(f"arrival.diurnal_amplitude must be in [0, 1], got {self.diurnal_amplitude}")

    @property
    def synthetic(self) -> bool:
        return self.process != "trace"


@dataclass(frozen=True)
class LengthConfig:
    """How long prompts and outputs are.

    source: "trace" takes (prompt, output) pairs from the trace: each replayed row keeps its own;
        synthetic arrivals draw whole rows (jointly, with replacement; Mooncake rows bring their
        prefix hashes; ServeGen draws from the length distributions of the arrival's window).
        "fixed" uses prompt_tokens and output_tokens for every request.
    prompt_tokens, output_tokens: the fixed lengths.
    max_prompt_tokens: clip prompts to this many tokens (prefix hashes are cut to match); None = no clip.
    max_output_tokens: clip the ground-truth output length; None = no clip.
    max_tokens: the `max_tokens` a client sends; None = the request's true output length (so a
        scheduler planning with max_tokens sees the truth). With a value, output_tokens is
        min(truth, max_tokens): the engine stops there.
    """

    source: str = "trace"
    prompt_tokens: int = 512
    output_tokens: int = 128
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.source not in LENGTH_SOURCES:
            raise ValueError(f"unknown lengths.source {self.source!r}; use one of {', '.join(LENGTH_SOURCES)}")
        for name in ("prompt_tokens", "output_tokens", "max_prompt_tokens", "max_output_tokens", "max_tokens"):
            _positive(f"lengths.{name}", getattr(self, name))


@dataclass(frozen=True)
class MixConfig:
    """Fractions of primary arrivals by request type; must sum to 1."""

    chat: float = 1.0
    generate: float = 0.0
    embedding: float = 0.0

    def __post_init__(self) -> None:
        for name in ("chat", "generate", "embedding"):
            _positive(f"mix.{name}", getattr(self, name), allow_zero=True)
        total = self.chat + self.generate + self.embedding
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"mix fractions chat + generate + embedding must sum to 1, got {total:g}")

    def fractions(self) -> dict[RequestType, float]:
        return {
            RequestType.LLM_CHAT: self.chat,
            RequestType.LLM_GENERATE: self.generate,
            RequestType.EMBEDDING: self.embedding,
        }


@dataclass(frozen=True)
class EmbeddingConfig:
    """Shape of online embedding requests (the mix's embedding share and the extra stream).

    inputs: texts per request; max_inputs: if set, a uniform integer in [inputs, max_inputs].
    tokens_per_input: tokens of each text; None = drawn from the length source's prompt lengths,
        clipped to max_input_tokens (an encoder's context, 512 for BERT-class models).
    stream_rps: an extra Poisson stream of embedding requests on top of the primary arrivals
        (scaled by rate_scale), e.g. a search box beside a chat trace; 0 = none.
    """

    inputs: int = 1
    max_inputs: int | None = None
    tokens_per_input: int | None = None
    max_input_tokens: int = 512
    stream_rps: float = 0.0

    def __post_init__(self) -> None:
        _positive("embedding.inputs", self.inputs)
        _positive("embedding.tokens_per_input", self.tokens_per_input)
        _positive("embedding.max_input_tokens", self.max_input_tokens)
        _positive("embedding.stream_rps", self.stream_rps, allow_zero=True)
        if self.max_inputs is not None and self.max_inputs < self.inputs:
            raise ValueError(f"embedding.max_inputs ({self.max_inputs}) must be >= embedding.inputs ({self.inputs})")


@dataclass(frozen=True)
class RagConfig:
    """Retrieval-augmented generation: query embeddings before chats, and bulk passage ingestion.

    fraction: share of chat requests that are RAG turns. A turn's query embedding (same tenant
        and class) arrives at the turn's arrival time and its chat request `delay_s` later, the
        time retrieval takes. The two are open-loop: the chat does not wait for the embedding.
    query_tokens: tokens of the query embedding (one input).
    delay_s: gap between the query embedding and its chat request.
    context_tokens: retrieved passage tokens added to the chat prompt.
    ingest_rate_rps: bulk ingestion batches per second (Poisson, scaled by rate_scale); 0 = none.
    ingest_inputs, ingest_tokens_per_input: passages per ingest batch and tokens per passage.
    ingest_priority, ingest_tenant, ingest_class: how ingest batches are labelled (no SLO).
    """

    fraction: float = 0.0
    query_tokens: int = 32
    delay_s: float = 0.05
    context_tokens: int = 0
    ingest_rate_rps: float = 0.0
    ingest_inputs: int = 32
    ingest_tokens_per_input: int = 256
    ingest_priority: str = field(default="background", metadata=parse_with(lambda v: _priority_name(v)))
    ingest_tenant: str = "ingest"
    ingest_class: str = "ingest"

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"rag.fraction must be in [0, 1], got {self.fraction}")
        _positive("rag.query_tokens", self.query_tokens)
        _positive("rag.delay_s", self.delay_s, allow_zero=True)
        _positive("rag.context_tokens", self.context_tokens, allow_zero=True)
        _positive("rag.ingest_rate_rps", self.ingest_rate_rps, allow_zero=True)
        _positive("rag.ingest_inputs", self.ingest_inputs)
        _positive("rag.ingest_tokens_per_input", self.ingest_tokens_per_input)
        try:
            Priority.parse(self.ingest_priority)
        except ValueError as exc:
            raise ConfigFieldError(("ingest_priority",), str(exc)) from None


@dataclass(frozen=True)
class ClassConfig:
    """A priority class: its share of requests, its priority and its SLOs (ms; None = no objective).

    types: request types the class applies to ("chat", "generate", "embedding"); empty = all.
        Each request draws its class among those applying to its type, by fraction (renormalised).
    """

    name: str = "standard"
    fraction: float = 1.0
    priority: str = field(default="normal", metadata=parse_with(lambda v: _priority_name(v)))
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a workload class needs a non-empty name")
        _positive(f"classes.{self.name}.fraction", self.fraction, allow_zero=True)
        for slo in ("ttft_ms", "tpot_ms", "e2e_ms"):
            _positive(f"classes.{self.name}.{slo}", getattr(self, slo))
        try:
            Priority.parse(self.priority)
        except ValueError as exc:
            raise ConfigFieldError(("priority",), str(exc)) from None
        for name in self.types:
            if name not in REQUEST_TYPE_NAMES:
                raise ValueError(
                    f"classes.{self.name}.types: unknown request type {name!r}; use {', '.join(REQUEST_TYPE_NAMES)}"
                )

    def applies_to(self, request_type: RequestType) -> bool:
        return not self.types or any(REQUEST_TYPE_NAMES[t] is request_type for t in self.types)


@dataclass(frozen=True)
class WorkloadConfig:
    """A whole workload. See docs/workloads.md for worked examples.

    trace: data source, one of azure_conv, azure_code, mooncake, servegen: the arrivals when
        arrival.process is "trace", and the lengths when lengths.source is "trace".
    trace_path: a file in that trace's format to use instead of the shipped one.
    rate_scale: multiplies the offered load. Traces are replayed on a compressed (> 1) or
        stretched (< 1) clock, inter-arrivals divided by rate_scale; synthetic rates (and the
        extra embedding and ingest streams) are multiplied by it.
    start_s, duration_s: the window. For traces, on the trace's own clock (seconds from its first
        request; ServeGen: from its start): the same slice is replayed at any rate_scale. For
        synthetic arrivals, on the process clock (simulated seconds). Output arrivals start at 0.
        duration_s None = to the end of the trace (synthetic arrivals then need max_requests).
    max_requests: at most this many primary arrivals (a RAG turn counts once; the extra
        embedding stream and ingest batches come on top); None = no limit.
    llm_model, embedding_model: the `model` of LLM and embedding requests.
    classes: priority classes with fractions and SLOs; tenants: tenant name -> weight.
    """

    trace: str = "azure_conv"
    trace_path: str | None = None
    arrival: ArrivalConfig = field(default_factory=ArrivalConfig)
    lengths: LengthConfig = field(default_factory=LengthConfig)
    rate_scale: float = 1.0
    start_s: float = 0.0
    duration_s: float | None = None
    max_requests: int | None = None
    llm_model: str = "llama-2-7b"
    embedding_model: str = "bge-base"
    mix: MixConfig = field(default_factory=MixConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    rag: RagConfig = field(default_factory=RagConfig)
    classes: tuple[ClassConfig, ...] = field(default=(ClassConfig(),), metadata=parse_with(lambda v: _classes(v)))
    tenants: dict[str, float] = field(
        default_factory=lambda: {"default": 1.0}, metadata=parse_with(lambda v: _tenants(v))
    )

    def __post_init__(self) -> None:
        if self.trace not in available_traces():
            raise ValueError(f"unknown trace {self.trace!r}; use one of {', '.join(available_traces())}")
        _positive("rate_scale", self.rate_scale)
        _positive("start_s", self.start_s, allow_zero=True)
        _positive("duration_s", self.duration_s)
        _positive("max_requests", self.max_requests)
        if not self.llm_model or not self.embedding_model:
            raise ValueError("llm_model and embedding_model must be non-empty model names")
        if not self.classes:
            raise ValueError("workload needs at least one class (classes)")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate class names in classes: {names}")
        if not self.tenants or any(w < 0 for w in self.tenants.values()) or sum(self.tenants.values()) <= 0:
            raise ValueError(f"tenants must map names to non-negative weights with a positive sum, got {self.tenants}")
        if self.arrival.synthetic and self.duration_s is None and self.max_requests is None:
            raise ValueError(
                f"synthetic arrivals ({self.arrival.process}) need an end: set duration_s (e.g. duration_s=600) or max_requests"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, root: Path = ("workload",)) -> WorkloadConfig:
        """Build from a (possibly nested, possibly OmegaConf) mapping; errors name the field's path."""
        return from_mapping(cls, data or {}, root=root)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for summaries and Hydra); `from_dict(to_dict())` round-trips."""
        out = dataclasses.asdict(self)
        out["classes"] = [dict(c, types=list(c["types"])) for c in out["classes"]]
        return out


# -- forms the annotations do not spell ------------------------------------------------------------


def _priority_name(value: Any) -> Any:
    """A priority may be written as its number (`priority: 1`); names are checked by `Priority.parse`."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _classes(value: Any) -> tuple[ClassConfig, ...]:
    """Classes as a list of mappings with `name`, or a mapping name -> fields (Hydra-friendly)."""
    value = plain(value)
    if isinstance(value, Mapping):
        items = []
        for name, fields_ in value.items():
            fields_ = dict(plain(fields_) or {})
            if "name" in fields_ and fields_["name"] != name:
                raise ConfigFieldError((str(name), "name"), f"{fields_['name']!r} differs from its key {name!r}")
            fields_["name"] = str(name)
            items.append(from_mapping(ClassConfig, fields_, root=(str(name),)))
        return tuple(items)
    if isinstance(value, list | tuple):
        return tuple(from_mapping(ClassConfig, v, root=(i,)) for i, v in enumerate(value))
    raise ValueError(f"must be a list of classes or a mapping name -> class, got {value!r}")


def _tenants(value: Any) -> dict[str, float]:
    """Tenants as a mapping name -> weight, a list of names (equal weights) or a count n (tenant-0..n-1)."""
    value = plain(value)
    if isinstance(value, bool):
        raise ValueError(f"must be a mapping, a list of names or a count, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"count must be >= 1, got {value}")
        return {f"tenant-{i}": 1.0 for i in range(value)}
    if isinstance(value, list | tuple):
        return {str(name): 1.0 for name in value}
    if isinstance(value, Mapping):
        out = {}
        for name, weight in value.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ConfigFieldError((str(name),), f"must be a number (a weight), got {weight!r}")
            out[str(name)] = float(weight)
        return out
    raise ValueError(f"must be a mapping, a list of names or a count, got {value!r}")
