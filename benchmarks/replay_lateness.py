"""Send lateness of the live replay driver: does one process keep an open-loop schedule?

    python benchmarks/replay_lateness.py --json          # writes benchmarks/results/replay_lateness.json

Target (issue 10): send lateness p99 < 5 ms at 50 requests/s. Lateness is the actual send time
minus the intended arrival (sagesched.replay.loadgen); latency is counted from the intended
arrival anyway, so lateness does not flatter the server, but a late generator would change the
load the server sees.

One run, in this order, in this process:

1. reference: the open-loop generator with a send that does nothing: the floor this event loop's
   timers give on this machine right now;
2. `driver=live` (mode policy): the shipped Azure conv workload's lengths on Poisson arrivals at
   `--rate` for `--duration` seconds, through the LiveExecutor with the hybrid policy, streaming,
   against a vLLM emulator at zero latency (`sagesched emulate vllm --time-scale 0`, a separate
   process on the same cores: every request really streams its tokens over HTTP, all at once);
3. the same workload in mode endpoint (our HTTP client straight to the emulator, no policy).

The machine is shared (2 cores, other work): compare rows within one run; the reference row
says how noisy the timers were.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "replay_lateness.json"


def _stats(values: list[float]) -> dict[str, Any]:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return {
        "n": len(v),
        "p50_ms": round(float(np.percentile(v, 50)), 4),
        "p99_ms": round(float(np.percentile(v, 99)), 4),
        "max_ms": round(float(v.max()), 4),
    }


def reference(rate: float, duration: float) -> dict[str, Any]:
    """The generator alone (a no-op send) on the same Poisson schedule."""
    import numpy as np

    from sagesched.replay.loadgen import Schedule, run_open_loop

    rng = np.random.default_rng(0)
    gaps = rng.exponential(1.0 / rate, size=int(rate * duration))

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.2
        schedule = Schedule((t0 + np.cumsum(gaps)).tolist())
        tasks: list[asyncio.Task[None]] = []

        async def send(i: int) -> None:
            return None

        await run_open_loop(schedule, send, loop.time, tasks)
        await asyncio.gather(*tasks)
        return schedule.lateness_ms()

    return _stats(asyncio.run(main()))


def replay_row(mode: str, rate: float, duration: float, url: str) -> dict[str, Any]:
    from sagesched.experiment import build_policy
    from sagesched.live.backends import BackendConfig
    from sagesched.replay.config import DriverConfig
    from sagesched.replay.live import replay
    from sagesched.replay.prompts import PromptBuilder, calibrate
    from sagesched.sim.workloads import build_workload

    workload = {
        "trace": "azure_conv",
        "duration_s": duration,
        "arrival": {"process": "poisson", "rate_rps": rate},
        "lengths": {"source": "trace"},
        "mix": {"chat": 1.0, "generate": 0.0, "embedding": 0.0},
        "embedding": {"stream_rps": 0.0},
    }
    requests = build_workload(workload, seed=1)
    driver = DriverConfig.from_dict(
        {"name": "live", "mode": mode, "endpoint": {"url": url}, "progress": False, "timeline_interval_s": 1.0}
    )
    builder = PromptBuilder(calibrate(url, "llama-2-7b", ("chat",)))
    policy = build_policy({"name": "hybrid"}) if mode == "policy" else None
    backends = [BackendConfig(url=url, kind="llm", models=["llama-2-7b"], id="vllm-emulator", max_inflight=512)]
    started, cpu0 = time.perf_counter(), time.process_time()
    result = replay(requests, driver, builder, policy=policy, backends=backends if policy else ())
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    outcomes = result.records["outcome"].value_counts().to_dict()
    return {
        "mode": mode,
        "requests": len(requests),
        "offered_rps": round(len(requests) / duration, 2),
        "output_tokens_streamed": int(result.records["output_tokens"].sum()),
        "outcomes": {str(k): int(v) for k, v in outcomes.items()},
        # Failures are the server's answers, e.g. its 400 for prompt + output beyond the model's context.
        "failure_reasons": {
            str(k)[:120]: int(v)
            for k, v in result.records.loc[result.records["outcome"] != "completed", "reason"]
            .str.replace(r"[0-9a-f]{32}", "<id>", regex=True)
            .str.replace(r"\d+", "N", regex=True)
            .value_counts()
            .head(3)
            .items()
        },
        "send_lateness": _stats(result.live["send_lateness_ms"].dropna().tolist()),
        "wall_s": round(wall, 2),
        "driver_cpu_s": round(cpu, 2),
        "driver_cpu_us_per_streamed_token": round(cpu * 1e6 / max(1, int(result.records["output_tokens"].sum())), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second (Poisson)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per row")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.0,
        help="emulator wall seconds per engine second (0 = zero latency: every token streams at once, "
        "the hardest case for the driver's loop; 1 = an A100's pace)",
    )
    parser.add_argument("--modes", nargs="+", default=["policy", "endpoint"], choices=["policy", "endpoint"])
    parser.add_argument("--json", action="store_true", help=f"write {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args(argv)

    from sagesched.live.emulators.runner import start_emulator

    load_start = os.getloadavg()
    rows: dict[str, Any] = {"reference_noop_send": reference(args.rate, args.duration)}
    with start_emulator("vllm", subprocess=True, time_scale=args.time_scale, max_num_seqs=512) as emulator:
        for mode in args.modes:
            rows[mode] = replay_row(mode, args.rate, args.duration, emulator.url)
    out = {
        "benchmark": "replay_lateness",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python benchmarks/replay_lateness.py --json"
        + (f" --rate {args.rate:g}" if args.rate != 50 else ""),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in load_start],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "note": "generator, executor and emulator share these cores with each other and other work",
        },
        "target": "send lateness p99 < 5 ms at 50 req/s",
        "rate_rps": args.rate,
        "duration_s": args.duration,
        "rows": rows,
        "emulator": f"sagesched emulate vllm --time-scale {args.time_scale:g} --max-num-seqs 512 (separate process)",
        "met": all(rows[m]["send_lateness"]["p99_ms"] < 5.0 for m in args.modes),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
