"""llm_embedding instances: one GPU, a vLLM engine and a TEI-like engine slowing each other."""

from __future__ import annotations

import pytest
from tiny_perf import TinyEmbPerf, make_provider

from sagesched.core import Request, RequestType
from sagesched.policies.fifo import FifoPolicy
from sagesched.sim import ClusterConfig, InstanceConfig, SharedGpuConfig, SimConfig, simulate
from sagesched.sim.config import TeiEngineConfig
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


def test_vllm_pooling_engine_prices_embeddings_by_the_encoder_and_shares_the_gpu():
    # embedding_backend: vllm is a second vLLM server running the encoder (--task embed): its batch is
    # priced by the encoder's perf model, not as prefill of the generative model, and it is
    # stretched while the LLM engine works, as TEI is.
    cl = shared_cluster(embedding_backend="vllm")
    service = TinyEmbPerf().batch_time_s(1, 300, 300)
    alone = simulate([emb(0.0, tokens=300)], cl, FifoPolicy(), perf_provider=provider).records.iloc[0]
    assert alone.outcome == "completed" and alone.output_tokens == 0
    assert alone.e2e_ms == pytest.approx(service * 1000)
    df = simulate([chat(0.0), emb(0.2, tokens=300)], cl, FifoPolicy(), perf_provider=provider).records.set_index(
        "request_id"
    )
    row = df.loc["e0.2"]
    assert row.outcome == "completed" and row.first_token_s == row.finish_s
    assert row.e2e_ms == pytest.approx(service * SharedGpu(cl.instances[0].shared).embedding_factor * 1000)
    assert df.loc["c0.0", "outcome"] == "completed"


def test_vllm_pooling_engine_batches_as_vllm_schedules():
    def run(reqs, **shared):
        cl = shared_cluster(**shared)
        return simulate(reqs, cl, FifoPolicy(), perf_provider=provider).records.set_index("request_id")

    # No prefetch: inputs that arrive while a step runs all join the next step (TEI packs the first of
    # them into its next batch on arrival, and the later ones wait one batch more).
    reqs = [emb(0.0, tokens=1500), emb(0.001, tokens=100), emb(0.002, tokens=100)]
    pooled = run(reqs, embedding_backend="vllm")
    assert pooled.loc["e0.001", "finish_s"] == pooled.loc["e0.002", "finish_s"]
    tei = run(reqs, embedding_backend="tei")
    assert tei.loc["e0.001", "finish_s"] < tei.loc["e0.002", "finish_s"]
    # max_num_seqs caps the requests of one step.
    capped = run(
        [emb(0.0, 1500), emb(0.001, 100), emb(0.0011, 100), emb(0.0012, 100)],
        embedding_backend="vllm",
        pooling_max_num_seqs=2,
    )
    assert capped.loc["e0.001", "finish_s"] == capped.loc["e0.0011", "finish_s"] < capped.loc["e0.0012", "finish_s"]
    # The token budget caps a step: two 400-token inputs share a step under the default budget
    # (2048 on an A100) and take one each under a 512-token budget.
    pair = [emb(0.0, 1500), emb(0.001, 400), emb(0.002, 400)]
    wide = run(pair, embedding_backend="vllm")
    assert wide.loc["e0.001", "finish_s"] == wide.loc["e0.002", "finish_s"]
    narrow = run(pair, embedding_backend="vllm", pooling_max_num_batched_tokens=512, pooling_max_num_seqs=8)
    assert narrow.loc["e0.001", "finish_s"] < narrow.loc["e0.002", "finish_s"]
    # vLLM's server has no per-call input limit (TEI answers 413 past max_client_batch_size = 32).
    many = Request(
        id="many",
        type=RequestType.EMBEDDING,
        model="bge-base",
        arrival_s=0.0,
        prompt_tokens=6400,
        embedding_inputs=64,
        embedding_tokens=6400,
    )
    assert run([many], embedding_backend="vllm").loc["many", "outcome"] == "completed"
    assert run([many], embedding_backend="tei").loc["many", "outcome"] == "rejected"


