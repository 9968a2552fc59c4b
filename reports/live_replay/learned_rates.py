"""The committed live replay against two simulations of it: nominal view rates and learned ones.

`python reports/live_replay/learned_rates.py` (about 10 s; no servers) simulates the replay's
workload under fifo and hybrid twice, on the shared-host cluster of `make_report.py` (the `*_sim`
runs): with `sim.view_rates=nominal`, as the committed report, and with `sim.view_rates=learned`,
where the policy's view rates move with every finished request as the live executor's do. It then
writes `learned_rates.md`: per metric, hybrid's change over fifo live (the committed `runs/*_live`)
and in each simulation, and each simulation's error against live. Nothing is fitted: "learned"
uses the live executor's own estimator and default weight, and the live runs are only scored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_report as mr  # noqa: E402  (this folder's report script: the same workload and cluster)


def simulate(view_rates: str) -> dict[str, dict[str, Any]]:
    """fifo and hybrid on the shared-host cluster with `view_rates`; their summaries."""
    from sagesched.experiment import run

    cluster = mr.cluster_config(["http://127.0.0.1:1", "http://127.0.0.1:2"], "http://127.0.0.1:3", 2, True)
    out: dict[str, dict[str, Any]] = {}
    for policy in mr.POLICIES:
        overrides = [f"policy={policy}", *mr.scaling(), "driver=sim", f"sim.view_rates={view_rates}"]
        out[policy] = run(
            mr.compose(overrides, cluster), Path("/tmp") / f"learned_rates_{policy}_{view_rates}", progress=False
        )
    return out


def get(summary: dict[str, Any] | None, key: str | tuple[str, ...]) -> float | None:
    d: Any = summary
    for k in (key,) if isinstance(key, str) else key:
        d = (d or {}).get(k)
    return None if d is None else float(d)


def pct(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b == 0 else f"{100 * (a / b - 1):+.1f}%"


def table(live: dict[str, dict[str, Any]], sims: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    arrow = {1: "up", -1: "down", 0: "=", None: "–"}
    rows: list[tuple[str, str | tuple[str, ...]]] = (
        [(m, m) for m in mr.METRICS]
        + [(f"{c} attainment", ("classes", c, "slo_attainment")) for c in mr.CLASSES]
        + [(f"{c} TTFT p99", ("classes", c, "ttft_p99_ms")) for c in ("interactive", "standard", "batch")]
    )
    lines = [
        "## Hybrid's change over fifo (hybrid / fifo - 1), live and in each simulation",
        "",
        "Direction: up / down when hybrid is more than 1% above / below fifo, `=` within 1%;"
        " `same` when a simulation's direction is live's.",
        "",
        "| metric | live | nominal | direction | learned | direction | closer to live |",
        "|---|---|---|---|---|---|---|",
    ]
    closer = 0
    counted = 0
    for label, key in rows:
        lf, lh = get(live["fifo"], key), get(live["hybrid"], key)
        cells = [pct(lh, lf)]
        gaps = []
        for name in ("nominal", "learned"):
            sf, sh = get(sims[name]["fifo"], key), get(sims[name]["hybrid"], key)
            d_sim, d_live = mr.direction(sf, sh), mr.direction(lf, lh)
            same = "–" if d_sim is None or d_live is None else ("same" if d_sim == d_live else "differs")
            cells += [pct(sh, sf), f"{same} ({arrow[d_sim]} / {arrow[d_live]})"]
            ok = None not in (sf, sh, lf, lh) and sf != 0 and lf != 0
            gaps.append(abs((sh / sf) - (lh / lf)) if ok else None)  # type: ignore[operator]
        verdict = "–"
        if None not in gaps:
            counted += 1
            if gaps[1] < gaps[0] - 1e-9:
                verdict, closer = "learned", closer + 1
            elif gaps[0] < gaps[1] - 1e-9:
                verdict = "nominal"
            else:
                verdict = "tie"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", f"Learned view rates put hybrid's change closer to live's on {closer} of {counted} metrics.", ""]
    lines += [
        "## Each simulation against live (error = sim / live - 1)",
        "",
        "| metric | fifo live | nominal | learned | hybrid live | nominal | learned |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in mr.METRICS:
        cells = []
        for p in mr.POLICIES:
            lv = get(live[p], m)
            cells.append("–" if lv is None else f"{lv:.3f}" if abs(lv) < 10 else f"{lv:.0f}")
            cells += [pct(get(sims[name][p], m), lv) for name in ("nominal", "learned")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(HERE / "runs"), help="folder holding fifo_live/ and hybrid_live/")
    parser.add_argument("--out", default=str(HERE / "learned_rates.md"))
    args = parser.parse_args(argv)
    live = {p: json.loads((Path(args.runs) / f"{p}_live" / "summary.json").read_text()) for p in mr.POLICIES}
    sims = {name: simulate(name) for name in ("nominal", "learned")}
    lines = [
        "# Live replay: nominal against learned view rates (generated by learned_rates.py)",
        "",
        f"Live: the committed runs in `{Path(args.runs).relative_to(HERE) if Path(args.runs).is_relative_to(HERE) else args.runs}`."
        " Simulated: the same workload and shared-host cluster as `make_report.py`'s `*_sim` runs, with"
        " `sim.view_rates=nominal` (the engine models' figures, as in `results.md`) and `sim.view_rates=learned`"
        " (moved by each finished request as the live executor moves its estimates). Latencies in ms.",
        "",
        *table(live, sims),
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
