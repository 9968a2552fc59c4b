"""The field's benchmark formats, in and out, so `compare` and reports work on any tool's results.

Import (into a run folder: `requests.parquet` in the simulator's schema where the format carries
per-request data, and `summary.json` with our summary keys):

- `vllm-bench`: `vllm bench serve --save-result --save-detailed` JSON. Per request it carries
  input/output lengths, TTFT (s), inter-token latencies (s) and the error text; it does not carry
  send times, so every request's `arrival_s` is 0 unless the file has `start_times`, and rates
  use the file's `duration`.
- `aiperf`: AIPerf `profile_export.jsonl`, one record per line: `metadata.request_start_ns` (the
  arrival), `metrics.time_to_first_token` / `request_latency` (ms), input/output lengths, `error`.
- `inference-perf`: kubernetes-sigs inference-perf lifecycle reports
  (`summary_lifecycle_metrics.json`, `stage_N_lifecycle_metrics.json`, or a results folder). These
  are distributions, not per-request data, so only `summary.json` is written (percentiles in ms,
  send lateness from `schedule_delay`).

Export a run folder as a `vllm bench serve` result JSON (with the detailed per-request arrays) or
as an inference-perf-style lifecycle summary.

A malformed file raises `ResultFormatError` naming the file, the line and the column or field.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sagesched.core import Outcome, RequestRecord
from sagesched.sim.workloads.errors import TraceFormatError

IMPORTERS = ("vllm-bench", "aiperf", "inference-perf")
EXPORTERS = ("vllm-bench", "inference-perf")
IP_PERCENTILES = (("p0.1", 0.1), ("p1", 1), ("p5", 5), ("p10", 10), ("p25", 25), ("median", 50), ("p75", 75),
                  ("p90", 90), ("p95", 95), ("p99", 99), ("p99.9", 99.9))  # fmt: skip


class ResultFormatError(TraceFormatError):
    """A benchmark result file that cannot be read; `path`, `line` and `column` say where."""


def _load_json(path: Path) -> tuple[Any, str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text), text
    except json.JSONDecodeError as exc:
        raise ResultFormatError(path, exc.lineno, str(exc.colno), f"not valid JSON: {exc.msg}") from None


def _read_run(folder: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """A run folder's summary (a JSON object) and per-request records, for the exporters."""
    summary, _ = _load_json(folder / "summary.json")
    if not isinstance(summary, dict):
        raise ResultFormatError(folder / "summary.json", 1, None, "expected a JSON object (a run's summary)")
    return summary, pd.read_parquet(folder / "requests.parquet")


def _line_of(text: str, key: str) -> int | None:
    """The 1-based line where `"key"` first appears in a JSON text (for error messages)."""
    at = text.find(f'"{key}"')
    return None if at < 0 else text.count("\n", 0, at) + 1


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# -- vllm bench serve ------------------------------------------------------------------------------
def read_vllm_bench(path: str | Path) -> tuple[list[RequestRecord], dict[str, Any]]:
    """Per-request records and the file's own fields from a `vllm bench serve --save-detailed` JSON."""
    path = Path(path)
    data, text = _load_json(path)
    if not isinstance(data, dict):
        raise ResultFormatError(path, 1, None, "expected a JSON object (vllm bench serve --save-result output)")
    arrays = {}
    for key in ("input_lens", "output_lens", "ttfts", "itls", "errors"):
        value = data.get(key)
        if not isinstance(value, list):
            raise ResultFormatError(
                path, _line_of(text, key), key,
                "missing or not a list; save the result with `vllm bench serve --save-result --save-detailed`",
            )  # fmt: skip
        arrays[key] = value
    n = len(arrays["input_lens"])
    for key, value in arrays.items():
        if len(value) != n:
            raise ResultFormatError(path, _line_of(text, key), key, f"has {len(value)} entries, input_lens has {n}")
    starts = data.get("start_times") if isinstance(data.get("start_times"), list) else None
    ids = data.get("request_ids") if isinstance(data.get("request_ids"), list) else None  # our exports carry them
    chat = "chat" in str(data.get("backend", "")) or "chat" in str(data.get("endpoint_type", ""))
    model = str(data.get("model_id") or "unknown")
    records = []
    for i in range(n):
        error = arrays["errors"][i]
        ttft = _number(arrays["ttfts"][i])
        itl = arrays["itls"][i] if isinstance(arrays["itls"][i], list) else []
        prompt, output = arrays["input_lens"][i], arrays["output_lens"][i]
        if not isinstance(prompt, int) or not isinstance(output, int):
            raise ResultFormatError(
                path, _line_of(text, "input_lens"), f"input_lens/output_lens[{i}]", "must be integers"
            )
        arrival = float(starts[i]) - float(starts[0]) if starts else 0.0
        record = RequestRecord(
            request_id=str(ids[i]) if ids else str(i), type="llm_chat" if chat else "llm_generate", model=model, priority=2,
            tenant="default", arrival_s=arrival, prompt_tokens=prompt, max_tokens=output, output_tokens=output,
        )  # fmt: skip
        if error or ttft is None or (ttft == 0 and output == 0):
            record.outcome = Outcome.FAILED.value
            record.reason = f"vllm-bench: {error or 'no first token'}"
            record.output_tokens = 0
        else:
            record.dispatch_s = arrival
            record.first_token_s = arrival + ttft
            record.finish_s = record.first_token_s + sum(float(x) for x in itl if _number(x) is not None)
        records.append(record)
    meta = {k: v for k, v in data.items() if not isinstance(v, list)}
    return records, meta