@pytest.mark.parametrize(
    ("hardware", "max_model_len", "shared", "budget", "seqs"),
    [
        ("a100", 512, {}, 2048, 256),  # the server's A100 defaults (vLLM V1 `vllm serve`)
        ("h100", 512, {}, 8192, 1024),  # >= 70 GB GPUs
        ("a100", 8192, {}, 8192, 256),  # chunked prefill off: raised to max_model_len
        ("a100", 4, {}, 1024, 256),  # capped at max_num_seqs x max_model_len
        ("a100", 512, {"pooling_max_num_seqs": 4}, 2048, 4),  # (cap 4 x 512 = 2048: unchanged)
        ("a100", 512, {"pooling_max_num_batched_tokens": 1000}, 1000, 256),
    ],
)
def test_vllm_pooling_engine_defaults_follow_vllm(hardware, max_model_len, shared, budget, seqs):
    from sagesched.sim.engines.tei import UNLIMITED, embedding_engine_config

    cfg = InstanceConfig.from_dict(
        {
            "id": "mix",
            "kind": "llm_embedding",
            "embedding_model": "bge-base",
            "hardware": hardware,
            "shared": {"embedding_backend": "vllm", **shared},
        }
    )
    assert cfg.tei == TeiEngineConfig()  # the TEI block is left as given, never rewritten
    got = embedding_engine_config(cfg, max_model_len)
    assert (got.max_batch_tokens, got.max_batch_requests) == (budget, seqs)
    assert not got.prefetch and got.max_client_batch_size == got.max_concurrent_requests == UNLIMITED
    assert embedding_engine_config(shared_cluster().instances[0], max_model_len) == TeiEngineConfig()


def test_vllm_pooling_engine_config_errors():
    from sagesched.sim.engines.tei import embedding_engine_config
    from sagesched.typed_config import ConfigFieldError

    def inst(**shared):
        return InstanceConfig(
            id="mix",
            kind="llm_embedding",
            model="llama-2-7b",
            embedding_model="bge-base",
            shared=SharedGpuConfig(embedding_backend="vllm", **shared),
        )

    with pytest.raises(ConfigFieldError, match="embedding_model"):
        InstanceConfig(
            id="mix", kind="llm_embedding", model="llama-2-7b", shared=SharedGpuConfig(embedding_backend="vllm")
        )
    with pytest.raises(ConfigFieldError, match="pooling_max_num_batched_tokens"):  # TEI knobs would be ignored
        InstanceConfig.from_dict(
            {
                "id": "mix",
                "kind": "llm_embedding",
                "embedding_model": "bge-base",
                "tei": {"max_batch_tokens": 4096},
                "shared": {"embedding_backend": "vllm"},
            }
        )
    with pytest.raises(ConfigFieldError, match="embedding_backend: vllm only"):  # ignored with TEI
        SharedGpuConfig(pooling_max_num_seqs=8)
    with pytest.raises(ConfigFieldError, match="llm_embedding only"):
        InstanceConfig(
            id="e", kind="embedding", embedding_model="bge-base", shared=SharedGpuConfig(embedding_backend="vllm")
        )
    # vLLM refuses to start with a budget under max_model_len (no chunked prefill) or under max_num_seqs.
    with pytest.raises(ConfigFieldError, match="max_model_len 512"):
        embedding_engine_config(inst(pooling_max_num_batched_tokens=256), 512)
    with pytest.raises(ConfigFieldError, match="below pooling_max_num_seqs 256"):
        embedding_engine_config(inst(pooling_max_num_batched_tokens=128, pooling_max_num_seqs=256), None)
    # (with max_num_seqs left to vLLM, it is capped at the budget instead)
    assert embedding_engine_config(inst(pooling_max_num_batched_tokens=128), None).max_batch_requests == 128
    # Switching the backend back by `replace` leaves a plain TEI engine (nothing was written into `tei`).
    from dataclasses import replace

    back = replace(inst(), shared=SharedGpuConfig())
    assert embedding_engine_config(back, 512) == TeiEngineConfig()


def test_an_llm_embedding_instance_needs_both_engines():
    def no_encoder(cfg):
        llm, _ = provider(cfg)
        return llm, None

    with pytest.raises(ValueError, match="both an LLM and an embedding performance model"):
        simulate([emb(0.0)], shared_cluster(embedding_backend="vllm"), FifoPolicy(), perf_provider=no_encoder)


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


def test_default_interference_is_the_anchored_mps_preset():
    """The shared-GPU defaults are not free numbers: they are `PRESETS['mps']`, derived from the two
    engines' roofline demands (each engine's work takes 1.5x its solo time while the other is busy)."""
    from sagesched.sim.engines.shared_gpu import PRESETS

    config = SharedGpuConfig()
    assert {k: getattr(config, k) for k in PRESETS["mps"]} == PRESETS["mps"]
    gpu = SharedGpu(config)
    assert gpu.llm_factor == pytest.approx(1.5, rel=1e-5) and gpu.embedding_factor == pytest.approx(1.5, rel=1e-5)
