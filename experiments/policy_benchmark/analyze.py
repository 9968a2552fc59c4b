"""Paired-by-seed comparisons for the policy benchmark, beside what `sagesched.report` tabulates.

    python experiments/policy_benchmark/analyze.py MAIN_DIR MVS_DIR --out reports/policy_benchmark

Reads every run folder (summary.json + requests.parquet) and writes `comparisons.md` and
`comparisons.csv` into the report folder:

- per scenario and load, each policy's goodput, its ratio to FIFO's and to the best policy's
  (means over seeds of the per-seed ratios: runs are paired by seed, i.e. by trace window), the
  fraction of the FIFO-to-bound gap it closes ``(g - g_fifo) / (g_bound - g_fifo)`` with the
  isolated-service bound of the same run, the shed fraction (requests the policy refused:
  ``queue_full`` / ``slo_unattainable``) and all rejections, the interactive class's p99 TTFT and
  its ratio to FIFO's, and the query embeddings' SLO attainment;
- mixed versus siloed at equal GPU count: goodput per layout, interference preset and policy,
  and each mixed layout's ratio to the best siloed layout's goodput (paired by seed), against the
  interference-free ceiling (`bound_4llm_4tei`);
- the interactive class's p99 TTFT floor (isolated service) and the goodput bound, each over
  FIFO's, so that a target no policy can reach in a cell is visible as such;
- multi-tenant: Jain's index over the tenants' service (the cost the fair-share policy charges,
  prompt + max_tokens, of the LLM requests dispatched while every tenant had requests queued).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from sagesched.policies.fair_share import jain_index

RUN = re.compile(r"^(?P<label>.+)_x(?P<load>[0-9.]+)_s(?P<seed>\d+)$")
SHED_CODES = ("queue_full", "slo_unattainable")
PRESETS = ("none", "time_slice", "mps", "ideal")


def cell_bounds(summary: dict, r: pd.DataFrame) -> tuple[float, float]:
    """(the interactive class's p99 TTFT floor, the goodput bound for any policy) of a run's cell.

    The floor: the p99 if every interactive request were served alone at its arrival on its fastest
    instance (`sagesched.bounds.isolated_latencies`): no policy that serves them can go lower. The
    bound: `bound_summary`'s `goodput_rps_upper_refusing`, which a policy that refuses requests
    cannot beat either (the records' own `bound` predates it). Rebuilt from the run's own config
    (the same requests for every policy of a cell)."""
    from sagesched.bounds import bound_summary, isolated_latencies
    from sagesched.experiment_parts import workload_requests
    from sagesched.replay.cluster import sim_cluster_dict
    from sagesched.sim import ClusterConfig

    cfg = summary.get("config") or {}
    if not cfg:
        return float("nan"), float("nan")
    requests = workload_requests(cfg["workload"], int(cfg.get("seed", 0)))
    cluster = ClusterConfig.from_dict(sim_cluster_dict(cfg["cluster"]))
    lat = isolated_latencies(requests, cluster)
    refusing = bound_summary(requests, cluster, lat).get("goodput_rps_upper_refusing")
    bound = float(refusing) if refusing is not None else float("nan")
    if "interactive" not in set(r["workload_class"]):
        return float("nan"), bound
    classes = r.set_index("request_id")["workload_class"]
    keep = np.array([classes.get(q.id) == "interactive" and not q.is_embedding for q in requests], dtype=bool)
    ttft = lat[keep, 0]
    ttft = ttft[~np.isnan(ttft)]
    return (float(np.percentile(ttft, 99)) if len(ttft) else float("nan")), bound


def load_runs(root: Path, floors: bool = False) -> pd.DataFrame:
    """One row per run folder under `root`; with `floors`, also the interactive TTFT floor of each
    (scenario, load, seed) (computed once per cell and seed, from its first run)."""
    rows = []
    floor_cache: dict[tuple[str, str, str], tuple[float, float]] = {}
    for summary_path in sorted(root.glob("*/*/summary.json")):
        run_dir = summary_path.parent
        m = RUN.match(run_dir.name)
        if m is None:
            continue
        s = json.loads(summary_path.read_text())
        r = pd.read_parquet(run_dir / "requests.parquet")
        reason = r["reason"].fillna("")
        inter = r[(r["workload_class"] == "interactive") & r["ttft_ms"].notna()]
        query = r[r["workload_class"] == "query_embedding"]
        row = {
            "scenario": run_dir.parent.name,
            "label": m["label"],
            "load": float(m["load"]),
            "seed": int(m["seed"]),
            "goodput": s["goodput_rps"],
            # The same count over the run's exact span (first arrival to last finish): the summary's
            # `duration_s` is the simulator's clock at its end, which runs on to the next 1 s timeline
            # tick after the last finish, so in the 25-50 s embedding-heavy runs a last chat ending
            # 0.2 s later can cost a whole second (3-4% of goodput).
            "goodput_span": float(r["slo_met"].sum()) / span if (span := _span(r)) > 0 else np.nan,
            "met": float(r["slo_met"].sum()),
            "span": span,
            "bound": (s.get("bound") or {}).get("goodput_rps_upper", np.nan),
            "attainment": s["slo_attainment"],
            "shed": float(reason.str.startswith(SHED_CODES).mean()),
            "rejected": s["rejected"] / max(1, s["requests"]),
            "inter_ttft_p99_ms": float(inter["ttft_ms"].quantile(0.99)) if len(inter) else np.nan,
            "inter_ttft_ms": inter["ttft_ms"].to_numpy(dtype=float),
            "query_attainment": float(query["slo_met"].mean()) if len(query) else np.nan,
        }
        if floors:
            key = (run_dir.parent.name, m["load"], m["seed"])
            if key not in floor_cache:
                floor_cache[key] = cell_bounds(s, r)
            row["inter_ttft_p99_floor_ms"], row["bound_refusing"] = floor_cache[key]
        if r["tenant"].nunique() > 1:
            row["jain"] = _jain(r)
        rows.append(row)
    return pd.DataFrame(rows)


def _jain(r: pd.DataFrame, bin_s: float = 1.0) -> float:
    """Jain's index of the service the tenants received while all of them were backlogged.

    Service is in the fair-share policy's own currency, the cost charged at dispatch
    (`fair_share.request_cost`: prompt + max_tokens, an embedding's input tokens), summed per tenant
    over the 1 s bins at whose start and end every tenant had a request waiting at the gateway
    (arrived, not yet dispatched); bins where some tenant ran out of queued work are left out, as
    the target asks (its share is then its demand, not a fair share).
    """
    llm = r[r["type"] != "embedding"]
    llm = llm[llm["dispatch_s"].notna()]
    tenants = sorted(r["tenant"].unique())
    cost = (llm["prompt_tokens"] + llm["max_tokens"]).clip(lower=1)
    end = float(llm["dispatch_s"].max()) if len(llm) else 0.0
    edges = np.arange(0.0, end + bin_s, bin_s)
    served = dict.fromkeys(tenants, 0.0)
    arrival, dispatch = llm["arrival_s"].to_numpy(), llm["dispatch_s"].to_numpy()
    owner = llm["tenant"].to_numpy()
    for t0 in edges:
        start = (arrival <= t0) & (dispatch > t0)
        stop = (arrival <= t0 + bin_s) & (dispatch > t0 + bin_s)
        if not all(np.any(start & (owner == t)) and np.any(stop & (owner == t)) for t in tenants):
            continue  # someone was not backlogged for the whole bin
        in_bin = (dispatch > t0) & (dispatch <= t0 + bin_s)
        for t in tenants:
            served[t] += float(cost[in_bin & (owner == t)].sum())
    if not any(served.values()):
        return float("nan")
    return jain_index([served[t] for t in tenants])


def _span(r: pd.DataFrame) -> float:
    """The later of the last finish and the last arrival, minus the first arrival (0 when nothing
    finished), as `sagesched.metrics` measures a run's span."""
    finish = r["finish_s"].max()
    return float(max(finish, r["arrival_s"].max()) - r["arrival_s"].min()) if pd.notna(finish) else 0.0


def paired(df: pd.DataFrame) -> pd.DataFrame:
    """Per (scenario, load, label): means over seeds of per-seed ratios against FIFO and the best."""
    out = []
    for (scenario, load), cell in df.groupby(["scenario", "load"]):
        by_seed = {seed: runs.set_index("label") for seed, runs in cell.groupby("seed")}
        for label, runs in cell.groupby("label"):
            ratios_fifo, ratios_best, closed, tail, floor, ceiling, ceiling_any = [], [], [], [], [], [], []
            tail_closed: list[float] = []
            tail_samples: list[tuple[np.ndarray, np.ndarray]] = []
            met_fifo, span_fifo = [], []
            ratios_best_span = []
            for _, run in runs.iterrows():
                seed_runs = by_seed[run["seed"]]
                best = seed_runs["goodput"].max()
                ratios_best.append(run["goodput"] / best if best > 0 else np.nan)
                best_span = seed_runs["goodput_span"].max()
                ratios_best_span.append(run["goodput_span"] / best_span if best_span > 0 else np.nan)
                if "fifo" in seed_runs.index:
                    fifo = seed_runs.loc["fifo"]
                    ratios_fifo.append(run["goodput"] / fifo["goodput"] if fifo["goodput"] > 0 else np.nan)
                    met_fifo.append(run["met"] / fifo["met"] if fifo["met"] > 0 else np.nan)
                    span_fifo.append(run["span"] / fifo["span"] if fifo["span"] > 0 else np.nan)
                    gap = run["bound"] - fifo["goodput"]
                    closed.append((run["goodput"] - fifo["goodput"]) / gap if gap > 1e-9 else np.nan)
                    tail.append(run["inter_ttft_p99_ms"] / fifo["inter_ttft_p99_ms"])
                    tail_samples.append((run["inter_ttft_ms"], fifo["inter_ttft_ms"]))
                    floor.append(run.get("inter_ttft_p99_floor_ms", np.nan) / fifo["inter_ttft_p99_ms"])
                    # The tail's analogue of `gap_closed`: how much of FIFO's p99 above the floor is gone.
                    tail_gap = fifo["inter_ttft_p99_ms"] - run.get("inter_ttft_p99_floor_ms", np.nan)
                    tail_closed.append(
                        (fifo["inter_ttft_p99_ms"] - run["inter_ttft_p99_ms"]) / tail_gap if tail_gap > 1e-9 else np.nan
                    )
                    ceiling.append(run["bound"] / fifo["goodput"] if fifo["goodput"] > 0 else np.nan)
                    ceiling_any.append(
                        run.get("bound_refusing", np.nan) / fifo["goodput"] if fifo["goodput"] > 0 else np.nan
                    )
            worst = int(np.nanargmax(tail)) if tail and not np.isnan(tail).all() else None
            ci = tail_ratio_interval(*tail_samples[worst]) if worst is not None else (np.nan, np.nan)
            out.append(
                {
                    "scenario": scenario,
                    "load": load,
                    "policy": label,
                    "seeds": len(runs),
                    "goodput": runs["goodput"].mean(),
                    "vs_best": np.nanmean(ratios_best),
                    "worst_seed_vs_best": np.nanmin(ratios_best),
                    "vs_best_span": np.nanmean(ratios_best_span),
                    "worst_seed_vs_best_span": np.nanmin(ratios_best_span),
                    "vs_fifo": np.nanmean(ratios_fifo) if ratios_fifo else np.nan,
                    "worst_seed_vs_fifo": np.nanmin(ratios_fifo) if ratios_fifo else np.nan,
                    "met_vs_fifo": np.nanmean(met_fifo) if met_fifo else np.nan,
                    "span_vs_fifo": np.nanmean(span_fifo) if span_fifo else np.nan,
                    "gap_closed": np.nanmean(closed) if closed else np.nan,
                    "shed": runs["shed"].mean(),
                    "rejected": runs["rejected"].mean(),
                    "inter_ttft_p99_ms": runs["inter_ttft_p99_ms"].mean(),
                    "inter_tail_vs_fifo": np.nanmax(tail) if tail else np.nan,
                    "inter_tail_ci90_lo": ci[0],
                    "inter_tail_ci90_hi": ci[1],
                    "inter_floor_vs_fifo": _nanmax(floor),
                    "inter_tail_gap_closed_min": _nanmin(tail_closed),
                    "bound_vs_fifo_min": _nanmin(ceiling),
                    "bound_refusing_vs_fifo_min": _nanmin(ceiling_any),
                    "query_attainment": runs["query_attainment"].mean(),
                    "jain": runs["jain"].mean() if "jain" in runs else np.nan,
                }
            )
    return pd.DataFrame(out)


def tail_ratio_interval(
    policy_ms: np.ndarray, fifo_ms: np.ndarray, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A 90% bootstrap interval of one run's p99 over another's (requests resampled with
    replacement, each run on its own; a fixed seed, so the report is reproducible).

    Why: the interactive class has 90-110 requests in an embedding-heavy run, so its p99 is the
    second-largest TTFT, and a target read on it (<= 0.5x FIFO's) can flip on one request. The
    requests of a run are not independent (they queue behind one another), so the interval is a
    floor on the noise, not its full size.
    """
    if len(policy_ms) < 2 or len(fifo_ms) < 2:
        return (np.nan, np.nan)
    rng = np.random.default_rng(seed)
    p99 = [np.percentile(rng.choice(x, size=(draws, len(x))), 99, axis=1) for x in (policy_ms, fifo_ms)]
    lo, hi = np.percentile(p99[0] / p99[1], [5, 95])
    return (float(lo), float(hi))


def _nanmax(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmax(arr)) if arr.size and not np.isnan(arr).all() else float("nan")


def _nanmin(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmin(arr)) if arr.size and not np.isnan(arr).all() else float("nan")


def split_mvs_label(label: str) -> tuple[str, str, str]:
    """``<cluster>_<preset>_<policy>`` -> (cluster, preset, policy); cluster names hold underscores."""
    for preset in PRESETS:
        for policy in ("slo_aware", "hybrid", "fifo"):
            suffix = f"_{preset}_{policy}"
            if label.endswith(suffix):
                return label[: -len(suffix)], preset, policy
    raise ValueError(f"cannot split mixed-vs-siloed run label {label!r}")


def mixed_vs_siloed(df: pd.DataFrame) -> pd.DataFrame:
    parts = df["label"].map(split_mvs_label)
    df = df.assign(layout=[p[0] for p in parts], preset=[p[1] for p in parts], policy=[p[2] for p in parts])
    out = []
    for (scenario, load), cell in df.groupby(["scenario", "load"]):
        silo = cell[cell["layout"].str.startswith("silo")]
        # The best siloed layout per seed, over every policy (the strongest siloed competitor).
        best_silo = silo.groupby("seed")["goodput"].max()
        for (layout, preset, policy), runs in cell.groupby(["layout", "preset", "policy"]):
            ratio = [run["goodput"] / best_silo.get(run["seed"], np.nan) for _, run in runs.iterrows()]
            bound_ratio = [run["bound"] / best_silo.get(run["seed"], np.nan) for _, run in runs.iterrows()]
            out.append(
                {
                    "scenario": scenario,
                    "load": load,
                    "layout": layout,
                    "interference": preset,
                    "policy": policy,
                    "goodput": runs["goodput"].mean(),
                    "bound": runs["bound"].mean(),
                    "vs_best_siloed": float(np.nanmean(ratio)) if not np.all(np.isnan(ratio)) else np.nan,
                    "bound_vs_best_siloed": float(np.nanmean(bound_ratio))
                    if not np.all(np.isnan(bound_ratio))
                    else np.nan,
                    "attainment": runs["attainment"].mean(),
                    "query_attainment": runs["query_attainment"].mean(),
                    "shed": runs["shed"].mean(),
                }
            )
    return pd.DataFrame(out)


CEILING_LAYOUT = "bound_4llm_4tei"


def mvs_headline(mvs: pd.DataFrame) -> pd.DataFrame:
    """Per scenario and load: the interference-free ceiling (`CEILING_LAYOUT`: four LLM and four TEI
    GPUs, what four shared GPUs would be if co-location cost nothing, best policy) and, per
    interference preset, the best mixed layout under hybrid and under any policy, each as a ratio to
    the best siloed layout (paired by seed), with the share of the ceiling's gain hybrid reaches."""
    out = []
    for (scenario, load), cell in mvs.groupby(["scenario", "load"]):
        ceiling = cell[cell["layout"] == CEILING_LAYOUT]["vs_best_siloed"].max()
        mixed = cell[cell["layout"].str.startswith("mixed") | cell["layout"].str.startswith("all_mixed")]
        for preset, runs in mixed.groupby("interference"):
            hyb = runs[runs["policy"] == "hybrid"]
            best_h = hyb.loc[hyb["vs_best_siloed"].idxmax()] if len(hyb) else None
            best_any = runs.loc[runs["vs_best_siloed"].idxmax()]
            h = float(best_h["vs_best_siloed"]) if best_h is not None else np.nan
            out.append(
                {
                    "scenario": scenario,
                    "load": load,
                    "interference": preset,
                    "isolated_bound_vs_best_siloed": float(cell["bound_vs_best_siloed"].max()),
                    "ceiling_vs_best_siloed": ceiling,
                    "hybrid_best_mixed": h,
                    "hybrid_layout": best_h["layout"] if best_h is not None else "",
                    "hybrid_shed": float(best_h["shed"]) if best_h is not None else np.nan,
                    "any_policy_best_mixed": float(best_any["vs_best_siloed"]),
                    "any_policy": f"{best_any['layout']}/{best_any['policy']}",
                    "hybrid_share_of_ceiling_gain": (h - 1.0) / (ceiling - 1.0) if ceiling > 1.0 + 1e-9 else np.nan,
                }
            )
    return pd.DataFrame(out)


def _md(df: pd.DataFrame, floats: str = "{:.3f}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [floats.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("main_dir", type=Path)
    parser.add_argument("mvs_dir", type=Path, nargs="?")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="Paired comparisons", help="first line of comparisons.md")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(args.main_dir, floors=True)
    table = paired(runs).sort_values(["scenario", "load", "goodput"], ascending=[True, True, False])
    table.to_csv(args.out / "comparisons.csv", index=False)
    text = [
        f"# {args.title} (written by experiments/policy_benchmark/analyze.py)",
        "",
        "Per cell, means over seeds of per-seed figures (each seed is one trace window, the same for every",
        "policy). `vs_best`: goodput over the best policy's in that seed; `worst_seed_vs_best`: its minimum",
        "over seeds; `vs_fifo`: over FIFO's; `gap_closed`: (goodput - FIFO's) / (isolated-service bound -",
        "FIFO's); `shed`: fraction of requests the policy refused (queue_full / slo_unattainable);",
        "`rejected`: all rejections (backend 400s for prompts over max_model_len included);",
        "`inter_tail_vs_fifo`: the worst seed's interactive p99 TTFT over FIFO's;",
        "`inter_tail_ci90_lo` / `_hi`: a 90% bootstrap interval of that ratio (the two runs' interactive",
        "requests resampled with replacement, 2,000 draws; requests of a run queue behind one another, so",
        "this is a floor on the noise of a p99 over a few hundred requests); `jain`: Jain's index over",
        "the tenants' service (prompt + max_tokens dispatched) in the 1 s bins where every tenant had",
        "requests queued at both ends (multi_tenant only).",
        "`inter_floor_vs_fifo`: the worst seed's interactive p99 TTFT *floor* (every interactive request",
        "served alone at its arrival on its fastest instance: no policy can go below it) over FIFO's p99;",
        "where it is above 0.5, no policy can bring the interactive tail to half FIFO's in that cell.",
        "`inter_tail_gap_closed_min`: the tail's `gap_closed`, (FIFO's p99 - the policy's) / (FIFO's p99 -",
        "the floor), in the worst seed: 1 is the floor reached, 0 FIFO's tail, below 0 worse than FIFO; a",
        "target stated this way never asks for less than the floor (NaN where FIFO is already at it); above 1",
        "a policy's p99 leaves out the requests it refused.",
        "`bound_vs_fifo_min`: the isolated-service goodput bound over FIFO's goodput in the worst seed:",
        "the largest goodput ratio over FIFO a policy that serves every request could post there;",
        "`bound_refusing_vs_fifo_min`: the same for any policy, one that refuses the requests that would",
        "finish last included (`sagesched.bounds`, `goodput_rps_upper_refusing`: a run lasts at least to",
        "its last arrival, refused or not).",
        "`vs_best_span` / `worst_seed_vs_best_span`: `vs_best` / `worst_seed_vs_best` with each run's goodput",
        "over its exact span (first arrival to last finish) instead of the summary's `duration_s` (the",
        "simulator's clock at its end: the next whole-second timeline tick after the last finish).",
        "`worst_seed_vs_fifo`: `vs_fifo`'s minimum over seeds. `met_vs_fifo` / `span_vs_fifo`: the two",
        "factors of a goodput ratio (goodput = SLOs met / span, first arrival to last finish, so per seed",
        "goodput / FIFO's = (met / FIFO's met) / (span / FIFO's span); the columns are means over seeds):",
        "more requests meeting their SLO, or the same count over a shorter run. Shedding shortens",
        "the span (a refused request never finishes late), so past saturation part of a shedding",
        "policy's ratio is span, not requests served in time.",
        "",
        _md(table),
    ]
    if args.mvs_dir is not None and args.mvs_dir.exists():
        mvs = mixed_vs_siloed(load_runs(args.mvs_dir)).sort_values(
            ["scenario", "load", "goodput"], ascending=[True, True, False]
        )
        mvs.to_csv(args.out / "mixed_vs_siloed.csv", index=False)
        text += [
            "",
            "## Mixed versus siloed at 4 GPUs",
            "",
            "`vs_best_siloed`: goodput over the best siloed layout's (best over layouts and policies) in the",
            "same seed. `interference`: the shared-GPU preset (none for siloed layouts). `bound_4llm_4tei` is",
            "not a 4-GPU layout but the ceiling of the study: four LLM-only plus four TEI-only GPUs, i.e.",
            "four shared GPUs whose two engines never slow each other (the engine model only stretches work",
            "on a shared GPU), under each policy.",
            "",
            "### Headline: the ceiling the interference model allows, and how close hybrid gets",
            "",
            "`isolated_bound_vs_best_siloed`: the isolated-service goodput bound (every request alone on",
            "its fastest instance: the same for every layout) over the best siloed layout's goodput, the",
            "loosest cap; `ceiling_vs_best_siloed`: the interference-free pool's goodput (best policy) over",
            "the best siloed layout's; `hybrid_best_mixed`: the best mixed 4-GPU layout under hybrid, same ratio;",
            "`hybrid_share_of_ceiling_gain`: (hybrid_best_mixed - 1) / (ceiling - 1).",
            "",
            _md(mvs_headline(mvs)),
            "",
            "### Every layout",
            "",
            _md(mvs),
        ]
    (args.out / "comparisons.md").write_text("\n".join(text) + "\n")
    print(f"wrote {args.out / 'comparisons.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
