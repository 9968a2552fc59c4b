"""The performance model: how long one vLLM engine step or one TEI embedding batch takes on a GPU.

LLM step (see docs/performance_model.md for the derivation and the measured error):

    t = scale * ( linear_scale * ops(T)                       # fitted per-operator curves, T = prefill + decode tokens
                  + 2 * layers * all_reduce(T)                # TP > 1: latency + bytes over NVLink
                  + lm_head(sequences)                        # logits GEMM, one row per sequence
                  + attention_scale * (prefill_attention + decode_attention)   # rooflines
                  + layers * layer_overhead + step_overhead + seq_overhead * sequences )

    prefill_attention = max(FLOPs of sum_i c_i (L_i - c_i/2) pairs / (peak x efficiency),     # exact causal sum
                            KV bytes of sum_i L_i / (bandwidth x decode efficiency))          # memory floor

A request's client-side latency adds the serving frontend's cost (HTTP, tokenisation, hand-off to the
engine, delivery of the first chunk), `frontend_s(prompt_tokens) = frontend_request_s +
frontend_prompt_token_s x prompt_tokens`, to both its TTFT and its E2E (see `frontend_s`).

`ops(T)` comes from Vidur's measured per-operator timings where they exist, else from a roofline whose
efficiencies are fitted to Vidur's measurements on the same GPU (`sagesched.sim.perf.operators`).
Everything is folded into a handful of precomputed floats at load time, because `step_time_s` is called
once per simulated engine step (10^5-10^6 times per run).

Embedding batch: a roofline on encoder FLOPs (2 x non-embedding params x tokens + attention) and memory
traffic (weights + activations), plus a per-batch and a per-input overhead.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

from sagesched.sim.perf.calibration import (
    EmbeddingCalibration,
    LLMCalibration,
    parse_calibration,
    read_calibration_file,
)
from sagesched.sim.perf.operators import OperatorCurves, operator_curves
from sagesched.sim.perf.piecewise import PiecewiseLinear, add_curves
from sagesched.sim.perf.profiles import (
    PROFILES_DIR,
    HardwareProfile,
    ModelProfile,
    available_hardware,
    available_model_profiles,
    load_hardware,
    load_model,
)

log = logging.getLogger(__name__)

__all__ = [
    "BatchShape",
    "EmbeddingPerfModel",
    "LLMPerfModel",
    "available_embedding_models",
    "available_hardware",
    "available_llm_models",
    "available_models",
]

#: Context length (tokens) of the nominal decode step behind `LLMPerfModel.decode_step_s`.
NOMINAL_DECODE_CONTEXT = 1024
#: Chunk (tokens) of the nominal prefill behind `LLMPerfModel.prefill_tokens_per_s` (vLLM's default budget).
NOMINAL_PREFILL_CHUNK = 2048
#: Batch behind `EmbeddingPerfModel.tokens_per_s`: 32 inputs (TEI's max_client_batch_size) of 256 tokens.
NOMINAL_EMBEDDING_BATCH = (32, 256)


@dataclass(frozen=True, slots=True)
class BatchShape:
    """The composition of one vLLM engine step, all the performance model needs to time it.

    Attributes: `prefill_tokens` new prompt tokens computed this step (sum of the prefill chunks);
    `decode_tokens` sequences decoding one token this step; `prefill_context_tokens` sum over prefill
    chunks of (tokens already in KV + chunk), what prefill attention attends over; `decode_context_tokens`
    sum over decoding sequences of their KV length, what decode attention reads; `num_prefills` sequences
    with a prefill chunk this step; `prefill_attention_pairs` the exact causal attention work of the
    prefill chunks, sum over chunks of c_i (L_i - c_i / 2) with c_i the chunk and L_i its context after
    the chunk (0: unknown, priced as `num_prefills` equal chunks, exact for one chunk).
    """

    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_context_tokens: int = 0
    decode_context_tokens: int = 0
    num_prefills: int = 0
    prefill_attention_pairs: float = 0.0


class StepShape:
    """A mutable `BatchShape` (same attributes) for the engine's own evaluations: one per planned
    step, and one reused across a decode run's evaluations (its KV length set before each). A frozen
    dataclass's keyword ``__init__`` cost 0.9 us against 0.3 us here. The performance model only
    reads the attributes.
    """

    __slots__ = (
        "decode_context_tokens",
        "decode_tokens",
        "num_prefills",
        "prefill_attention_pairs",
        "prefill_context_tokens",
        "prefill_tokens",
    )

    def __init__(
        self,
        prefill_tokens: int,
        decode_tokens: int,
        prefill_context_tokens: int,
        decode_context_tokens: int,
        num_prefills: int,
        prefill_attention_pairs: float,
    ) -> None:
        self.prefill_tokens = prefill_tokens
        self.decode_tokens = decode_tokens
        self.prefill_context_tokens = prefill_context_tokens
        self.decode_context_tokens = decode_context_tokens
        self.num_prefills = num_prefills
        self.prefill_attention_pairs = prefill_attention_pairs


def available_models() -> list[str]:
    """Every shipped model profile (LLM and embedding)."""
    return available_model_profiles()


def available_llm_models() -> list[str]:
    """Model profiles an `LLMPerfModel` can load."""
    return available_model_profiles("llm")


def available_embedding_models() -> list[str]:
    """Model profiles an `EmbeddingPerfModel` can load."""
    return available_model_profiles("embedding")


def _load_pair(model: str, hardware: str, kind: str) -> tuple[ModelProfile, HardwareProfile]:
    if kind == "llm" and model.endswith(".json"):  # a Hugging Face config.json: roofline operators
        return load_model(model), load_hardware(hardware)
    valid = available_model_profiles(kind)
    if model not in valid:
        what = "an LLM" if kind == "llm" else "an embedding model"
        raise ValueError(
            f"unknown {'LLM' if kind == 'llm' else 'embedding'} model {model!r} (need {what}); valid: {valid}"
        )
    return load_model(model), load_hardware(hardware)


#: Calibration files applied without flags: `<model>-<hardware>-tp<N>.yaml`, fitted to real servers.
DEFAULT_CALIBRATION_DIR: Path = PROFILES_DIR / "calibration" / "defaults"


def default_calibration(model: str, hardware: str, tensor_parallel: int) -> Path | None:
    """The shipped calibration for this deployment, if one was fitted (`calibration="none"` skips it)."""
    path = DEFAULT_CALIBRATION_DIR / f"{model}-{hardware}-tp{tensor_parallel}.yaml"
    return path if path.is_file() else None


def valid_tensor_parallel(model: ModelProfile, max_tp: int = 8) -> list[int]:
    """TP degrees vLLM accepts for `model` on one 8-GPU node: divide the heads; KV heads split or replicate evenly."""
    kv = model.num_kv_heads
    return [t for t in range(1, max_tp + 1) if model.num_heads % t == 0 and (kv % t == 0 or t % kv == 0)]


class LLMPerfModel:
    """Step time of a vLLM engine serving `model` on `tensor_parallel` GPUs of type `hardware`.

    Build with `LLMPerfModel.load(...)`. Attributes: `model`, `hardware` (profiles), `tensor_parallel`,
    `calibration`, `source` ("vidur" or "roofline": where the operator curves come from), `vidur_file`,
    `prefill_tokens_per_s` and `decode_step_s` (nominal figures for `InstanceView` estimates).
    """

    #: `step_time_s` is exactly affine in `decode_context_tokens` for fixed token counts (its
    #: guarantee below), so a decode run needs no check that it is (`VllmEngineCore.start_decode_run`).
    decode_affine = True

    __slots__ = (
        "_ar_latency",
        "_ar_per_token",
        "_c_decode",
        "_c_kv_read",
        "_c_prefill",
        "_c_seq",
        "_fe_request",
        "_fe_seq",
        "_fe_token",
        "_lm_const",
        "_lm_slope",
        "_ops",
        "_overhead",
        "_slopes",
        "_x0",
        "_xs",
        "_y0",
        "_ys",
        "calibration",
        "calibration_file",
        "curves",
        "decode_step_s",
        "hardware",
        "model",
        "prefill_tokens_per_s",
        "source",
        "tensor_parallel",
        "vidur_file",
    )

    def __init__(
        self, model: ModelProfile, hardware: HardwareProfile, tensor_parallel: int, calibration: LLMCalibration
    ) -> None:
        self.model = model
        self.hardware = hardware
        self.tensor_parallel = tensor_parallel
        self.calibration = calibration
        self.calibration_file: str | None = None
        curves: OperatorCurves = operator_curves(model.name, hardware.name, tensor_parallel)
        self.curves = curves
        self.source = curves.source
        self.vidur_file = curves.vidur_file
        self._precompute()
        self.decode_step_s = self.step_time_s(BatchShape(decode_tokens=1, decode_context_tokens=NOMINAL_DECODE_CONTEXT))
        chunk = NOMINAL_PREFILL_CHUNK
        self.prefill_tokens_per_s = chunk / self.step_time_s(
            BatchShape(prefill_tokens=chunk, prefill_context_tokens=chunk, num_prefills=1)
        )

    @classmethod
    def load(
        cls, model: str, hardware: str, tensor_parallel: int = 1, calibration: str | Path | None = None
    ) -> LLMPerfModel:
        """The model for `model` on `tensor_parallel` x `hardware`, optionally adjusted by a calibration file.

        ValueError (listing the valid choices) for an unknown model or hardware, an embedding model, a TP
        degree the model's heads cannot be split over, or a calibration file that does not fit the schema
        (see `sagesched.sim.perf.calibration`).
        """
        m, hw = _load_pair(model, hardware, "llm")
        tps = valid_tensor_parallel(m)
        if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel not in tps:
            raise ValueError(f"tensor_parallel={tensor_parallel!r} is not valid for {model}; valid: {tps}")
        cal = LLMCalibration()
        if calibration is None:
            calibration = default_calibration(model, hardware, tensor_parallel)
        elif str(calibration) == "none":
            calibration = None
        if calibration is not None:
            data = read_calibration_file(calibration)
            cal = parse_calibration(
                data,
                LLMCalibration,
                str(calibration),
                {"model": model, "hardware": hardware, "tensor_parallel": tensor_parallel},
            )
        model_ = cls(m, hw, tensor_parallel, cal)
        model_.calibration_file = None if calibration is None else str(calibration)
        return model_

    def _hw(self, name: str) -> float:
        value = getattr(self.calibration, name)
        return float(getattr(self.hardware, name) if value is None else value)

    def allreduce_calls(self) -> int:
        """All-reduce calls per step: after attention and after the MLP of every layer (0 without TP)."""
        return 2 * self.model.num_layers if self.tensor_parallel > 1 else 0

    def allreduce_hops(self) -> int:
        """Latency-bound ring steps per step: 2 x (TP - 1) per all-reduce call."""
        return self.allreduce_calls() * 2 * (self.tensor_parallel - 1)

    def _precompute(self) -> None:
        m, hw, tp, cal = self.model, self.hardware, self.tensor_parallel, self.calibration
        b = float(m.dtype_bytes)
        # Non-attention operators (ms -> s).
        # Roofline operators carry the GPU's calibrated correction (`roofline_operator_scale`, fitted to real
        # servers); Vidur's measured curves do not need one.
        op_scale = self._hw("roofline_operator_scale") if self.source == "roofline" else 1.0
        self._ops = self.curves.step_curve_ms(m.num_layers).scaled(1e-3 * cal.linear_scale * op_scale)
        # Constants per step: CPU/scheduling overhead, per-layer launch gaps, all-reduce latency (per ring step).
        self._overhead = m.num_layers * self._hw("layer_overhead_s") + self._hw("step_overhead_s")
        self._ar_latency = self.allreduce_hops() * self._hw("allreduce_latency_s")
        # All-reduce bandwidth: a ring moves 2 (TP-1)/TP of the hidden-state bytes per token per call.
        self._ar_per_token = 0.0
        if tp > 1:
            bus = hw.nvlink_bandwidth_bytes_per_s * self._hw("allreduce_efficiency")
            self._ar_per_token = self.allreduce_calls() * (m.hidden_size * b * 2.0 * (tp - 1) / tp) / bus
        const = self._overhead + self._ar_latency
        line = PiecewiseLinear(
            (1.0, 2.0), (const + self._ar_per_token, const + 2 * self._ar_per_token), self._ar_per_token
        )
        total = add_curves([self._ops, line]).scaled(cal.scale)
        self._xs, self._ys = total.xs, total.ys
        self._slopes = total.slopes
        self._x0, self._y0 = total.xs[0], total.ys[0]
        # LM head: vocab-parallel logits GEMM, one row per sequence in the batch; roofline of weights vs FLOPs.
        lm_params = m.vocab_size * m.hidden_size / tp
        self._lm_const = cal.scale * lm_params * b / (hw.hbm_bandwidth_bytes_per_s * hw.lm_head_bandwidth_efficiency)
        self._lm_slope = cal.scale * 2.0 * lm_params / (hw.peak_bf16_flops * hw.lm_head_flops_efficiency)
        # Attention. Prefill: 4 FLOPs x head_dim per (query, key) pair per head per layer, over peak x efficiency.
        flops_per_pair = 4.0 * m.head_dim * (m.num_heads / tp) * m.num_layers
        att = cal.scale * cal.attention_scale
        self._c_prefill = att * flops_per_pair / (hw.peak_bf16_flops * self._hw("prefill_attention_efficiency"))
        # Decode: every decoding sequence reads its whole KV cache (this GPU's share of the KV heads) once.
        bw = hw.hbm_bandwidth_bytes_per_s * self._hw("decode_attention_efficiency")
        self._c_decode = att * self.kv_bytes_per_token_per_gpu() / bw
        # Prefill attention's memory floor: a chunk's attention reads the KV of its whole context at least once.
        self._c_kv_read = self._c_decode
        # Per-sequence CPU cost of a step (input preparation, sampling, output processing): grows with the batch.
        self._c_seq = cal.scale * self._hw("seq_overhead_s")
        self._fe_request = self._hw("frontend_request_s")
        self._fe_token = self._hw("frontend_prompt_token_s")
        self._fe_seq = self._hw("frontend_seq_s")

    def frontend_s(self, prompt_tokens: int, running: int = 0) -> float:
        """Client-visible serving-frontend cost of one request (seconds), added to its TTFT and its E2E.

        frontend_request_s + frontend_prompt_token_s x prompt_tokens + frontend_seq_s x running, with
        `running` the sequences in flight on the engine when the token is delivered. Why: clients time
        requests through the OpenAI server (HTTP, tokenisation, engine hand-off, streaming), which the
        engine's step times do not contain; its single process also turns every step's output of every
        running sequence into stream chunks, so a token waits longer for delivery the larger the batch.
        Measured TTFT on H100 is about twice the engine's first step without it (docs/performance_model.md).
        """
        return self._fe_request + self._fe_token * prompt_tokens + self._fe_seq * running

    def _prefill_attention(self, batch: BatchShape) -> float:
        p, k = batch.prefill_tokens, batch.num_prefills
        ctx = max(batch.prefill_context_tokens, p)
        pairs = batch.prefill_attention_pairs
        if pairs <= 0.0:
            pairs = (p * ctx - 0.5 * p * p) / (k if k > 0 else 1)
        compute = self._c_prefill * pairs
        memory = self._c_kv_read * ctx
        return compute if compute > memory else memory

    def components(self, batch: BatchShape) -> dict[str, float]:
        """The step time split into its terms (seconds, calibration applied); they sum to `step_time_s(batch)`.

        For reports and fitting, not the hot path.
        """
        p, d, k = batch.prefill_tokens, batch.decode_tokens, batch.num_prefills
        n = p + d
        if n <= 0:
            return {}
        s = self.calibration.scale
        rows = d + (k if k > 0 else (1 if p > 0 else 0))
        return {
            "operators": s * self._ops(n),
            "allreduce_latency": s * self._ar_latency,
            "allreduce_bandwidth": s * self._ar_per_token * max(n, 1.0),
            "lm_head": max(self._lm_const, self._lm_slope * rows),
            "prefill_attention": self._prefill_attention(batch) if p > 0 else 0.0,
            "decode_attention": self._c_decode * batch.decode_context_tokens,
            "overhead": s * self._overhead,
            "sequence_overhead": self._c_seq * rows,
        }

    def step_time_s(self, batch: BatchShape) -> float:
        """Seconds one engine step with this composition takes (0 for an empty batch).

        Guarantees the simulator relies on: non-decreasing in every field, and, for fixed token counts,
        exactly affine in `decode_context_tokens` (so a run of decode-only steps sums in closed form).
        """
        p = batch.prefill_tokens
        d = batch.decode_tokens
        n = p + d
        if n <= 0:
            return 0.0
        k = batch.num_prefills
        rows = d + (k if k > 0 else (1 if p > 0 else 0))
        t = self._rows_time(n, rows)
        if p > 0:
            # `_prefill_attention(batch)`, spelled out: once per step with a prefill (hot).
            ctx = batch.prefill_context_tokens
            if ctx < p:
                ctx = p
            pairs = batch.prefill_attention_pairs
            if pairs <= 0.0:
                pairs = (p * ctx - 0.5 * p * p) / (k if k > 0 else 1)
            compute = self._c_prefill * pairs
            memory = self._c_kv_read * ctx
            t += compute if compute > memory else memory
        return t + self._c_decode * batch.decode_context_tokens + self._c_seq * rows

    def _rows_time(self, n: int, rows: int) -> float:
        """The part of a step's time set by its `n` tokens and `rows` output rows alone (the linear
        layers' piecewise curve and the LM head), before attention and per-sequence terms."""
        xs = self._xs
        if n <= self._x0:
            t = self._y0
        else:
            i = bisect_right(xs, n) - 1
            t = self._ys[i] + self._slopes[i] * (n - xs[i])
        lm = self._lm_slope * rows
        return t + (lm if lm > self._lm_const else self._lm_const)

    def decode_run_terms(self, n: int, ctx: int) -> tuple[float, float]:
        """(a, d) of a run of pure-decode steps of `n` sequences over `ctx` KV tokens: the first
        step's time and the increase per step (each step adds `n` KV tokens), bit for bit what two
        `step_time_s` calls give (the same operations in the same order, with the part that does
        not depend on the KV length computed once; a decode run starts ~2 times per request)."""
        t = self._rows_time(n, n)
        tail = self._c_seq * n
        a = t + self._c_decode * ctx + tail
        return a, t + self._c_decode * (ctx + n) + tail - a

    def cpu_time_s(self, batch: BatchShape) -> float:
        """The CPU share of `step_time_s(batch)`: the per-step and per-sequence overheads."""
        k = batch.num_prefills
        rows = batch.decode_tokens + (k if k > 0 else (1 if batch.prefill_tokens > 0 else 0))
        return self.calibration.scale * self._hw("step_overhead_s") + self._c_seq * rows

    def step_time_async_s(self, batch: BatchShape) -> float:
        """Step time under vLLM's async scheduling: max(GPU part, CPU part), the two overlapping.

        Non-decreasing in every field like `step_time_s`; not affine in the decode context once the
        CPU part dominates, which the decode jump detects (it then sums step times explicitly).
        """
        t = self.step_time_s(batch)
        if t <= 0.0:
            return 0.0
        cpu = self.cpu_time_s(batch)
        gpu = t - cpu
        return gpu if gpu > cpu else cpu

    def weight_bytes_per_gpu(self) -> float:
        """Bytes of weights each of the `tensor_parallel` GPUs holds."""
        return self.model.weight_bytes / self.tensor_parallel

    def kv_bytes_per_token_per_gpu(self) -> float:
        """KV-cache bytes one token occupies on each GPU (KV heads split over TP, replicated past it)."""
        m = self.model
        return m.kv_bytes_per_token * max(1.0, m.num_kv_heads / self.tensor_parallel) / m.num_kv_heads

    def kv_capacity_tokens(self, gpu_memory_utilization: float = 0.9) -> int:
        """Tokens of KV cache the instance holds: (memory x utilization - weights) / KV bytes per token, per GPU.

        ValueError if the utilization is not in (0, 1] or the weights do not fit (naming the fix).
        """
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        free = self.hardware.memory_bytes * gpu_memory_utilization - self.weight_bytes_per_gpu()
        if free <= 0:
            need = [
                t
                for t in valid_tensor_parallel(self.model)
                if self.model.weight_bytes / t < self.hardware.memory_bytes * gpu_memory_utilization
            ]
            raise ValueError(
                f"{self.model.name} weights ({self.weight_bytes_per_gpu() / 1e9:.1f} GB per GPU) do not fit in "
                f"{gpu_memory_utilization:.0%} of a {self.hardware.name}; use a larger tensor_parallel (fits: {need}) "
                "or a higher gpu_memory_utilization"
            )
        return int(free // self.kv_bytes_per_token_per_gpu())

    def __repr__(self) -> str:
        return (
            f"LLMPerfModel({self.model.name!r}, {self.hardware.name!r}, tensor_parallel={self.tensor_parallel}, "
            f"source={self.source!r}, decode_step_s={self.decode_step_s:.4g})"
        )


class EmbeddingPerfModel:
    """Batch time of a TEI instance serving an encoder `model` on one GPU of type `hardware`.

    t = scale * ( max(FLOPs / (peak x flops_efficiency), bytes / (bandwidth x bandwidth_efficiency))
                  + batch_overhead_s + per_input_overhead_s x inputs )
    FLOPs = 2 x non-embedding params x tokens + 4 x layers x hidden x tokens x longest input (attention,
    exact for equal-length inputs, an upper bound otherwise); bytes = non-embedding weights + activation
    traffic per token. Attributes: `model`, `hardware`, `calibration`, `tokens_per_s` (nominal).
    """

    __slots__ = (
        "_act_bytes_per_token",
        "_attn_flops",
        "_batch_overhead",
        "_dense_flops",
        "_input_overhead",
        "_inv_bw",
        "_inv_flops",
        "_scale",
        "_weight_bytes",
        "calibration",
        "hardware",
        "model",
        "tokens_per_s",
    )

    def __init__(self, model: ModelProfile, hardware: HardwareProfile, calibration: EmbeddingCalibration) -> None:
        self.model = model
        self.hardware = hardware
        self.calibration = calibration
        emb = hardware.embedding

        def pick(name: str) -> float:
            value = getattr(calibration, name)
            return float(getattr(emb, name) if value is None else value)

        b = float(model.dtype_bytes)
        h, i, layers = model.hidden_size, model.intermediate_size, model.num_layers
        dense_params = model.num_params - model.embedding_params - model.max_position_embeddings * h
        self._dense_flops = 2.0 * dense_params
        self._attn_flops = 4.0 * layers * h
        self._weight_bytes = dense_params * b
        # Each layer writes and reads back q, k, v, attention out, projection out, two residual sums and two
        # norms (9 x hidden) and the FFN's up and activation outputs (2 x intermediate).
        self._act_bytes_per_token = 2.0 * layers * (9 * h + 2 * i) * b
        self._inv_flops = 1.0 / (hardware.peak_bf16_flops * pick("flops_efficiency"))
        self._inv_bw = 1.0 / (hardware.hbm_bandwidth_bytes_per_s * pick("bandwidth_efficiency"))
        self._batch_overhead = pick("batch_overhead_s")
        self._input_overhead = pick("per_input_overhead_s")
        self._scale = calibration.scale
        n, length = NOMINAL_EMBEDDING_BATCH
        self.tokens_per_s = n * length / self.batch_time_s(n, n * length, length)

    @classmethod
    def load(cls, model: str, hardware: str, calibration: str | Path | None = None) -> EmbeddingPerfModel:
        """The model for encoder `model` on one `hardware` GPU; ValueError listing valid names / calibration keys."""
        m, hw = _load_pair(model, hardware, "embedding")
        cal = EmbeddingCalibration()
        if calibration is not None and str(calibration) != "none":  # "none": no calibration, as for LLMs
            data = read_calibration_file(calibration)
            cal = parse_calibration(
                data, EmbeddingCalibration, str(calibration), {"model": model, "hardware": hardware}
            )
        return cls(m, hw, cal)

    def flops(self, total_tokens: int, max_input_tokens: int) -> float:
        """Encoder FLOPs of a batch: dense layers on every token plus attention up to the longest input."""
        return total_tokens * (self._dense_flops + self._attn_flops * max_input_tokens)

    def batch_time_s(self, num_inputs: int, total_tokens: int, max_input_tokens: int) -> float:
        """Seconds one batch of `num_inputs` inputs, `total_tokens` tokens in all, the longest `max_input_tokens`, takes."""
        if num_inputs <= 0 or total_tokens <= 0:
            return 0.0
        longest: float = max_input_tokens
        mean = total_tokens / num_inputs
        if longest < mean:
            longest = mean
        flops = total_tokens * (self._dense_flops + self._attn_flops * longest)
        compute = flops * self._inv_flops
        memory = (self._weight_bytes + self._act_bytes_per_token * total_tokens) * self._inv_bw
        roof = compute if compute > memory else memory
        return self._scale * (roof + self._batch_overhead + self._input_overhead * num_inputs)

    def __repr__(self) -> str:
        return f"EmbeddingPerfModel({self.model.name!r}, {self.hardware.name!r}, tokens_per_s={self.tokens_per_s:.4g})"
