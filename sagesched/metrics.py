"""Per-request records to a DataFrame, and the summary every run reports.

The simulator, live mode and the experiment runner all summarise through `summarize`, so "p99
TTFT" or "goodput" means the same thing in every result file. The summary is a plain dict of
JSON types (floats, ints, strings, None, nested dicts): empty groups give None rather than NaN,
and no numpy scalar leaks out, so `json.dumps(summary)` always works. docs/results.md lists every
key.

Definitions (why they are what they are):
- Latency percentiles are over *completed* requests: a rejected request has no latency, and its
  cost shows in `slo_attainment`, which counts it as a miss. TTFT/TPOT/E2E are over LLM requests
  (chat and generate); embedding latency (arrival to result) is reported on its own because
  mixing millisecond embeddings into LLM percentiles would hide both.
- `slo_attainment` is over *all* requests: rejected and failed ones miss. A completed request
  meets its SLO when each objective it has is met (`RequestRecord.slo_met`).
- `goodput_rps` is requests meeting all their SLOs per second (DistServe's definition).
- `duration_s` defaults to last finish minus first arrival: the span the system was busy with
  this workload, so rates are not inflated by cutting the tail off. It runs at least to the last
  arrival: a rejected request leaves no finish behind, and a policy that refused the last requests
  would otherwise end the run early and raise its own goodput by refusing.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from sagesched.core.records import RECORD_COLUMNS, Outcome, RequestRecord
from sagesched.core.request import Priority

PERCENTILES = (50, 90, 99)
UNCLASSIFIED = "unclassified"
"""The class key for requests without a workload class (tags["class"] unset)."""

_INT_COLUMNS = (
    "priority",
    "prompt_tokens",
    "max_tokens",
    "output_tokens",
    "embedding_inputs",
    "embedding_tokens",
    "batch_size",
    "preemptions",
    "cached_prompt_tokens",
)
_FLOAT_COLUMNS = (
    "arrival_s",
    "slo_ttft_ms",
    "slo_tpot_ms",
    "slo_e2e_ms",
    "dispatch_s",
    "first_token_s",
    "finish_s",
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
)
_REQUIRED = (
    "request_id",
    "type",
    "priority",
    "arrival_s",
    "outcome",
    "output_tokens",
    "embedding_inputs",
    "finish_s",
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
)


_BASE_COLUMNS = [f.name for f in dataclasses.fields(RequestRecord)]


def records_frame(records: Iterable[RequestRecord]) -> pd.DataFrame:
    """One row per record with exactly RECORD_COLUMNS, with stable dtypes (so Parquet schemas match).

    Integer columns are int64, times and latencies float64 (missing = NaN), `slo_met` bool, the
    rest strings (`instance_id` None when the request never reached an instance).

    Built from one `attrgetter` tuple per record rather than through `RequestRecord.as_row` (whose
    `asdict` costs ~60 µs a record, a second per 20k requests): the simulator times this as part of
    every run. The derived columns use the same arithmetic as the record's properties, which a test
    checks row for row.
    """
    row = operator.attrgetter(*_BASE_COLUMNS)
    frame = pd.DataFrame.from_records([row(r) for r in records], columns=_BASE_COLUMNS)
    for column in _INT_COLUMNS:
        frame[column] = frame[column].astype("int64")
    for column in _FLOAT_COLUMNS:
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in frame.columns:
        if column not in _INT_COLUMNS and column not in _FLOAT_COLUMNS:
            frame[column] = frame[column].astype(object)
    frame["ttft_ms"] = (frame["first_token_s"] - frame["arrival_s"]) * 1000.0
    frame["e2e_ms"] = (frame["finish_s"] - frame["arrival_s"]) * 1000.0
    decoded = (frame["finish_s"] - frame["first_token_s"]) * 1000.0 / (frame["output_tokens"] - 1)
    frame["tpot_ms"] = decoded.where(frame["output_tokens"] >= 2)
    frame["slo_met"] = _slo_met(frame).astype(bool)
    return frame[list(RECORD_COLUMNS)]


# -- JSON-safe scalars -----------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A plain float, or None for missing / NaN / infinite values."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _rate(count: float, duration_s: float | None) -> float | None:
    return None if duration_s is None else float(count) / duration_s


def _percentiles(values: pd.Series, prefix: str) -> dict[str, float | None]:
    data = values.dropna().to_numpy(dtype=np.float64)
    out: dict[str, float | None] = {}
    for q in PERCENTILES:
        out[f"{prefix}_p{q}_ms"] = _num(np.percentile(data, q)) if data.size else None
    out[f"{prefix}_mean_ms"] = _num(data.mean()) if data.size else None
    return out


def _slo_met(df: pd.DataFrame) -> pd.Series:
    """RequestRecord.slo_met, vectorised (used when a frame lacks the column)."""
    met = df["outcome"] == Outcome.COMPLETED.value
    for limit, value in (("slo_ttft_ms", "ttft_ms"), ("slo_tpot_ms", "tpot_ms"), ("slo_e2e_ms", "e2e_ms")):
        if limit in df:
            lim, val = df[limit].astype("float64"), df[value].astype("float64")
            met &= lim.isna() | val.isna() | (val <= lim)
    return met


def _default_duration(df: pd.DataFrame) -> float | None:
    if df.empty:
        return None
    start = df["arrival_s"].min()
    finish = df["finish_s"].max()
    last_arrival = df["arrival_s"].max()
    finish = last_arrival if pd.isna(finish) else max(finish, last_arrival)
    duration = float(finish - start)
    return duration if math.isfinite(duration) and duration > 0 else None


def _counts(series: pd.Series) -> dict[str, int]:
    counts = series.fillna("").astype(str).replace("", "unspecified").value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items())}


def _group_summary(df: pd.DataFrame, met: pd.Series, duration_s: float | None) -> dict[str, Any]:
    """The per-class / per-priority block: counts, attainment, goodput and tail latencies."""
    completed = df["outcome"] == Outcome.COMPLETED.value
    llm = completed & (df["type"] != "embedding")
    emb = completed & (df["type"] == "embedding")
    ttft = _percentiles(df.loc[llm, "ttft_ms"], "ttft")
    tpot = _percentiles(df.loc[llm, "tpot_ms"], "tpot")
    e2e = _percentiles(df.loc[llm, "e2e_ms"], "e2e")
    embedding = _percentiles(df.loc[emb, "e2e_ms"], "embedding")
    return {
        "requests": len(df),
        "completed": int(completed.sum()),
        "rejected": int((df["outcome"] == Outcome.REJECTED.value).sum()),
        "failed": int((df["outcome"] == Outcome.FAILED.value).sum()),
        "slo_attainment": _num(met.mean()) if len(df) else None,
        "goodput_rps": _rate(int(met.sum()), duration_s),
        "ttft_p50_ms": ttft["ttft_p50_ms"],
        "ttft_p99_ms": ttft["ttft_p99_ms"],
        "tpot_p99_ms": tpot["tpot_p99_ms"],
        "e2e_p99_ms": e2e["e2e_p99_ms"],
        "embedding_p99_ms": embedding["embedding_p99_ms"],
    }


def summarize(df: pd.DataFrame, *, duration_s: float | None = None) -> dict[str, Any]:
    """The run summary (keys in docs/results.md); JSON-serialisable, NaN-free.

    `duration_s` is the denominator of every rate; by default last finish minus first arrival.
    """
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"records frame lacks column(s) {', '.join(missing)}; build it with records_frame(records)")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be > 0 (or None for last finish - first arrival), got {duration_s}")
    duration = float(duration_s) if duration_s is not None else _default_duration(df)

    outcome = df["outcome"]
    completed = outcome == Outcome.COMPLETED.value
    is_embedding = df["type"] == "embedding"
    llm_done = completed & ~is_embedding
    emb_done = completed & is_embedding
    met = (df["slo_met"].astype(bool) if "slo_met" in df else _slo_met(df)).reindex(df.index, fill_value=False)
    n = len(df)

    summary: dict[str, Any] = {
        "requests": n,
        "completed": int(completed.sum()),
        "rejected": int((outcome == Outcome.REJECTED.value).sum()),
        "failed": int((outcome == Outcome.FAILED.value).sum()),
        "llm_requests": int((~is_embedding).sum()),
        "embedding_requests": int(is_embedding.sum()),
        "duration_s": duration,
    }
    summary.update(_percentiles(df.loc[llm_done, "ttft_ms"], "ttft"))
    summary.update(_percentiles(df.loc[llm_done, "tpot_ms"], "tpot"))
    summary.update(_percentiles(df.loc[llm_done, "e2e_ms"], "e2e"))
    summary.update(_percentiles(df.loc[emb_done, "e2e_ms"], "embedding"))
    if "dispatch_s" in df:
        queue_ms = (df.loc[completed, "dispatch_s"] - df.loc[completed, "arrival_s"]) * 1000.0
        summary.update(_percentiles(queue_ms, "queue"))

    output_tokens = int(df.loc[llm_done, "output_tokens"].sum())
    embeddings = int(df.loc[emb_done, "embedding_inputs"].sum())
    summary.update(
        {
            "slo_attainment": _num(met.mean()) if n else None,
            "slo_met": int(met.sum()),
            "goodput_rps": _rate(int(met.sum()), duration),
            "throughput_rps": _rate(int(completed.sum()), duration),
            "output_tokens": output_tokens,
            "throughput_tokens_per_s": _rate(output_tokens, duration),
            "embeddings": embeddings,
            "embeddings_per_s": _rate(embeddings, duration),
            "preemptions": int(df["preemptions"].sum()) if "preemptions" in df else 0,
        }
    )
    if "cached_prompt_tokens" in df and "prompt_tokens" in df:
        prompt = int(df.loc[llm_done, "prompt_tokens"].sum())
        cached = int(df.loc[llm_done, "cached_prompt_tokens"].sum())
        summary["prefix_cache_hit_rate"] = _num(cached / prompt) if prompt else None

    summary["rejections_by_reason"] = (
        _counts(df.loc[outcome == Outcome.REJECTED.value, "reason"]) if "reason" in df else {}
    )
    summary["failures_by_reason"] = _counts(df.loc[outcome == Outcome.FAILED.value, "reason"]) if "reason" in df else {}

    classes = (
        df["workload_class"].fillna("").astype(str).replace("", UNCLASSIFIED)
        if "workload_class" in df
        else pd.Series(UNCLASSIFIED, index=df.index)
    )
    priorities = df["priority"].map(_priority_name)
    summary["slo_attainment_by_class"] = {k: _num(v) for k, v in sorted(met.groupby(classes).mean().items())}
    summary["slo_attainment_by_priority"] = {
        k: _num(v) for k, v in sorted(met.groupby(priorities).mean().items(), key=lambda kv: _priority_rank(kv[0]))
    }
    summary["slo_attainment_by_type"] = {
        k: _num(v) for k, v in sorted(met.groupby(df["type"].astype(str)).mean().items())
    }
    summary["classes"] = {str(k): _group_summary(g, met.loc[g.index], duration) for k, g in sorted(df.groupby(classes))}
    summary["priorities"] = {
        str(k): _group_summary(g, met.loc[g.index], duration)
        for k, g in sorted(df.groupby(priorities), key=lambda kv: _priority_rank(kv[0]))
    }
    summary["per_instance"] = _per_instance(df)
    return summary


def _priority_name(value: Any) -> str:
    try:
        return Priority(int(value)).name.lower()
    except (ValueError, TypeError):
        return str(value)


def _priority_rank(name: str) -> int:
    try:
        return int(Priority[name.upper()])
    except KeyError:
        return 99


def _per_instance(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per instance: requests it took, how many completed, the request-weighted mean batch size, work done."""
    if "instance_id" not in df:
        return {}
    placed = df[df["instance_id"].notna() & (df["instance_id"].astype(str) != "")]
    out: dict[str, dict[str, Any]] = {}
    for instance, group in sorted(placed.groupby(placed["instance_id"].astype(str))):
        done = group["outcome"] == Outcome.COMPLETED.value
        out[str(instance)] = {
            "requests": len(group),
            "completed": int(done.sum()),
            "mean_batch_size": _num(group["batch_size"].mean()) if "batch_size" in group else None,
            "output_tokens": int(group.loc[done & (group["type"] != "embedding"), "output_tokens"].sum()),
            "embeddings": int(group.loc[done & (group["type"] == "embedding"), "embedding_inputs"].sum()),
        }
    return out
