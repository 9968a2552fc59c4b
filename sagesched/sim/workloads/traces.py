"""Request traces with one row per request: the Azure 2023 LLM traces and the Mooncake trace.

Both formats reduce to the same `RequestTrace`: arrival times (seconds from the first request),
prompt and output lengths, and (Mooncake only) the prompt's prefix-block hashes. Rows are kept
together so lengths can be sampled jointly: in the Azure traces prompt and output lengths are
nearly uncorrelated across the trace but not within a workload, so drawing them independently
would invent requests that never happen.

Parsing is a single pass of the `csv`/`json` modules that checks every cell as it goes, so a bad
cell is reported with its file, line and column (see `TraceFormatError`), and a parsed trace is
cached in-process keyed by (path, size, mtime): sweeps that build many workloads parse each file
once. The whole Azure conv trace parses in well under 0.1 s.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from sagesched.sim.workloads.errors import TraceFormatError, require_utf8_text

log = logging.getLogger(__name__)

TRACE_DIR = Path(__file__).resolve().parents[2] / "data" / "traces"
"""Where the shipped traces live (inside the package, so an installed wheel finds them too)."""

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per Mooncake `hash_ids` block (one id per 512-token prefix block, per the trace's docs)."""

INT64_MAX = 2**63 - 1
"""Largest token count a trace cell may hold: the parsed columns are int64 arrays."""

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")
_FIX_ROW = "fix the value or remove the row"


@dataclass(frozen=True)
class TraceSpec:
    """A shipped trace: its name in configs, its file format and its file name in `TRACE_DIR`."""

    name: str
    format: str  # "azure" | "mooncake" | "servegen"
    filename: str
    description: str


SHIPPED_TRACES: dict[str, TraceSpec] = {
    spec.name: spec
    for spec in (
        TraceSpec(
            "azure_conv",
            "azure",
            "AzureLLMInferenceTrace_conv.csv",
            "Azure LLM inference trace 2023, conversation service: 19,366 requests over ~1 h",
        ),
        TraceSpec(
            "azure_code",
            "azure",
            "AzureLLMInferenceTrace_code.csv",
            "Azure LLM inference trace 2023, code service: 8,819 requests over ~1 h, very bursty",
        ),
        TraceSpec(
            "mooncake",
            "mooncake",
            "mooncake_synthetic_trace.jsonl",
            "Mooncake (Kimi) synthetic trace: 3,993 requests with 512-token prefix-block hashes",
        ),
        TraceSpec(
            "servegen",
            "servegen",
            "servegen_m-large_chunk-1-trace.csv",
            "ServeGen m-large client 1: 14 days of 10-minute rate windows plus length distributions",
        ),
    )
}


def available_traces() -> list[str]:
    """Names accepted as `workload.trace`."""
    return sorted(SHIPPED_TRACES)


def trace_spec(name: str) -> TraceSpec:
    """The shipped trace called `name`; ValueError listing the valid names otherwise."""
    try:
        return SHIPPED_TRACES[name]
    except KeyError:
        raise ValueError(f"unknown trace {name!r}; use one of {', '.join(available_traces())}") from None


def resolve_trace_path(name: str, path: str | Path | None = None) -> Path:
    """The file to read for trace `name`: `path` if given (a file in that trace's format), else the shipped one."""
    spec = trace_spec(name)
    target = Path(path).expanduser() if path is not None else TRACE_DIR / spec.filename
    if not target.is_file():
        raise FileNotFoundError(
            f"trace file {str(target)!r} not found"
            + (f"; leave trace_path unset to use the shipped {name} trace" if path is not None else "")
        )
    return target


@dataclass(frozen=True, eq=False)
class RequestTrace:
    """Per-request rows of a trace, sorted by arrival; arrays are read-only (the object is cached and shared)."""

    name: str
    path: str
    arrival_s: np.ndarray  # float64, seconds since the first request
    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64
    prefix_hashes: tuple[tuple[int, ...], ...] | None = None  # Mooncake only, one tuple per row

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0


# -- parsing ------------------------------------------------------------------------------------


def _parse_int(text: str, path: Path, line: int, column: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise TraceFormatError(path, line, column, f"expected an integer, got {text!r}") from None
    if not 0 <= value <= INT64_MAX:
        expected = "a non-negative integer" if value < 0 else f"an integer of at most {INT64_MAX} (int64)"
        raise TraceFormatError(path, line, column, f"expected {expected}, got {text!r}; {_FIX_ROW}")
    return value


def _parse_azure_time(text: str, path: Path, line: int) -> float:
    """Seconds since the epoch (naive UTC) from an ISO date-time, or plain seconds for custom traces."""
    try:
        return (datetime.fromisoformat(text) - _EPOCH).total_seconds()
    except ValueError:
        pass
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):  # also 'nan' / 'inf', which float() accepts but no arrival time is
        raise TraceFormatError(
            path,
            line,
            "TIMESTAMP",
            f"expected a date-time like '2023-11-16 18:15:46.680590' or finite seconds, got {text!r}; {_FIX_ROW}",
        )
    return seconds


_EPOCH = datetime(1970, 1, 1)


