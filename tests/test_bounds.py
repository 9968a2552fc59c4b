"""The isolated-service bound: no simulated request may beat it, and its closed form is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sagesched.bounds import _decode_s, bound_summary, isolated_latencies
from sagesched.core import SLO, RejectCode, Rejection, Request, RequestType
from sagesched.metrics import summarize
from sagesched.policies import make_policy
from sagesched.policies.fifo import FifoPolicy
from sagesched.sim import ClusterConfig, SimConfig, simulate
from sagesched.sim.perf_model import BatchShape, LLMPerfModel
from sagesched.sim.workloads import WorkloadConfig, build_workload

MIXED = ClusterConfig.from_dict(
    {
        "instances": [
            {"id": "llm", "kind": "llm", "model": "llama-2-7b", "max_inflight": 32},
            {"id": "mixed", "kind": "llm_embedding", "model": "llama-2-7b", "embedding_model": "bge-base"},
            {"id": "tei", "kind": "embedding", "embedding_model": "bge-base", "model": None},
        ]
    }
)
CLASSES = {
    "interactive": {"fraction": 0.5, "priority": "high", "ttft_ms": 300, "tpot_ms": 40, "types": ["chat"]},
    "standard": {"fraction": 0.5, "priority": "normal", "ttft_ms": 2000, "types": ["chat"]},
    "query": {"fraction": 1.0, "priority": "high", "e2e_ms": 20, "types": ["embedding"]},
}


def _workload(trace: str, rate_scale: float, duration_s: float, **extra) -> WorkloadConfig:
    return WorkloadConfig.from_dict(
        {
            "trace": trace,
            "rate_scale": rate_scale,
            "duration_s": duration_s,
            "llm_model": "llama-2-7b",
            "embedding_model": "bge-base",
            "classes": CLASSES,
            **extra,
        }
    )


def _check_not_beaten(requests, cluster, policy_name: str, rel: float = 0.0) -> dict:
    result = simulate(requests, cluster, make_policy(policy_name), SimConfig(timeline_interval_s=0))
    records = result.records.set_index("request_id")
    bound = isolated_latencies(requests, cluster)
    ids = [r.id for r in requests]
    sim = records.loc[ids]
    done = sim["outcome"].to_numpy() == "completed"
    assert done.any()
    eps = 1e-6  # ms; float summation order only
    for col, k in (("ttft_ms", 0), ("e2e_ms", 2)):
        got = sim[col].to_numpy(dtype=float)[done]
        low = bound[done, k]
        ok = np.isnan(got) | np.isnan(low) | (got >= low * (1.0 - rel) - eps)
        worst = np.flatnonzero(~ok)
        assert not len(worst), (
            f"{policy_name}: {len(worst)} requests beat the {col} bound, e.g. "
            f"{np.array(ids)[done][worst[0]]}: {got[worst[0]]:.3f} < {low[worst[0]]:.3f} ms"
        )
    summary = summarize(result.records)
    upper = bound_summary(requests, cluster)
    assert summary["duration_s"] >= upper["span_lower_s"] - 1e-9
    assert summary["slo_attainment"] <= upper["slo_attainment_upper"] + 1e-12
    assert summary["goodput_rps"] <= upper["goodput_rps_upper"] + 1e-9
    assert upper["goodput_rps_upper"] <= upper["goodput_rps_upper_refusing"] + 1e-12
    return upper


# No shrinking: each example is a whole simulation, and the failure message already names the request.
@settings(
    max_examples=6, deadline=None, phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow]
)
@given(
    seed=st.integers(0, 10_000),
    rate_scale=st.sampled_from([0.5, 2.0, 6.0]),
    policy=st.sampled_from(["fifo", "hybrid", "least_loaded", "slo_aware"]),
)
def test_no_request_beats_its_isolated_latency_on_a_mixed_cluster(seed, rate_scale, policy):
    """Chats and query embeddings over LLM-only, shared and TEI instances, light to overloaded."""
    config = _workload(
        "azure_conv", rate_scale, 30.0 * rate_scale, embedding={"stream_rps": 3.0, "inputs": 2, "max_inputs": 6}
    )
    requests = build_workload(config, seed)
    assert any(r.is_embedding for r in requests) and any(not r.is_embedding for r in requests)
    _check_not_beaten(requests, MIXED, policy)


def test_bound_holds_with_long_prompts_and_shared_prefixes():
    """Mooncake's shared prefixes: the bound credits every previously seen block as cached.

    One known gap, documented in sagesched.bounds: the performance model prices a step holding several
    prefill chunks as chunks of equal size, so a 30k-context chunk sharing a step with a fresh prompt is
    priced below its cost alone (measured here: TTFT 1.6% under the bound for one request of 150).
    The allowance below is for that approximation only; e2e and single-instance runs stay exact.
    """
    requests = build_workload(_workload("mooncake", 1.0, None, max_requests=150), 3)
    assert any(r.prefix_hashes for r in requests)
    _check_not_beaten(requests, ClusterConfig.uniform(1, model="llama-2-7b"), "fifo")
    _check_not_beaten(requests, ClusterConfig.uniform(2, model="llama-2-7b"), "fifo", rel=0.03)


def test_bound_holds_for_bursty_code_trace():
    cluster = ClusterConfig.uniform(1, model="llama-2-7b")
    requests = build_workload(_workload("azure_code", 1.0, 60.0), 1)
    _check_not_beaten(requests, cluster, "fifo")


def test_an_isolated_request_meets_its_bound_exactly():
    """With nothing else running, the simulated latency of a lone request equals the bound (tightness)."""
    cluster = ClusterConfig.uniform(1, model="llama-2-7b")
    requests = build_workload(_workload("azure_conv", 1.0, 60.0, max_requests=1), 1)
    assert len(requests) == 1
    result = simulate(requests, cluster, make_policy("fifo"), SimConfig(timeline_interval_s=0))
    row = result.records.iloc[0]
    ttft, _, e2e = isolated_latencies(requests, cluster)[0]
    assert row["ttft_ms"] == pytest.approx(ttft, rel=1e-6)
    assert row["e2e_ms"] == pytest.approx(e2e, rel=1e-6)


@pytest.mark.parametrize("model,hardware", [("llama-2-7b", "a100"), ("llama-3-8b", "h100"), ("gemma-3-270m", "a100")])
@pytest.mark.parametrize("prompt,steps", [(1, 1), (17, 2), (512, 255), (3000, 1000)])
def test_closed_form_decode_sum_equals_the_explicit_sum(model, hardware, prompt, steps):
    perf = LLMPerfModel.load(model, hardware)
    explicit = math.fsum(
        perf.step_time_s(BatchShape(decode_tokens=1, decode_context_tokens=prompt + k)) for k in range(1, steps + 1)
    )
    assert _decode_s(perf, prompt, steps) == pytest.approx(explicit, rel=1e-9)


def test_unservable_requests_are_nan_and_do_not_count_as_met():
    llm_only = ClusterConfig.uniform(1, model="llama-2-7b")
    config = _workload("azure_conv", 1.0, 20.0, embedding={"stream_rps": 2.0})
    requests = build_workload(config, 2)
    lat = isolated_latencies(requests, llm_only)
    emb = np.array([r.is_embedding for r in requests])
    assert emb.any() and np.isnan(lat[emb]).all() and not np.isnan(lat[~emb, 0]).any()
    upper = bound_summary(requests, llm_only)
    assert upper["slo_attainment_upper"] <= 1.0 - emb.mean() + 1e-12


def test_a_request_no_engine_admits_gets_no_bound_and_costs_nothing():
    """A 10**12-token prompt: the simulator refuses it (KV cache), so its bound is NaN, computed at
    once instead of pricing 5e8 prefill chunks."""
    import time

    from sagesched.core import Request, RequestType
    from sagesched.sim import InstanceConfig

    cluster = ClusterConfig((InstanceConfig(id="a", model="llama-2-7b", hardware="a100"),))
    requests = [
        Request(id=i, type=RequestType.LLM_CHAT, model="llama-2-7b", arrival_s=0.0, prompt_tokens=p, max_tokens=8)
        for i, p in (("huge", 10**12), ("ok", 500))
    ]
    started = time.perf_counter()
    lat = isolated_latencies(requests, cluster)
    assert time.perf_counter() - started < 5.0
    assert np.isnan(lat[0]).all() and not np.isnan(lat[1]).any()
    result = simulate(requests, cluster, make_policy("fifo"), SimConfig(progress=False))
    outcome = dict(zip(result.records.request_id, result.records.outcome, strict=True))
    assert outcome == {"huge": "rejected", "ok": "completed"}  # the bound agrees with the simulator


class _RefuseLongAnswers(FifoPolicy):
    """FIFO that refuses every request asking for more than 1,000 tokens (a test policy, not registered)."""

    def schedule(self, now, queue, instances):
        refused = [r for r in queue if r.max_tokens > 1000]
        kept = [r for r in queue if r.max_tokens <= 1000]
        decisions = [
            Rejection(r.id, "answer too long for this test", RejectCode.SLO_UNATTAINABLE, "test") for r in refused
        ]
        return decisions + (super().schedule(now, kept, instances) if kept else [])


def test_a_policy_that_refuses_the_last_finisher_beats_the_serve_all_bound_but_not_the_refusing_one() -> None:
    """Refusing the request that would finish last ends the run sooner; `goodput_rps_upper` assumes
    every request is served, `goodput_rps_upper_refusing` does not (and the run still lasts to the
    last arrival, so refusing everything after the first answer cannot shrink it to nothing)."""
    cluster = ClusterConfig.from_dict({"instances": [{"id": "llm", "kind": "llm", "model": "llama-2-7b"}]})
    slo = SLO(ttft_ms=1000)
    requests = [
        Request("short", RequestType.LLM_CHAT, "llama-2-7b", 0.0, 100, 10, slo=slo, output_tokens=10),
        Request("long", RequestType.LLM_CHAT, "llama-2-7b", 0.5, 100, 3000, slo=slo, output_tokens=3000),
    ]
    upper = bound_summary(requests, cluster)
    result = simulate(requests, cluster, _RefuseLongAnswers(), SimConfig(timeline_interval_s=0))
    summary = summarize(result.records)
    assert summary["rejected"] == 1 and summary["slo_met"] == 1
    assert summary["duration_s"] == pytest.approx(0.5)  # to the refused request's arrival
    assert summary["goodput_rps"] > 10 * upper["goodput_rps_upper"]
    assert summary["goodput_rps"] <= upper["goodput_rps_upper_refusing"] + 1e-9
    assert upper["goodput_rps_upper_refusing"] == pytest.approx(1 / 0.5)