def write_vllm_bench(run: str | Path) -> dict[str, Any]:
    """A run folder as a `vllm bench serve` result JSON (summary fields plus the detailed arrays).

    sagesched does not keep each token's time, so `itls` per request are empty and the ITL
    statistics are the per-request mean TPOT's (said in `sagesched_note`); generated texts are not
    kept either (empty strings).
    """
    folder = Path(run)
    summary, records = _read_run(folder)
    llm = records[records["type"] != "embedding"]
    done = llm[llm["outcome"] == Outcome.COMPLETED.value]
    duration = summary.get("duration_s") or 1.0
    out: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S"),
        "backend": f"sagesched-{summary.get('driver', 'sim')}",
        "label": summary.get("label"),
        "model_id": str(llm["model"].iloc[0]) if len(llm) else None,
        "num_prompts": len(llm),
        "request_rate": summary.get("offered_rps"),
        "duration": duration,
        "completed": len(done),
        "failed": len(llm) - len(done),
        "total_input_tokens": int(done["prompt_tokens"].sum()),
        "total_output_tokens": int(done["output_tokens"].sum()),
        "request_throughput": len(done) / duration,
        "request_goodput": float(done["slo_met"].sum()) / duration,
        "output_throughput": float(done["output_tokens"].sum()) / duration,
        "total_token_throughput": float(done["prompt_tokens"].sum() + done["output_tokens"].sum()) / duration,
    }
    for name, column in (("ttft", "ttft_ms"), ("tpot", "tpot_ms"), ("itl", "tpot_ms"), ("e2el", "e2e_ms")):
        values = done[column].dropna().to_numpy(dtype=float)
        out[f"mean_{name}_ms"] = float(values.mean()) if len(values) else None
        out[f"median_{name}_ms"] = float(np.median(values)) if len(values) else None
        out[f"std_{name}_ms"] = float(values.std()) if len(values) else None
        for q in (90, 99):
            out[f"p{q}_{name}_ms"] = float(np.percentile(values, q)) if len(values) else None
    completed = llm["outcome"] == Outcome.COMPLETED.value
    out["input_lens"] = llm["prompt_tokens"].astype(int).tolist()
    out["output_lens"] = llm["output_tokens"].where(completed, 0).astype(int).tolist()
    out["ttfts"] = [None if math.isnan(v) else v / 1000.0 for v in llm["ttft_ms"].astype(float)]
    out["itls"] = [[] for _ in range(len(llm))]
    out["start_times"] = llm["arrival_s"].astype(float).tolist()
    out["request_ids"] = llm["request_id"].astype(str).tolist()
    out["generated_texts"] = ["" for _ in range(len(llm))]
    out["errors"] = ["" if ok else str(reason) for ok, reason in zip(completed, llm["reason"], strict=True)]
    out["sagesched_note"] = "itls not recorded (per-token times are not kept): ITL stats are per-request mean TPOT"
    return out


