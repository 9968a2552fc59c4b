"""Step-time models for llama-server on a CPU, and the calibration files that carry their coefficients.

Why a model of its own: on a CPU llama.cpp's cost is not vLLM's. Measured on the shipped Gemma 3 270M
(Q4_K_M, portable AVX2 build, 1 thread), a step costs the server loop around `llama_decode` (sampling
bookkeeping, streaming the chunks: a few ms) plus, for each of its micro-batches,
- a fixed part (graph build, threadpool hand-off) per `llama_decode` micro-batch;
- per token row of the weight GEMMs, in two prices: ggml's repacked Q4_K kernels multiply rows in
  blocks of 4 (gemm) and the rows left over one at a time (gemv), and gemv rows cost several gemm rows
  (ggml-cpu `repack.cpp`, `forward_mul_mat`: "If there are more than three rows in src1, use gemm;
  otherwise, use gemv"); so 4 decoding streams run a step *faster* than 3. The leftover 1, 2 or 3 rows
  are priced as a whole (measured not linear in their number);
- per output row (logits: the LM head over a 262k vocabulary, then sampling and streaming the token);
- per sequence in the micro-batch (attention runs per KV stream) and per (row, KV cell) pair attention
  computes (llama.cpp computes a row against all of its sequence's cells, padded, and masks the rest).

    t(step) = step_s + sum over its micro-batches of
    t(ubatch) = ubatch_s + row_block_s * 4 floor(R/4) + row_tail{R mod 4}_s + output_s * O + seq_s * S
              + kv_pair_s * P

with R rows (tokens), O output rows, S sequences, P pairs. Every coefficient is fitted by probes of the
real server (`sagesched.calibrate.llamacpp_probe`) with non-negative least squares, so the model is
non-decreasing in each feature (it is not monotone in R itself: that is the real kernel behaviour).

A calibration file (YAML, `engine: llamacpp`) holds the coefficients, the client-visible frontend cost
per request, the server settings and threads they were measured with, and how they were fitted.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from sagesched.sim.perf_model import BatchShape

#: Where probe-fitted llama.cpp calibrations ship (one file per model, CPU and thread count).
CALIBRATION_DIR = Path(__file__).resolve().parents[2] / "data" / "profiles" / "calibration" / "llamacpp"


@dataclass(frozen=True, slots=True)
class UBatch:
    """One physical micro-batch (one graph computation inside `llama_decode`).

    rows: tokens computed; outputs: rows whose logits (or, for an embedding server, pooled vectors)
    are produced; seqs: sequences (slots) in it; kv_pairs: (query, key) pairs attended;
    decode_rows / prefill_rows: rows from generating slots / from prompts; decode_pairs: the pairs of
    the decode rows (their KV lengths).
    """

    rows: int
    outputs: int
    seqs: int
    kv_pairs: float
    decode_rows: int = 0
    prefill_rows: int = 0
    decode_pairs: float = 0.0


FEATURES = (
    "step_s",
    "ubatch_s",
    "row_block_s",
    "row_tail1_s",
    "row_tail2_s",
    "row_tail3_s",
    "output_s",
    "seq_s",
    "kv_pair_s",
)


def ubatch_features(ub: UBatch, row_block: int = 4) -> tuple[float, ...]:
    """The feature vector of one micro-batch, in `FEATURES` order (the step term is 0 here).

    The rows left over after the blocks of 4 are priced by how many there are (1, 2 or 3), not per row:
    measured by server CPU time on this machine, micro-batches of 1, 2, 3 and 4 decode rows cost 46, 60,
    102 and 91 ms, so the leftover rows' cost is not linear in their number.
    """
    if ub.rows <= 0:
        return (0.0,) * len(FEATURES)
    rb, rt = divmod(ub.rows, row_block)
    tails = [0.0, 0.0, 0.0]
    if rt:
        tails[min(rt, 3) - 1] = 1.0
    return (0.0, 1.0, float(rb * row_block), *tails, float(ub.outputs), float(ub.seqs), ub.kv_pairs)


def step_features(ubatches: list[UBatch], row_block: int = 4) -> list[float]:
    """A step's features: 1 for the step (the server loop around `llama_decode`) plus its micro-batches'."""
    total = [0.0] * len(FEATURES)
    if not ubatches:
        return total
    total[0] = 1.0
    for ub in ubatches:
        for i, f in enumerate(ubatch_features(ub, row_block)):
            total[i] += f
    return total


@dataclass(frozen=True)
class CpuStepModel:
    """llama.cpp micro-batch time on one CPU for one model (see the module docstring for the terms)."""

    step_s: float = 0.0
    ubatch_s: float = 0.0
    row_block_s: float = 0.0
    row_tail1_s: float = 0.0
    row_tail2_s: float = 0.0
    row_tail3_s: float = 0.0
    output_s: float = 0.0
    seq_s: float = 0.0
    kv_pair_s: float = 0.0
    row_block: int = 4

    def __post_init__(self) -> None:
        for name in FEATURES:
            if getattr(self, name) < 0:
                raise ValueError(f"CpuStepModel.{name} must be >= 0, got {getattr(self, name)}")
        if self.row_block < 1:
            raise ValueError(f"row_block must be >= 1, got {self.row_block}")

    @cached_property  # read once per simulated step; the dataclass is frozen, so it never changes
    def coefficients(self) -> tuple[float, ...]:
        return tuple(getattr(self, n) for n in FEATURES)

    def ubatch_time_s(self, ub: UBatch) -> float:
        """One micro-batch, without the per-step term."""
        return sum(c * f for c, f in zip(self.coefficients, ubatch_features(ub, self.row_block), strict=True))

    def ubatches_time_s(self, ubatches: list[UBatch]) -> float:
        """One step: the per-step term plus its micro-batches."""
        return sum(c * f for c, f in zip(self.coefficients, step_features(ubatches, self.row_block), strict=True))


@dataclass(frozen=True)
class AffineStepModel:
    """A simpler step-time model on `BatchShape` (kept for GPU-style shapes and older calibrations):

    t = step_s + prefill_token_s x prefill tokens + decode_seq_s x decode sequences
        + context_pair_s x (query, key) pairs attended (decode context + prefill attention pairs)
    """

    step_s: float
    prefill_token_s: float
    decode_seq_s: float
    context_pair_s: float

    def step_time_s(self, b: BatchShape) -> float:
        if b.prefill_tokens + b.decode_tokens == 0:
            return 0.0
        return (
            self.step_s
            + self.prefill_token_s * b.prefill_tokens
            + self.decode_seq_s * b.decode_tokens
            + self.context_pair_s * (b.decode_context_tokens + b.prefill_attention_pairs)
        )


class CalibrationFileError(ValueError):
    """A llama.cpp calibration file is missing, unreadable or lacks a field; the message names the fix."""


@dataclass(frozen=True)
class LlamaCppCalibration:
    """What a probe calibration gives the simulator: the step model, the frontend cost, and provenance.

    `server` holds the llama-server settings the probes ran with (n_parallel, n_ctx, n_batch, n_ubatch,
    threads); a simulation should use the same ones. `fit` is the fit's report (residuals, cross-validation).
    """

    step: CpuStepModel
    frontend_request_s: float = 0.0
    model: str = ""
    hardware: str = ""
    server: dict[str, Any] | None = None
    fit: dict[str, Any] | None = None
    source: str = ""

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "engine": "llamacpp",
            "model": self.model,
            "hardware": self.hardware,
            "source": self.source,
            "server": dict(self.server or {}),
            "frontend_request_s": float(f"{self.frontend_request_s:.6g}"),
            "step": {
                f.name: float(f"{getattr(self.step, f.name):.6g}") for f in fields(self.step) if f.name in FEATURES
            },
        }
        doc["step"]["row_block"] = self.step.row_block
        if self.fit is not None:
            doc["fit"] = self.fit
        return doc

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_document(), sort_keys=False))
        return path


def parse_llamacpp_calibration(doc: Any, where: str = "calibration") -> LlamaCppCalibration:
    """Validate a calibration document (as loaded from YAML); CalibrationFileError names what is wrong."""
    if not isinstance(doc, dict):
        raise CalibrationFileError(f"{where}: expected a mapping with engine: llamacpp, got {type(doc).__name__}")
    if doc.get("engine") != "llamacpp":
        raise CalibrationFileError(
            f"{where}: engine is {doc.get('engine')!r}, expected 'llamacpp' "
            "(write one with `sagesched calibrate llamacpp` or `python -m sagesched.calibrate.live_report`)"
        )
    step = doc.get("step")
    if not isinstance(step, dict):
        raise CalibrationFileError(f"{where}: missing the 'step' mapping of CpuStepModel coefficients {FEATURES}")
    unknown = set(step) - set(FEATURES) - {"row_block"}
    if unknown:
        raise CalibrationFileError(f"{where}: unknown step coefficient(s) {sorted(unknown)}; known: {FEATURES}")
    try:
        model = CpuStepModel(
            **{k: float(v) for k, v in step.items() if k != "row_block"}, row_block=int(step.get("row_block", 4))
        )
        frontend = float(doc.get("frontend_request_s", 0.0))
    except (TypeError, ValueError) as exc:
        raise CalibrationFileError(f"{where}: {exc}") from None
    return LlamaCppCalibration(
        step=model,
        frontend_request_s=frontend,
        model=str(doc.get("model", "")),
        hardware=str(doc.get("hardware", "")),
        server=dict(doc.get("server") or {}),
        fit=doc.get("fit"),
        source=str(doc.get("source", "")),
    )


def load_llamacpp_calibration(name_or_path: str | Path) -> LlamaCppCalibration:
    """Load a calibration by path, or by the name of a shipped file in `CALIBRATION_DIR` (without .yaml)."""
    path = Path(name_or_path)
    if not path.exists():
        shipped = CALIBRATION_DIR / f"{name_or_path}.yaml"
        if not shipped.exists():
            known = sorted(p.stem for p in CALIBRATION_DIR.glob("*.yaml")) if CALIBRATION_DIR.exists() else []
            raise CalibrationFileError(
                f"llama.cpp calibration {str(name_or_path)!r}: no such file, and no shipped calibration of that "
                f"name (shipped: {known}); give a path written by `sagesched calibrate llamacpp`"
            )
        path = shipped
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CalibrationFileError(f"{path}: not valid YAML ({exc})") from None
    return parse_llamacpp_calibration(doc, str(path))
