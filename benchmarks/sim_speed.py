"""Simulator speed: replay the whole Azure 2023 conversation trace on 4 Llama-2-7B A100 instances.

Runs the default (jump) mode and the step-by-step reference mode on the same workload and policy,
and reports simulated requests per second, the speed-up, the largest per-request latency
difference between the two modes, peak memory and the machine.

    python benchmarks/sim_speed.py --json [--out benchmarks/results/sim_speed.json] [--policy hybrid]

Suites (issue 12: speed past saturation and at fleet scale), each cell in its own process with a
time limit (a cell past it is reported as such, not waited for) and its own peak RSS:

    python benchmarks/sim_speed.py --suite loads      # every shipped policy, default workload at 1x/2x/3x
    python benchmarks/sim_speed.py --suite embedding  # every policy, embedding_heavy at 3x on rag_mixed
    python benchmarks/sim_speed.py --suite instances  # the Azure conv trace on 4/64/256/1024 instances
    python benchmarks/sim_speed.py --suite fleet      # 1,000,000 requests on 1,000 instances at ~80% busy
    python benchmarks/sim_speed.py --suite all --out benchmarks/results/sim_speed_suites.json

Targets are ratios within one run (the machine is shared): per policy, requests/s at 3x >= 0.3x its
own 1x figure; 256 instances >= 0.7x the 4-instance figure; the fleet run < 10 min, < 4 GB RSS.

Light load against an older checkout (issue 12's "no lower than today"), interleaved in one run:

    git archive 7442c5e | (mkdir -p /tmp/base && tar -x -C /tmp/base)
    python benchmarks/sim_speed.py --baseline /tmp/base --policies hybrid,fifo --repeat 3 --out ...

Each repetition runs this script's light-load benchmark (`--skip-step --repeat 1`) once in the
baseline tree (its own sim_speed.py, `PYTHONPATH` pointing at it) and once in this one, each in a
fresh process, alternating; the fastest of each counts, and each run's process CPU time is kept.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from sagesched.core import Request, RequestType
from sagesched.policies import make_policy
from sagesched.sim import ClusterConfig, InstanceConfig, SimConfig, simulate

SHARED_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"


def load_azure_conv() -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(arrival_s, prompt_tokens, output_tokens, source): the package's loader, else the shared CSV."""
    try:
        from sagesched.sim.workloads.traces import load_trace

        trace = load_trace("azure_conv")
        return trace.arrival_s, trace.prompt_tokens, trace.output_tokens, str(trace.path)
    except ImportError:
        rows = list(csv.DictReader(SHARED_TRACE.open()))
        stamps = [datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in rows]
        t0 = stamps[0]
        arrival = np.array([(s - t0).total_seconds() for s in stamps])
        prompt = np.array([int(r["ContextTokens"]) for r in rows])
        output = np.array([int(r["GeneratedTokens"]) for r in rows])
        order = np.argsort(arrival, kind="stable")
        return arrival[order], prompt[order], output[order], str(SHARED_TRACE)


def requests(model: str) -> tuple[list[Request], str]:
    arrival, prompt, output, source = load_azure_conv()
    reqs = [
        Request(
            id=f"conv-{i}",
            type=RequestType.LLM_CHAT,
            model=model,
            arrival_s=float(arrival[i]),
            prompt_tokens=int(prompt[i]),
            max_tokens=max(1, int(output[i])),
            output_tokens=max(1, int(output[i])),
        )
        for i in range(len(arrival))
    ]
    return reqs, source


def policy_for(name: str):
    try:
        return make_policy(name), name
    except (ValueError, ImportError):
        return make_policy("fifo"), "fifo"