# -- AIPerf ------------------------------------------------------------------------------------------
def _metric(path: Path, line: int, metrics: dict[str, Any], name: str, unit_scale: dict[str, float]) -> float | None:
    entry = metrics.get(name)
    if entry is None:
        return None
    if not isinstance(entry, dict) or "value" not in entry:
        raise ResultFormatError(path, line, f"metrics.{name}", 'expected {"value": ..., "unit": ...}')
    value = _number(entry["value"])
    if value is None:
        raise ResultFormatError(path, line, f"metrics.{name}.value", f"expected a number, got {entry['value']!r}")
    unit = str(entry.get("unit", ""))
    if unit not in unit_scale:
        raise ResultFormatError(
            path, line, f"metrics.{name}.unit", f"unknown unit {unit!r}; expected {sorted(unit_scale)}"
        )
    return value * unit_scale[unit]


def read_aiperf(path: str | Path) -> tuple[list[RequestRecord], dict[str, Any]]:
    """Per-request records from an AIPerf `profile_export.jsonl` (times relative to the first start)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    ms = {"ms": 1.0, "sec": 1000.0, "s": 1000.0, "ns": 1e-6, "us": 1e-3}
    tokens = {"tokens": 1.0, "": 1.0}
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ResultFormatError(path, line_no, str(exc.colno), f"not valid JSON: {exc.msg}") from None
            meta = data.get("metadata") if isinstance(data, dict) else None
            if not isinstance(meta, dict):
                raise ResultFormatError(path, line_no, "metadata", "missing; is this AIPerf's profile_export.jsonl?")
            start = meta.get("request_start_ns")
            if not isinstance(start, int):
                raise ResultFormatError(
                    path, line_no, "metadata.request_start_ns", f"expected integer ns, got {start!r}"
                )
            metrics = data.get("metrics") or {}
            if not isinstance(metrics, dict):
                raise ResultFormatError(path, line_no, "metrics", "expected an object")
            rid = str(meta.get("x_request_id") or meta.get("session_num") or line_no)
            rows.append(
                (
                    rid,
                    start,
                    _metric(path, line_no, metrics, "time_to_first_token", ms),
                    _metric(path, line_no, metrics, "request_latency", ms),
                    _metric(path, line_no, metrics, "input_sequence_length", tokens)
                    or _metric(path, line_no, metrics, "error_isl", tokens),
                    _metric(path, line_no, metrics, "output_sequence_length", tokens)
                    or _metric(path, line_no, metrics, "output_token_count", tokens),
                    data.get("error"),
                    bool(meta.get("was_cancelled")),
                )
            )
    if not rows:
        raise ResultFormatError(path, None, None, "no records; the file is empty")
    t0 = min(r[1] for r in rows)
    records = []
    for rid, start, ttft, latency, isl, osl, error, cancelled in rows:
        arrival = (start - t0) / 1e9
        record = RequestRecord(
            request_id=rid, type="llm_chat", model="unknown", priority=2, tenant="default", arrival_s=arrival,
            prompt_tokens=int(isl or 0), max_tokens=int(osl or 0), output_tokens=int(osl or 0), dispatch_s=arrival,
        )  # fmt: skip
        if error or cancelled or latency is None:
            record.outcome = Outcome.FAILED.value
            detail = error if isinstance(error, dict) else {}
            record.reason = (
                f"aiperf: {detail.get('code', '')} {detail.get('type', '')}: {detail.get('message', '')}".strip()
                if detail
                else "aiperf: cancelled"
            )
            record.output_tokens = 0
        else:
            record.first_token_s = None if ttft is None else arrival + ttft / 1000.0
            record.finish_s = arrival + latency / 1000.0
        records.append(record)
    return records, {"records": len(records)}


# -- inference-perf ----------------------------------------------------------------------------------
def _dist_ms(path: Path, text: str, block: Any, name: str, scale: float = 1000.0) -> dict[str, float | None]:
    if not isinstance(block, dict):
        raise ResultFormatError(
            path, _line_of(text, name), name, "expected a distribution object (mean, median, p99, ...)"
        )
    out = {}
    for key, q in (("median", 50), ("p90", 90), ("p99", 99)):
        v = _number(block.get(key))
        out[f"p{q}"] = None if v is None else v * scale
    v = _number(block.get("mean"))
    out["mean"] = None if v is None else v * scale
    return out


def read_inference_perf(path: str | Path) -> dict[str, Any]:
    """Our summary keys from an inference-perf lifecycle report (a file, or a folder holding
    `summary_lifecycle_metrics.json`); no per-request data exists in this format."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "summary_lifecycle_metrics.json", path / "results" / "summary_lifecycle_metrics.json"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise FileNotFoundError(f"{path} holds no summary_lifecycle_metrics.json (nor results/ with one)")
    data, text = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("successes"), dict):
        raise ResultFormatError(
            path, _line_of(text, "successes") or 1, "successes", "missing; not an inference-perf lifecycle report"
        )
    ok = data["successes"]
    failures = data.get("failures") or {}
    load = data.get("load_summary") or {}
    latency = ok.get("latency")
    if not isinstance(latency, dict):
        raise ResultFormatError(path, _line_of(text, "latency"), "successes.latency", "missing or not an object")
    completed = int(ok.get("count") or 0)
    failed = int(failures.get("count") or 0) if isinstance(failures, dict) else 0
    summary: dict[str, Any] = {
        "driver": "import",
        "requests": completed + failed,
        "completed": completed,
        "rejected": 0,
        "failed": failed,
    }
    for ours, theirs in (
        ("ttft", "time_to_first_token"),
        ("tpot", "time_per_output_token"),
        ("e2e", "request_latency"),
    ):
        if theirs in latency:
            for key, value in _dist_ms(path, text, latency[theirs], theirs).items():
                summary[f"{ours}_{key}_ms"] = value
    if isinstance(load.get("schedule_delay"), dict):
        delay = _dist_ms(path, text, load["schedule_delay"], "schedule_delay")
        summary["send_lateness_p50_ms"], summary["send_lateness_p99_ms"] = delay["p50"], delay["p99"]
    throughput = ok.get("throughput") or {}
    summary["throughput_rps"] = _number(throughput.get("requests_per_sec"))
    summary["throughput_tokens_per_s"] = _number(throughput.get("output_tokens_per_sec"))
    summary["offered_rps"] = _number(load.get("requested_rate"))
    summary["duration_s"] = _number(load.get("send_duration"))
    prompt = ok.get("prompt_len") or {}
    output = ok.get("output_len") or {}
    summary["prompt_tokens_mean"] = _number(prompt.get("mean")) if isinstance(prompt, dict) else None
    summary["output_tokens_mean"] = _number(output.get("mean")) if isinstance(output, dict) else None
    summary["source"] = {"format": "inference-perf", "path": str(path), "per_request": False}
    return summary


