"""Plain CSV traces: the simplest way to bring your own workload to either driver.

Columns (a header row is required; order is free):

==============  ========  ===============================================================
column          required  meaning
==============  ========  ===============================================================
arrival_s       yes       seconds from the trace's start (non-decreasing is not required)
prompt_tokens   yes       prompt length (for embeddings: total input tokens)
output_tokens   yes       tokens to generate (0 for embeddings)
type            no        chat (default), generate or embedding
priority        no        0-4 or a name (critical, high, normal, low, background)
tenant          no        tenant name (default "default")
prefix_hashes   no        space- or semicolon-separated integers: shared prefix blocks
class           no        workload class label (reports group by it)
slo_ttft_ms, slo_tpot_ms, slo_e2e_ms   no   latency objectives
embedding_inputs                        no   inputs of an embedding request (default 1)
request_id      no        default: csv-<line>
==============  ========  ===============================================================

Use it with `workload=csv workload.trace_path=my.csv` (conf/workload/csv.yaml). A bad cell raises
`TraceFormatError` naming the file, the line and the column.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sagesched.core import SLO, Priority, Request, RequestType
from sagesched.sim.workloads.errors import TraceFormatError, require_utf8_text
from sagesched.sim.workloads.traces import INT64_MAX

REQUIRED = ("arrival_s", "prompt_tokens", "output_tokens")
OPTIONAL = (
    "type",
    "priority",
    "tenant",
    "prefix_hashes",
    "class",
    "slo_ttft_ms",
    "slo_tpot_ms",
    "slo_e2e_ms",
    "embedding_inputs",
    "request_id",
)
TYPES = {
    "chat": RequestType.LLM_CHAT,
    "llm_chat": RequestType.LLM_CHAT,
    "generate": RequestType.LLM_GENERATE,
    "llm_generate": RequestType.LLM_GENERATE,
    "completion": RequestType.LLM_GENERATE,
    "embedding": RequestType.EMBEDDING,
}


def _number(path: Path, line: int, column: str, text: str, *, integer: bool, minimum: float = 0.0) -> Any:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise TraceFormatError(path, line, column, f"expected {kind}, got {text!r}") from None
    if value != value or value < minimum:  # NaN or below the minimum
        raise TraceFormatError(path, line, column, f"must be >= {minimum:g}, got {text!r}")
    if not math.isfinite(value):
        raise TraceFormatError(path, line, column, f"must be a finite number, got {text!r}")
    if integer and value > INT64_MAX:  # too large for the records' int64 columns
        raise TraceFormatError(path, line, column, f"must be <= {INT64_MAX}, got {text!r}")
    return value


def read_csv_trace(
    path: str | Path,
    *,
    llm_model: str = "llama-2-7b",
    embedding_model: str = "bge-base",
) -> list[Request]:
    """Every row of the CSV at `path` as a `Request`, sorted by arrival (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV trace {path} not found; give workload.trace_path=PATH to an existing file")
    require_utf8_text(path)  # a binary (e.g. Parquet) or UTF-16 file: named, not a bare codec error
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark
        reader = csv.reader(handle)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise TraceFormatError(path, 1, None, "empty file; the first line must be a header") from None
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise TraceFormatError(path, 1, None, f"header lacks {', '.join(missing)}; required: {', '.join(REQUIRED)}")
        unknown = [c for c in header if c not in REQUIRED and c not in OPTIONAL]
        if unknown:
            raise TraceFormatError(path, 1, unknown[0], f"unknown column; allowed: {', '.join(REQUIRED + OPTIONAL)}")
        out: list[Request] = []
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise TraceFormatError(path, line, None, f"expected {len(header)} fields, got {len(row)}")
            cells = {h: c.strip() for h, c in zip(header, row, strict=True)}
            out.append(_request(path, line, cells, llm_model, embedding_model))
    if not out:
        raise TraceFormatError(path, None, None, "no requests in the trace (only a header); add rows below it")
    ids = [r.id for r in out]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise TraceFormatError(path, None, "request_id", f"duplicate request ids {dupes}")
    out.sort(key=lambda r: r.arrival_s)
    return out


def _request(path: Path, line: int, cells: Mapping[str, str], llm_model: str, embedding_model: str) -> Request:
    arrival = _number(path, line, "arrival_s", cells["arrival_s"], integer=False)
    prompt = _number(path, line, "prompt_tokens", cells["prompt_tokens"], integer=True)
    output = _number(path, line, "output_tokens", cells["output_tokens"], integer=True)
    type_text = (cells.get("type") or "chat").lower()
    if type_text not in TYPES:
        raise TraceFormatError(path, line, "type", f"unknown type {type_text!r}; use chat, generate or embedding")
    rtype = TYPES[type_text]
    priority = Priority.NORMAL
    if cells.get("priority"):
        try:
            priority = Priority.parse(cells["priority"])
        except ValueError as exc:
            raise TraceFormatError(path, line, "priority", str(exc)) from None
    hashes: tuple[int, ...] = ()
    if cells.get("prefix_hashes"):
        parts = cells["prefix_hashes"].replace(";", " ").split()
        hashes = tuple(_number(path, line, "prefix_hashes", p, integer=True, minimum=-(2**63)) for p in parts)
    slo = SLO(
        **{
            name[4:]: _number(path, line, name, cells[name], integer=False)
            for name in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2e_ms")
            if cells.get(name)
        }
    )
    rid = cells.get("request_id") or f"csv-{line}"
    tags = {"class": cells["class"]} if cells.get("class") else {}
    tenant = cells.get("tenant") or "default"
    if rtype is RequestType.EMBEDDING:
        inputs = _number(path, line, "embedding_inputs", cells.get("embedding_inputs") or "1", integer=True, minimum=1)
        return Request(
            id=rid, type=rtype, model=embedding_model, arrival_s=arrival, prompt_tokens=prompt,
            embedding_inputs=inputs, embedding_tokens=prompt, priority=priority, tenant=tenant, slo=slo,
            output_tokens=0, tags=tags,
        )  # fmt: skip
    if output < 1:
        raise TraceFormatError(path, line, "output_tokens", "an LLM request needs output_tokens >= 1")
    return Request(
        id=rid, type=rtype, model=llm_model, arrival_s=arrival, prompt_tokens=prompt, max_tokens=output,
        priority=priority, tenant=tenant, slo=slo, output_tokens=output, prefix_hashes=hashes, tags=tags,
    )  # fmt: skip


def build_csv_workload(workload: Mapping[str, Any]) -> list[Request]:
    """`workload.trace: csv`: read `trace_path`, keep the [start_s, start_s + duration_s) window,
    compress arrivals by `rate_scale`, cap at `max_requests`; arrivals restart at 0."""
    known = {
        "trace",
        "trace_path",
        "rate_scale",
        "start_s",
        "duration_s",
        "max_requests",
        "llm_model",
        "embedding_model",
    }
    unknown = sorted(set(workload) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for a CSV workload (trace: csv); valid: {', '.join(sorted(known))}")
    if not workload.get("trace_path"):
        raise ValueError(
            "a CSV workload needs workload.trace_path=PATH (columns: arrival_s,prompt_tokens,output_tokens,...)"
        )
    rate = _setting(workload, "rate_scale", above=0.0) or 1.0
    start = _setting(workload, "start_s", at_least=0.0) or 0.0
    duration = _setting(workload, "duration_s", above=0.0)
    max_requests = _setting(workload, "max_requests", at_least=1.0, whole=True)
    requests = read_csv_trace(
        workload["trace_path"],
        llm_model=str(workload.get("llm_model") or "llama-2-7b"),
        embedding_model=str(workload.get("embedding_model") or "bge-base"),
    )
    end = float("inf") if duration is None else start + duration
    window = [r for r in requests if start <= r.arrival_s < end]
    if max_requests is not None:
        window = window[: int(max_requests)]
    return [dataclasses.replace(r, arrival_s=(r.arrival_s - start) / rate) for r in window]


def _setting(
    workload: Mapping[str, Any],
    key: str,
    *,
    above: float | None = None,
    at_least: float | None = None,
    whole: bool = False,
) -> float | None:
    """`workload.<key>` as a number checked against its bound; None when unset (null)."""
    value = workload.get(key)
    if value is None:
        return None
    kind = "a whole number" if whole else "a number"
    bound = f"> {above:g}" if above is not None else f">= {at_least:g}"
    if isinstance(value, bool) or not isinstance(value, int | float) or (whole and not float(value).is_integer()):
        raise ValueError(f"workload.{key} must be {kind} {bound}, got {value!r}")
    if (
        not math.isfinite(value)
        or (above is not None and value <= above)
        or (at_least is not None and value < at_least)
    ):
        raise ValueError(f"workload.{key} must be {kind} {bound}, got {value!r}")
    return float(value)
