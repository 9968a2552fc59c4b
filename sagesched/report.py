"""Turn a sweep's result folders into a report: a markdown page, PNG plots and a table of every figure.

`python -m sagesched.report SWEEP_DIR --out reports/NAME` finds every `summary.json` under SWEEP_DIR
(one per run, as `python -m sagesched.experiment -m ...` writes them), groups runs by scenario,
policy and offered load, and averages over seeds with a Student-t 95% confidence interval.
The numbers in the tables are read from the summaries and nothing else, so a report can always be
checked against the runs behind it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

# Two-sided 95% Student-t critical values by degrees of freedom (n - 1); 1.96 beyond the table.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip

METRICS: dict[str, tuple[str, bool]] = {
    # column: (label, higher is better)
    "slo_attainment": ("SLO attainment", True),
    "goodput_rps": ("goodput (req/s meeting SLOs)", True),
    "ttft_p99_ms": ("p99 TTFT (ms)", False),
    "ttft_p50_ms": ("p50 TTFT (ms)", False),
    "e2e_p99_ms": ("p99 end-to-end (ms)", False),
    "tpot_p99_ms": ("p99 TPOT (ms)", False),
    "embedding_p99_ms": ("p99 embedding latency (ms)", False),
    "throughput_tokens_per_s": ("throughput (output tokens/s)", True),
    "rejected": ("rejected requests", False),
}
PLOTTED = ("slo_attainment", "goodput_rps", "ttft_p99_ms", "embedding_p99_ms")


class ReportError(ValueError):
    """Raised for a sweep directory a report cannot be made from; the message names the fix."""


def t95(n: int) -> float:
    """Critical value for a two-sided 95% interval from n samples."""
    if n < 2:
        return float("nan")
    df = n - 1
    for key in sorted(_T95):
        if df <= key:
            return _T95[key]
    return 1.96


def _scenario(summary: dict) -> str:
    cfg = summary.get("config") or {}
    return str(cfg.get("scenario") or (cfg.get("workload") or {}).get("name") or "default")


def load_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per run: scenario, policy, rate_scale, offered_rps, seed and every scalar summary field."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ReportError(f"sweep directory {root} does not exist; pass the folder a multirun wrote")
    rows = []
    for path in sorted(root.rglob("summary.json")):
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}: not valid JSON ({exc}); re-run that job or delete the file") from exc
        cfg = summary.get("config") or {}
        workload = cfg.get("workload") or {}
        row = {k: v for k, v in summary.items() if isinstance(v, int | float | str | type(None))}
        row.update(
            run_dir=str(path.parent.relative_to(root)),
            scenario=_scenario(summary),
            rate_scale=float(workload.get("rate_scale", 1.0)),
            offered_rps=summary.get("offered_rps"),
        )
        for cls, value in (summary.get("slo_attainment_by_class") or {}).items():
            row[f"slo_attainment[{cls}]"] = value
        rows.append(row)
    if not rows:
        raise ReportError(f"no summary.json under {root}; run a sweep first (python -m sagesched.experiment -m ...)")
    return pd.DataFrame(rows)


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, CI half-width and run count per (scenario, policy, rate_scale) for every numeric column."""
    keys = ["scenario", "policy", "rate_scale"]
    numeric = [
        c for c in runs.columns if c not in keys and c != "seed" and pd.api.types.is_numeric_dtype(runs[c])
    ]
    out = []
    for key, group in runs.groupby(keys, sort=True):
        row = dict(zip(keys, key, strict=True))
        row["runs"] = len(group)
        for col in numeric:
            values = group[col].dropna().astype(float)
            n = len(values)
            row[col] = float(values.mean()) if n else None
            row[f"{col}_ci"] = float(t95(n) * values.std(ddof=1) / math.sqrt(n)) if n >= 2 else None
        out.append(row)
    return pd.DataFrame(out)