def _ip_dist(values: np.ndarray, scale: float = 1.0) -> dict[str, float] | None:
    if not len(values):
        return None
    v = values.astype(float) * scale
    out = {"mean": float(v.mean()), "min": float(v.min())}
    out.update({name: float(np.percentile(v, q)) for name, q in IP_PERCENTILES})
    out["max"] = float(v.max())
    return out


def write_inference_perf(run: str | Path) -> dict[str, Any]:
    """A run folder as an inference-perf-style lifecycle summary (seconds, inference-perf's keys)."""
    folder = Path(run)
    summary, records = _read_run(folder)
    llm = records[records["type"] != "embedding"]
    done = llm[llm["outcome"] == Outcome.COMPLETED.value]
    bad = llm[llm["outcome"] != Outcome.COMPLETED.value]
    duration = summary.get("duration_s") or 1.0
    live_path = folder / "live.parquet"
    lateness = (
        pd.read_parquet(live_path)["send_lateness_ms"].dropna().to_numpy() if live_path.is_file() else np.array([])
    )
    normalized = (done["e2e_ms"] / done["output_tokens"].clip(lower=1)).to_numpy()
    return {
        "load_summary": {
            "count": len(llm),
            "schedule_delay": _ip_dist(lateness, 1e-3),
            "send_duration": float(llm["arrival_s"].max() - llm["arrival_s"].min()) if len(llm) else 0.0,
            "requested_rate": summary.get("offered_rps"),
        },
        "successes": {
            "count": len(done),
            "latency": {
                "request_latency": _ip_dist(done["e2e_ms"].dropna().to_numpy(), 1e-3),
                "time_to_first_token": _ip_dist(done["ttft_ms"].dropna().to_numpy(), 1e-3),
                "time_per_output_token": _ip_dist(done["tpot_ms"].dropna().to_numpy(), 1e-3),
                "normalized_time_per_output_token": _ip_dist(normalized, 1e-3),
            },
            "throughput": {
                "input_tokens_per_sec": float(done["prompt_tokens"].sum()) / duration,
                "output_tokens_per_sec": float(done["output_tokens"].sum()) / duration,
                "total_tokens_per_sec": float(done["prompt_tokens"].sum() + done["output_tokens"].sum()) / duration,
                "requests_per_sec": len(done) / duration,
            },
            "prompt_len": _ip_dist(done["prompt_tokens"].to_numpy()),
            "output_len": _ip_dist(done["output_tokens"].to_numpy()),
        },
        "failures": {
            "count": len(bad),
            "request_latency": _ip_dist(bad["e2e_ms"].dropna().to_numpy(), 1e-3),
            "prompt_len": _ip_dist(bad["prompt_tokens"].to_numpy()),
        },
    }


