"""A fresh calibration before a replay, and the load that keeps the servers as busy as designed.

Why: the report's load (`make_report.RATE_SCALE`) was chosen for the servers' speed when the shipped
calibrations were probed, and this machine's speed drifts by tens of percent over a day (shared
hosts; README.md, "Learned view rates"). A replay on a slower machine is then a different
experiment, further past saturation, and a simulation timed by the old calibration does not predict
it. `probe_servers` probes a lone LLM and a lone embedding llama-server exactly as the shipped
calibrations were probed (`python -m sagesched.calibrate.live_report`: server pinned to one core,
this process to the others, the same probe set and fit), and `speed_ratio` says how much longer the
same requests keep the servers busy under the fresh calibration than under the shipped one.
Dividing the arrival rate by that ratio replays the same requests, stretched in time, at the
utilisation the report was designed for. Nothing here reads a replay's outcome.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any


def probe_servers(folder: Path, quick: bool = False, log: Callable[[str], None] = print) -> tuple[str, str]:
    """Probe fresh LLM and embedding servers; their calibration files (written under `folder`)."""
    from sagesched.calibrate.live_report import calibrate_server
    from sagesched.calibrate.llamacpp_server import ServerSettings, embedding_settings, split_cpus

    folder.mkdir(parents=True, exist_ok=True)
    server_cpus, client_cpus = split_cpus()
    affinity = os.sched_getaffinity(0)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    try:
        # The shipped calibrations' server settings: 4 slots of 2,048 tokens, one ggml thread.
        for settings, name in (
            (ServerSettings(parallel=4, ctx_size=8192, threads=1), "llm"),
            (embedding_settings(1), "embedding"),
        ):
            server, _, _ = calibrate_server(settings, server_cpus, folder, name, quick, log=log)
            server.stop()
    finally:
        os.sched_setaffinity(0, affinity)
    return str(folder / "llm_calibration.yaml"), str(folder / "embedding_calibration.yaml")


def busy_s(summary: dict[str, Any], prefix: str) -> float:
    """Simulated busy seconds of the instances whose id starts with `prefix` (utilisation x time)."""
    sim = summary.get("sim") or {}
    instances = {k: v for k, v in (sim.get("instances") or {}).items() if k.startswith(prefix)}
    return sum(v["utilization"] for v in instances.values()) * float(sim.get("sim_time_s") or 0.0)


def speed_ratio(
    simulate: Callable[[], dict[str, Any]], simulate_fresh: Callable[[float], dict[str, Any]], rounds: int = 8
) -> float:
    """The LLM servers' simulated busy time for the same requests, fresh calibration over shipped
    (> 1: the machine is slower now), each at the load the report would run it at.

    `simulate()` runs fifo on isolated servers under the shipped calibration at the report's load;
    `simulate_fresh(r)` under the fresh one with the arrival rates divided by `r`, and each returns
    its summary. The busy time depends on the load (a saturated server batches more rows per step),
    so the ratio is taken at the matched load it defines: from r = 1, a few fixed-point rounds (the
    first round alone was 1.39 for servers made 1.5x slower by hand; the second is within 0.5%).
    """
    shipped = busy_s(simulate(), "llm-")
    if shipped <= 0:
        raise RuntimeError("no simulated LLM work under the shipped calibration to compare with")
    ratio = 1.0
    for _ in range(rounds):
        fresh = busy_s(simulate_fresh(ratio), "llm-")
        if fresh <= 0:
            raise RuntimeError("no simulated LLM work under the fresh calibration to compare with")
        ratio, before = fresh / shipped, ratio
        if abs(ratio - before) <= 1e-3 * before:
            return ratio
    warnings.warn(
        f"the slowdown did not settle in {rounds} rounds (last two: {before:.4f}, {ratio:.4f}); using the last",
        RuntimeWarning,
        stacklevel=2,
    )
    return ratio
