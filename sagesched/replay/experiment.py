"""`driver=live` for the experiment entry point: the same config, replayed against real servers.

Builds exactly what `driver=sim` builds (policy, workload requests, the cluster), then replays the
requests open loop (sagesched.replay.live) and writes the same files: `requests.parquet` with the
simulator's columns, `timeline.parquet`, `summary.json` with the simulator's keys (`sim` and
`sim_wall_s` are null) plus the live-only ones, the same plots, and `live.parquet` (per-request
send lateness and requested vs. server token counts).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from sagesched.replay.config import DriverConfig

log = logging.getLogger(__name__)


def run_live(
    resolved: dict[str, Any], driver: DriverConfig, out: Path, *, progress: bool | None = None
) -> dict[str, Any]:
    """Replay `resolved` (a composed experiment config) with `driver`; write into `out`; return the summary."""
    from sagesched.experiment_parts import ExperimentError, build_policy, ended_reasons, json_default, workload_requests
    from sagesched.metrics import summarize
    from sagesched.replay.cluster import backend_configs, block_tokens, sim_cluster_dict
    from sagesched.replay.live import replay
    from sagesched.replay.prompts import Calibration, PromptBuilder, calibrate, calibrate_embeddings

    seed = int(resolved.get("seed", 0))
    out.mkdir(parents=True, exist_ok=True)
    if "cluster" not in resolved or "workload" not in resolved:
        raise ExperimentError("config groups `cluster` and `workload` are needed; check conf/config.yaml's defaults")
    endpoint_mode = driver.mode == "endpoint"
    policy = None if endpoint_mode else build_policy(resolved["policy"])
    backends = [] if endpoint_mode else backend_configs(resolved["cluster"])
    started = time.perf_counter()
    requests = workload_requests(resolved["workload"], seed)

    calibration = Calibration()
    llm = [r for r in requests if not r.is_embedding]
    if driver.prompts.calibrate and llm:
        endpoints = sorted({"chat" if r.type.value == "llm_chat" else "completions" for r in llm})
        if endpoint_mode:
            url = str(driver.endpoint.url)
        else:
            serving = [b for b in backends if llm[0].model in b.models and b.kind.value != "embedding"]
            if not serving:
                raise ExperimentError(f"no cluster instance with a url serves model {llm[0].model!r}")
            url = serving[0].url
        calibration = calibrate(url, llm[0].model, endpoints, use_tokenize=driver.prompts.tokenize)
    embeddings = [r for r in requests if r.is_embedding]
    if driver.prompts.calibrate and embeddings:
        model = embeddings[0].model
        if endpoint_mode:
            emb_url = str(driver.endpoint.url)
        else:
            serving = [b for b in backends if model in b.models and b.kind.value != "llm" and b.api == "openai"]
            emb_url = serving[0].url if serving else ""
        if emb_url:
            calibrate_embeddings(calibration, emb_url, model)
    blocks = driver.prompts.block_tokens or block_tokens(resolved["cluster"])
    builder = PromptBuilder(calibration, block_tokens=blocks, seed=driver.prompts.seed)

    result = replay(requests, driver, builder, policy=policy, backends=backends, progress=progress)

    summary = summarize(result.records)
    offered_s = max(requests[-1].arrival_s - requests[0].arrival_s, 1e-9)
    label = str(resolved.get("label") or (policy.name if policy else "endpoint"))
    bound = None
    try:
        from sagesched.bounds import bound_summary
        from sagesched.sim import ClusterConfig

        bound = bound_summary(requests, ClusterConfig.from_dict(sim_cluster_dict(resolved["cluster"])))
    except (ValueError, KeyError, TypeError) as exc:  # a URL-only cluster has no performance model
        log.info("no offline bound for this cluster: %s", exc)
    summary["sim"] = None
    summary.update(
        ended_reasons=ended_reasons(result.records),
        driver="live",
        policy=policy.name if policy else "endpoint",
        label=label,
        policy_config=policy.describe() if policy else {"endpoint": driver.endpoint.url},
        seed=seed,
        offered_rps=len(requests) / offered_s,
        sim_wall_s=None,
        total_wall_s=time.perf_counter() - started,
        bound=bound,
        config=resolved,
    )
    summary.update(result.live_summary())
    summary["live"] = {**result.stats, "calibration": calibration.as_dict(), "block_tokens": blocks}
    result.records.to_parquet(out / "requests.parquet", index=False)
    result.live.to_parquet(out / "live.parquet", index=False)
    if len(result.timeline):
        result.timeline.to_parquet(out / "timeline.parquet", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default))
    from sagesched.plots import plot_run

    plot_run(result.records, result.timeline, out)
    return summary
