"""`sagesched compare RUN_A RUN_B`: two runs side by side, and request by request.

A run is a folder with `summary.json` and, where the run has per-request data, `requests.parquet`
(any experiment output, live or simulated, or a folder written by `sagesched import`). The
comparison has three parts:

- **paired differences**: requests matched by workload request id (the same id is the same
  request in a sim and a live run of one config); for TTFT, TPOT, end-to-end and embedding
  latency, the distribution of B - A and of B / A over the pairs where both completed, and how
  often the two runs ended a request differently (completed in one, rejected/failed in the other);
- **side by side**: the summary percentiles of both runs, B - A and B / A;
- **CDF plots**: both runs' latency distributions on one axis per metric.

`--out DIR` writes compare.md, paired.parquet, side_by_side.csv and cdf.png; the tables are
also printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

METRICS = (
    ("ttft_ms", "TTFT (ms)", False),
    ("tpot_ms", "TPOT (ms)", False),
    ("e2e_ms", "end-to-end (ms)", False),
    ("e2e_ms", "embedding (ms)", True),
)
"""(column, label, embedding?): LLM metrics over LLM requests, embedding latency over embeddings."""

SUMMARY_KEYS = (
    "requests", "completed", "rejected", "failed",
    "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms",
    "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms",
    "e2e_p50_ms", "e2e_p90_ms", "e2e_p99_ms",
    "embedding_p50_ms", "embedding_p99_ms",
    "queue_p50_ms", "queue_p99_ms",
    "slo_attainment", "goodput_rps", "throughput_rps", "throughput_tokens_per_s",
    "send_lateness_p50_ms", "send_lateness_p99_ms",
)  # fmt: skip


class CompareError(ValueError):
    """A run folder that cannot be compared; the message names the folder and the fix."""


@dataclass
class Run:
    """One run folder: its label, summary and per-request records (None for a summary-only import)."""

    path: Path
    label: str
    summary: dict[str, Any]
    records: pd.DataFrame | None


def load_run(path: str | Path, label: str | None = None) -> Run:
    folder = Path(path)
    if not folder.is_dir():
        raise CompareError(
            f"{folder} is not a run folder (a folder with summary.json, e.g. outputs/<date>/<time>_<label>)"
        )
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise CompareError(
            f"{folder} has no summary.json; point at an experiment's output folder or a `sagesched import` folder"
        )
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise CompareError(f"{summary_path}:{exc.lineno}: column {exc.colno}: not valid JSON ({exc.msg})") from None
    if not isinstance(summary, dict):
        raise CompareError(f"{summary_path}: expected a JSON object (a run's summary), got {type(summary).__name__}")
    records_path = folder / "requests.parquet"
    try:
        records = pd.read_parquet(records_path) if records_path.is_file() else None
    except (OSError, ValueError) as exc:  # truncated or not Parquet (pyarrow's ArrowInvalid is a ValueError)
        raise CompareError(
            f"{records_path}: unreadable ({exc}); re-run or re-import the run, or delete the file"
        ) from None
    if label is None:
        driver = summary.get("driver") or summary.get("source", {}).get("format") or "run"
        label = f"{summary.get('label') or summary.get('policy') or folder.name} ({driver})"
    return Run(folder, label, summary, records)


def _latency(records: pd.DataFrame, column: str, embedding: bool) -> pd.Series:
    done = records[(records["outcome"] == "completed") & ((records["type"] == "embedding") == embedding)]
    return done.set_index("request_id")[column].astype(float)


def paired(a: Run, b: Run) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(per-request frame, per-metric stats, outcome agreement) over requests present in both runs."""
    if a.records is None or b.records is None:
        return pd.DataFrame(), pd.DataFrame(), {"paired_requests": 0, "note": "a run has no per-request data"}
    ra, rb = a.records.set_index("request_id"), b.records.set_index("request_id")
    common = ra.index.intersection(rb.index)
    frame = pd.DataFrame(index=common)
    frame.index.name = "request_id"
    frame["type"] = ra.loc[common, "type"]
    frame["outcome_a"], frame["outcome_b"] = ra.loc[common, "outcome"], rb.loc[common, "outcome"]
    for column in ("ttft_ms", "tpot_ms", "e2e_ms"):
        frame[f"{column}_a"] = ra.loc[common, column].astype(float)
        frame[f"{column}_b"] = rb.loc[common, column].astype(float)
        frame[f"{column}_diff"] = frame[f"{column}_b"] - frame[f"{column}_a"]
    rows = []
    for column, label, embedding in METRICS:
        both = frame[(frame["outcome_a"] == "completed") & (frame["outcome_b"] == "completed")]
        both = both[(both["type"] == "embedding") == embedding]
        diff = both[f"{column}_diff"].dropna()
        ratio = (both[f"{column}_b"] / both[f"{column}_a"]).replace([np.inf, -np.inf], np.nan).dropna()
        if not len(diff):
            continue
        rows.append(
            {
                "metric": label,
                "pairs": len(diff),
                "diff_p10": float(diff.quantile(0.1)),
                "diff_p50": float(diff.median()),
                "diff_p90": float(diff.quantile(0.9)),
                "diff_mean": float(diff.mean()),
                "ratio_p50": float(ratio.median()) if len(ratio) else math.nan,
                "b_slower_share": float((diff > 0).mean()),
            }
        )
    agreement = pd.crosstab(frame["outcome_a"], frame["outcome_b"]) if len(frame) else pd.DataFrame()
    info = {
        "paired_requests": len(common),
        "only_in_a": len(ra.index.difference(rb.index)),
        "only_in_b": len(rb.index.difference(ra.index)),
        "same_outcome_share": float((frame["outcome_a"] == frame["outcome_b"]).mean()) if len(frame) else None,
        "outcomes": {
            f"{i} -> {j}": int(agreement.loc[i, j])
            for i in agreement.index
            for j in agreement.columns
            if agreement.loc[i, j]
        },
    }
    return frame.reset_index(), pd.DataFrame(rows), info


