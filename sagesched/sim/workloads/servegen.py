"""ServeGen client traces: request rates per 10-minute window, and length distributions.

ServeGen (Alibaba, 2025) publishes production workloads as per-client summaries rather than
request logs. For each client a CSV gives, per window, the mean rate (requests/s), the
inter-arrival coefficient of variation and the family fitted to the inter-arrivals (Gamma or
Weibull); a JSON gives, per (coarser) window, the probability of each input and output length.

We regenerate requests from those summaries: inside each window, a renewal process whose
inter-arrival times have the window's mean (1/rate) and CV, drawn from the window's family with
its parameters matched to those two moments (the fitted parameters in the CSV are in ServeGen's
own normalisation; mean and CV are what the load depends on). Input and output lengths are drawn
from the distributions of the latest length window at or before the arrival (ServeGen publishes
them as separate marginals, so they are drawn independently).

CSV columns (no header): window_start_s, rate_rps, cv, pattern, param1, param2; an empty pattern
marks a window without traffic. JSON: {window_start_s: {"input_tokens": "{len: prob, ...}",
"output_tokens": "{...}"}}, the inner distributions being Python-style dict literals.
"""

from __future__ import annotations

import csv
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sagesched.sim.workloads.arrivals import renewal_arrivals
from sagesched.sim.workloads.errors import TraceFormatError, require_utf8_text
from sagesched.sim.workloads.traces import resolve_trace_path

SERVEGEN_COLUMNS = ("window_start_s", "rate_rps", "cv", "pattern", "param1", "param2")
SERVEGEN_PATTERNS = ("Gamma", "Weibull", "Exponential")
LENGTH_FIELDS = ("input_tokens", "output_tokens")


@dataclass(frozen=True, eq=False)
class LengthPmf:
    """A discrete length distribution: values and their cumulative probabilities."""

    values: np.ndarray  # int64, increasing
    cdf: np.ndarray  # float64, last entry 1.0

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        index = np.searchsorted(self.cdf, rng.random(size), side="right")
        return self.values[np.minimum(index, len(self.values) - 1)]

    @property
    def mean(self) -> float:
        probs = np.diff(self.cdf, prepend=0.0)
        return float(np.dot(self.values, probs))


