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
# The offline reference (sagesched.bounds) of each metric that has one: no online policy can beat it.
BOUND_OF = {
    "slo_attainment": "bound.slo_attainment_upper",
    "goodput_rps": "bound.goodput_rps_upper",
    "ttft_p50_ms": "bound.ttft_p50_ms_lower",
    "ttft_p99_ms": "bound.ttft_p99_ms_lower",
    "e2e_p99_ms": "bound.e2e_p99_ms_lower",
    "embedding_p99_ms": "bound.embedding_p99_ms_lower",
}
BOUND_LABEL = "bound (isolated service)"


class ReportError(ValueError):
    """Raised for a sweep directory a report cannot be made from; the message names the fix."""


def t95(n: int) -> float:
    """Critical value for a two-sided 95% interval from n samples: Student's t with n - 1 degrees of freedom.

    Exact (scipy's quantile), not a rounded table: a table's nearest-entry lookup made intervals too
    narrow (df=11 used 2.179 for 2.201; df > 30 used the normal 1.96).
    """
    if n < 2:
        return float("nan")
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.975, n - 1))


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
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReportError(f"{path}: not valid JSON ({exc}); re-run that job or delete the file") from exc
        if not isinstance(summary, dict):
            raise ReportError(
                f"{path}: expected a JSON object (an experiment's summary), got {type(summary).__name__}; "
                "re-run that job or delete the file"
            )
        cfg = _mapping(summary.get("config"), path, "config")
        workload = _mapping(cfg.get("workload"), path, "config.workload")
        rate_scale = workload.get("rate_scale")
        if rate_scale is None:  # not recorded (an imported run) or null (a CSV trace at its own rate)
            rate_scale = 1.0
        if isinstance(rate_scale, bool) or not isinstance(rate_scale, int | float):
            raise ReportError(
                f"{path}: config.workload.rate_scale must be a number, got {rate_scale!r}; "
                "re-run that job or delete the file"
            )
        row = {k: v for k, v in summary.items() if isinstance(v, int | float | str | type(None))}
        # Runs group under their label (a tuned variant of a policy gets its own line), by default the policy name.
        row.update(
            policy=str(summary.get("label") or summary.get("policy")),
            policy_name=summary.get("policy"),
            run_dir=str(path.parent.relative_to(root)),
            scenario=_scenario(summary),
            rate_scale=float(rate_scale),
            offered_rps=summary.get("offered_rps"),
        )
        for cls, value in _mapping(summary.get("slo_attainment_by_class"), path, "slo_attainment_by_class").items():
            row[f"slo_attainment[{cls}]"] = value
        for key, value in _mapping(summary.get("bound"), path, "bound").items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                row[f"bound.{key}"] = value
        rows.append(row)
    if not rows:
        raise ReportError(f"no summary.json under {root}; run a sweep first (python -m sagesched.experiment -m ...)")
    runs = pd.DataFrame(rows)
    # A job folder (Hydra's .hydra/ inside) without summary.json is a failed or unfinished run: say so,
    # so a report over fewer runs than the sweep launched does not pass for the whole sweep.
    missing = sorted(
        str(hydra.parent.relative_to(root))
        for hydra in root.rglob(".hydra")
        if hydra.is_dir() and not (hydra.parent / "summary.json").is_file()
    )
    if missing:
        log.warning(
            "WARNING: %d run folder(s) under %s have no summary.json (failed or unfinished jobs) and are left out: %s",
            len(missing),
            root,
            ", ".join(missing),
        )
    runs.attrs["missing_runs"] = missing
    return runs


def _mapping(value: object, path: Path, what: str) -> dict:
    """`value` as a mapping (None: empty); anything else is a ReportError naming the file and the field."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ReportError(
            f"{path}: {what} must be a JSON object, got {type(value).__name__}; re-run that job or delete the file"
        )
    return value


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, CI half-width and run count per (scenario, policy, rate_scale) for every numeric column."""
    keys = ["scenario", "policy", "rate_scale"]
    numeric = [c for c in runs.columns if c not in keys and c != "seed" and pd.api.types.is_numeric_dtype(runs[c])]
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


def _bound_by_load(data: pd.DataFrame, metric: str) -> pd.Series | None:
    """The reference value of `metric` per load (the same for every policy at a load and seed)."""
    col = BOUND_OF.get(metric)
    if col is None or col not in data or data[col].isna().all():
        return None
    return data.groupby("rate_scale", sort=True)[col].mean()


def _class_columns(data: pd.DataFrame) -> list[str]:
    return sorted(
        c for c in data.columns if c.startswith("slo_attainment[") and not c.endswith("_ci") and data[c].notna().any()
    )