def side_by_side(a: Run, b: Run) -> pd.DataFrame:
    """The summary keys of both runs, with B - A and B / A."""
    rows = []
    for key in SUMMARY_KEYS:
        va, vb = a.summary.get(key), b.summary.get(key)
        if va is None and vb is None:
            continue
        fa = float(va) if isinstance(va, (int, float)) else math.nan
        fb = float(vb) if isinstance(vb, (int, float)) else math.nan
        rows.append({"metric": key, "a": fa, "b": fb, "b_minus_a": fb - fa, "b_over_a": fb / fa if fa else math.nan})
    return pd.DataFrame(rows)


def plot_cdfs(a: Run, b: Run, path: Path) -> Path | None:
    """One CDF panel per metric with both runs; None when neither run has per-request data."""
    if a.records is None and b.records is None:
        return None
    from sagesched.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for ax, (column, label, embedding) in zip(axes, METRICS, strict=True):
        for run, style in ((a, "-"), (b, "--")):
            if run.records is None:
                continue
            values = np.sort(_latency(run.records, column, embedding).dropna().to_numpy())
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), style, label=run.label)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value.is_integer() and abs(value) >= 10:
            return f"{value:.0f}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(frame: pd.DataFrame, headers: Sequence[str] | None = None) -> str:
    if frame.empty:
        return "(none)"
    cols = list(frame.columns)
    head = list(headers) if headers else cols
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def compare(
    run_a: str | Path, run_b: str | Path, out: str | Path | None = None, labels: Sequence[str] | None = None
) -> str:
    """Compare two run folders; write the files into `out` if given; return the markdown text."""
    a = load_run(run_a, labels[0] if labels else None)
    b = load_run(run_b, labels[1] if labels else None)
    if a.label == b.label:
        a.label, b.label = f"A: {a.label}", f"B: {b.label}"
    frame, stats, info = paired(a, b)
    table = side_by_side(a, b)
    text = [
        f"# {a.label} vs {b.label}",
        "",
        f"A = `{a.path}`, B = `{b.path}`.",
        "",
        "## Side by side (summary)",
        "",
        markdown_table(table, ["metric", "A", "B", "B - A", "B / A"]),
        "",
        "## Paired per request (B - A, ms; matched by workload request id, both completed)",
        "",
        f"{info['paired_requests']} requests in both runs ({info.get('only_in_a', 0)} only in A, "
        f"{info.get('only_in_b', 0)} only in B); same outcome in "
        + (f"{info['same_outcome_share']:.1%}" if info.get("same_outcome_share") is not None else "–")
        + " of them."
        + (f" Outcomes (A -> B): {info['outcomes']}." if info.get("outcomes") else ""),
        "",
        markdown_table(stats, ["metric", "pairs", "p10", "median", "p90", "mean", "median B/A", "share B slower"]),
    ]
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        if len(frame):
            frame.to_parquet(folder / "paired.parquet", index=False)
        table.to_csv(folder / "side_by_side.csv", index=False)
        if plot_cdfs(a, b, folder / "cdf.png") is not None:
            text += ["", "![latency CDFs](cdf.png)"]
        (folder / "compare.md").write_text("\n".join(text) + "\n")
    return "\n".join(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sagesched compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", help="run folder A (summary.json [+ requests.parquet])")
    parser.add_argument("run_b", help="run folder B")
    parser.add_argument("--out", default=None, help="write compare.md, paired.parquet, side_by_side.csv, cdf.png here")
    parser.add_argument("--labels", nargs=2, default=None, metavar=("A", "B"), help="names for the two runs")
    args = parser.parse_args(argv)
    try:
        print(compare(args.run_a, args.run_b, args.out, args.labels))
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
