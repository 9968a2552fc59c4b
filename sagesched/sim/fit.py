"""`python -m sagesched.sim.fit` / `sagesched fit`: how well the performance model fits the measurements.

Reports (text, or JSON with `--json`):
  vidur       per profile file and TP degree: MAPE over all measured token counts of each fitted operator
              curve against Vidur's median time, of the per-step total (sum of the operators as the model
              combines them), and of the roofline fallback's total on the same file (how far the fallback
              used for unprofiled models/GPUs is from a measurement).
  splitwise   Llama-2-70B on A100/H100 at TP 2/4/8 against Splitwise's measured prefill time (batch 1,
              prompt 128..8192) and per-token time (prompt 512, batch 1..64): the shipped model as is
              ("default"), calibrated to Splitwise (five coefficients per GPU, fitted on all TPs:
              "calibrated"), and calibrated on the other two TPs only ("heldout_tp", out of sample).
  calibration the fitted Splitwise coefficients; `--write-calibration DIR` writes them as calibration files.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy.optimize import nnls

from sagesched.sim.perf.calibration import LLMCalibration
from sagesched.sim.perf.operators import (
    LAYER_OPS,
    STEP_OPS,
    fit_roofline,
    fit_vidur,
    read_vidur,
    roofline_op_curves,
)
from sagesched.sim.perf.piecewise import PiecewiseLinear
from sagesched.sim.perf.profiles import PROFILES_DIR, available_model_profiles, load_hardware, load_model
from sagesched.sim.perf_model import BatchShape, LLMPerfModel

log = logging.getLogger(__name__)

SPLITWISE_CSV: Path = PROFILES_DIR / "splitwise" / "splitwise_perf_model.csv"
SPLITWISE_MODELS = {"llama2-70b": "llama-2-70b"}
SPLITWISE_HARDWARE = {"a100-80gb": "a100", "h100-80gb": "h100"}  # the power-capped "h100-80gb-pcap" rows are skipped
#: Splitwise rows used: prefill time vs prompt size at batch 1; per-token time vs batch size at prompt 512.
DECODE_PROMPT, DECODE_OUTPUT = 512, 128
CALIBRATED_KEYS = ("linear_scale", "attention_scale", "step_overhead_s", "allreduce_latency_s", "allreduce_efficiency")


def mape(pred: np.ndarray, meas: np.ndarray) -> float:
    """Mean absolute percentage error, in percent."""
    pred, meas = np.asarray(pred, float), np.asarray(meas, float)
    return float(100.0 * np.mean(np.abs(pred - meas) / meas))


def _summed(terms: Iterable[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """`sum(terms)` as an array (in the same order, so the same rounding), also when `terms` is empty."""
    total = np.zeros(shape)
    for term in terms:
        total = total + term
    return total


def _total_measured(table: dict[str, tuple[np.ndarray, np.ndarray]], num_layers: int) -> np.ndarray:
    shape = np.shape(next(iter(table.values()))[1])
    layers = _summed((table[op][1] * num_layers * mult for op, mult in LAYER_OPS.items()), shape)
    return layers + _summed((table[op][1] * mult for op, mult in STEP_OPS.values()), shape)


def _total_curve(curves: dict[str, PiecewiseLinear], tokens: np.ndarray, num_layers: int) -> np.ndarray:
    shape = np.shape(tokens)
    layers = _summed((curves[op].evaluate(tokens) * num_layers * mult for op, mult in LAYER_OPS.items()), shape)
    return layers + _summed((curves[op].evaluate(tokens) * mult for op, mult in STEP_OPS.values()), shape)


def vidur_report() -> list[dict[str, Any]]:
    """Fit error of the operator curves against every shipped Vidur file, per TP degree."""
    out = []
    for name in available_model_profiles("llm"):
        model = load_model(name)
        for hw_name, file_name in sorted(model.vidur.items()):
            hw, params = load_hardware(hw_name), fit_roofline(hw_name)
            fitted = fit_vidur(file_name)
            for tp, table in sorted(read_vidur(file_name).items()):
                tokens = table["emb"][0]
                measured = _total_measured(table, model.num_layers)
                roof = roofline_op_curves(model, hw, tp, params)
                out.append(
                    {
                        "file": file_name,
                        "model": name,
                        "hardware": hw_name,
                        "tensor_parallel": tp,
                        "token_counts": len(tokens),
                        "tokens_range": [int(tokens.min()), int(tokens.max())],
                        "mape_ops": {op: round(mape(fitted[tp][op].evaluate(t), y), 2) for op, (t, y) in table.items()},
                        "mape_total": round(mape(_total_curve(fitted[tp], tokens, model.num_layers), measured), 2),
                        "roofline_mape_total": round(mape(_total_curve(roof, tokens, model.num_layers), measured), 2),
                    }
                )
    return out


# ----------------------------------------------------------------------------------------------------------
# Splitwise


def splitwise_points() -> list[dict[str, Any]]:
    """Median measured times per configuration of the Splitwise rows the report uses."""
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    with SPLITWISE_CSV.open(newline="") as fh:
        for row in csv.DictReader(fh):
            model, hw = SPLITWISE_MODELS.get(row["model"]), SPLITWISE_HARDWARE.get(row["hardware"])
            if model is None or hw is None:
                continue
            key = (
                model,
                hw,
                int(row["tensor_parallel"]),
                int(row["prompt_size"]),
                int(row["batch_size"]),
                int(row["token_size"]),
            )
            groups[key].append((float(row["prompt_time"]), float(row["token_time"])))
    points = []
    for (model, hw, tp, prompt, batch, out_tokens), vals in sorted(groups.items()):
        prompt_ms = float(np.median([v[0] for v in vals]))
        token_ms = float(np.median([v[1] for v in vals]))
        base = {"model": model, "hardware": hw, "tensor_parallel": tp, "prompt_size": prompt, "batch_size": batch}
        if batch == 1 and out_tokens == DECODE_OUTPUT:
            shape = BatchShape(prefill_tokens=prompt, prefill_context_tokens=prompt, num_prefills=1)
            points.append({**base, "kind": "prefill", "measured_s": prompt_ms / 1e3, "shape": shape})
        if prompt == DECODE_PROMPT and out_tokens == DECODE_OUTPUT:
            # Mid-generation on average: each sequence holds its prompt plus half its output in KV.
            ctx = batch * (prompt + out_tokens // 2)
            shape = BatchShape(decode_tokens=batch, decode_context_tokens=ctx)
            points.append({**base, "kind": "decode", "measured_s": token_ms / 1e3, "shape": shape})
    return points


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients: scipy's Lawson-Hanson NNLS (the exact optimum, where
    dropping the most negative column and refitting can stop at a worse active set)."""
    coef, _residual = nnls(a, y)
    return coef


