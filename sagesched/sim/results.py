"""What a simulation returns: per-request records, instance timelines, counters and a summary.

Records are built column by column straight from the `RequestRecord` slots (tens of thousands of
rows in milliseconds), with the derived latency columns computed the same way as
`RequestRecord.ttft_ms` / `tpot_ms` / `e2e_ms` / `slo_met`, so the frame has exactly
`RECORD_COLUMNS` and agrees with the live driver's records.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sagesched.core import RECORD_COLUMNS, Outcome, RequestRecord

TIMELINE_COLUMNS = ("time_s", "instance_id", "running", "waiting", "kv_usage", "batch_size", "busy")
_BASE = [c for c in RECORD_COLUMNS if c not in ("ttft_ms", "tpot_ms", "e2e_ms", "slo_met")]


def records_to_frame(records: Iterable[RequestRecord]) -> pd.DataFrame:
    """One row per record, columns `RECORD_COLUMNS` in order."""
    recs = list(records)
    data: dict[str, Any] = {col: [getattr(r, col) for r in recs] for col in _BASE}
    df = pd.DataFrame(data)
    for col in ("dispatch_s", "first_token_s", "finish_s", "slo_ttft_ms", "slo_tpot_ms", "slo_e2e_ms"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    arrival = df["arrival_s"].to_numpy(float)
    first = df["first_token_s"].to_numpy(float)
    finish = df["finish_s"].to_numpy(float)
    out = df["output_tokens"].to_numpy(float)
    df["ttft_ms"] = (first - arrival) * 1000.0
    df["e2e_ms"] = (finish - arrival) * 1000.0
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = (finish - first) * 1000.0 / (out - 1.0)
    df["tpot_ms"] = np.where(out >= 2, tpot, np.nan)
    met = df["outcome"].to_numpy() == Outcome.COMPLETED.value
    for limit, value in (("slo_ttft_ms", "ttft_ms"), ("slo_tpot_ms", "tpot_ms"), ("slo_e2e_ms", "e2e_ms")):
        lim = df[limit].to_numpy(float)
        val = df[value].to_numpy(float)
        met &= np.isnan(lim) | np.isnan(val) | (val <= lim)
    df["slo_met"] = met
    return df[list(RECORD_COLUMNS)]


def timeline_frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(TIMELINE_COLUMNS))


@dataclass
class SimResult:
    """The outcome of `simulate`.

    records: one row per request (`RECORD_COLUMNS`); timeline: per-instance samples
    (`TIMELINE_COLUMNS`; `busy` is the fraction of the preceding interval the GPU had work);
    wall_s: seconds the run took; stats: counters (events, policy calls and time, per-instance
    steps, preemptions, prefix-cache hits, KV peak, utilisation, TEI 429/413 counts).
    """

    records: pd.DataFrame
    timeline: pd.DataFrame
    wall_s: float
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Latency percentiles, SLO attainment, goodput, throughput, rejections (sagesched.metrics)
        plus the simulator's own counters under `sim`."""
        duration = self.stats.get("sim_time_s") or None
        try:
            from sagesched.metrics import summarize
        except ImportError:  # metrics module not installed in this checkout
            summary = _basic_summary(self.records)
        else:
            summary = dict(summarize(self.records, duration_s=duration))
        summary["sim"] = {"wall_s": self.wall_s, **self.stats}
        return summary

    def write(self, folder: str | Path) -> Path:
        """records.parquet, timeline.parquet and summary.json into `folder` (created)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self.records.to_parquet(out / "records.parquet", index=False)
        self.timeline.to_parquet(out / "timeline.parquet", index=False)
        (out / "summary.json").write_text(json.dumps(self.summary(), indent=2, default=_json_default))
        return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _basic_summary(df: pd.DataFrame) -> dict[str, Any]:
    done = df[df["outcome"] == Outcome.COMPLETED.value]
    out: dict[str, Any] = {
        "requests": len(df),
        "completed": len(done),
        "rejected": int((df["outcome"] == Outcome.REJECTED.value).sum()),
        "failed": int((df["outcome"] == Outcome.FAILED.value).sum()),
    }
    for col in ("ttft_ms", "tpot_ms", "e2e_ms"):
        values = done[col].dropna()
        for q in (50, 90, 99):
            out[f"{col[:-3]}_p{q}_ms"] = float(np.percentile(values, q)) if len(values) else None
    return out
