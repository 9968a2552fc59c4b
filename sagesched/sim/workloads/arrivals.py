"""Synthetic arrival processes: Poisson, Gamma renewal, on/off bursts and a diurnal (sinusoidal) rate.

Each function returns sorted arrival times in [start_s, end_s) (end may be infinite when `limit`
bounds the count instead) from a numpy Generator, so a seed fixes the result.

- Poisson: the memoryless baseline (inter-arrival CV 1).
- Gamma: a renewal process with a chosen CV; CV > 1 is bursty (AlpaServe-style), CV < 1 smoother
  than Poisson. Shape k = 1/CV², scale = 1/(rate k).
- Bursts: a Poisson process whose rate alternates between a base rate (off phase) and a burst
  rate (on phase) in fixed-length phases, off first: the square wave of a flash crowd.
- Diurnal: a non-homogeneous Poisson process with rate r(t) = mean (1 + A sin(2π (t + phase)/P)),
  drawn by thinning (Lewis and Shedler) a Poisson process at the peak rate.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

# -- inter-arrival families matched to a mean and a CV -----------------------------------------


@lru_cache(maxsize=4096)
def weibull_shape_for_cv(cv: float) -> float:
    """The Weibull shape k whose coefficient of variation is `cv` (bisection on a monotone function)."""
    if cv <= 0:
        raise ValueError(f"a Weibull CV must be > 0, got {cv}")
    target = math.log1p(cv * cv)

    def log_ratio(k: float) -> float:  # log(Γ(1+2/k) / Γ(1+1/k)^2), decreasing in k
        return math.lgamma(1 + 2 / k) - 2 * math.lgamma(1 + 1 / k)

    lo, hi = 0.02, 200.0
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if log_ratio(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-12:
            break
    return math.sqrt(lo * hi)


def interarrival_sampler(rate: float, cv: float, family: str = "Gamma"):
    """A function (rng, n) -> n inter-arrival gaps with mean 1/rate and the given CV.

    CV 0 gives a constant gap; Exponential ignores the CV (it is 1 by definition).
    """
    mean = 1.0 / rate
    if family == "Exponential" or cv == 1.0:
        return lambda rng, n: rng.exponential(mean, n)
    if cv <= 0:
        return lambda rng, n: np.full(n, mean)
    if family == "Weibull":
        shape = weibull_shape_for_cv(cv)
        scale = mean / math.gamma(1 + 1 / shape)
        return lambda rng, n: scale * rng.weibull(shape, n)
    shape = 1.0 / (cv * cv)
    return lambda rng, n: rng.gamma(shape, mean / shape, n)


def renewal_arrivals(
    rng: np.random.Generator,
    rate: float,
    cv: float,
    start_s: float,
    end_s: float,
    *,
    family: str = "Gamma",
    limit: int | None = None,
) -> np.ndarray:
    """Arrivals of a renewal process started at `start_s`, up to `end_s` (may be inf) or `limit` arrivals."""
    if math.isfinite(end_s):
        expected = (end_s - start_s) * rate
    elif limit is not None:
        expected = float(limit)
    else:
        raise ValueError("an unbounded arrival process needs an end time or a request limit")
    sample = interarrival_sampler(rate, cv, family)
    if limit is not None:
        expected = min(expected, float(limit))
    chunk = max(64, int(expected * 1.1 + 6 * math.sqrt(expected + 1) * max(cv, 1.0)))
    out: list[np.ndarray] = []
    now, count = start_s, 0
    while True:
        times = now + np.cumsum(sample(rng, chunk))
        keep = times[times < end_s]
        out.append(keep)
        count += len(keep)
        if len(keep) < len(times) or (limit is not None and count >= limit):
            break
        now = float(times[-1])
    result = np.concatenate(out)
    return result[:limit] if limit is not None else result


def _bounded(end_s: float, limit: int | None) -> None:
    if not math.isfinite(end_s) and limit is None:
        raise ValueError(
            "an unbounded arrival process needs an end time (duration_s) or a request limit (max_requests)"
        )


def poisson_arrivals(
    rng: np.random.Generator, rate_rps: float, start_s: float, end_s: float, limit: int | None = None
) -> np.ndarray:
    """Poisson arrivals at `rate_rps`."""
    _bounded(end_s, limit)
    return renewal_arrivals(rng, rate_rps, 1.0, start_s, end_s, family="Exponential", limit=limit)


def gamma_arrivals(
    rng: np.random.Generator, rate_rps: float, cv: float, start_s: float, end_s: float, limit: int | None = None
) -> np.ndarray:
    """Renewal arrivals with Gamma inter-arrivals of mean 1/rate and coefficient of variation `cv`."""
    _bounded(end_s, limit)
    return renewal_arrivals(rng, rate_rps, cv, start_s, end_s, family="Gamma", limit=limit)


def _piecewise_poisson(rng: np.random.Generator, edges: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Exact Poisson arrivals with rate `rates[i]` on [edges[i], edges[i+1])."""
    lengths = np.diff(edges)
    counts = rng.poisson(rates * lengths)
    segment = np.repeat(np.arange(len(lengths)), counts)
    times = edges[segment] + rng.random(segment.size) * lengths[segment]
    return np.sort(times, kind="stable")


