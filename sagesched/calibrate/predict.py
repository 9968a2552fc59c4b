"""Replay a measured run through the simulator and summarise it the way the client measured it.

The same function serves the fitter (short windows of each stage, many times) and the fidelity report
(the full stages, once): one vLLM instance with the measured server's settings, a FIFO gateway, the
run's exact arrival times and prompts.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from sagesched.calibrate.runs import MeasuredRun, build_requests
from sagesched.policies import make_policy
from sagesched.sim import ClusterConfig, InstanceConfig, SimConfig, simulate
from sagesched.sim.config import VllmEngineConfig
from sagesched.sim.frontend import frontend_delays

#: Hugging Face model id -> the profile name the simulator knows it by.
HF_TO_PROFILE = {
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
    "meta-llama/Llama-2-70b-hf": "llama-2-70b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
}


def profile_name(hf_id: str) -> str:
    """The shipped model profile for a Hugging Face id; ValueError naming the known ids."""
    if hf_id in HF_TO_PROFILE:
        return HF_TO_PROFILE[hf_id]
    raise ValueError(f"no model profile for {hf_id!r}; known: {sorted(HF_TO_PROFILE)}")


def model_ref(run: MeasuredRun, operators: str = "vidur") -> str:
    """What `LLMPerfModel.load` gets for `run`'s model: the shipped profile ("vidur": its Vidur operator
    curves where they exist), or ("roofline") the run's own Hugging Face config.json next to the runs
    (`model_config/<name>.config.json`), timed by the GPU's fitted roofline with no profile at all."""
    if operators == "vidur":
        return profile_name(run.server.model)
    if operators != "roofline":
        raise ValueError(f"operators={operators!r}: use 'vidur' or 'roofline'")
    path = run.path.parent / "model_config" / f"{run.server.model.split('/')[-1]}.config.json"
    if not path.is_file():
        raise ValueError(f"no {path} for the roofline path (a Hugging Face config.json of {run.server.model})")
    return str(path)


def instance_for(run: MeasuredRun, max_inflight: int = 100_000) -> InstanceConfig:
    """One vLLM instance configured as the measured server was (budget, sequence cap, max_model_len)."""
    s = run.server
    vllm = VllmEngineConfig(
        max_num_batched_tokens=s.max_num_batched_tokens,
        max_num_seqs=s.max_num_seqs,
        block_size=16,
        prefix_hash_block_tokens=16,
        enable_prefix_caching=True,
    )
    if hasattr(vllm, "max_model_len"):
        vllm = replace(vllm, max_model_len=s.max_model_len)
    return InstanceConfig(
        id="vllm-0",
        model=profile_name(s.model),
        hardware=run.hardware,
        tensor_parallel=s.tensor_parallel,
        max_inflight=max_inflight,
        vllm=vllm,
    )


def add_frontend(fe, arrival, ttft, e2e, prompt, done) -> tuple[np.ndarray, np.ndarray]:
    """Client-side TTFT and E2E: the engine's plus the frontend's cost (`sagesched.sim.frontend`)."""
    first = arrival + ttft
    finish = np.where(done, arrival + e2e, np.inf)
    d_first, d_finish = frontend_delays(fe, arrival, first, finish, prompt)
    ttft_out = ttft + d_first
    # A stream's last chunk never reaches the client before its first (`sim.frontend.apply_frontend`).
    return ttft_out, np.maximum(e2e + d_finish, ttft_out)


def predict_run(
    run: MeasuredRun, perf, window_s: float | None = None, mode: str = "jump", warmup_s: float = 0.0
) -> list[dict[str, float]]:
    """Simulated per-stage statistics (`runs.STATS`, seconds) of `run` with the LLM perf model `perf`.

    Requests are attributed to the stage they arrived in; requests arriving in the first `warmup_s` of
    a stage are left out of its statistics (the server was already warm when the measured stage began,
    except for the very first). Requests unfinished at the end are left out, as inference-perf reports
    only successes; for a saturated run, so are those that finish after the run's last stage ends.
    """
    inst = instance_for(run)
    reqs, spans = build_requests(run, profile_name(run.server.model), window_s)
    horizon = spans[-1][1] + (600.0 if window_s is None else 4.0 * window_s)
    res = simulate(
        reqs,
        ClusterConfig((inst,)),
        make_policy("fifo"),
        SimConfig(mode=mode, timeline_interval_s=0.0, max_time_s=horizon),
        perf_provider=lambda _cfg: (perf, None),
    )
    rec = res.records
    fe = perf.frontend_s if hasattr(perf, "frontend_s") else None
    arrival = rec["arrival_s"].to_numpy(float)
    ttft = rec["ttft_ms"].to_numpy(float) / 1e3
    e2e = rec["e2e_ms"].to_numpy(float) / 1e3
    done = (rec["outcome"] == "completed").to_numpy()
    if fe is not None and "frontend_applied" not in res.stats:  # a simulator without the frontend hook
        ttft, e2e = add_frontend(fe, arrival, ttft, e2e, rec["prompt_tokens"].to_numpy(), done)
    out_len = run.workload.output_len
    stages = []
    for i, (a, b) in enumerate(spans):
        lo = a + (warmup_s if i > 0 else 0.0)
        sel = done & (arrival >= lo) & (arrival < b)
        if run.saturated:
            # Past saturation the client gave up on what had not finished when the run ended (inference-perf
            # counts those as failures): compare the requests that finished by then.
            sel &= arrival + e2e <= spans[-1][1]
        if not sel.any():
            stages.append(
                {
                    "e2e_mean": np.nan,
                    "e2e_p90": np.nan,
                    "ttft_mean": np.nan,
                    "ttft_p90": np.nan,
                    "itl_mean": np.nan,
                    "completed": 0,
                    "offered": int(((arrival >= lo) & (arrival < b)).sum()),
                }
            )
            continue
        e, t = e2e[sel], ttft[sel]
        stages.append(
            {
                "e2e_mean": float(e.mean()),
                "e2e_p90": float(np.percentile(e, 90)),
                "ttft_mean": float(t.mean()),
                "ttft_p90": float(np.percentile(t, 90)),
                "itl_mean": float((e.mean() - t.mean()) / max(1, out_len - 1)),
                "completed": int(sel.sum()),
                "offered": int(((arrival >= lo) & (arrival < b)).sum()),
            }
        )
    return stages
