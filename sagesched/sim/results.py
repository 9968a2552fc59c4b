"""What a simulation returns: per-request records, instance timelines, counters and a summary.

Records become a frame through `sagesched.metrics.records_frame`, the same function live mode uses,
so simulated and live runs have exactly `RECORD_COLUMNS` with the same dtypes and the same
definitions of TTFT, TPOT, end-to-end latency and SLO attainment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sagesched.core import Outcome

TIMELINE_COLUMNS = ("time_s", "instance_id", "running", "waiting", "kv_usage", "batch_size", "busy")


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
        # Rates over the metrics' own span (last finish - first arrival), as the live driver's
        # summary has them: the simulator's clock at the end (`stats["sim_time_s"]`) runs on to the
        # timeline sampler's next tick, which made goodput depend on where a run's last finish fell
        # within a second (up to 3% on a 30 s run).
        try:
            from sagesched.metrics import summarize
        except ImportError:  # metrics module not installed in this checkout
            summary = _basic_summary(self.records)
        else:
            summary = dict(summarize(self.records))
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
