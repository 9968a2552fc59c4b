"""The bound prices an embedding on a vLLM pooling engine (`embedding_backend: vllm`) by the encoder,
and no simulated embedding there beats it."""

from __future__ import annotations

import pytest

from sagesched.bounds import admits, isolated_latency_s
from sagesched.core import Request, RequestType
from sagesched.policies.fifo import FifoPolicy
from sagesched.sim import ClusterConfig, InstanceConfig, SimConfig, simulate
from sagesched.sim.perf_model import EmbeddingPerfModel


def pooled(backend: str) -> InstanceConfig:
    return InstanceConfig.from_dict(
        {
            "id": "mix",
            "kind": "llm_embedding",
            "model": "llama-2-7b",
            "embedding_model": "bge-base",
            "shared": {"embedding_backend": backend},
        }
    )


def embedding(rid: str, t: float, inputs: int = 4, tokens: int = 1200) -> Request:
    return Request(
        id=rid,
        type=RequestType.EMBEDDING,
        model="bge-base",
        arrival_s=t,
        prompt_tokens=tokens,
        embedding_inputs=inputs,
        embedding_tokens=tokens,
    )


def test_pooling_engine_bound_is_the_encoders_batch_time():
    req = embedding("e", 0.0)
    inst = pooled("vllm")
    assert admits(req, inst)
    ttft, e2e = isolated_latency_s(req, inst)
    expected = EmbeddingPerfModel.load("bge-base", "a100").batch_time_s(4, 1200, 300)
    assert ttft == e2e == pytest.approx(expected)
    assert isolated_latency_s(req, pooled("tei")) == (ttft, e2e)  # the same encoder, priced the same


def test_no_simulated_embedding_on_the_pooling_engine_beats_its_bound():
    reqs = [embedding(f"e{i}", 0.004 * i, inputs=1 + i % 5, tokens=200 + 97 * i) for i in range(40)]
    inst = pooled("vllm")
    df = simulate(reqs, ClusterConfig((inst,)), FifoPolicy(), SimConfig(timeline_interval_s=0)).records
    assert (df.outcome == "completed").all()
    for req, e2e_ms in zip(reqs, df.set_index("request_id").loc[[r.id for r in reqs], "e2e_ms"], strict=True):
        assert e2e_ms >= isolated_latency_s(req, inst)[1] * 1000 * (1 - 1e-9)