def fit_splitwise_calibration(points: list[dict[str, Any]]) -> dict[str, float]:
    """Fit `CALIBRATED_KEYS` to the points (one model and GPU) by relative-error weighted non-negative least squares.

    Step time = linear_scale x operators + attention_scale x attention + step_overhead_s
    + allreduce_latency_s x ring steps + all-reduce bytes / (NVLink x allreduce_efficiency)
    + LM head (kept at the profile's values).
    """
    rows, target = [], []
    for p in points:
        perf = _default_model(p["model"], p["hardware"], p["tensor_parallel"])
        c = perf.components(p["shape"])
        attention = c["prefill_attention"] + c["decode_attention"]
        rows.append([c["operators"], attention, 1.0, float(perf.allreduce_hops()), c["allreduce_bandwidth"]])
        target.append(p["measured_s"] - c["lm_head"] - c["sequence_overhead"])
    a, y = np.array(rows), np.array(target)
    w = 1.0 / np.array([p["measured_s"] for p in points])
    coef = _nnls(a * w[:, None], y * w)
    if coef[0] == 0 or coef[1] == 0 or coef[4] == 0:
        raise ValueError("splitwise calibration degenerate: an operator, attention or all-reduce scale fitted to 0")
    # The all-reduce bandwidth term scales as 1/efficiency; an efficiency above 1 is clipped (physics).
    default_eff = load_hardware(points[0]["hardware"]).allreduce_efficiency
    coef[4] = min(1.0, default_eff / coef[4])
    return dict(zip(CALIBRATED_KEYS, (float(v) for v in coef), strict=True))


_DEFAULTS: dict[tuple[str, str, int], LLMPerfModel] = {}


def _default_model(model: str, hw: str, tp: int) -> LLMPerfModel:
    key = (model, hw, tp)
    if key not in _DEFAULTS:
        _DEFAULTS[key] = LLMPerfModel.load(model, hw, tp)
    return _DEFAULTS[key]


def _calibrated(model: str, hw: str, tp: int, coef: dict[str, float]) -> LLMPerfModel:
    base = _default_model(model, hw, tp)
    return LLMPerfModel(base.model, base.hardware, tp, LLMCalibration(**coef))


