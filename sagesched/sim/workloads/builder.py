"""Turn a `WorkloadConfig` and a seed into the list of `Request`s a simulation replays.

The build runs in stages, each with its own random stream derived from (seed, stage), so that
changing one knob (say the class fractions) leaves every other draw (arrivals, lengths, types)
unchanged: two runs that differ in one setting differ only where that setting acts.

1. primary arrivals and their (prompt, output) lengths: trace rows, ServeGen windows or a
   synthetic process with lengths from the trace (joint rows) or fixed;
2. a request type per arrival (the mix), then a class (among those applying to the type) and a
   tenant;
3. RAG turns: a share of chats gets a query embedding at the turn's time and the chat later;
4. streams on top: online embeddings and bulk passage-ingest batches;
5. sort by arrival time (ties by generation order) with stable, readable ids:
   `<trace>-<row>` for replayed trace rows, `<process>-<n>`/`servegen-<n>` for generated
   arrivals, `<id>-q` for a RAG query, `embed-<n>` and `ingest-<n>` for the extra streams.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sagesched.core.request import SLO, Priority, Request, RequestType
from sagesched.sim.workloads import arrivals as proc
from sagesched.sim.workloads.config import ClassConfig, WorkloadConfig
from sagesched.sim.workloads.servegen import ServeGenTrace, load_servegen
from sagesched.sim.workloads.traces import MOONCAKE_BLOCK_TOKENS, RequestTrace, load_trace, trace_spec

log = logging.getLogger(__name__)

_STREAMS = {
    "arrivals": 1,
    "lengths": 2,
    "types": 3,
    "classes": 4,
    "tenants": 5,
    "rag": 6,
    "embedding": 7,
    "embedding_stream": 8,
    "ingest": 9,
}
_TYPE_ORDER = (RequestType.LLM_CHAT, RequestType.LLM_GENERATE, RequestType.EMBEDDING)


def _rng(seed: int, stage: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, _STREAMS[stage]])


@dataclass
class _Primary:
    """Primary arrivals before types are drawn: output-clock times, trace-clock times, lengths."""

    ids: list[str]
    times: np.ndarray  # output clock (seconds from the window start, after rate scaling)
    trace_times: np.ndarray  # the source's own clock (for ServeGen length windows)
    prompts: np.ndarray
    outputs: np.ndarray
    hashes: list[tuple[int, ...]] | None
    horizon_s: float  # end of the window on the output clock


class _Source:
    """The configured data source: a per-request trace or a ServeGen client."""

    def __init__(self, config: WorkloadConfig) -> None:
        self.config = config
        self.format = trace_spec(config.trace).format
        self.rows: RequestTrace | None = None
        self.servegen: ServeGenTrace | None = None
        if self.format == "servegen":
            self.servegen = load_servegen(config.trace_path)
        else:
            self.rows = load_trace(config.trace, config.trace_path)

    @property
    def trace(self) -> RequestTrace:
        """The per-request trace (every format but ServeGen's)."""
        if self.rows is None:
            raise TypeError(f"trace {self.config.trace!r} is a ServeGen client, not a per-request trace")
        return self.rows

    @property
    def client(self) -> ServeGenTrace:
        """The ServeGen client (rates, CVs and length distributions per window)."""
        if self.servegen is None:
            raise TypeError(f"trace {self.config.trace!r} is a per-request trace, not a ServeGen client")
        return self.servegen

    @property
    def end_s(self) -> float:
        """End of the source's clock."""
        return self.servegen.duration_s if self.servegen is not None else self.trace.duration_s

    def sample_prompts(self, rng: np.random.Generator, trace_times: np.ndarray) -> np.ndarray:
        """Prompt lengths drawn from the source (used for embedding inputs beyond a row's own)."""
        if self.config.lengths.source == "fixed":
            return np.full(len(trace_times), self.config.lengths.prompt_tokens, dtype=np.int64)
        if self.servegen is not None:
            return self.servegen.sample_lengths(rng, trace_times)[0]
        rows = self.trace
        return rows.prompt_tokens[rng.integers(0, len(rows), len(trace_times))]


def _primary(config: WorkloadConfig, source: _Source, seed: int) -> _Primary:
    arrival, scale = config.arrival, config.rate_scale
    start = config.start_s
    end = start + config.duration_s if config.duration_s is not None else math.inf
    limit = config.max_requests
    rng_len = _rng(seed, "lengths")
    hashes = None

    if arrival.process == "trace" and source.rows is not None:
        trace = source.rows
        lo, hi = np.searchsorted(trace.arrival_s, [start, end], side="left")
        rows = np.arange(lo, hi if limit is None else min(hi, lo + limit))
        trace_times = trace.arrival_s[rows]
        times = (trace_times - start) / scale
        ids = [f"{config.trace}-{r:06d}" for r in rows.tolist()]
        prompts, outputs = trace.prompt_tokens[rows], trace.output_tokens[rows]
        if trace.prefix_hashes is not None:
            hashes = [trace.prefix_hashes[r] for r in rows.tolist()]
        horizon = (
            (min(end, trace.duration_s) - start) / scale if math.isfinite(end) else (times[-1] if len(times) else 0.0)
        )
    else:
        rng = _rng(seed, "arrivals")
        if arrival.process == "trace":  # ServeGen: regenerate arrivals from its windows
            sg = source.client
            stop = min(end, sg.duration_s)
            trace_times = sg.arrivals(rng, start, stop, limit)
            times = (trace_times - start) / scale
            name = "servegen"
            horizon = (stop - start) / scale
        else:
            trace_times = _synthetic(rng, config, start, end, limit)
            times = trace_times - start
            name = arrival.process
            horizon = (end - start) if math.isfinite(end) else (float(times[-1]) if len(times) else 0.0)
        ids = [f"{name}-{i:06d}" for i in range(len(times))]
        n = len(times)
        if config.lengths.source == "fixed":
            prompts = np.full(n, config.lengths.prompt_tokens, dtype=np.int64)
            outputs = np.full(n, config.lengths.output_tokens, dtype=np.int64)
        elif source.servegen is not None:
            prompts, outputs = source.servegen.sample_lengths(rng_len, trace_times)
        else:
            table = source.trace
            rows = rng_len.integers(0, len(table), n)
            prompts, outputs = table.prompt_tokens[rows], table.output_tokens[rows]
            if table.prefix_hashes is not None:
                hashes = [table.prefix_hashes[r] for r in rows.tolist()]

    if config.lengths.source == "fixed" and arrival.process == "trace":
        prompts = np.full(len(times), config.lengths.prompt_tokens, dtype=np.int64)
        outputs = np.full(len(times), config.lengths.output_tokens, dtype=np.int64)
        hashes = None
    return _Primary(
        ids,
        np.asarray(times, dtype=np.float64),
        np.asarray(trace_times, dtype=np.float64),
        np.asarray(prompts, dtype=np.int64),
        np.asarray(outputs, dtype=np.int64),
        hashes,
        float(horizon),
    )


def _synthetic(rng: np.random.Generator, config: WorkloadConfig, start: float, end: float, limit: int | None):
    a, scale = config.arrival, config.rate_scale
    if a.process == "poisson":
        return proc.poisson_arrivals(rng, a.rate_rps * scale, start, end, limit)
    if a.process == "gamma":
        return proc.gamma_arrivals(rng, a.rate_rps * scale, a.cv, start, end, limit)
    if a.process == "burst":
        return proc.burst_arrivals(
            rng, a.rate_rps * scale, a.burst_rate_rps * scale, a.burst_on_s, a.burst_off_s, start, end, limit
        )
    return proc.diurnal_arrivals(
        rng, a.rate_rps * scale, a.diurnal_amplitude, a.diurnal_period_s, a.diurnal_phase_s, start, end, limit
    )


def _draw_classes(
    rng: np.random.Generator, classes: tuple[ClassConfig, ...], types: list[RequestType]
) -> list[ClassConfig]:
    """A class per request, among the classes applying to its type, by (renormalised) fraction."""
    out: list[ClassConfig | None] = [None] * len(types)
    type_array = np.array([_TYPE_ORDER.index(t) for t in types], dtype=np.int64)
    for code, request_type in enumerate(_TYPE_ORDER):
        where = np.flatnonzero(type_array == code)
        if where.size == 0:
            continue
        candidates = [c for c in classes if c.applies_to(request_type)]
        weights = np.array([c.fraction for c in candidates], dtype=np.float64)
        if not candidates or weights.sum() <= 0:
            raise ValueError(
                f"no class with a positive fraction applies to {request_type.value} requests; "
                f"add {request_type.value.removeprefix('llm_')!r} to a class's types (or leave types empty)"
            )
        picks = rng.choice(len(candidates), size=where.size, p=weights / weights.sum())
        for i, pick in zip(where.tolist(), picks.tolist(), strict=True):
            out[i] = candidates[pick]
    return out  # type: ignore[return-value]


class _Factory:
    """Builds Request objects with the shared per-workload settings."""

    def __init__(self, config: WorkloadConfig, source: _Source, seed: int) -> None:
        self.config = config
        self.source = source
        self.rng_embedding = _rng(seed, "embedding")
        self.slos = {c.name: SLO(c.ttft_ms, c.tpot_ms, c.e2e_ms) for c in config.classes}
        self.priorities = {c.name: Priority.parse(c.priority) for c in config.classes}

    def llm(self, rid, rtype, time, prompt, output, cls, tenant, hashes, tags) -> Request:
        lengths = self.config.lengths
        prompt = max(1, int(prompt))
        if lengths.max_prompt_tokens is not None and prompt > lengths.max_prompt_tokens:
            prompt = lengths.max_prompt_tokens
            if hashes:
                hashes = hashes[: math.ceil(prompt / MOONCAKE_BLOCK_TOKENS)]
        output = max(1, int(output))
        if lengths.max_output_tokens is not None:
            output = min(output, lengths.max_output_tokens)
        max_tokens = output if lengths.max_tokens is None else lengths.max_tokens
        output = min(output, max_tokens)
        return Request(
            id=rid,
            type=rtype,
            model=self.config.llm_model,
            arrival_s=float(time),
            prompt_tokens=prompt,
            max_tokens=max_tokens,
            priority=self.priorities[cls.name],
            tenant=tenant,
            slo=self.slos[cls.name],
            output_tokens=output,
            prefix_hashes=tuple(hashes) if hashes else (),
            tags={"class": cls.name, **tags},
        )

    def embedding_tokens(self, first_prompt: int | None, trace_time: float) -> tuple[int, int]:
        """(inputs, total tokens) for an online embedding request."""
        emb = self.config.embedding
        rng = self.rng_embedding
        inputs = emb.inputs if emb.max_inputs is None else int(rng.integers(emb.inputs, emb.max_inputs + 1))
        if emb.tokens_per_input is not None:
            per_input = np.full(inputs, emb.tokens_per_input, dtype=np.int64)
        else:
            drawn = inputs - (1 if first_prompt is not None else 0)
            per_input = self.source.sample_prompts(rng, np.full(drawn, trace_time))
            if first_prompt is not None:
                per_input = np.concatenate([[first_prompt], per_input])
        per_input = np.clip(per_input, 1, emb.max_input_tokens)
        return inputs, int(per_input.sum())

    def embedding(self, rid, time, inputs, tokens, priority, tenant, slo, tags) -> Request:
        return Request(
            id=rid,
            type=RequestType.EMBEDDING,
            model=self.config.embedding_model,
            arrival_s=float(time),
            prompt_tokens=tokens,
            max_tokens=0,
            embedding_inputs=inputs,
            embedding_tokens=tokens,
            priority=priority,
            tenant=tenant,
            slo=slo,
            output_tokens=0,
            tags=tags,
        )


def build_workload(config: WorkloadConfig | Mapping[str, Any] | None, seed: int) -> list[Request]:
    """The requests of `config` for `seed`, sorted by arrival_s; the same inputs give the same list."""
    config = config if isinstance(config, WorkloadConfig) else WorkloadConfig.from_dict(config)
    source = _Source(config)
    primary = _primary(config, source, seed)
    n = len(primary.times)
    if n == 0:
        hint = ""
        if source.servegen is not None:
            busy = source.servegen.window_start_s[source.servegen.rate_rps > 0]
            hint = f"; ServeGen's first busy window starts at start_s={busy[0]:g}" if len(busy) else ""
        log.warning("workload window [%g s, +%s) has no primary arrivals%s", config.start_s, config.duration_s, hint)
    factory = _Factory(config, source, seed)

    fractions = config.mix.fractions()
    codes = _rng(seed, "types").choice(3, size=n, p=[fractions[t] for t in _TYPE_ORDER])
    types = [_TYPE_ORDER[c] for c in codes.tolist()]
    classes = _draw_classes(_rng(seed, "classes"), config.classes, types)
    tenant_names = list(config.tenants)
    weights = np.array([config.tenants[t] for t in tenant_names], dtype=np.float64)
    rng_tenants = _rng(seed, "tenants")
    tenants = [tenant_names[i] for i in rng_tenants.choice(len(tenant_names), size=n, p=weights / weights.sum())]
    rag = config.rag
    rag_turn = _rng(seed, "rag").random(n) < rag.fraction

    items: list[Request] = []
    times = primary.times.tolist()
    prompts, outputs = primary.prompts.tolist(), primary.outputs.tolist()
    for i in range(n):
        rid, rtype, cls, tenant, t = primary.ids[i], types[i], classes[i], tenants[i], times[i]
        if rtype is RequestType.EMBEDDING:
            inputs, tokens = factory.embedding_tokens(prompts[i], float(primary.trace_times[i]))
            items.append(
                factory.embedding(
                    rid,
                    t,
                    inputs,
                    tokens,
                    factory.priorities[cls.name],
                    tenant,
                    factory.slos[cls.name],
                    {"class": cls.name},
                )
            )
            continue
        hashes = primary.hashes[i] if primary.hashes is not None else None
        if rtype is RequestType.LLM_CHAT and rag_turn[i]:
            items.append(
                factory.embedding(
                    f"{rid}-q",
                    t,
                    1,
                    rag.query_tokens,
                    factory.priorities[cls.name],
                    tenant,
                    factory.slos[cls.name],
                    {"class": cls.name, "rag": "query", "rag_pair": rid},
                )
            )
            items.append(
                factory.llm(
                    rid,
                    rtype,
                    t + rag.delay_s,
                    prompts[i] + rag.context_tokens,
                    outputs[i],
                    cls,
                    tenant,
                    hashes,
                    {"rag": "answer", "rag_pair": rid},
                )
            )
            continue
        items.append(factory.llm(rid, rtype, t, prompts[i], outputs[i], cls, tenant, hashes, {}))

    horizon = primary.horizon_s
    emb = config.embedding
    if emb.stream_rps > 0 and horizon > 0:
        rng = _rng(seed, "embedding_stream")
        stream = proc.poisson_arrivals(rng, emb.stream_rps * config.rate_scale, 0.0, horizon)
        stream_classes = _draw_classes(rng, config.classes, [RequestType.EMBEDDING] * len(stream))
        stream_tenants = rng.choice(len(tenant_names), size=len(stream), p=weights / weights.sum()).tolist()
        for j, t in enumerate(stream.tolist()):
            cls = stream_classes[j]
            trace_time = config.start_s + t * (config.rate_scale if config.arrival.process == "trace" else 1.0)
            inputs, tokens = factory.embedding_tokens(None, trace_time)
            items.append(
                factory.embedding(
                    f"embed-{j:06d}",
                    t,
                    inputs,
                    tokens,
                    factory.priorities[cls.name],
                    tenant_names[stream_tenants[j]],
                    factory.slos[cls.name],
                    {"class": cls.name},
                )
            )
    if rag.ingest_rate_rps > 0 and horizon > 0:
        rng = _rng(seed, "ingest")
        ingest = proc.poisson_arrivals(rng, rag.ingest_rate_rps * config.rate_scale, 0.0, horizon)
        priority = Priority.parse(rag.ingest_priority)
        tokens = rag.ingest_inputs * rag.ingest_tokens_per_input
        for j, t in enumerate(ingest.tolist()):
            items.append(
                factory.embedding(
                    f"ingest-{j:06d}",
                    t,
                    rag.ingest_inputs,
                    tokens,
                    priority,
                    rag.ingest_tenant,
                    SLO(),
                    {"class": rag.ingest_class, "rag": "ingest"},
                )
            )

    order = sorted(range(len(items)), key=lambda k: items[k].arrival_s)  # stable: ties keep generation order
    requests = [items[k] for k in order]
    log.info(
        "workload %s/%s seed %d: %d requests (%d primary) over %.1f s",
        config.trace,
        config.arrival.process,
        seed,
        len(requests),
        n,
        requests[-1].arrival_s if requests else 0.0,
    )
    return requests