def plot_scenario(agg: pd.DataFrame, scenario: str, out_dir: Path) -> list[str]:
    """One PNG per plotted metric against offered load, a line per policy, plus the bound; returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    data = agg[agg["scenario"] == scenario]
    for metric in PLOTTED:
        if metric not in data or data[metric].isna().all():
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for policy, group in data.groupby("policy", sort=True):
            group = group.sort_values("rate_scale")
            err = group.get(f"{metric}_ci")
            ax.errorbar(group["rate_scale"], group[metric], yerr=None if err is None else err.fillna(0),
                        marker="o", capsize=3, label=policy)  # fmt: skip
        bound = _bound_by_load(data, metric)
        if bound is not None:
            ax.plot(bound.index, bound.to_numpy(), "k--", linewidth=1.2, label=BOUND_LABEL)
        if metric.endswith("_ms"):
            ax.set_yscale("log")
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
    class_cols = _class_columns(data)
    if class_cols:
        fig, axes = plt.subplots(1, len(class_cols), figsize=(3.6 * len(class_cols), 3.6), sharey=True, squeeze=False)
        for ax, col in zip(axes[0], class_cols, strict=True):
            for policy, group in data.groupby("policy", sort=True):
                group = group.sort_values("rate_scale")
                ax.plot(group["rate_scale"], group[col], marker="o", label=policy)
            ax.set_title(col[len("slo_attainment[") : -1], fontsize=9)
            ax.set_xlabel("offered load")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("SLO attainment")
        axes[0][-1].legend(fontsize=6)
        fig.suptitle(f"{scenario}: SLO attainment per class")
        fig.tight_layout()
        name = f"{scenario}_slo_by_class.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def _table(data: pd.DataFrame, columns: list[tuple[str, str]]) -> list[str]:
    """Markdown rows (load, policy, runs, then `columns`), with the bound's row after each load's policies."""
    header = ["load", "policy", "runs", *(label for _, label in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rate, group in data.groupby("rate_scale", sort=True):
        for _, row in group.sort_values("policy").iterrows():
            cells = [f"{rate:g}", str(row["policy"]), str(row["runs"])]
            cells += [_fmt(row.get(col), row.get(f"{col}_ci")) for col, _ in columns]
            lines.append("| " + " | ".join(cells) + " |")
        bound_cells = [_fmt(group[BOUND_OF[col]].mean()) if BOUND_OF.get(col) in group else "–" for col, _ in columns]
        if any(cell != "–" for cell in bound_cells):
            lines.append("| " + " | ".join([f"{rate:g}", f"*{BOUND_LABEL}*", "", *bound_cells]) + " |")
    return lines


def findings(agg: pd.DataFrame, focus: str = "hybrid") -> list[str]:
    """Plain statements computed from the table, one per scenario and load.

    Who leads on goodput (ties within 0.5% listed together), the gap to the offline bound, and where
    each policy whose label starts with `focus` ranks (a tie counts as the better rank).
    """
    lines: list[str] = []
    if "goodput_rps" not in agg:  # e.g. runs imported from a tool that measures no SLOs
        return ["- no run's summary has goodput_rps (imported runs without SLOs?): no ranking"]
    for scenario, data in agg.groupby("scenario", sort=True):
        for rate, group in data.groupby("rate_scale", sort=True):
            ranked = group.dropna(subset=["goodput_rps"]).sort_values(
                ["goodput_rps", "policy"], ascending=[False, True]
            )
            if ranked.empty:
                continue
            top = float(ranked["goodput_rps"].iloc[0])
            leaders = ranked[ranked["goodput_rps"] >= top * 0.995]["policy"].tolist()
            names = ", ".join(f"`{p}`" for p in leaders[:4]) + (
                f" and {len(leaders) - 4} more" if len(leaders) > 4 else ""
            )
            text = f"- **{scenario}, load {rate:g}**: best goodput {top:.2f} req/s by {names}"
            bound = _bound_by_load(group, "goodput_rps")
            if bound is not None and len(bound):
                text += f" (bound {float(bound.iloc[0]):.2f})"
            for _, mine in ranked[ranked["policy"].astype(str).str.startswith(focus)].iterrows():
                rank = int((ranked["goodput_rps"] > mine["goodput_rps"] * 1.005).sum()) + 1
                text += f"; `{mine['policy']}` ranks {rank}/{len(ranked)} ({mine['goodput_rps']:.2f} req/s"
                text += f", SLO attainment {_fmt(mine.get('slo_attainment'))})"
            lines.append(text)
    return lines


def write_report(sweep_dir: str | Path, out_dir: str | Path, *, title: str | None = None,
                 command: str | None = None, analysis: str | None = None) -> Path:  # fmt: skip
    """Build the report folder; returns the path of its README.md."""
    runs = load_runs(sweep_dir)
    agg = aggregate(runs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"report folder {out} is a file; pass a new or existing folder with --out")
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
    missing = runs.attrs.get("missing_runs") or []
    if missing:
        lines += [f"**Left out: {len(missing)} run folder(s) without summary.json:** {', '.join(missing)}", ""]
    if analysis:
        lines += [analysis.strip(), ""]
    lines += ["## Findings computed from the table", "", *findings(agg), ""]
    shown = [m for m in METRICS if m in agg.columns]
    for scenario in sorted(agg["scenario"].unique()):
        lines += [f"## {scenario}", ""]
        for name in plot_scenario(agg, scenario, out):
            lines += [f"![{name}]({name})", ""]
        data = agg[agg["scenario"] == scenario]
        lines += _table(data, [(m, METRICS[m][0]) for m in shown])
        lines.append("")
        class_cols = _class_columns(data)
        if class_cols:
            lines += [f"SLO attainment per class ({scenario}):", ""]
            lines += _table(data, [(c, c[len("slo_attainment[") : -1]) for c in class_cols])
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
    try:
        if args.analysis and not Path(args.analysis).is_file():
            raise ReportError(f"analysis file {args.analysis} does not exist; pass a markdown file or drop --analysis")
        analysis = Path(args.analysis).read_text() if args.analysis else None
        readme = write_report(args.sweep_dir, args.out, title=args.title, command=args.command, analysis=analysis)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