def _sorted_trace(name, path, times, prompts, outputs, hashes=None) -> RequestTrace:
    arrival = np.asarray(times, dtype=np.float64)
    prompt = np.asarray(prompts, dtype=np.int64)
    output = np.asarray(outputs, dtype=np.int64)
    if arrival.size and np.any(np.diff(arrival) < 0):
        log.info("trace %s is not sorted by time; sorting it (stable)", path)
        order = np.argsort(arrival, kind="stable")
        arrival, prompt, output = arrival[order], prompt[order], output[order]
        if hashes is not None:
            hashes = [hashes[i] for i in order]
    if arrival.size:
        arrival = arrival - arrival[0]
    for array in (arrival, prompt, output):
        array.setflags(write=False)
    return RequestTrace(name, str(path), arrival, prompt, output, tuple(hashes) if hashes is not None else None)


def parse_azure_csv(path: Path, name: str = "azure") -> RequestTrace:
    """Parse an Azure LLM inference trace CSV (header TIMESTAMP,ContextTokens,GeneratedTokens)."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise TraceFormatError(path, 1, None, f"empty file; expected the header {','.join(AZURE_COLUMNS)}")
        header = [cell.strip() for cell in header]
        missing = [col for col in AZURE_COLUMNS if col not in header]
        if missing:
            raise TraceFormatError(
                path, 1, missing[0], f"missing from the header {header}; expected columns {', '.join(AZURE_COLUMNS)}"
            )
        i_time, i_ctx, i_gen = (header.index(col) for col in AZURE_COLUMNS)
        width = len(header)
        times: list[float] = []
        prompts: list[int] = []
        outputs: list[int] = []
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != width:
                raise TraceFormatError(
                    path, line, None, f"expected {width} fields ({','.join(header)}), got {len(row)}"
                )
            times.append(_parse_azure_time(row[i_time].strip(), path, line))
            prompts.append(_parse_int(row[i_ctx], path, line, "ContextTokens"))
            outputs.append(_parse_int(row[i_gen], path, line, "GeneratedTokens"))
    if not times:
        raise TraceFormatError(path, None, None, "no requests in the trace (only a header)")
    return _sorted_trace(name, path, times, prompts, outputs)


def _json_int(row: dict, key: str, path: Path, line: int) -> int:
    if key not in row:
        raise TraceFormatError(path, line, key, f"missing; each line needs {', '.join(MOONCAKE_FIELDS[:3])}")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
        raise TraceFormatError(
            path,
            line,
            key,
            f"expected a non-negative integer of at most {INT64_MAX} (int64), got {value!r}; {_FIX_ROW}",
        )
    return value


def parse_mooncake_jsonl(path: Path, name: str = "mooncake") -> RequestTrace:
    """Parse a Mooncake trace: one JSON object per line with timestamp (ms), lengths and hash_ids."""
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    hashes: list[tuple[int, ...]] = []
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(path, line, None, f"invalid JSON at character {exc.colno}: {exc.msg}") from None
            if not isinstance(row, dict):
                raise TraceFormatError(path, line, None, f"expected a JSON object, got {type(row).__name__}")
            stamp = row.get("timestamp")
            # The chained test also rejects NaN and Infinity (which `json` accepts) and ints past float range.
            if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not 0 <= stamp <= sys.float_info.max:
                raise TraceFormatError(
                    path, line, "timestamp", f"expected finite non-negative milliseconds, got {stamp!r}; {_FIX_ROW}"
                )
            times.append(stamp / 1000.0)
            prompts.append(_json_int(row, "input_length", path, line))
            outputs.append(_json_int(row, "output_length", path, line))
            ids = row.get("hash_ids", [])
            if not isinstance(ids, list) or not all(type(h) is int for h in ids):
                raise TraceFormatError(path, line, "hash_ids", f"expected a list of integers, got {str(ids)[:60]!r}")
            hashes.append(tuple(ids))
    if not times:
        raise TraceFormatError(path, None, None, "no requests in the trace (empty file)")
    return _sorted_trace(name, path, times, prompts, outputs, hashes)


# -- loading with an in-process cache ----------------------------------------------------------

_CACHE: dict[tuple[str, str, int, int], RequestTrace] = {}
_CACHE_LOCK = threading.Lock()
_PARSERS = {"azure": parse_azure_csv, "mooncake": parse_mooncake_jsonl}


def load_trace(name: str, path: str | Path | None = None) -> RequestTrace:
    """The per-request trace `name` (azure_conv, azure_code, mooncake), or a file of its format at `path`.

    Cached per (file, size, mtime): repeated loads are free, an edited file is parsed again.
    """
    spec = trace_spec(name)
    if spec.format not in _PARSERS:
        raise ValueError(
            f"trace {name!r} has no per-request rows (it is a {spec.format} rate trace); "
            f"per-request traces are {', '.join(n for n, s in SHIPPED_TRACES.items() if s.format in _PARSERS)}"
        )
    target = resolve_trace_path(name, path)
    stat = target.stat()
    key = (name, str(target.resolve()), stat.st_size, stat.st_mtime_ns)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached
    require_utf8_text(target)
    trace = _PARSERS[spec.format](target, name)
    log.debug("parsed trace %s: %d requests over %.0f s", target, len(trace), trace.duration_s)
    with _CACHE_LOCK:
        _CACHE[key] = trace
    return trace


def clear_trace_cache() -> None:
    """Forget parsed traces (tests; or to free memory after a large custom trace)."""
    with _CACHE_LOCK:
        _CACHE.clear()
