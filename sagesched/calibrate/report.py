"""The fidelity report, part (i): leave-one-out on the measured H100 runs.

    python -m sagesched.calibrate.report ../shared/calibration/vllm-h100-llama-2-7b --out reports/fidelity

For each run R: fit the coefficients (`fit_runs`) on the other runs that are not saturated, replay R's
full stages through the simulator with them, and compare each stage's statistics with R's measurement.
Nothing is fitted to the run it is scored on. The same table is computed for the model as it was before
issue 11 (no frontend term, decode attention at 60% of HBM bandwidth, 1 ms step overhead) for reference.
Writes `loo.json` (every number) and `loo.md` (the tables of `README.md`'s part (i); `--markdown` prints
them again from an existing `loo.json`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sagesched.calibrate.fit_runs import fit_runs, perf_for
from sagesched.calibrate.predict import predict_run
from sagesched.calibrate.runs import STATS, MeasuredRun, find_runs

#: The H100 profile's coefficients before issue 11 (what "before" means in the report).
BEFORE: dict[str, float] = {
    "decode_attention_efficiency": 0.6,
    "step_overhead_s": 0.001,
    "seq_overhead_s": 0.0,
    "frontend_request_s": 0.0,
    "frontend_prompt_token_s": 0.0,
    "frontend_seq_s": 0.0,
}
#: BLIS's published mean absolute errors over 38 real vLLM v0.15.1 runs (trained-physics model), percent.
BLIS = {"e2e_mean": 9.1, "ttft_mean": 19.5, "itl_mean": 9.8}


def score(
    run: MeasuredRun, coefficients: dict[str, float], window_s: float | None, operators: str = "vidur"
) -> list[dict]:
    """Per stage: measured and simulated statistics and the signed relative error in percent."""
    pred = predict_run(run, perf_for(run, coefficients, operators=operators), window_s=window_s)
    rows = []
    for st, p in zip(run.stages, pred, strict=True):
        rows.append(
            {
                "run": run.name,
                "stage": st.index,
                "rate": st.rate,
                "saturated": run.saturated,
                "measured": st.stats,
                "simulated": {k: p[k] for k in STATS},
                "error_pct": {k: 100.0 * (p[k] / st.stats[k] - 1.0) for k in STATS},
                "completed_sim": p["completed"],
                "completed_measured": st.count,
                "failed_measured": st.failures,
            }
        )
    return rows


def leave_one_out(
    runs: list[MeasuredRun], window_s: float, full_window: float | None, operators: str = "vidur"
) -> dict:
    """The leave-one-out table, plus the fit on every unsaturated run (the shipped coefficients)."""
    folds: list[dict[str, Any]] = []
    for held in runs:
        train = [r for r in runs if r is not held and not r.saturated]
        t = time.perf_counter()
        fit = fit_runs(train, window_s=window_s, operators=operators)
        rows = score(held, fit.coefficients, full_window, operators)
        before = score(held, BEFORE, full_window, operators)
        folds.append(
            {
                "held_out": held.name,
                "trained_on": fit.training_runs,
                "coefficients": fit.coefficients,
                "train_rms_relative_error": fit.rms_relative_error(),
                "fit_evaluations": fit.evaluations,
                "wall_s": time.perf_counter() - t,
                "stages": rows,
                "before": before,
            }
        )
        print(f"fold {held.name}: {[{k: round(v, 1) for k, v in r['error_pct'].items()} for r in rows]}", flush=True)
    # The reasoning-held-out fold already fitted every unsaturated run: reuse it as the full fit.
    full_fold = next((f for f in folds if set(f["trained_on"]) == {r.name for r in runs if not r.saturated}), None)
    full = (
        None
        if full_fold is not None
        else fit_runs([r for r in runs if not r.saturated], window_s=window_s, operators=operators)
    )
    if full is not None:
        full_fit = {
            "coefficients": full.coefficients,
            "training_runs": full.training_runs,
            "rms_relative_error": full.rms_relative_error(),
        }
    else:
        assert full_fold is not None
        full_fit = {
            "coefficients": full_fold["coefficients"],
            "training_runs": full_fold["trained_on"],
            "rms_relative_error": full_fold["train_rms_relative_error"],
        }
    return {
        "folds": folds,
        "full_fit": full_fit,
        "settings": {"fit_window_s": window_s, "score_window_s": full_window, "operators": operators},
    }


def summary(result: dict, key: str = "stages") -> dict[str, dict[str, float]]:
    """Mean absolute error (percent) per statistic over the unsaturated stages, and over all stages."""
    out = {}
    for label, keep in (("unsaturated", lambda r: not r["saturated"]), ("all", lambda r: True)):
        rows = [r for f in result["folds"] for r in f[key] if keep(r)]
        out[label] = {k: float(np.mean([abs(r["error_pct"][k]) for r in rows])) for k in STATS}
    return out


def markdown(result: dict) -> str:
    """The part (i) tables."""
    lines = [
        "| held-out run | stage | rate (req/s) | E2E mean | E2E p90 | TTFT mean | TTFT p90 | ITL mean | before: E2E / TTFT / ITL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in result["folds"]:
        for r, b in zip(f["stages"], f["before"], strict=True):
            e, m, s = r["error_pct"], r["measured"], r["simulated"]

            def cell(k: str, unit: float = 1e3, e=e, m=m, s=s) -> str:
                return f"{e[k]:+.1f}% ({s[k] * unit:.1f} vs {m[k] * unit:.1f})"

            sat = (
                f" (saturated: {r['completed_sim']} simulated vs {r['completed_measured']} measured requests "
                "finished by the end)"
                if r["saturated"]
                else ""
            )
            be = b["error_pct"]
            lines.append(
                f"| {r['run']}{sat} | {r['stage']} | {r['rate']:g} | {cell('e2e_mean')} | {cell('e2e_p90')} | "
                f"{cell('ttft_mean')} | {cell('ttft_p90')} | {cell('itl_mean')} | "
                f"{be['e2e_mean']:+.0f}% / {be['ttft_mean']:+.0f}% / {be['itl_mean']:+.0f}% |"
            )
    s, sb = summary(result), summary(result, "before")
    lines += [
        "",
        "| mean absolute error | E2E mean | E2E p90 | TTFT mean | TTFT p90 | ITL mean |",
        "|---|---|---|---|---|---|",
    ]
    for label, d in (
        ("this model, unsaturated stages", s["unsaturated"]),
        ("this model, all stages", s["all"]),
        ("before issue 11, unsaturated stages", sb["unsaturated"]),
    ):
        lines.append(
            f"| {label} | {d['e2e_mean']:.1f}% | {d['e2e_p90']:.1f}% | {d['ttft_mean']:.1f}% | "
            f"{d['ttft_p90']:.1f}% | {d['itl_mean']:.1f}% |"
        )
    lines.append(
        f"| BLIS (published, 38 runs) | {BLIS['e2e_mean']}% | - | {BLIS['ttft_mean']}% | - | {BLIS['itl_mean']}% |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="folder of inference-perf run folders (../shared/calibration/...)")
    ap.add_argument("--out", type=Path, default=Path("reports/fidelity"))
    ap.add_argument("--fit-window", type=float, default=40.0, help="seconds of each stage replayed while fitting")
    ap.add_argument("--score-window", type=float, default=None, help="seconds of each stage scored (default: all)")
    ap.add_argument("--markdown", action="store_true", help="only print the tables of an existing loo.json")
    ap.add_argument(
        "--operators",
        choices=("vidur", "roofline"),
        default="vidur",
        help="operator curves: the Vidur profile, or the roofline from the runs' config.json (files *_roofline.*)",
    )
    args = ap.parse_args(argv)
    suffix = "" if args.operators == "vidur" else "_roofline"
    path = args.out / f"loo{suffix}.json"
    if args.markdown:
        sys.stdout.write(markdown(json.loads(path.read_text())) + "\n")
        return 0
    result = leave_one_out(find_runs(args.runs), args.fit_window, args.score_window, args.operators)
    result["summary"] = summary(result)
    result["summary_before"] = summary(result, "before")
    result["source"] = str(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    (args.out / f"loo{suffix}.md").write_text(markdown(result) + "\n")
    sys.stdout.write(markdown(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
