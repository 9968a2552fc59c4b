"""Fit performance-model coefficients to measured serving runs by simulating them (scipy least squares).

Why simulate rather than fit step-time formulas directly: the runs report client-side latency
distributions, not step times. A request's TTFT and E2E depend on the batch it shares each step with,
which depends on the coefficients themselves (slower steps, more concurrent sequences). So each
candidate coefficient vector is scored by replaying the training runs through the simulator, and
`scipy.optimize.least_squares` minimises the relative errors of the per-stage statistics.

The coefficients are hardware-level (they go into a calibration file or a hardware profile); the
operator curves (Vidur's measurements or the fitted roofline) are kept as they are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import least_squares

from sagesched.calibrate.predict import model_ref, predict_run
from sagesched.calibrate.runs import STATS, MeasuredRun
from sagesched.sim.perf.calibration import LLMCalibration
from sagesched.sim.perf_model import LLMPerfModel

#: name -> (initial value, lower bound, upper bound, typical magnitude for scaling). Decode attention's
#: bandwidth efficiency is not among them: light-load runs cannot tell it from the operator scale (a
#: fit on runs of at most ~20 concurrent sequences extrapolated to 80 as saturated), so it is set to the
#: fraction of HBM bandwidth the GPU's GEMMs reach in Vidur's profiles (`anchored_coefficients`).
PARAMS: dict[str, tuple[float, float, float, float]] = {
    "frontend_request_s": (0.008, 0.0, 0.2, 0.01),
    "frontend_prompt_token_s": (5e-6, 0.0, 1e-4, 1e-5),
    "step_overhead_s": (0.0008, 0.0, 0.02, 0.001),
    "seq_overhead_s": (2e-5, 0.0, 2e-3, 5e-5),
    "frontend_seq_s": (5e-5, 0.0, 2e-3, 5e-5),
    "linear_scale": (1.0, 0.5, 1.5, 0.2),
}
#: Statistics the fit matches, with their weights (means matter most; p90s keep the tails honest).
WEIGHTS: dict[str, float] = {"e2e_mean": 1.0, "e2e_p90": 0.5, "ttft_mean": 1.0, "ttft_p90": 0.5, "itl_mean": 1.0}


@dataclass
class FitResult:
    """Fitted coefficients, the per-(run, stage, statistic) relative residuals, and what the fit cost."""

    coefficients: dict[str, float]
    residuals: dict[str, dict[str, float]]
    training_runs: list[str]
    cost: float
    evaluations: int
    wall_s: float

    def rms_relative_error(self) -> float:
        vals = [v for st in self.residuals.values() for v in st.values()]
        return float(np.sqrt(np.mean(np.square(vals)))) if vals else float("nan")


def anchored_coefficients(hardware: str) -> dict[str, float]:
    """Coefficients set from independent measurements rather than fitted to the runs: decode attention
    streams the KV cache at the HBM fraction the GPU's GEMMs reach in Vidur's operator profiles
    (0.90 on H100, `sagesched.sim.perf.operators.fit_roofline`)."""
    from sagesched.sim.perf.operators import fit_roofline

    try:
        return {"decode_attention_efficiency": round(fit_roofline(hardware).gemm_bandwidth_efficiency, 4)}
    except ValueError:  # no Vidur profile on this GPU: keep the hardware profile's value
        return {}


def perf_for(
    run: MeasuredRun, coefficients: dict[str, float], base: LLMCalibration | None = None, operators: str = "vidur"
) -> LLMPerfModel:
    """The LLM performance model of `run`'s server with `coefficients` applied over `base` (`operators`:
    see `predict.model_ref`)."""
    # The fit measures the operator scale itself (`linear_scale`), from the uncorrected curves.
    cal = replace(base or LLMCalibration(roofline_operator_scale=1.0), **coefficients)
    proto = LLMPerfModel.load(model_ref(run, operators), run.hardware, run.server.tensor_parallel)
    return LLMPerfModel(proto.model, proto.hardware, proto.tensor_parallel, cal)


def residuals_for(
    runs: list[MeasuredRun],
    coefficients: dict[str, float],
    window_s: float | None,
    warmup_s: float,
    operators: str = "vidur",
) -> dict[str, dict[str, float]]:
    """Relative error (simulated / measured - 1) of every statistic of every stage of `runs`."""
    out: dict[str, dict[str, float]] = {}
    for run in runs:
        perf = perf_for(run, coefficients, operators=operators)
        pred = predict_run(run, perf, window_s=window_s, warmup_s=warmup_s)
        for st, p in zip(run.stages, pred, strict=True):
            out[f"{run.name}/stage{st.index}"] = {k: p[k] / st.stats[k] - 1.0 for k in STATS}
    return out


def fit_runs(
    runs: list[MeasuredRun],
    window_s: float | None = 60.0,
    warmup_s: float = 10.0,
    free: tuple[str, ...] = tuple(PARAMS),
    max_nfev: int = 40,
    operators: str = "vidur",
) -> FitResult:
    """Least-squares fit of the `free` coefficients to `runs` (saturated runs are refused: their
    successes are a biased sample, see `MeasuredRun.saturated`)."""
    bad = [r.name for r in runs if r.saturated]
    if bad:
        raise ValueError(f"runs {bad} are saturated (many failed requests): leave them out of the fit")
    if not runs:
        raise ValueError("no runs to fit")
    anchored = {k: v for k, v in anchored_coefficients(runs[0].hardware).items() if k not in free}
    names = list(free)
    x0 = np.array([PARAMS[n][0] for n in names])
    lo = np.array([PARAMS[n][1] for n in names])
    hi = np.array([PARAMS[n][2] for n in names])
    scale = np.array([PARAMS[n][3] for n in names])
    w = np.sqrt(np.array([WEIGHTS[k] for k in STATS]))
    evals = 0

    def fun(z: np.ndarray) -> np.ndarray:
        nonlocal evals
        evals += 1
        coef = {**anchored, **dict(zip(names, np.clip(z * scale, lo, hi), strict=True))}
        res = residuals_for(runs, coef, window_s, warmup_s, operators)
        vec = np.concatenate([np.array([r[k] for k in STATS]) * w for r in res.values()])
        return np.nan_to_num(vec, nan=10.0)

    t = time.perf_counter()
    sol = least_squares(
        fun, x0 / scale, bounds=(lo / scale, hi / scale), diff_step=0.03, x_scale=1.0, max_nfev=max_nfev
    )
    coef = {**anchored, **{n: float(v) for n, v in zip(names, np.clip(sol.x * scale, lo, hi), strict=True)}}
    res = residuals_for(runs, coef, window_s, warmup_s, operators)
    return FitResult(coef, res, [r.name for r in runs], float(sol.cost), evals, time.perf_counter() - t)