# -- suites (issue 12) ------------------------------------------------------------------------------
SCALES = (1.0, 2.0, 3.0)
INSTANCE_COUNTS = (4, 64, 256, 1024)
INSTANCE_POLICIES = ("fifo", "hybrid")
FLEET_REQUESTS = 1_000_000
FLEET_INSTANCES = 1_000
# Arrivals per instance per second that keep a Llama-2-7B A100 instance ~80% busy under FIFO with
# Azure conv lengths: pilot runs of 3,000 requests on 8 instances gave utilisation 0.58 at 0.25,
# 0.68 at 0.30, 0.81 at 0.38 and 0.92 at 0.50 req/s; the fleet run reports its own utilisation.
FLEET_RATE_PER_INSTANCE = 0.38
LIMITS_S = {"loads": 300, "embedding": 300, "instances": 600, "fleet": 1800}


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _experiment_cell(overrides: list[str]) -> dict:
    """Simulate one composed experiment config (as `python -m sagesched.experiment` would)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sagesched.experiment import build_policy, conf_dir, workload_requests
    from sagesched.replay.cluster import sim_cluster_dict

    with initialize_config_dir(version_base=None, config_dir=str(conf_dir())):
        cfg = compose(config_name="config", overrides=[*overrides, "sim.progress=false"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    seed = int(resolved["seed"])
    reqs = workload_requests(resolved["workload"], seed)
    cluster = ClusterConfig.from_dict(sim_cluster_dict(resolved["cluster"]))
    sim = SimConfig.from_dict({**resolved["sim"], "seed": seed})
    cpu = time.process_time()
    result = simulate(reqs, cluster, build_policy(resolved["policy"]), sim)
    return _cell_result(result, len(reqs), time.process_time() - cpu)


def _cell_result(result, n: int, cpu_s: float) -> dict:
    """Wall and CPU figures of one simulation. On a shared machine the wall time also counts time
    other jobs held the cores; the simulation's own CPU time (`sim_cpu_s`) does not."""
    out = result.records.outcome
    calls = result.stats["policy_calls"]
    return {
        "requests": n,
        "wall_s": round(result.wall_s, 3),
        "requests_per_s": round(n / result.wall_s, 1),
        "sim_cpu_s": round(cpu_s, 3),
        "requests_per_cpu_s": round(n / max(cpu_s, 1e-9), 1),
        "policy_calls": calls,
        "policy_s": round(result.stats["policy_s"], 3),
        "policy_us_per_call": round(1e6 * result.stats["policy_s"] / max(1, calls), 1),
        "completed": int((out == "completed").sum()),
        "rejected": int((out == "rejected").sum()),
        "sim_time_s": round(result.stats["sim_time_s"], 1),
    }


def _instances_cell(policy: str, count: int) -> dict:
    model = "llama-2-7b"
    reqs, _ = requests(model)
    cluster = ClusterConfig(
        tuple(InstanceConfig(id=f"llm-{k:04d}", model=model, hardware="a100") for k in range(count))
    )
    cpu = time.process_time()
    result = simulate(reqs, cluster, make_policy(policy), SimConfig(mode="jump", timeline_interval_s=1.0))
    return _cell_result(result, len(reqs), time.process_time() - cpu)


def _fleet_cell(n: int, count: int, rate_per_instance: float) -> dict:
    """Poisson arrivals at `rate_per_instance` x `count`, (prompt, output) pairs drawn from the
    Azure conv trace, on `count` Llama-2-7B A100 instances under FIFO."""
    model = "llama-2-7b"
    _, prompt, output, _ = load_azure_conv()
    rng = np.random.default_rng(12)
    pick = rng.integers(0, len(prompt), n)
    arrival = np.cumsum(rng.exponential(1.0 / (rate_per_instance * count), n))
    reqs = [
        Request(
            id=f"fleet-{i}",
            type=RequestType.LLM_CHAT,
            model=model,
            arrival_s=float(arrival[i]),
            prompt_tokens=int(prompt[pick[i]]),
            max_tokens=max(1, int(output[pick[i]])),
            output_tokens=max(1, int(output[pick[i]])),
        )
        for i in range(n)
    ]
    del arrival, pick
    cluster = ClusterConfig(
        tuple(InstanceConfig(id=f"llm-{k:04d}", model=model, hardware="a100") for k in range(count))
    )
    cpu = time.process_time()
    result = simulate(reqs, cluster, make_policy("fifo"), SimConfig(mode="jump", timeline_interval_s=1.0))
    cpu = time.process_time() - cpu
    util = [s["utilization"] for s in result.stats["instances"].values()]
    return {
        **_cell_result(result, n, cpu),
        "instances": count,
        "rate_rps": rate_per_instance * count,
        "mean_utilization": round(float(np.mean(util)), 3),
        "timeline_rows": 0 if result.timeline is None else len(result.timeline),
    }


def run_cell(spec: dict) -> dict:
    """One cell, in this process (the `--cell` entry point)."""
    kind = spec["kind"]
    if kind in ("loads", "embedding"):
        out = _experiment_cell(spec["overrides"])
    elif kind == "instances":
        out = _instances_cell(spec["policy"], spec["count"])
    elif kind == "fleet":
        out = _fleet_cell(spec["requests"], spec["count"], spec["rate_per_instance"])
    else:
        raise ValueError(f"unknown cell kind {kind!r}")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds of this process (building the workload included): on a shared machine the wall
    # time also counts the time other jobs held the cores.
    return {**spec, **out, "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_mb": _peak_rss_mb()}


