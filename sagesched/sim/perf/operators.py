"""The non-attention part of an LLM step: per-operator curves in the number of tokens.

Where Vidur measured the model on the hardware (`data/profiles/vidur/*.csv`, median GPU time per operator
against num_tokens for TP 1/2/4/8), each operator gets its own fitted piecewise-linear curve. Elsewhere
(another model, e.g. gemma-3-270m; another GPU, e.g. llama-3-8b on H100; another TP degree) each operator
is a roofline: a fixed kernel floor plus the larger of its memory time (weights + activations over HBM
bandwidth) and its compute time (2 x weights x tokens over peak FLOPs), with the efficiencies and floors
fitted per GPU type to all of Vidur's measurements on that GPU. Vidur's attention timings are not in the
profiles; attention is a separate roofline term (see `perf_model`).
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sagesched.sim.perf.piecewise import PiecewiseLinear, add_curves, fit_hinges
from sagesched.sim.perf.profiles import (
    PROFILES_DIR,
    HardwareProfile,
    ModelProfile,
    available_model_profiles,
    load_hardware,
    load_model,
)

VIDUR_DIR: Path = PROFILES_DIR / "vidur"

#: Operators run once per transformer layer per step, with their multiplicity (two residual adds).
LAYER_OPS: dict[str, int] = {
    "input_layernorm": 1,
    "attn_pre_proj": 1,
    "attn_rope": 1,
    "attn_post_proj": 1,
    "post_attention_layernorm": 1,
    "mlp_up_proj": 1,
    "mlp_act": 1,
    "mlp_down_proj": 1,
    "add": 2,
}
#: Operators run once per step: the token-embedding gather and the final norm (timed like a layer norm).
STEP_OPS: dict[str, tuple[str, int]] = {"emb": ("emb", 1), "final_norm": ("input_layernorm", 1)}
GEMM_OPS: tuple[str, ...] = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
ELEMENTWISE_OPS: tuple[str, ...] = ("input_layernorm", "attn_rope", "post_attention_layernorm", "mlp_act", "add", "emb")
ALL_OPS: tuple[str, ...] = (*LAYER_OPS, "emb")
#: Breakpoints of the fitted curves (tokens); only those inside a file's measured range are used.
KNOTS: tuple[float, ...] = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

OpTable = dict[str, tuple[np.ndarray, np.ndarray]]  # op -> (num_tokens, median ms)


@functools.cache
def read_vidur(file_name: str) -> dict[int, OpTable]:
    """Vidur CSV -> {tensor-parallel degree: {operator: (num_tokens, median time in ms)}}, sorted by tokens."""
    path = VIDUR_DIR / file_name
    rows: dict[int, list[dict[str, str]]] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            rows.setdefault(int(row["num_tensor_parallel_workers"]), []).append(row)
    out: dict[int, OpTable] = {}
    for tp, rs in rows.items():
        rs.sort(key=lambda r: int(r["num_tokens"]))
        tokens = np.array([float(r["num_tokens"]) for r in rs])
        out[tp] = {op: (tokens, np.array([float(r[f"time_stats.{op}.median"]) for r in rs])) for op in ALL_OPS}
    return out


@functools.cache
def fit_vidur(file_name: str) -> dict[int, dict[str, PiecewiseLinear]]:
    """Per TP degree, per operator: a monotone piecewise-linear fit (ms vs tokens) minimising relative error."""
    return {
        tp: {op: fit_hinges(t, y, KNOTS) for op, (t, y) in table.items()} for tp, table in read_vidur(file_name).items()
    }


# ----------------------------------------------------------------------------------------------------------
# Roofline operators, for (model, hardware, TP) without a Vidur profile.


@dataclass(frozen=True)
class OpShape:
    """Per-GPU cost drivers of one operator: weight bytes read once per step, FLOPs and activation bytes per token."""

    weight_bytes: float
    flops_per_token: float
    act_bytes_per_token: float


@dataclass(frozen=True)
class RooflineParams:
    """Fitted constants of the roofline operators on one GPU type (see `fit_roofline`).

    Attributes: `gemm_bandwidth_efficiency` / `gemm_flops_efficiency` achieved fractions of HBM bandwidth
    and peak FLOPs by the linear layers; `gemm_floor_ms` fixed time of one GEMM kernel;
    `elementwise_bandwidth_efficiency` and `elementwise_floor_ms` the same for norms/rope/act/add/embedding.
    """

    gemm_bandwidth_efficiency: float
    gemm_flops_efficiency: float
    gemm_floor_ms: float
    elementwise_bandwidth_efficiency: float
    elementwise_floor_ms: float


def op_shapes(model: ModelProfile, tp: int) -> dict[str, OpShape]:
    """Cost drivers of each operator on one of `tp` GPUs (Megatron-style sharding, KV heads replicated past tp)."""
    b = float(model.dtype_bytes)
    d, h = model.head_dim, model.hidden_size
    q_heads = model.num_heads / tp
    kv_heads = max(1.0, model.num_kv_heads / tp)
    inter = model.intermediate_size / tp
    up_width = (2 if model.gated_mlp else 1) * inter

    def gemm(k: float, n: float) -> OpShape:
        return OpShape(weight_bytes=k * n * b, flops_per_token=2.0 * k * n, act_bytes_per_token=(k + n) * b)

    def elementwise(bytes_per_token: float) -> OpShape:
        return OpShape(weight_bytes=0.0, flops_per_token=0.0, act_bytes_per_token=bytes_per_token)

    return {
        "attn_pre_proj": gemm(h, (q_heads + 2 * kv_heads) * d),
        "attn_post_proj": gemm(q_heads * d, h),
        "mlp_up_proj": gemm(h, up_width),
        "mlp_down_proj": gemm(inter, h),
        "input_layernorm": elementwise(2 * h * b),
        "post_attention_layernorm": elementwise(2 * h * b),
        "attn_rope": elementwise(2 * (q_heads + kv_heads) * d * b),
        "mlp_act": elementwise((up_width + inter) * b),
        "add": elementwise(3 * h * b),
        "emb": elementwise(2 * h * b),
    }


def _max_of_lines(a1: float, b1: float, a2: float, b2: float, x0: float = 1.0) -> PiecewiseLinear:
    """max(a1 + b1 x, a2 + b2 x) for x >= x0 as a piecewise-linear curve (at most one kink)."""
    pts = [x0]
    if b1 != b2:
        cross = (a2 - a1) / (b1 - b2)
        if cross > x0:
            pts.append(cross)
    pts.append(pts[-1] + 1.0)
    ys = [max(a1 + b1 * x, a2 + b2 * x) for x in pts]
    return PiecewiseLinear(tuple(pts), tuple(ys), max(b1, b2))


def roofline_op_curve(shape: OpShape, hw: HardwareProfile, params: RooflineParams, gemm: bool) -> PiecewiseLinear:
    """One operator's time (ms) against tokens under the fitted roofline."""
    if gemm:
        bw = hw.hbm_bandwidth_bytes_per_s * params.gemm_bandwidth_efficiency
        fl = hw.peak_bf16_flops * params.gemm_flops_efficiency
        floor = params.gemm_floor_ms
        mem_a, mem_b = 1e3 * shape.weight_bytes / bw, 1e3 * shape.act_bytes_per_token / bw
        return _max_of_lines(floor + mem_a, mem_b, floor, 1e3 * shape.flops_per_token / fl)
    bw = hw.hbm_bandwidth_bytes_per_s * params.elementwise_bandwidth_efficiency
    slope = 1e3 * shape.act_bytes_per_token / bw
    return PiecewiseLinear(
        (1.0, 2.0), (params.elementwise_floor_ms + slope, params.elementwise_floor_ms + 2 * slope), slope
    )


