"""Before/after check that a simulator change keeps every result: same placements, same latencies.

Runs a fixed grid of (policy, scenario, load) cells through the experiment's own config tree and
stores one compact fingerprint per cell (per request: outcome, instance, dispatch/first-token/finish
times, preemptions), then compares two such runs request by request.

    python benchmarks/sim_equivalence.py record OUT_DIR [--cells quick] [--mode jump|step]
    python benchmarks/sim_equivalence.py compare BEFORE_DIR AFTER_DIR

`record` with an older checkout on PYTHONPATH gives the "before" side; `record --plain` runs the
current tree with policies handed a plain list instead of the indexed `GatewayQueue` (the reference
path every indexed fast path must match). `compare` prints, per cell,
the number of requests whose placement or latency differs (tolerance 1e-9 s) and exits 1 on any.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

# (policy, scenario overrides, load): scenarios short enough to record the "before" side on a
# shared 2-core machine, long enough to saturate at 2x-3x (where the gateway queue builds up).
SCENARIOS = {
    "conv": ["workload=azure_conv", "workload.duration_s=240"],
    "emb": ["workload=embedding_heavy", "cluster=rag_mixed", "workload.duration_s=60"],
}
POLICIES = [
    "fifo",
    "priority",
    "slo_aware",
    "adaptive",
    "hybrid",
    "round_robin",
    "random",
    "least_loaded",
    "power_of_two",
]
CELLS = {
    "quick": [(p, "conv", s) for p in POLICIES for s in (1.0, 3.0)] + [(p, "emb", 2.0) for p in POLICIES],
}
COLUMNS = ["outcome", "instance_id", "dispatch_s", "first_token_s", "finish_s", "preemptions", "rule"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sagesched.experiment import conf_dir

    with initialize_config_dir(version_base=None, config_dir=str(conf_dir())):
        return hydra_compose(config_name="config", overrides=overrides)


def run_cell(policy: str, scenario: str, scale: float, mode: str, plain: bool = False) -> tuple[pd.DataFrame, dict]:
    from omegaconf import OmegaConf

    from sagesched.experiment import build_policy
    from sagesched.sim import ClusterConfig, SimConfig, simulate
    from sagesched.sim.workloads import WorkloadConfig, build_workload

    cfg = compose([f"policy={policy}", *SCENARIOS[scenario], f"workload.rate_scale={scale}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    wl = dict(resolved["workload"])
    wl.pop("name", None)
    requests = build_workload(WorkloadConfig.from_dict(wl), int(resolved["seed"]))
    sim = SimConfig.from_dict({**resolved["sim"], "progress": False, "mode": mode, "seed": int(resolved["seed"])})
    kwargs = {"plain_inputs": True} if plain else {}  # the reference path (absent before the indexes)
    result = simulate(
        requests, ClusterConfig.from_dict(resolved["cluster"]), build_policy(resolved["policy"]), sim, **kwargs
    )
    frame = result.records.set_index("request_id")[[c for c in COLUMNS if c in result.records.columns]]
    stats = {"requests": len(requests), "wall_s": result.wall_s, "policy_calls": result.stats["policy_calls"]}
    return frame.sort_index(), stats


def record(out: Path, cells: str, mode: str, only: str | None, plain: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for policy, scenario, scale in CELLS[cells]:
        name = f"{policy}_{scenario}_x{scale:g}"
        if only and only not in name:
            continue
        t = time.perf_counter()
        frame, stats = run_cell(policy, scenario, scale, mode, plain)
        frame.to_parquet(out / f"{name}.parquet")
        stats["cell_wall_s"] = time.perf_counter() - t
        (out / f"{name}.json").write_text(json.dumps(stats))
        print(f"{name}: {stats['requests']} requests, sim {stats['wall_s']:.2f} s", flush=True)


def compare(before: Path, after: Path) -> int:
    bad = 0
    for path in sorted(before.glob("*.parquet")):
        other = after / path.name
        if not other.exists():
            print(f"{path.stem}: missing in {after}")
            continue
        a, b = pd.read_parquet(path), pd.read_parquet(other)
        if not a.index.equals(b.index):
            print(f"{path.stem}: different request sets")
            bad += 1
            continue
        differs = np.zeros(len(a), dtype=bool)
        for col in a.columns:
            x, y = a[col], b[col]
            if x.dtype.kind == "f":
                xv, yv = x.to_numpy(float), y.to_numpy(float)
                same = (np.isnan(xv) & np.isnan(yv)) | (np.abs(xv - yv) <= 1e-9)
            else:
                both_null = (x.isna() & y.isna()).to_numpy()
                same = both_null | (x.astype(object).fillna("") == y.astype(object).fillna("")).to_numpy()
            differs |= ~same
        wa = json.loads(path.with_suffix(".json").read_text())["wall_s"]
        wb = json.loads(other.with_suffix(".json").read_text())["wall_s"]
        print(f"{path.stem:34s} {int(differs.sum()):6d} of {len(a):6d} differ   sim {wa:8.2f} s -> {wb:7.2f} s")
        bad += int(differs.any())
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--cells", default="quick", choices=sorted(CELLS))
    rec.add_argument("--mode", default="jump", choices=["jump", "step"])
    rec.add_argument("--only", default=None, help="only cells whose name contains this")
    rec.add_argument("--plain", action="store_true", help="hand policies a plain list (the reference path)")
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("before", type=Path)
    cmp_.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "record":
        record(args.out, args.cells, args.mode, args.only, args.plain)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