def _spawn(spec: dict, limit_s: float) -> dict:
    started = time.perf_counter()
    cmd = [sys.executable, __file__, "--cell", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return {**spec, "timed_out_after_s": limit_s}
    if done.returncode != 0:
        return {**spec, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = round(time.perf_counter() - started, 1)
    return out


def suite_specs(
    name: str,
    policies: list[str],
    counts: tuple[int, ...] = INSTANCE_COUNTS,
    limit_s: float | None = None,
    extra: tuple[str, ...] = (),
) -> list[tuple[dict, float]]:
    specs: list[tuple[dict, float]] = []
    if name in ("loads", "all"):
        for policy in policies:
            for scale in SCALES:
                overrides = [f"policy={policy}", f"workload.rate_scale={scale}", *extra]
                specs.append(({"kind": "loads", "policy": policy, "scale": scale, "overrides": overrides}, 0))
    if name in ("embedding", "all"):
        for policy in policies:
            overrides = [
                f"policy={policy}",
                "workload=embedding_heavy",
                "cluster=rag_mixed",
                "workload.rate_scale=3.0",
                *extra,
            ]
            specs.append(({"kind": "embedding", "policy": policy, "scale": 3.0, "overrides": overrides}, 0))
    if name in ("instances", "all"):
        for policy in [p for p in policies if p in INSTANCE_POLICIES] or list(INSTANCE_POLICIES):
            for count in counts:
                specs.append(({"kind": "instances", "policy": policy, "count": count}, 0))
    if name in ("fleet", "all"):
        spec = {
            "kind": "fleet",
            "requests": FLEET_REQUESTS,
            "count": FLEET_INSTANCES,
            "rate_per_instance": FLEET_RATE_PER_INSTANCE,
        }
        specs.append((spec, 0))
    return [(spec, limit_s or LIMITS_S[spec["kind"]]) for spec, _ in specs]


def summarize_suite(cells: list[dict]) -> dict:
    """The issue's targets as ratios within this run."""
    out: dict = {}
    loads = {(c["policy"], c["scale"]): c for c in cells if c["kind"] == "loads"}
    ratios = {}
    for policy in sorted({p for p, _ in loads}):
        one, three = loads.get((policy, 1.0)), loads.get((policy, 3.0))
        if one and three and "requests_per_s" in one and "requests_per_s" in three:
            ratios[policy] = round(three["requests_per_s"] / one["requests_per_s"], 3)
        else:
            ratios[policy] = None
    cpu_ratios = {}
    for policy in sorted({p for p, _ in loads}):
        one, three = loads.get((policy, 1.0)), loads.get((policy, 3.0))
        if one and three and "requests_per_cpu_s" in one and "requests_per_cpu_s" in three:
            cpu_ratios[policy] = round(three["requests_per_cpu_s"] / one["requests_per_cpu_s"], 3)
    if cpu_ratios:
        out["cpu_speed_3x_over_1x"] = cpu_ratios
    if ratios:
        out["speed_3x_over_1x"] = ratios
        out["target_3x_over_1x_met"] = {p: (r is not None and r >= 0.3) for p, r in ratios.items()}
    inst = {(c["policy"], c["count"]): c for c in cells if c["kind"] == "instances"}
    scaling = {}
    for policy in INSTANCE_POLICIES:
        base = inst.get((policy, 4))
        if not base or "requests_per_s" not in base:
            continue
        scaling[policy] = {
            str(n): round(inst[(policy, n)]["requests_per_s"] / base["requests_per_s"], 3)
            for n in INSTANCE_COUNTS
            if (policy, n) in inst and "requests_per_s" in inst[(policy, n)]
        }
    cpu_scaling = {}
    for policy in INSTANCE_POLICIES:
        base = inst.get((policy, 4))
        if base and "requests_per_cpu_s" in base:
            cpu_scaling[policy] = {
                str(n): round(inst[(policy, n)]["requests_per_cpu_s"] / base["requests_per_cpu_s"], 3)
                for n in INSTANCE_COUNTS
                if (policy, n) in inst and "requests_per_cpu_s" in inst[(policy, n)]
            }
    if cpu_scaling:
        out["cpu_speed_vs_4_instances"] = cpu_scaling
    if scaling:
        out["speed_vs_4_instances"] = scaling
        out["target_256_over_4_met"] = {p: s.get("256", 0) >= 0.7 for p, s in scaling.items()}
    fleet = [c for c in cells if c["kind"] == "fleet"]
    if fleet and "wall_s" in fleet[0]:
        f = fleet[0]
        out["fleet"] = {
            "wall_s": f["wall_s"],
            "peak_rss_mb": f["peak_rss_mb"],
            "target_met": f["wall_s"] < 600 and f["peak_rss_mb"] < 4096,
        }
    return out


def _machine(load_before: tuple[float, float, float]) -> dict:
    """Where a suite ran, with the load average around it (the machine is shared: say how busy it was)."""
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def run_suite(
    name: str,
    policies: list[str] | None,
    out_path: Path | None,
    counts: tuple[int, ...] = INSTANCE_COUNTS,
    limit_s: float | None = None,
    extra: tuple[str, ...] = (),
) -> dict:
    from sagesched.policies import available_policies

    chosen = policies or sorted(available_policies())
    load_before = os.getloadavg()
    cells = []
    for spec, limit in suite_specs(name, chosen, counts, limit_s, extra):
        cell = _spawn(spec, limit)
        cells.append(cell)
        brief = {k: cell.get(k) for k in ("wall_s", "requests_per_s", "peak_rss_mb", "timed_out_after_s", "error")}
        label = spec.get("policy", "fifo")
        sys.stderr.write(f"{spec['kind']:>9} {label:>13} {spec.get('scale', spec.get('count', ''))!s:>6}: {brief}\n")
        if out_path:  # keep what is done so far
            out_path.write_text(json.dumps({"suite": name, "cells": cells}, indent=2) + "\n")
    result = {
        "benchmark": "sim_speed",
        "suite": name,
        "summary": summarize_suite(cells),
        "cells": cells,
        "machine": _machine(load_before),
    }
    if out_path:
        out_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _light_run(root: Path, policy: str) -> dict:
    """One light-load run (`--skip-step --repeat 1`) of `root`'s own sim_speed.py in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, str(root / "benchmarks" / "sim_speed.py"), "--json", "--skip-step", "--repeat", "1"]
    done = subprocess.run([*cmd, "--policy", policy], capture_output=True, text=True, env=env, cwd=root, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = json.loads(done.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": out["wall_s"], "requests": out["requests"], "process_cpu_s": round(cpu, 3)}


def compare_baseline(baseline: Path, policies: list[str], repeat: int, out_path: Path | None) -> dict:
    """The light-load benchmark here and in `baseline`, interleaved (module docstring)."""
    here = Path(__file__).resolve().parents[1]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    for _ in range(max(1, repeat)):
        for policy in policies:
            for side, root in (("baseline", baseline.resolve()), ("this", here)):
                runs.setdefault(f"{policy}/{side}", []).append(_light_run(root, policy))
    best = {k: min(r["wall_s"] for r in v) for k, v in runs.items()}
    cpu = {k: min(r["process_cpu_s"] for r in v) for k, v in runs.items()}
    n = next(iter(runs.values()))[0]["requests"]
    result = {
        "benchmark": "sim_speed_light_baseline",
        "baseline": str(baseline),
        "runs": runs,
        "fastest_wall_s": best,
        "requests_per_s": {k: round(n / w, 1) for k, w in best.items()},
        "this_over_baseline": {p: round(best[f"{p}/baseline"] / best[f"{p}/this"], 3) for p in policies},
        "this_over_baseline_process_cpu": {p: round(cpu[f"{p}/baseline"] / cpu[f"{p}/this"], 3) for p in policies},
        "how": "each repetition: this script's light-load run (--skip-step --repeat 1: the Azure conv trace on 4 "
        "A100 instances, jump mode) in a fresh process, in the baseline tree then in this one; fastest wall of "
        "each, and the least process CPU (trace loading and imports included, the same work on both sides)",
        "machine": _machine(load_before),
    }
    if out_path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--policy", default="hybrid")
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    parser.add_argument("--skip-step", action="store_true", help="do not run the step-mode reference")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each mode, interleaved; the fastest counts (a shared machine only ever adds time)",
    )
    parser.add_argument("--suite", choices=["loads", "embedding", "instances", "fleet", "all"], default=None)
    parser.add_argument("--policies", default=None, help="comma-separated policies for --suite (default: all)")
    parser.add_argument("--counts", default=None, help="comma-separated instance counts for --suite instances")
    parser.add_argument("--limit-s", type=float, default=None, help="per-cell time limit (default per suite)")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override for experiment cells")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # one suite cell, as JSON (internal)
    parser.add_argument(
        "--baseline", type=Path, default=None, help="an older checkout: light-load runs there and here, interleaved"
    )
    args = parser.parse_args(argv)

    if args.baseline:
        result = compare_baseline(args.baseline, (args.policies or args.policy).split(","), args.repeat, args.out)
        sys.stdout.write(
            json.dumps(
                {k: result[k] for k in ("requests_per_s", "this_over_baseline", "this_over_baseline_process_cpu")},
                indent=2,
            )
            + "\n"
        )
        return result

    if args.cell:
        result = run_cell(json.loads(args.cell))
        sys.stdout.write(json.dumps(result) + "\n")
        return result
    if args.suite:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
        policies = args.policies.split(",") if args.policies else None
        counts = tuple(int(c) for c in args.counts.split(",")) if args.counts else INSTANCE_COUNTS
        result = run_suite(args.suite, policies, args.out, counts, args.limit_s, tuple(args.override))
        if args.json:
            sys.stdout.write(json.dumps(result["summary"], indent=2) + "\n")
        return result

    model = "llama-2-7b"
    load_before = os.getloadavg()
    reqs, source = requests(model)
    if args.limit:
        reqs = reqs[: args.limit]
    cluster = ClusterConfig(
        tuple(InstanceConfig(id=f"llm-{k}", model=model, hardware="a100") for k in range(args.instances))
    )

    t = time.perf_counter()
    from sagesched.sim.perf_provider import default_perf_provider

    default_perf_provider(cluster.instances[0])  # load + fit the performance model once (cached)
    perf_load_s = time.perf_counter() - t

    fast_walls: list[float] = []
    step_walls: list[float] = []
    fast = ref = None
    for _ in range(max(1, args.repeat)):
        policy, policy_name = policy_for(args.policy)
        fast = simulate(reqs, cluster, policy, SimConfig(mode="jump", timeline_interval_s=1.0))
        fast_walls.append(fast.wall_s)
        if not args.skip_step:
            policy, _ = policy_for(args.policy)
            ref = simulate(reqs, cluster, policy, SimConfig(mode="step", timeline_interval_s=1.0))
            step_walls.append(ref.wall_s)
    wall = min(fast_walls)
    result: dict = {
        "benchmark": "sim_speed",
        "trace": Path(source).name,
        "requests": len(reqs),
        "instances": args.instances,
        "model": model,
        "hardware": "a100",
        "policy": policy_name,
        "repeat": len(fast_walls),
        "wall_s": round(wall, 3),
        "wall_s_all": [round(w, 3) for w in fast_walls],
        "requests_per_s": round(len(reqs) / wall, 1),
        "events": fast.stats["events"],
        "policy_calls": fast.stats["policy_calls"],
        "policy_s": round(fast.stats["policy_s"], 3),
        "policy_us_per_call": round(1e6 * fast.stats["policy_s"] / max(1, fast.stats["policy_calls"]), 1),
        "perf_model_load_s": round(perf_load_s, 3),
        "completed": int((fast.records.outcome == "completed").sum()),
        "sim_time_s": round(fast.stats["sim_time_s"], 3),
    }
    if ref is not None:
        step_wall = min(step_walls)
        a, b = fast.records, ref.records
        diffs = [np.nanmax(np.abs(a[c].to_numpy(float) - b[c].to_numpy(float))) for c in ("ttft_ms", "e2e_ms")]
        result.update(
            step_mode_wall_s=round(step_wall, 3),
            step_mode_wall_s_all=[round(w, 3) for w in step_walls],
            step_mode_events=ref.stats["events"],
            speedup_vs_step_mode=round(step_wall / wall, 2),
            max_abs_latency_diff_ms=float(max(diffs)),
            same_placements=bool((a.instance_id == b.instance_id).all()),
        )
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_rss_mb"] = round(rss_kb / 1024.0, 1)
    result["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        sys.stdout.write(text + "\n")
    else:
        for key, value in result.items():
            sys.stdout.write(f"{key:>26}: {value}\n")
    return result


if __name__ == "__main__":
    main()
