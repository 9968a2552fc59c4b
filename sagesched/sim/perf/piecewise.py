"""A piecewise-linear curve that is cheap to evaluate, and its weighted least-squares fit.

Why piecewise-linear: a GEMM's time against the number of tokens is flat while it is bound by reading
the weights and grows linearly once it is bound by compute; a few hinges capture that, sum across
operators into another piecewise-linear curve, and evaluate with one bisect and two float operations
(the step time is on the simulator's hot path).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PiecewiseLinear:
    """y(x) through the points (xs[i], ys[i]), linear between them, with slope `tail_slope` past xs[-1].

    Below xs[0] the curve is held at ys[0] (no extrapolation to fewer tokens than ever measured).
    Attributes: `xs` strictly increasing breakpoints; `ys` values there; `tail_slope` slope past the last.
    """

    xs: tuple[float, ...]
    ys: tuple[float, ...]
    tail_slope: float

    def __post_init__(self) -> None:
        if len(self.xs) != len(self.ys) or not self.xs:
            raise ValueError("PiecewiseLinear needs as many ys as xs, at least one")
        if any(b <= a for a, b in zip(self.xs, self.xs[1:], strict=False)):
            raise ValueError(f"PiecewiseLinear xs must be strictly increasing, got {self.xs}")
        # Precomputed per-segment slopes, so that evaluation is one bisect and one multiply-add.
        slopes = [
            (y1 - y0) / (x1 - x0) for x0, x1, y0, y1 in zip(self.xs, self.xs[1:], self.ys, self.ys[1:], strict=False)
        ]
        object.__setattr__(self, "_slopes", (*slopes, self.tail_slope))

    @property
    def slopes(self) -> tuple[float, ...]:
        """Slope of each segment: between xs[i] and xs[i+1], and past xs[-1] (the tail) last."""
        return self._slopes  # type: ignore[attr-defined]

    def __call__(self, x: float) -> float:
        xs = self.xs
        if x <= xs[0]:
            return self.ys[0]
        i = bisect_right(xs, x) - 1
        return self.ys[i] + self._slopes[i] * (x - xs[i])  # type: ignore[attr-defined]

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """Vectorised evaluation (for fitting and reports, not the hot path)."""
        x = np.asarray(x, dtype=float)
        inner = np.interp(x, self.xs, self.ys)
        return np.where(x > self.xs[-1], self.ys[-1] + self.tail_slope * (x - self.xs[-1]), inner)

    def scaled(self, factor: float, offset: float = 0.0) -> PiecewiseLinear:
        """factor * y + offset (a calibration scale, or a constant per-step cost folded in)."""
        return PiecewiseLinear(self.xs, tuple(factor * y + offset for y in self.ys), factor * self.tail_slope)

    def monotone(self) -> PiecewiseLinear:
        """The smallest non-decreasing curve above this one at the breakpoints (noise never makes more tokens cheaper)."""
        ys = tuple(float(v) for v in np.maximum.accumulate(np.asarray(self.ys, dtype=float)))
        return PiecewiseLinear(self.xs, ys, max(0.0, self.tail_slope))


def add_curves(curves: Sequence[PiecewiseLinear]) -> PiecewiseLinear:
    """The exact sum of piecewise-linear curves (breakpoints are the union of theirs)."""
    xs = sorted({x for c in curves for x in c.xs})
    ys = [sum(c(x) for c in curves) for x in xs]
    return PiecewiseLinear(tuple(float(x) for x in xs), tuple(ys), sum(c.tail_slope for c in curves))


def fit_hinges(x: np.ndarray, y: np.ndarray, knots: Sequence[float], relative: bool = True) -> PiecewiseLinear:
    """Least-squares fit of a continuous piecewise-linear curve with breakpoints at `knots`.

    Basis: 1, x, and max(0, x - k) for each interior knot. With `relative`, rows are weighted by 1/y so
    the fit minimises relative (percentage) error, which is what matters across 1..32768 tokens.
    Knots outside the data's range are dropped. The result is made monotone (see `PiecewiseLinear.monotone`).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return PiecewiseLinear((lo,), (float(np.mean(y)),), 0.0)
    ks = sorted({float(k) for k in knots if lo < k < hi})
    cols = [np.ones_like(x), x] + [np.maximum(0.0, x - k) for k in ks]
    a = np.stack(cols, axis=1)
    w = 1.0 / np.maximum(y, 1e-12) if relative else np.ones_like(y)
    coef, *_ = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)
    pts = [lo, *ks, hi]
    vals = [
        float(coef[0] + coef[1] * p + sum(c * max(0.0, p - k) for c, k in zip(coef[2:], ks, strict=True))) for p in pts
    ]
    tail = float(coef[1] + sum(coef[2:]))
    return PiecewiseLinear(tuple(pts), tuple(vals), tail).monotone()
