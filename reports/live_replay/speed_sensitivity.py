"""How much the simulated hybrid-over-fifo gain moves when the servers' speed is off by a few percent.

    python reports/live_replay/speed_sensitivity.py --llm-calibration FILE --embedding-calibration FILE \
        --out reports/live_replay/matched_load/speed_sensitivity_1337.md

Why: a live replay is judged against one simulated prediction, but a probe's step prices carry an
error of a few percent (the fit's leave-one-out residual is ~5%), and past saturation the policies'
outcomes turn on single requests meeting or missing an SLO. This scales every LLM step coefficient
by 0.97-1.03 and reruns the simulated pair (shared host, the given view rates, the load and SLOs that
`make_report.py --match-load` derives from the same calibrations), so the prediction is read as a band, not a point.
Nothing here reads a live run. About a minute; no servers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_report as mr  # noqa: E402  (this folder's report script)

FACTORS = (0.97, 0.98, 0.99, 1.0, 1.01, 1.02, 1.03)


def scaled_calibration(path: str | Path, factor: float, folder: Path, frontend: bool = False) -> str:
    """`path` (a calibration file) with every step coefficient x `factor` (and, with `frontend`, its
    per-request frontend cost), written under `folder`."""
    cal = yaml.safe_load(Path(path).read_text())
    for key, value in cal["step"].items():
        if key.endswith("_s"):
            cal["step"][key] = value * factor
    if frontend:
        cal["frontend_request_s"] = cal.get("frontend_request_s", 0.0) * factor
    out = folder / f"{Path(path).stem}_x{factor:g}.yaml"
    out.write_text(yaml.safe_dump(cal))
    return str(out)


def simulate_pair(
    load: list[str], view_rates: str, llm_slots: int, calibrations: tuple[str, str], folder: Path
) -> dict[str, dict[str, Any]]:
    from sagesched.experiment import run

    summaries = {}
    for policy in mr.POLICIES:
        cluster = mr.cluster_config(*mr.PLACEHOLDER, llm_slots, calibrations=calibrations)
        overrides = [f"policy={policy}", *load, "driver=sim", f"sim.view_rates={view_rates}"]
        summaries[policy] = run(mr.compose(overrides, cluster), folder / policy, progress=False)
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm-calibration", required=True, help="the chat servers' calibration file")
    parser.add_argument("--embedding-calibration", required=True, help="the embedding server's")
    parser.add_argument("--view-rates", choices=("nominal", "learned"), default="learned")
    parser.add_argument("--host-cpus", type=int, default=2, help="cores the simulated servers share")
    parser.add_argument("--rate-scale", type=float, default=mr.RATE_SCALE, help="as make_report.py's")
    parser.add_argument("--duration", type=float, default=mr.DURATION_S, help="as make_report.py's")
    parser.add_argument("--llm-slots", type=int, default=2, help="as make_report.py's")
    parser.add_argument("--work", default="/tmp/speed_sensitivity", help="scratch folder for the runs")
    parser.add_argument("--out", default=None, help="write the table here (markdown) as well as printing it")
    args = parser.parse_args(argv)
    mr.HOST_CPUS = args.host_cpus
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calibrations = (args.llm_calibration, args.embedding_calibration)
    r = mr.matched_slowdown(args.rate_scale, args.duration, args.llm_slots, work / "matching", calibrations)
    print(f"servers {r:.4f}x as busy as under the shipped calibration (make_report.py --match-load's figure)")
    load = mr.scaling(args.rate_scale / r, args.duration, mr.EMBEDDING_RPS / r, r)
    lines = [
        "| LLM step prices | fifo goodput | hybrid goodput | goodput change | attainment change | median TTFT change |",
        "|---|---|---|---|---|---|",
    ]
    gains = []
    for factor in FACTORS:
        scaled = (scaled_calibration(args.llm_calibration, factor, work), args.embedding_calibration)
        s = simulate_pair(load, args.view_rates, args.llm_slots, scaled, work / f"x{factor:g}")
        fifo, hybrid = s["fifo"], s["hybrid"]
        gain = hybrid["goodput_rps"] / fifo["goodput_rps"] - 1
        gains.append(gain)
        lines.append(
            f"| x{factor:g} | {fifo['goodput_rps']:.3f} | {hybrid['goodput_rps']:.3f} | {gain:+.1%} | "
            f"{hybrid['slo_attainment'] / fifo['slo_attainment'] - 1:+.1%} | "
            f"{hybrid['ttft_p50_ms'] / fifo['ttft_p50_ms'] - 1:+.1%} |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        f"Goodput change over the {len(FACTORS)} speeds: {min(gains):+.1%} to {max(gains):+.1%}, mean "
        f"{sum(gains) / len(gains):+.1%}. Slowdown {r:.4f}; load and SLOs: `{' '.join(load)}`; calibrations "
        f"`{args.llm_calibration}` (scaled) and `{args.embedding_calibration}`; view rates {args.view_rates}; "
        f"{args.host_cpus} shared cores.",
    ]
    if args.out:
        Path(args.out).write_text(
            "# Simulated hybrid-over-fifo gain under a few percent of speed error "
            "(generated by speed_sensitivity.py)\n\n" + "\n".join(lines) + "\n"
        )
    print(lines[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