def _in_spans(rng, start_s: float, end_s: float, limit: int | None, span_s: float, draw) -> np.ndarray:
    """Call draw(rng, lo, hi) over consecutive spans until `end_s` or `limit` arrivals."""
    _bounded(end_s, limit)
    out: list[np.ndarray] = []
    count, lo = 0, start_s
    while lo < end_s and (limit is None or count < limit):
        hi = min(lo + span_s, end_s)
        times = draw(rng, lo, hi)
        out.append(times)
        count += len(times)
        lo = hi
    result = np.concatenate(out) if out else np.zeros(0)
    return result[:limit] if limit is not None else result


def burst_arrivals(
    rng: np.random.Generator,
    base_rate_rps: float,
    burst_rate_rps: float,
    on_s: float,
    off_s: float,
    start_s: float,
    end_s: float,
    limit: int | None = None,
) -> np.ndarray:
    """Poisson arrivals at `base_rate_rps` for `off_s`, then `burst_rate_rps` for `on_s`, repeating from t=0.

    Phases are aligned to time 0 of the process clock, so a window starting mid-cycle sees the
    phase it would have seen in a longer run.
    """
    period = on_s + off_s

    def draw(rng, lo, hi):
        first = math.floor(lo / period)
        last = math.ceil(hi / period)
        cycles = np.arange(first, last + 1, dtype=np.float64) * period
        edges = np.sort(np.concatenate([cycles, cycles + off_s]))
        edges = np.unique(np.clip(edges, lo, hi))
        if len(edges) < 2:
            return np.zeros(0)
        mids = (edges[:-1] + edges[1:]) / 2
        in_burst = np.mod(mids, period) >= off_s
        rates = np.where(in_burst, burst_rate_rps, base_rate_rps)
        return _piecewise_poisson(rng, edges, rates)

    return _in_spans(rng, start_s, end_s, limit, span_s=max(period * 64, 1.0), draw=draw)


def diurnal_rate(t_s: np.ndarray | float, mean_rate_rps: float, amplitude: float, period_s: float, phase_s: float):
    """The diurnal process's instantaneous rate at `t_s`."""
    return mean_rate_rps * (1.0 + amplitude * np.sin(2.0 * np.pi * (np.asarray(t_s) + phase_s) / period_s))


def diurnal_arrivals(
    rng: np.random.Generator,
    mean_rate_rps: float,
    amplitude: float,
    period_s: float,
    phase_s: float,
    start_s: float,
    end_s: float,
    limit: int | None = None,
) -> np.ndarray:
    """Non-homogeneous Poisson arrivals with a sinusoidal rate, by thinning at the peak rate."""
    peak = mean_rate_rps * (1.0 + amplitude)

    def draw(rng, lo, hi):
        count = rng.poisson(peak * (hi - lo))
        times = np.sort(lo + rng.random(count) * (hi - lo))
        accept = rng.random(count) * peak < diurnal_rate(times, mean_rate_rps, amplitude, period_s, phase_s)
        return times[accept]

    return _in_spans(rng, start_s, end_s, limit, span_s=max(period_s, 1.0), draw=draw)
