"""Hypothesis: invariants of the simulator over random small workloads and clusters.

Conservation (one record per request, each with one outcome), ordered timestamps, the KV bound
(an engine never holds more blocks than it has), determinism, and jump mode == step mode.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_perf import make_provider

from sagesched.core import Priority, Request, RequestType
from sagesched.policies.fifo import FifoPolicy
from sagesched.sim import ClusterConfig, InstanceConfig, SimConfig, TeiEngineConfig, VllmEngineConfig, simulate

provider = make_provider(kv_tokens=4096)


@st.composite
def instances(draw, idx: int) -> InstanceConfig:
    kind = draw(st.sampled_from(["llm", "embedding", "llm_embedding"]))
    vllm = VllmEngineConfig(
        num_gpu_blocks=draw(st.integers(12, 80)),
        max_num_batched_tokens=draw(st.sampled_from([32, 128, 2048])),
        max_num_seqs=draw(st.integers(1, 8)),
        prefix_hash_block_tokens=32,
        scheduling_policy=draw(st.sampled_from(["fcfs", "priority"])),
    )
    tei = TeiEngineConfig(
        max_batch_tokens=draw(st.sampled_from([64, 512, 16384])),
        max_batch_requests=draw(st.sampled_from([None, 1, 4])),
        max_concurrent_requests=draw(st.integers(2, 40)),
        max_client_batch_size=draw(st.integers(1, 8)),
    )
    return InstanceConfig(
        id=f"i{idx}",
        kind=kind,
        model="m",
        embedding_model="e",
        vllm=vllm,
        tei=tei,
        max_inflight=draw(st.integers(1, 12)),
    )


@st.composite
def scenarios(draw):
    n_inst = draw(st.integers(1, 3))
    cluster = ClusterConfig(tuple(draw(instances(i)) for i in range(n_inst)))
    n = draw(st.integers(1, 25))
    gaps = draw(st.lists(st.floats(0.0, 0.2), min_size=n, max_size=n))
    times = np.cumsum(gaps)
    reqs = []
    for i, t in enumerate(times):
        if draw(st.booleans()):
            prompt = draw(st.integers(1, 150))
            out = draw(st.integers(1, 60))
            hashes = tuple(draw(st.lists(st.integers(0, 3), max_size=4, unique=True)))
            reqs.append(
                Request(
                    id=f"r{i}",
                    type=RequestType.LLM_CHAT,
                    model="m",
                    arrival_s=float(t),
                    prompt_tokens=prompt,
                    max_tokens=out + draw(st.integers(0, 5)),
                    output_tokens=out,
                    prefix_hashes=hashes,
                    priority=Priority(draw(st.integers(0, 4))),
                )
            )
        else:
            inputs = draw(st.integers(1, 10))
            tokens = draw(st.integers(inputs, 400))
            reqs.append(
                Request(
                    id=f"r{i}",
                    type=RequestType.EMBEDDING,
                    model="e",
                    arrival_s=float(t),
                    prompt_tokens=tokens,
                    embedding_inputs=inputs,
                    embedding_tokens=tokens,
                )
            )
    return cluster, reqs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_invariants_hold(scenario):
    cluster, reqs = scenario
    res = simulate(reqs, cluster, FifoPolicy(), SimConfig(mode="jump"), perf_provider=provider)
    df = res.records
    # conservation: every request exactly once, with one outcome and a reason unless completed
    assert sorted(df.request_id) == sorted(r.id for r in reqs)
    assert set(df.outcome) <= {"completed", "rejected"}
    assert (df[df.outcome != "completed"].reason != "").all()
    # timestamps ordered
    done = df[df.outcome == "completed"]
    assert (done.arrival_s <= done.dispatch_s).all()
    assert (done.dispatch_s <= done.first_token_s + 1e-12).all()
    assert (done.first_token_s <= done.finish_s).all()
    # KV bound
    for inst in cluster.instances:
        stats = res.stats["instances"][inst.id]
        if "peak_kv_blocks" in stats:
            assert stats["peak_kv_blocks"] <= stats["kv_blocks"] == inst.vllm.num_gpu_blocks
    # determinism and the step-mode reference
    again = simulate(reqs, cluster, FifoPolicy(), SimConfig(mode="jump"), perf_provider=provider).records
    assert again.equals(df)
    step = simulate(reqs, cluster, FifoPolicy(), SimConfig(mode="step"), perf_provider=provider).records
    assert (step.outcome == df.outcome).all() and (step.instance_id.fillna("") == df.instance_id.fillna("")).all()
    diff = (step.e2e_ms - df.e2e_ms).abs().fillna(0.0)
    assert diff.max() < 1e-6
    assert (step.preemptions == df.preemptions).all()
