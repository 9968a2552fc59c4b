"""An offline bound no online policy can beat: each request served alone on its fastest instance.

Why it is a bound: in the engine model a request's step or batch only ever gets slower when other
work shares it (step time grows with batch tokens and context; a shared GPU only stretches work),
queueing only adds delay, and the best a scheduler can do for a request is to start it at its
arrival on the compatible instance where it runs fastest. So its isolated latency, computed here
from the same performance model the simulator uses, is a lower bound on its TTFT and end-to-end
latency under any policy; and the share of requests whose isolated latencies meet their SLOs is an
upper bound on SLO attainment (and, over the run's duration, on goodput).

One approximation of the performance model weakens this: a step holding several prefill chunks is
priced as if its chunks had equal size (`LLMPerfModel.step_time_s` sees only sums), so a chunk deep
in a long prompt that shares a step with a fresh prompt is priced below its cost alone. On long
prompts (Mooncake, 20-40k tokens) a request's simulated TTFT can then fall a few percent under this
bound (tests/test_bounds.py measures 1.6%); on the Azure traces no request does.

Prefix caching is the one effect that can make a request faster than alone; the bound credits
every prompt block whose prefix hash appeared in any earlier request as already cached.

Decode cost is summed in closed form: the step time of a one-sequence decode is affine in its KV
length in the performance model, so the sum over n steps is n times the step time at the mean
length (tests check this against the explicit sum).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from sagesched.core import Request
from sagesched.sim.config import ClusterConfig, InstanceConfig
from sagesched.sim.engines.llamacpp_instance import isolated_llamacpp_s, llamacpp_admits, prefix_block_tokens
from sagesched.sim.engines.tei import embedding_engine_config
from sagesched.sim.perf_model import BatchShape, EmbeddingPerfModel, LLMPerfModel


@lru_cache(maxsize=64)
def _llm(model: str, hardware: str, tp: int, calibration: str | None) -> LLMPerfModel:
    return LLMPerfModel.load(model, hardware, tp, calibration)


@lru_cache(maxsize=64)
def _emb(model: str, hardware: str, calibration: str | None) -> EmbeddingPerfModel:
    return EmbeddingPerfModel.load(model, hardware, calibration)


def _prefill_s(perf: LLMPerfModel, prompt: int, cached: int, chunk: int) -> float:
    done, total = cached, 0.0
    while done < prompt:
        step = min(chunk, prompt - done)
        total += perf.step_time_s(BatchShape(prefill_tokens=step, prefill_context_tokens=done + step, num_prefills=1))
        done += step
    return total


def _decode_s(perf: LLMPerfModel, prompt: int, steps: int) -> float:
    if steps <= 0:
        return 0.0
    mean_context = prompt + (steps + 1) / 2.0
    lo = perf.step_time_s(BatchShape(decode_tokens=1, decode_context_tokens=math.floor(mean_context)))
    hi = perf.step_time_s(BatchShape(decode_tokens=1, decode_context_tokens=math.ceil(mean_context)))
    frac = mean_context - math.floor(mean_context)
    return steps * (lo + (hi - lo) * frac)


def admits(request: Request, instance: InstanceConfig) -> bool:
    """Whether `instance`'s engine would accept `request` at all (the simulator answers 400 to a
    request whose KV cache need exceeds the whole cache, or, with `vllm.max_model_len` set, whose
    prompt plus output exceeds it). A bound for a request no engine admits is NaN: it is rejected,
    and pricing its prefill would walk a 10**12-token prompt chunk by chunk."""
    if instance.engine == "llamacpp":
        return llamacpp_admits(request, instance)
    if request.is_embedding:
        return True  # an encoder engine (TEI or vLLM's pooling engine) keeps no KV cache to run out of
    outputs = request.output_tokens if request.output_tokens is not None else request.max_tokens
    total = request.prompt_tokens + max(1, outputs)
    limit = getattr(instance.vllm, "max_model_len", None)
    if limit is not None and request.prompt_tokens + max(1, request.max_tokens or outputs) > limit:
        return False
    block = instance.vllm.block_size
    blocks = instance.vllm.num_gpu_blocks
    if blocks is None:  # as `VllmEngineCore` sizes its cache
        perf = _llm(instance.model, instance.hardware, instance.tensor_parallel, instance.calibration)
        blocks = int(perf.kv_capacity_tokens(instance.vllm.gpu_memory_utilization)) // block
    return -(-total // block) <= blocks


def isolated_latency_s(request: Request, instance: InstanceConfig, cached_tokens: int = 0) -> tuple[float, float]:
    """(time to first token or result, end-to-end) of `request` alone on `instance`, in seconds."""
    if instance.engine == "llamacpp":
        return isolated_llamacpp_s(request, instance, cached_tokens)
    if request.is_embedding:
        # Every embedding engine (TEI, or vLLM's pooling engine beside vLLM) runs the encoder's own
        # performance model; alone, a request's inputs are one batch.
        # Its inputs are truncated as the engine truncates them (`TeiEngineCore.max_input_length`).
        assert instance.embedding_model is not None
        perf = _emb(instance.embedding_model, instance.hardware, instance.calibration)
        n = max(1, request.embedding_inputs)
        base, extra = divmod(request.embedding_tokens or request.prompt_tokens, n)  # as the driver splits them
        longest_model = getattr(getattr(perf, "model", None), "max_position_embeddings", None)
        limit = embedding_engine_config(instance, longest_model).max_input_length or longest_model
        if limit:
            total = (n - extra) * min(base, limit) + extra * min(base + 1, limit)
            longest = min(base + (1 if extra else 0), limit)
        else:
            total, longest = base * n + extra, base + (1 if extra else 0)
        t = perf.batch_time_s(n, total, max(1, longest))
        return t, t
    llm = _llm(instance.model, instance.hardware, instance.tensor_parallel, instance.calibration)
    cached = min(cached_tokens, max(0, request.prompt_tokens - 1))
    ttft = _prefill_s(llm, request.prompt_tokens, cached, instance.vllm.max_num_batched_tokens)
    outputs = request.output_tokens if request.output_tokens is not None else request.max_tokens
    return ttft, ttft + _decode_s(llm, request.prompt_tokens, max(0, outputs - 1))


def isolated_latencies(requests: Sequence[Request], cluster: ClusterConfig) -> np.ndarray:
    """Array of shape (n, 3): lower bounds on TTFT, TPOT and end-to-end (ms); NaN where unservable."""
    out = np.full((len(requests), 3), np.nan)
    seen_blocks: set[int] = set()
    for i, request in enumerate(requests):
        candidates = [
            inst
            for inst in cluster.instances
            if inst.kind.serves(request.type) and request.model in inst.models and admits(request, inst)
        ]
        cached = 0
        if request.prefix_hashes:
            for block_hash in request.prefix_hashes:
                if block_hash not in seen_blocks:
                    break
                cached += 1
            block_tokens = 0
            if candidates:
                first = candidates[0]
                block_tokens = (
                    prefix_block_tokens(first.llamacpp)
                    if first.engine == "llamacpp"
                    else first.vllm.prefix_hash_block_tokens
                )
            cached *= block_tokens
            seen_blocks.update(request.prefix_hashes)
        if not candidates:
            continue
        # Each bound is its own minimum: the fastest first token, the fastest decode and the fastest
        # finish may come from different instances (different hardware or chunk budgets). TPOT is
        # each instance's own decode time, minimised: the fastest finish less the fastest first token
        # (from another instance) overstates it.
        latencies = [isolated_latency_s(request, inst, cached) for inst in candidates]
        best_ttft = min(t for t, _ in latencies)
        best_e2e = min(e for _, e in latencies)
        outputs = request.output_tokens if request.output_tokens is not None else request.max_tokens
        if not request.is_embedding and outputs >= 2:
            tpot = min(e - t for t, e in latencies) / (outputs - 1)
        else:
            tpot = np.nan
        out[i] = (best_ttft * 1000.0, tpot * 1000.0, best_e2e * 1000.0)
    return out


def bound_summary(
    requests: Sequence[Request], cluster: ClusterConfig, latencies: np.ndarray | None = None
) -> dict[str, Any]:
    """Bounds to print beside a policy's summary: latency lower bounds, attainment/goodput upper bounds.

    Goodput is SLO-meeting requests over the run's span (first arrival to last finish, as
    `sagesched.metrics.summarize` measures it). No policy can end the run before every request's
    isolated finish, so the span is at least `span_lower_s` = max(arrival + isolated e2e) - first
    arrival, and goodput at most (requests meeting their SLOs alone) / `span_lower_s`: the same
    number for every policy on a workload. Requests no instance admits are rejected by every policy
    and leave no finish behind, so only servable requests' finishes count.

    `goodput_rps_upper` assumes every servable request is served: a policy that refuses the requests
    that would finish last ends its run sooner. `goodput_rps_upper_refusing` holds for any policy,
    refusing ones included: the span still runs to the last arrival (`sagesched.metrics`), and a run
    that ends at T can count only the requests that meet their SLOs alone and finish alone by T, so
    goodput is at most the largest (that count) / (T - first arrival) over T at or after the last
    arrival.

    `latencies`: `isolated_latencies(requests, cluster)` when the caller already has it.
    """
    lat = isolated_latencies(requests, cluster) if latencies is None else latencies
    met = np.zeros(len(requests), dtype=bool)
    for i, request in enumerate(requests):
        ttft, tpot, e2e = lat[i]
        if np.isnan(e2e):
            continue
        slo = request.slo
        met[i] = (
            (slo.ttft_ms is None or ttft <= slo.ttft_ms)
            and (slo.tpot_ms is None or np.isnan(tpot) or tpot <= slo.tpot_ms)
            and (slo.e2e_ms is None or e2e <= slo.e2e_ms)
        )
    llm = np.array([not r.is_embedding for r in requests], dtype=bool)

    def pct(values: np.ndarray, q: float) -> float | None:
        values = values[~np.isnan(values)]
        return float(np.percentile(values, q)) if len(values) else None

    span_lower_s = None
    goodput_refusing = None
    if requests and not np.isnan(lat[:, 2]).all():
        arrivals = np.array([r.arrival_s for r in requests])
        finishes = arrivals + lat[:, 2] / 1000.0
        first, last = float(arrivals.min()), float(arrivals.max())
        span_lower_s = max(float(np.nanmax(finishes)) - first, 1e-9)
        # Between two of these finishes the count is flat and the span grows, so the best end is one
        # of them, or the last arrival.
        ends = np.sort(finishes[met])
        candidates = np.unique(np.maximum(ends, last))
        goodput_refusing = 0.0
        if len(candidates):
            counts = np.searchsorted(ends, candidates, side="right")
            goodput_refusing = float(np.max(counts / np.maximum(candidates - first, 1e-9)))
    return {
        "kind": "isolated-service lower bound (each request alone on its fastest compatible instance)",
        "ttft_p50_ms_lower": pct(lat[llm, 0], 50),
        "ttft_p99_ms_lower": pct(lat[llm, 0], 99),
        "tpot_p50_ms_lower": pct(lat[llm, 1], 50),
        "e2e_p99_ms_lower": pct(lat[llm, 2], 99),
        "embedding_p99_ms_lower": pct(lat[~llm, 2], 99),
        "slo_attainment_upper": float(met.mean()) if len(met) else None,
        "span_lower_s": span_lower_s,
        "goodput_rps_upper": float(met.sum() / span_lower_s) if span_lower_s else None,
        "goodput_rps_upper_refusing": goodput_refusing,  # None exactly when span_lower_s is
    }
