"""Simulator speed: replay the whole Azure 2023 conversation trace on 4 Llama-2-7B A100 instances.

Runs the default (jump) mode and the step-by-step reference mode on the same workload and policy,
and reports simulated requests per second, the speed-up, the largest per-request latency
difference between the two modes, peak memory and the machine.

    python benchmarks/sim_speed.py --json [--out benchmarks/results/sim_speed.json] [--policy hybrid]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
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
    args = parser.parse_args(argv)

    model = "llama-2-7b"
    load_before = os.getloadavg()
    reqs, source = requests(model)
    if args.limit:
        reqs = reqs[: args.limit]
    cluster = ClusterConfig(
        tuple(InstanceConfig(id=f"llm-{k}", model=model, hardware="a100") for k in range(args.instances))
    )

    t = time.perf_counter()
    from sagesched.sim.cluster import default_perf_provider

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