@dataclass(frozen=True, eq=False)
class ServeGenTrace:
    """One ServeGen client: rate windows and length-distribution windows, both sorted by start time."""

    path: str
    window_start_s: np.ndarray  # float64
    window_end_s: np.ndarray  # float64 (the next window's start; the last one as long as the one before)
    rate_rps: np.ndarray  # float64, 0 for idle windows
    cv: np.ndarray  # float64
    pattern: tuple[str, ...]  # "" for idle windows
    length_window_s: np.ndarray  # float64 start of each length window (empty ones skipped)
    input_pmfs: tuple[LengthPmf, ...]
    output_pmfs: tuple[LengthPmf, ...]

    @property
    def duration_s(self) -> float:
        return float(self.window_end_s[-1]) if len(self.window_end_s) else 0.0

    def expected_requests(self, start_s: float = 0.0, end_s: float = math.inf) -> float:
        """Mean number of arrivals in [start_s, end_s) on the trace's clock."""
        lo = np.clip(self.window_start_s, start_s, end_s)
        hi = np.clip(self.window_end_s, start_s, end_s)
        return float(np.sum(self.rate_rps * (hi - lo)))

    def length_window(self, times_s: np.ndarray) -> np.ndarray:
        """Index of the length window for each time (the latest at or before it; the first if none)."""
        index = np.searchsorted(self.length_window_s, times_s, side="right") - 1
        return np.maximum(index, 0)

    def sample_lengths(self, rng: np.random.Generator, times_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input, output) token counts for requests arriving at `times_s` (trace clock)."""
        windows = self.length_window(times_s)
        inputs = np.zeros(len(times_s), dtype=np.int64)
        outputs = np.zeros(len(times_s), dtype=np.int64)
        for w in np.unique(windows):
            mask = windows == w
            count = int(mask.sum())
            inputs[mask] = self.input_pmfs[w].sample(rng, count)
            outputs[mask] = self.output_pmfs[w].sample(rng, count)
        return inputs, outputs

    def arrivals(self, rng: np.random.Generator, start_s: float, end_s: float, limit: int | None = None) -> np.ndarray:
        """Arrival times in [start_s, end_s) on the trace clock, window by window, at most `limit`."""
        chunks: list[np.ndarray] = []
        total = 0
        for i in range(len(self.window_start_s)):
            lo = max(float(self.window_start_s[i]), start_s)
            hi = min(float(self.window_end_s[i]), end_s)
            rate = float(self.rate_rps[i])
            if hi <= lo or rate <= 0 or not self.pattern[i]:
                continue
            times = renewal_arrivals(rng, rate, float(self.cv[i]), lo, hi, family=self.pattern[i])
            chunks.append(times)
            total += len(times)
            if limit is not None and total >= limit:
                break
        out = np.concatenate(chunks) if chunks else np.zeros(0)
        return out[:limit] if limit is not None else out


# -- parsing -----------------------------------------------------------------------------------


def _float_cell(text: str, path: Path, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceFormatError(path, line, column, f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise TraceFormatError(path, line, column, f"expected a finite non-negative number, got {text!r}")
    return value


def _parse_rates(path: Path):
    starts: list[float] = []
    rates: list[float] = []
    cvs: list[float] = []
    patterns: list[str] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(SERVEGEN_COLUMNS):
                raise TraceFormatError(
                    path,
                    line,
                    None,
                    f"expected {len(SERVEGEN_COLUMNS)} fields ({','.join(SERVEGEN_COLUMNS)}), got {len(row)}",
                )
            start = _float_cell(row[0], path, line, "window_start_s")
            if starts and start <= starts[-1]:
                raise TraceFormatError(
                    path, line, "window_start_s", f"windows must increase; {row[0]} after {starts[-1]:g}"
                )
            pattern = row[3].strip()
            if pattern and pattern not in SERVEGEN_PATTERNS:
                raise TraceFormatError(
                    path,
                    line,
                    "pattern",
                    f"unknown arrival pattern {pattern!r}; use {', '.join(SERVEGEN_PATTERNS)} or empty",
                )
            starts.append(start)
            rates.append(_float_cell(row[1], path, line, "rate_rps"))
            cvs.append(_float_cell(row[2], path, line, "cv"))
            patterns.append(pattern)
            for column, text in zip(SERVEGEN_COLUMNS[4:], row[4:], strict=True):
                _float_cell(text, path, line, column)
    if not starts:
        raise TraceFormatError(path, None, None, "no rate windows in the file")
    return starts, rates, cvs, patterns


def _line_of(text: str, needle: str) -> int | None:
    pos = text.find(needle)
    return None if pos < 0 else text.count("\n", 0, pos) + 1


def _field_line(text: str, key: str, field: str) -> int | None:
    start = text.find(f'"{key}"')
    pos = text.find(f'"{field}"', max(start, 0))
    return None if start < 0 or pos < 0 else text.count("\n", 0, pos) + 1


def _parse_pmf(literal: str, path: Path, line: int | None, column: str) -> LengthPmf | None:
    """Parse "{143: 0.0001, 148: 0.0002}" (ServeGen's encoding); None for an empty distribution."""
    body = literal.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise TraceFormatError(path, line, column, f"expected '{{length: probability, ...}}', got {body[:40]!r}")
    body = body[1:-1].strip()
    if not body:
        return None
    values, probs = [], []
    for item in body.split(","):
        key, sep, value = item.partition(":")
        try:
            if not sep:
                raise ValueError
            length, prob = int(key), float(value)
        except ValueError:
            raise TraceFormatError(
                path, line, column, f"expected 'length: probability', got {item.strip()[:40]!r}"
            ) from None
        if length < 0 or not (prob >= 0 and math.isfinite(prob)):
            raise TraceFormatError(path, line, column, f"negative or invalid entry {item.strip()[:40]!r}")
        values.append(length)
        probs.append(prob)
    order = np.argsort(values, kind="stable")
    vals = np.asarray(values, dtype=np.int64)[order]
    p = np.asarray(probs, dtype=np.float64)[order]
    total = p.sum()
    if total <= 0:
        raise TraceFormatError(path, line, column, "probabilities sum to 0")
    cdf = np.cumsum(p / total)
    cdf[-1] = 1.0
    return LengthPmf(vals, cdf)


def _parse_lengths(path: Path):
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(path, exc.lineno, None, f"invalid JSON at character {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise TraceFormatError(path, 1, None, "expected a JSON object {window_start_s: {input_tokens, output_tokens}}")
    windows = []
    for key, fields in data.items():
        # Line numbers are only computed on the error path: scanning the text per window is slow.
        try:
            start = float(key)
        except ValueError:
            raise TraceFormatError(
                path, _line_of(text, f'"{key}"'), "window_start_s", f"expected a number as the key, got {key!r}"
            ) from None
        if not isinstance(fields, dict):
            raise TraceFormatError(
                path,
                _line_of(text, f'"{key}"'),
                None,
                f"window {key}: expected an object with {', '.join(LENGTH_FIELDS)}",
            )
        pmfs = []
        for name in LENGTH_FIELDS:
            if name not in fields or not isinstance(fields[name], str):
                raise TraceFormatError(path, _line_of(text, f'"{key}"'), name, f"window {key}: missing or not a string")
            try:
                pmfs.append(_parse_pmf(fields[name], path, None, name))
            except TraceFormatError as exc:
                raise TraceFormatError(
                    path, _field_line(text, key, name), name, f"window {key}: {exc.detail}"
                ) from None
        if pmfs[0] is None or pmfs[1] is None:
            continue  # ServeGen's convention: a window without data reuses the previous one
        windows.append((start, pmfs[0], pmfs[1]))
    if not windows:
        raise TraceFormatError(path, None, None, "no non-empty length windows")
    windows.sort(key=lambda w: w[0])
    return windows


def lengths_path_for(rates_path: Path) -> Path:
    """ServeGen pairs `<name>-trace.csv` with `<name>-dataset.json` in the same folder."""
    name = rates_path.name
    if not name.endswith("-trace.csv"):
        raise ValueError(
            f"a ServeGen rate file must be named '<client>-trace.csv' beside '<client>-dataset.json', got {name!r}"
        )
    return rates_path.with_name(name[: -len("-trace.csv")] + "-dataset.json")


_CACHE: dict[tuple, ServeGenTrace] = {}
_LOCK = threading.Lock()


def load_servegen(path: str | Path | None = None) -> ServeGenTrace:
    """The shipped ServeGen client (or the `<client>-trace.csv` at `path` and its `-dataset.json`), cached."""
    rates_path = resolve_trace_path("servegen", path)
    length_path = lengths_path_for(rates_path)
    if not length_path.is_file():
        raise FileNotFoundError(f"ServeGen length file {str(length_path)!r} not found beside {str(rates_path)!r}")
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in (rates_path, length_path))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    require_utf8_text(rates_path)
    require_utf8_text(length_path)
    starts, rates, cvs, patterns = _parse_rates(rates_path)
    windows = _parse_lengths(length_path)
    start = np.asarray(starts, dtype=np.float64)
    last = start[-1] - start[-2] if len(start) > 1 else 600.0
    end = np.append(start[1:], start[-1] + last)
    trace = ServeGenTrace(
        path=str(rates_path),
        window_start_s=start,
        window_end_s=end,
        rate_rps=np.asarray(rates, dtype=np.float64),
        cv=np.asarray(cvs, dtype=np.float64),
        pattern=tuple(patterns),
        length_window_s=np.asarray([w[0] for w in windows], dtype=np.float64),
        input_pmfs=tuple(w[1] for w in windows),
        output_pmfs=tuple(w[2] for w in windows),
    )
    with _LOCK:
        _CACHE[key] = trace
    return trace