# -- run folders ---------------------------------------------------------------------------------------
def import_run(fmt: str, path: str | Path, out: str | Path) -> dict[str, Any]:
    """Read `path` in format `fmt` into the run folder `out`; return the summary written."""
    from sagesched.metrics import records_frame, summarize

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "inference-perf":
        summary = read_inference_perf(path)
    elif fmt in ("vllm-bench", "aiperf"):
        records, meta = read_vllm_bench(path) if fmt == "vllm-bench" else read_aiperf(path)
        frame = records_frame(records)
        duration = _number(meta.get("duration")) if fmt == "vllm-bench" else None
        summary = summarize(frame, duration_s=duration if duration and duration > 0 else None)
        summary["driver"] = "import"
        summary["source"] = {"format": fmt, "path": str(path), "per_request": True, **meta}
        frame.to_parquet(folder / "requests.parquet", index=False)
    else:
        raise ValueError(f"unknown format {fmt!r}; import one of {', '.join(IMPORTERS)}")
    source = Path(path)
    summary.setdefault("label", source.parent.name if source.name == "results" else source.stem)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def export_run(fmt: str, run: str | Path) -> dict[str, Any]:
    if fmt == "vllm-bench":
        return write_vllm_bench(run)
    if fmt == "inference-perf":
        return write_inference_perf(run)
    raise ValueError(f"unknown format {fmt!r}; export one of {', '.join(EXPORTERS)}")


def import_main(argv: Sequence[str] | None = None) -> int:
    """`sagesched import FORMAT PATH --out DIR`."""
    parser = argparse.ArgumentParser(
        prog="sagesched import", description="read another tool's results into a run folder"
    )
    parser.add_argument("format", choices=IMPORTERS)
    parser.add_argument("path", help="the result file (or an inference-perf results folder)")
    parser.add_argument("--out", required=True, help="run folder to write (summary.json [+ requests.parquet])")
    args = parser.parse_args(argv)
    try:
        summary = import_run(args.format, args.path, args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {summary.get('requests')} requests, {summary.get('completed')} completed ({args.format})")
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    """`sagesched export FORMAT RUN_DIR [--out FILE]`."""
    parser = argparse.ArgumentParser(prog="sagesched export", description="write a run in another tool's format")
    parser.add_argument("format", choices=EXPORTERS)
    parser.add_argument("run", help="a run folder (summary.json + requests.parquet)")
    parser.add_argument("--out", default=None, help="output JSON file (default: stdout)")
    args = parser.parse_args(argv)
    try:
        data = export_run(args.format, args.run)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(data, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0