def roofline_op_curves(
    model: ModelProfile, hw: HardwareProfile, tp: int, params: RooflineParams
) -> dict[str, PiecewiseLinear]:
    """Every operator's roofline curve (ms vs tokens) for `model` on one of `tp` GPUs of type `hw`."""
    return {op: roofline_op_curve(s, hw, params, op in GEMM_OPS) for op, s in op_shapes(model, tp).items()}


def _vidur_files_for(hw_name: str) -> list[tuple[ModelProfile, str]]:
    out = []
    for name in available_model_profiles():
        m = load_model(name)
        if hw_name in m.vidur:
            out.append((m, m.vidur[hw_name]))
    return out


@functools.cache
def fit_roofline(hw_name: str) -> RooflineParams:
    """Fit the roofline constants of `hw_name` to all Vidur measurements on it (minimum mean relative error).

    GEMMs: a grid search over the two efficiencies, with the best kernel floor for each pair in closed form
    (weighted least squares on relative error). Elementwise ops: linear least squares on floor + bytes/bandwidth.
    """
    hw = load_hardware(hw_name)
    files = _vidur_files_for(hw_name)
    if not files and hw.roofline_reference:
        # Same silicon, other memory (H200 = H100's SMs with HBM3e): the achieved fractions carry over.
        return fit_roofline(hw.roofline_reference)
    if not files:
        raise ValueError(f"no Vidur profile on {hw_name!r} to fit a roofline from; add one to {VIDUR_DIR}")
    g_w, g_f, g_a, g_y, e_x, e_y = [], [], [], [], [], []
    for model, file_name in files:
        for tp, table in read_vidur(file_name).items():
            shapes = op_shapes(model, tp)
            for op, (t, y) in table.items():
                s = shapes[op]
                if op in GEMM_OPS:
                    g_w.append(np.full_like(t, s.weight_bytes))
                    g_f.append(t * s.flops_per_token)
                    g_a.append(t * s.act_bytes_per_token)
                    g_y.append(y)
                else:
                    e_x.append(t * s.act_bytes_per_token)
                    e_y.append(y)
    w_bytes, flops, act, y = (np.concatenate(v) for v in (g_w, g_f, g_a, g_y))
    mem = 1e3 * (w_bytes + act) / hw.hbm_bandwidth_bytes_per_s
    comp = 1e3 * flops / hw.peak_bf16_flops
    inv_y2 = 1.0 / y**2
    grid = np.linspace(0.2, 1.0, 33)
    best = (np.inf, 1.0, 1.0, 0.0)
    for eb in grid:
        m = mem / eb
        for ef in grid:
            base = np.maximum(m, comp / ef)
            floor = max(0.0, float(np.sum((y - base) / y * (1.0 / y)) / np.sum(inv_y2)))
            err = float(np.mean(np.abs(base + floor - y) / y))
            if err < best[0]:
                best = (err, float(eb), float(ef), floor)
    x, ye = np.concatenate(e_x), np.concatenate(e_y)
    a = np.stack([np.ones_like(x), 1e3 * x / hw.hbm_bandwidth_bytes_per_s], axis=1) / ye[:, None]
    (floor_e, inv_eff), *_ = np.linalg.lstsq(a, np.ones_like(ye), rcond=None)
    inv_eff = max(float(inv_eff), 1.0)  # efficiency cannot exceed 1
    return RooflineParams(
        gemm_bandwidth_efficiency=best[1],
        gemm_flops_efficiency=best[2],
        gemm_floor_ms=best[3],
        elementwise_bandwidth_efficiency=1.0 / inv_eff,
        elementwise_floor_ms=max(0.0, float(floor_e)),
    )


# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorCurves:
    """The per-operator curves (ms vs tokens on one GPU) behind a (model, hardware, TP) and where they came from.

    Attributes: `source` "vidur" (fitted to the named file) or "roofline" (fitted efficiencies, see
    `fit_roofline`); `vidur_file` the CSV when `source` is "vidur"; `ops` operator -> curve.
    """

    source: str
    vidur_file: str | None
    ops: dict[str, PiecewiseLinear]

    def step_curve_ms(self, num_layers: int) -> PiecewiseLinear:
        """All non-attention operators of one step: layer ops x layers + embedding + final norm (ms)."""
        parts = [self.ops[op].scaled(num_layers * mult) for op, mult in LAYER_OPS.items()]
        parts += [self.ops[op].scaled(mult) for op, mult in STEP_OPS.values()]
        return add_curves(parts)


@functools.cache
def operator_curves(model_name: str, hw_name: str, tp: int) -> OperatorCurves:
    """Fitted Vidur curves when measured for this (model, hardware, TP); else the fitted roofline."""
    model, hw = load_model(model_name), load_hardware(hw_name)
    file_name = model.vidur.get(hw_name)
    if file_name is not None:
        fitted = fit_vidur(file_name)
        if tp in fitted:
            return OperatorCurves("vidur", file_name, fitted[tp])
    return OperatorCurves("roofline", None, roofline_op_curves(model, hw, tp, fit_roofline(hw_name)))