def _errors(points: list[dict[str, Any]], perf_for) -> dict[str, float]:
    out = {}
    for kind in ("prefill", "decode"):
        sel = [p for p in points if p["kind"] == kind]
        pred = [perf_for(p).step_time_s(p["shape"]) for p in sel]
        out[kind] = round(mape(np.array(pred), np.array([p["measured_s"] for p in sel])), 2)
    return out


def splitwise_report() -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Per (model, GPU, TP): prefill and decode MAPE, default / calibrated / held-out-TP; and the coefficients."""
    points = splitwise_points()
    by_hw: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        by_hw[(p["model"], p["hardware"])].append(p)
    report, calibrations = [], {}
    for (model, hw), pts in sorted(by_hw.items()):
        coef = fit_splitwise_calibration(pts)
        calibrations[f"{model}/{hw}"] = coef
        for tp in sorted({p["tensor_parallel"] for p in pts}):
            mine = [p for p in pts if p["tensor_parallel"] == tp]
            held = fit_splitwise_calibration([p for p in pts if p["tensor_parallel"] != tp])
            default = _errors(mine, lambda p: _default_model(p["model"], p["hardware"], p["tensor_parallel"]))
            calibrated = _errors(
                mine, lambda p, c=coef: _calibrated(p["model"], p["hardware"], p["tensor_parallel"], c)
            )
            heldout = _errors(mine, lambda p, c=held: _calibrated(p["model"], p["hardware"], p["tensor_parallel"], c))
            report.append(
                {
                    "model": model,
                    "hardware": hw,
                    "tensor_parallel": tp,
                    "prefill_points": sum(p["kind"] == "prefill" for p in mine),
                    "decode_points": sum(p["kind"] == "decode" for p in mine),
                    "prefill_mape_default": default["prefill"],
                    "decode_mape_default": default["decode"],
                    "prefill_mape_calibrated": calibrated["prefill"],
                    "decode_mape_calibrated": calibrated["decode"],
                    "prefill_mape_heldout_tp": heldout["prefill"],
                    "decode_mape_heldout_tp": heldout["decode"],
                }
            )
    return report, calibrations


ANCHOR_CSV: Path = PROFILES_DIR / "anchors" / "tensorrt_bert_base_a100_fp16.csv"


def embedding_anchor() -> dict[str, Any]:
    """BERT-base on A100 (NVIDIA's published TensorRT FP16 latencies) against the encoder roofline.

    Fits `latency = floor + FLOPs / (peak x efficiency)` to the published table (model execution only) and
    compares the shipped `bge-base`/`a100` TEI estimate with it; the estimate is meant to sit above TensorRT
    (TEI adds server-side overheads and is not TensorRT-tuned).
    """
    from sagesched.sim.perf_model import EmbeddingPerfModel

    with ANCHOR_CSV.open(newline="") as fh:
        rows = [(int(r["seq_len"]), int(r["batch_size"]), float(r["latency_ms"]) / 1e3) for r in csv.DictReader(fh)]
    perf = EmbeddingPerfModel.load("bge-base", "a100")
    hw = perf.hardware
    flops = np.array([perf.flops(b * s, s) for s, b, _ in rows])
    meas = np.array([t for _, _, t in rows])
    a = np.stack([np.ones_like(flops), flops / hw.peak_bf16_flops], axis=1) / meas[:, None]
    (floor, inv_eff), *_ = np.linalg.lstsq(a, np.ones_like(meas), rcond=None)
    fitted = floor + inv_eff * flops / hw.peak_bf16_flops
    shipped = np.array([perf.batch_time_s(b, b * s, s) for s, b, _ in rows])
    return {
        "source": "NVIDIA/TensorRT demo/BERT README, A100 40GB, BERT-Base FP16, average latency",
        "points": len(rows),
        "tensorrt_flops_efficiency": round(float(1.0 / inv_eff), 3),
        "tensorrt_floor_ms": round(float(floor) * 1e3, 3),
        "tensorrt_fit_mape": round(mape(fitted, meas), 2),
        "shipped_tei_over_tensorrt_mean": round(float(np.mean(shipped / meas)), 3),
        "shipped_tei_over_tensorrt_min": round(float(np.min(shipped / meas)), 3),
        "shipped_tei_over_tensorrt_max": round(float(np.max(shipped / meas)), 3),
    }


def run() -> dict[str, Any]:
    """The whole report as a JSON-able dict: keys vidur, roofline, splitwise, calibration, embedding, summary."""
    vidur = vidur_report()
    splitwise, calibration = splitwise_report()
    roofline = {hw: vars(fit_roofline(hw)) for hw in sorted({r["hardware"] for r in vidur})}

    def worst(key: str, rows: list[dict[str, Any]]) -> float:
        return max(r[key] for r in rows)

    summary = {
        "vidur_mape_total_mean": round(float(np.mean([r["mape_total"] for r in vidur])), 2),
        "vidur_mape_total_max": worst("mape_total", vidur),
        "vidur_mape_op_max": max(max(r["mape_ops"].values()) for r in vidur),
        "roofline_mape_total_mean": round(float(np.mean([r["roofline_mape_total"] for r in vidur])), 2),
        "roofline_mape_total_max": worst("roofline_mape_total", vidur),
    }
    for kind in ("prefill", "decode"):
        for variant in ("default", "calibrated", "heldout_tp"):
            summary[f"splitwise_{kind}_mape_{variant}_max"] = worst(f"{kind}_mape_{variant}", splitwise)
    embedding = embedding_anchor()
    summary["embedding_tensorrt_fit_mape"] = embedding["tensorrt_fit_mape"]
    return {
        "vidur": vidur,
        "roofline": roofline,
        "splitwise": splitwise,
        "calibration": calibration,
        "embedding": embedding,
        "summary": summary,
    }


def write_calibrations(calibration: dict[str, dict[str, float]], directory: Path) -> list[Path]:
    """Write one calibration file per (model, GPU): `splitwise-<model>-<gpu>.yaml`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, coef in sorted(calibration.items()):
        model, hw = key.split("/")
        path = directory / f"splitwise-{model}-{hw}.yaml"
        doc = {
            "model": model,
            "hardware": hw,
            "source": "python -m sagesched.sim.fit --write-calibration: fitted to Splitwise's measured prefill and "
            "per-token times (splitwise_perf_model.csv, TP 2/4/8)",
            **{k: float(f"{v:.6g}") for k, v in coef.items()},
        }
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        paths.append(path)
    return paths


def _text(report: dict[str, Any]) -> str:
    lines = ["Vidur per-operator profiles: MAPE % over all measured token counts", ""]
    lines.append(f"{'file':34} {'tp':>3} {'n':>4} {'total':>7} {'worst op':>22} {'roofline':>9}")
    for r in report["vidur"]:
        op, err = max(r["mape_ops"].items(), key=lambda kv: kv[1])
        lines.append(
            f"{r['file']:34} {r['tensor_parallel']:>3} {r['token_counts']:>4} {r['mape_total']:>7.2f} "
            f"{op + ' ' + format(err, '.2f'):>22} {r['roofline_mape_total']:>9.2f}"
        )
    lines += [
        "",
        "Splitwise (Llama-2-70B): MAPE % prefill (batch 1, prompt 128..8192) / decode (prompt 512, batch 1..64)",
        "",
    ]
    lines.append(f"{'gpu':5} {'tp':>3} {'default':>15} {'calibrated':>15} {'held-out TP':>15}")
    for r in report["splitwise"]:
        cells = [
            f"{r[f'prefill_mape_{v}']:.1f} / {r[f'decode_mape_{v}']:.1f}"
            for v in ("default", "calibrated", "heldout_tp")
        ]
        lines.append(f"{r['hardware']:5} {r['tensor_parallel']:>3} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15}")
    lines += ["", "Splitwise calibration coefficients:"]
    for key, coef in report["calibration"].items():
        lines.append(f"  {key}: " + ", ".join(f"{k}={v:.4g}" for k, v in coef.items()))
    lines += ["", "Embedding anchor (BERT-base, A100, TensorRT FP16):"]
    lines += [f"  {k}: {v}" for k, v in report["embedding"].items()]
    lines += ["", "Summary:"] + [f"  {k}: {v}" for k, v in report["summary"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m sagesched.sim.fit` and `sagesched fit`."""
    parser = argparse.ArgumentParser(prog="sagesched fit", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--write-calibration", metavar="DIR", type=Path, help="write the Splitwise calibration files to DIR"
    )
    args = parser.parse_args(argv)
    report = run()
    if args.write_calibration is not None:
        for path in write_calibrations(report["calibration"], args.write_calibration):
            log.info("wrote %s", path)
    sys.stdout.write((json.dumps(report, indent=2) if args.json else _text(report)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
