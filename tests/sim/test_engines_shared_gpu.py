"""llm_embedding instances: one GPU, a vLLM engine and a TEI-like engine slowing each other."""

from __future__ import annotations

import pytest
from tiny_perf import TinyEmbPerf, make_provider

from sagesched.core import Request, RequestType
from sagesched.policies.fifo import FifoPolicy
from sagesched.sim import ClusterConfig, InstanceConfig, SharedGpuConfig, SimConfig, simulate
from sagesched.sim.engines import SharedGpu

provider = make_provider(kv_tokens=100_000)


def shared_cluster(**shared) -> ClusterConfig:
    return ClusterConfig(
        (
            InstanceConfig(
                id="mix",
                kind="llm_embedding",
                model="llama-2-7b",
                embedding_model="bge-base",
                shared=SharedGpuConfig(**shared),
            ),
        )
    )


def chat(t: float, out: int = 200) -> Request:
    return Request(
        id=f"c{t}",
        type=RequestType.LLM_CHAT,
        model="llama-2-7b",
        arrival_s=t,
        prompt_tokens=100,
        max_tokens=out,
        output_tokens=out,
    )


def emb(t: float, tokens: int = 2000) -> Request:
    return Request(
        id=f"e{t}",
        type=RequestType.EMBEDDING,
        model="bge-base",
        arrival_s=t,
        prompt_tokens=tokens,
        embedding_inputs=1,
        embedding_tokens=tokens,
    )


def test_stretch_factors_follow_weights_and_overlap():
    gpu = SharedGpu(SharedGpuConfig(llm_weight=0.7, embedding_weight=0.3, overlap=0.2))
    assert gpu.llm_stretch(False) == 1.0 and gpu.embedding_stretch(False) == 1.0
    assert gpu.llm_stretch(True) == pytest.approx(1 / (1.2 * 0.7))
    assert gpu.embedding_stretch(True) == pytest.approx(1 / (1.2 * 0.3))
    assert SharedGpu(SharedGpuConfig(overlap=1.0, llm_weight=1, embedding_weight=1)).llm_stretch(True) == 1.0


def test_embedding_alone_runs_at_full_speed_and_is_stretched_while_llm_decodes():
    cl = shared_cluster()
    service = TinyEmbPerf().batch_time_s(1, 2000, 2000)
    alone = simulate([emb(0.0)], cl, FifoPolicy(), perf_provider=provider).records.iloc[0]
    assert alone.e2e_ms == pytest.approx(service * 1000)
    df = simulate([chat(0.0), emb(0.5)], cl, FifoPolicy(), perf_provider=provider).records.set_index("request_id")
    factor = SharedGpu(cl.instances[0].shared).embedding_factor
    assert df.loc["e0.5", "e2e_ms"] == pytest.approx(service * factor * 1000)


@pytest.mark.parametrize("mode", ["jump", "step"])
def test_llm_slows_down_only_while_embedding_work_runs(mode):
    cl = shared_cluster()
    sim = SimConfig(mode=mode)
    base = simulate([chat(0.0)], cl, FifoPolicy(), sim, perf_provider=provider).records.iloc[0]
    embeds = [emb(0.3 + 0.05 * i) for i in range(5)]
    mixed = simulate([chat(0.0), *embeds], cl, FifoPolicy(), sim, perf_provider=provider).records
    slowed = mixed.set_index("request_id").loc["c0.0"]
    assert slowed.ttft_ms == pytest.approx(base.ttft_ms)  # prefill happened before any embedding work
    extra = slowed.e2e_ms - base.e2e_ms
    busy_ms = sum(mixed[mixed.type == "embedding"].e2e_ms)  # upper bound: time the embedding engine was busy
    gpu = SharedGpu(cl.instances[0].shared)
    assert 0 < extra <= busy_ms * (gpu.llm_factor - 1) + 2 * 1000 * 0.0045 * gpu.llm_factor


def test_jump_and_step_agree_on_a_shared_gpu():
    cl = shared_cluster()
    reqs = [chat(0.1 * i, out=50 + 13 * i) for i in range(8)] + [
        emb(0.07 * i + 0.01, tokens=500 + 50 * i) for i in range(12)
    ]
    a = simulate(reqs, cl, FifoPolicy(), SimConfig(mode="jump"), perf_provider=provider).records
    b = simulate(reqs, cl, FifoPolicy(), SimConfig(mode="step"), perf_provider=provider).records
    assert (a.outcome == "completed").all()
    assert (a.e2e_ms - b.e2e_ms).abs().max() < 1e-6
    assert (a.ttft_ms - b.ttft_ms).abs().max() < 1e-6


def test_pooling_backend_serves_embeddings_inside_vllm():
    cl = shared_cluster(embedding_backend="vllm")
    df = simulate([chat(0.0), emb(0.2, tokens=300)], cl, FifoPolicy(), perf_provider=provider).records.set_index(
        "request_id"
    )
    row = df.loc["e0.2"]
    assert row.outcome == "completed" and row.output_tokens == 0
    assert row.first_token_s == row.finish_s
    assert df.loc["c0.0", "outcome"] == "completed"


def test_anchored_presets_span_time_slicing_to_roofline_overlap():
    from sagesched.sim.engines.shared_gpu import (
        DECODE_LLAMA2_7B_A100,
        PRESETS,
        TEI_BGE_BASE_A100,
        ResourceDemand,
        colocated_stretch,
    )

    # Separate processes without MPS: each engine gets half the GPU while both are busy.
    ts = SharedGpu(SharedGpuConfig(**PRESETS["time_slice"]))
    assert ts.llm_stretch(True) == pytest.approx(2.0) and ts.embedding_stretch(True) == pytest.approx(2.0)
    # A memory-bound decode and a compute-bound encoder fit together on the roofline: no stretch...
    ideal = SharedGpu(SharedGpuConfig(**PRESETS["ideal"]))
    assert ideal.llm_stretch(True) == pytest.approx(1.0) and ideal.embedding_stretch(True) == pytest.approx(1.0)
    mps = SharedGpu(SharedGpuConfig(**PRESETS["mps"]))
    assert mps.llm_stretch(True) == pytest.approx(1.5, rel=1e-5)
    # ...but two compute-bound engines do not: 1.3x the compute there is, even with ideal overlap.
    heavy = ResourceDemand(compute=0.8, memory=0.1)
    assert colocated_stretch(heavy, TEI_BGE_BASE_A100, 1.0) == pytest.approx(1.3)
    assert colocated_stretch(DECODE_LLAMA2_7B_A100, TEI_BGE_BASE_A100, 0.0) == 2.0
    with pytest.raises(ValueError, match="efficiency"):
        colocated_stretch(heavy, heavy, 1.5)
