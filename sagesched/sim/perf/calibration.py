"""Calibration files: coefficients that adjust a performance model without editing its profiles.

Why: the shipped profiles describe a reference stack (vLLM v1 with CUDA graphs, TEI); a real deployment
(another driver, power cap, engine version) or a stack measured elsewhere (Splitwise's) differs by a few
constants. A later issue fits these files from live backends; `python -m sagesched.sim.fit --write-calibration`
writes them from the Splitwise measurements.

Schema (YAML or JSON, one flat mapping, every key optional):
  metadata   model, hardware, tensor_parallel: if given, must match what the model is loaded for
             (a file fitted for one deployment is refused for another); source, notes: free text;
             fit: how the file was fitted (residuals, cross-validation), written by `sagesched calibrate`.
  LLM        scale (x the whole step time), linear_scale (x the per-operator GEMM/elementwise time),
             attention_scale (x both attention terms), and overrides of the hardware constants
             step_overhead_s, layer_overhead_s, allreduce_latency_s, allreduce_efficiency,
             prefill_attention_efficiency, decode_attention_efficiency, seq_overhead_s (per
             sequence in a step), frontend_request_s and frontend_prompt_token_s (the serving
             frontend's cost per request and per prompt token, added to TTFT and E2E), frontend_seq_s
             (the frontend's cost per sequence running when a token is delivered),
             roofline_operator_scale (x roofline operator curves; Vidur curves are not affected).
  embedding  scale (x the whole batch time), and overrides flops_efficiency, bandwidth_efficiency,
             batch_overhead_s, per_input_overhead_s.
Unknown keys are an error naming the valid ones (a typo must not silently do nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

METADATA_KEYS: frozenset[str] = frozenset({"model", "hardware", "tensor_parallel", "source", "notes", "fit"})


@dataclass(frozen=True)
class LLMCalibration:
    """Coefficients applied to an `LLMPerfModel`; None means "keep the hardware profile's value".

    step time = scale * (linear_scale * operators + all-reduce + LM head + attention_scale * attention
    + layers * layer_overhead_s + step_overhead_s + seq_overhead_s * sequences); the frontend terms add
    frontend_request_s + frontend_prompt_token_s * prompt tokens to each request's TTFT and E2E.
    """

    scale: float = 1.0
    linear_scale: float = 1.0
    attention_scale: float = 1.0
    step_overhead_s: float | None = None
    layer_overhead_s: float | None = None
    allreduce_latency_s: float | None = None
    allreduce_efficiency: float | None = None
    prefill_attention_efficiency: float | None = None
    decode_attention_efficiency: float | None = None
    seq_overhead_s: float | None = None
    frontend_request_s: float | None = None
    frontend_prompt_token_s: float | None = None
    frontend_seq_s: float | None = None
    roofline_operator_scale: float | None = None


@dataclass(frozen=True)
class EmbeddingCalibration:
    """Coefficients applied to an `EmbeddingPerfModel`; None means "keep the hardware profile's value".

    batch time = scale * (roofline time + batch_overhead_s + per_input_overhead_s * inputs).
    """

    scale: float = 1.0
    flops_efficiency: float | None = None
    bandwidth_efficiency: float | None = None
    batch_overhead_s: float | None = None
    per_input_overhead_s: float | None = None


def read_calibration_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML/JSON calibration file; ValueError naming the file if it is not one."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"calibration file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"calibration file {p} is not valid YAML/JSON: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"calibration file {p}: expected a mapping of coefficient names to numbers")
    return data


C = TypeVar("C", LLMCalibration, EmbeddingCalibration)


def parse_calibration(data: dict[str, Any], cls: type[C], where: str, expect: dict[str, Any]) -> C:
    """Validate `data` against `cls`'s fields and the metadata in `expect`; return the calibration."""
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid - METADATA_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown calibration keys {unknown}; valid: {sorted(valid | METADATA_KEYS)}")
    for key, want in expect.items():
        if key in data and data[key] != want:
            raise ValueError(f"{where}: calibrated for {key}={data[key]!r}, but the model is loaded for {key}={want!r}")
    values: dict[str, float] = {}
    for key in valid & set(data):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: {key} must be a number, got {value!r}")
        if not math.isfinite(value):  # NaN gives NaN latencies, inf never-ending steps
            raise ValueError(f"{where}: {key} is {value}; a coefficient must be a finite number")
        if value < 0 or (key.endswith(("scale", "efficiency")) and value == 0):
            raise ValueError(f"{where}: {key} must be positive, got {value!r}")
        if key.endswith("efficiency") and value > 1:
            raise ValueError(f"{where}: {key} is a fraction of peak and must be <= 1, got {value!r}")
        values[key] = float(value)
    return cls(**values)