def _fmt(value, ci=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    digits = 3 if abs(value) < 10 else 1
    text = f"{value:.{digits}f}"
    if ci is not None and not (isinstance(ci, float) and math.isnan(ci)):
        text += f" ± {ci:.{digits}f}"
    return text


def plot_scenario(agg: pd.DataFrame, scenario: str, out_dir: Path) -> list[str]:
    """One PNG per plotted metric against offered load, a line per policy; returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    data = agg[agg["scenario"] == scenario]
    for metric in PLOTTED:
        if metric not in data or data[metric].isna().all():
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy, group in data.groupby("policy", sort=True):
            group = group.sort_values("rate_scale")
            err = group.get(f"{metric}_ci")
            ax.errorbar(group["rate_scale"], group[metric], yerr=None if err is None else err.fillna(0),
                        marker="o", capsize=3, label=policy)  # fmt: skip
        ax.set_xlabel("offered load (x trace rate)")
        ax.set_ylabel(METRICS[metric][0])
        ax.set_title(f"{scenario}: {METRICS[metric][0]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        name = f"{scenario}_{metric}.png"
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    class_cols = sorted(c for c in data.columns if c.startswith("slo_attainment[") and not c.endswith("_ci"))
    if class_cols:
        top = data["rate_scale"].max()
        at_top = data[data["rate_scale"] == top]
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(at_top))
        for i, (_, row) in enumerate(at_top.sort_values("policy").iterrows()):
            xs = [j + i * width for j in range(len(class_cols))]
            ax.bar(xs, [row[c] if row[c] is not None else 0 for c in class_cols], width, label=row["policy"])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(class_cols))])
        ax.set_xticklabels([c[len("slo_attainment[") : -1] for c in class_cols], rotation=30, fontsize=7)
        ax.set_ylabel("SLO attainment")
        ax.set_title(f"{scenario}: SLO attainment per class at load {top:g}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{scenario}_slo_by_class.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def findings(agg: pd.DataFrame, focus: str = "hybrid") -> list[str]:
    """Plain statements computed from the table: who leads on goodput at each load, where `focus` ranks."""
    lines = []
    for scenario, data in agg.groupby("scenario", sort=True):
        for rate, group in data.groupby("rate_scale", sort=True):
            ranked = group[group["policy"] != "bound"].sort_values("goodput_rps", ascending=False)
            if ranked.empty or ranked["goodput_rps"].isna().all():
                continue
            best = ranked.iloc[0]
            text = f"- **{scenario}, load {rate:g}**: best goodput {best['goodput_rps']:.2f} req/s by `{best['policy']}`"
            if focus in set(ranked["policy"]):
                pos = list(ranked["policy"]).index(focus) + 1
                mine = ranked[ranked["policy"] == focus].iloc[0]
                text += f"; `{focus}` ranks {pos}/{len(ranked)} ({mine['goodput_rps']:.2f} req/s"
                text += f", SLO attainment {_fmt(mine.get('slo_attainment'))})"
            lines.append(text)
    return lines


def write_report(sweep_dir: str | Path, out_dir: str | Path, *, title: str | None = None,
                 command: str | None = None, analysis: str | None = None) -> Path:  # fmt: skip
    """Build the report folder; returns the path of its README.md."""
    runs = load_runs(sweep_dir)
    agg = aggregate(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    agg.to_csv(out / "aggregate.csv", index=False)
    lines = [f"# {title or 'Policy benchmark'}", ""]
    if command:
        lines += ["Reproduce with:", "", "```bash", command, "```", ""]
    seeds = sorted(runs["seed"].dropna().unique().tolist()) if "seed" in runs else []
    lines += [
        f"{len(runs)} runs; seeds {seeds}; each figure is the mean over seeds ± a 95% Student-t interval.",
        "",
    ]
    if analysis:
        lines += [analysis.strip(), ""]
    lines += ["## Findings computed from the table", "", *findings(agg), ""]
    shown = [m for m in METRICS if m in agg.columns]
    for scenario in sorted(agg["scenario"].unique()):
        lines += [f"## {scenario}", ""]
        for name in plot_scenario(agg, scenario, out):
            lines += [f"![{name}]({name})", ""]
        data = agg[agg["scenario"] == scenario].sort_values(["rate_scale", "policy"])
        header = ["load", "policy", "runs", *(METRICS[m][0] for m in shown)]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for _, row in data.iterrows():
            cells = [f"{row['rate_scale']:g}", str(row["policy"]), str(row["runs"])]
            cells += [_fmt(row[m], row.get(f"{m}_ci")) for m in shown]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    log.info("wrote %s", readme)
    return readme


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sagesched.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a folder holding run folders with summary.json (a Hydra multirun dir)")
    parser.add_argument("--out", required=True, help="report folder to write, e.g. reports/my_sweep")
    parser.add_argument("--title", default=None)
    parser.add_argument("--command", default=None, help="the command that reproduces the sweep (shown in the report)")
    parser.add_argument("--analysis", default=None, help="a markdown file whose text is placed above the findings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    analysis = Path(args.analysis).read_text() if args.analysis else None
    try:
        readme = write_report(args.sweep_dir, args.out, title=args.title, command=args.command, analysis=analysis)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
