"""Hypothesis: the simulator's standards over random small clusters and workloads, for every policy.

Where tests/sim/test_sim_properties.py checks fifo on vLLM / TEI instances, this draws every policy,
both view rates, llama.cpp servers and shared GPUs (TEI or a vLLM pooling engine, each interference
preset) next to them, and workloads with chat, generate and embedding requests at the edges (empty and
one-token prompts, prompts past a slot's context or the KV cache, one output token, bursts at one
instant, SLOs, tenants). On every run:

- nothing lost: one record per request, each completed or rejected with a reason (with no
  `max_time_s` nothing may fail: a request still queued or in flight at the end is lost);
- completed requests: arrival <= dispatch <= first token <= finish, the output length the engine was
  asked for, on an instance that serves the request's model and type;
- the summary's counts are the records' (completed + rejected + failed == requests; goodput ==
  slo_met / the summary's span);
- determinism: the same inputs give byte-identical records;
- jump mode == step mode, as tests/sim/test_sim_properties.py and benchmarks/sim_equivalence.py
  define it: same outcome, instance, reason, preemptions and output tokens, times within 1e-9 s.

Then one regression test per bug these properties found.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_perf import make_provider

from sagesched.core import SLO, InstanceView, Priority, Request, RequestType
from sagesched.policies import available_policies, make_policy
from sagesched.policies.base import Policy, PolicyConfig
from sagesched.sim import ClusterConfig, SimConfig, simulate
from sagesched.sim.engines.llamacpp_instance import load_llamacpp_perf
from sagesched.sim.engines.shared_gpu import PRESETS

LLM_CAL = "gemma-3-270m-q4km-xeon-2cpu-t1"
EMB_CAL = "gemma-3-270m-q4km-xeon-2cpu-t1-embedding"
POLICIES = available_policies()
TINY = make_provider(kv_tokens=4096)
# Few examples per policy: ten policies x 2 view-rate settings x 3 runs each must stay well under a
# minute on a shared 2-core machine; `derandomize` makes every CI run draw the same examples.
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def provider(cfg):
    """Stand-in GPU engines (tests/sim/tiny_perf.py); llama.cpp servers on their shipped calibration."""
    return (load_llamacpp_perf(cfg), None) if cfg.engine == "llamacpp" else TINY(cfg)


# -- scenarios -------------------------------------------------------------------------------------
@st.composite
def instance_entries(draw, idx: int) -> dict:
    kind = draw(st.sampled_from(["llm", "embedding", "llm_embedding", "llamacpp", "llamacpp_embedding"]))
    entry: dict = {"id": f"i{idx}", "max_inflight": draw(st.integers(1, 8))}
    if kind.startswith("llamacpp"):
        embeddings = kind == "llamacpp_embedding"
        entry.update(
            kind="embedding" if embeddings else "llm",
            engine="llamacpp",
            model=None if embeddings else "m",
            llamacpp={
                "calibration": EMB_CAL if embeddings else LLM_CAL,
                "n_parallel": draw(st.integers(1, 3)),
                "n_ctx": draw(st.sampled_from([None, 256, 512])),
                "reject_when_busy": draw(st.booleans()),
            },
        )
        if embeddings:
            entry["embedding_model"] = "e"
        return entry
    entry.update(kind=kind, model="m" if kind != "embedding" else None)
    if kind != "llm":
        entry["embedding_model"] = "e"
    entry["vllm"] = {
        "num_gpu_blocks": draw(st.integers(12, 80)),
        "max_num_batched_tokens": draw(st.sampled_from([32, 128, 2048])),
        "max_num_seqs": draw(st.integers(1, 8)),
        "prefix_hash_block_tokens": 32,
        "scheduling_policy": draw(st.sampled_from(["fcfs", "priority"])),
        "max_model_len": draw(st.sampled_from([None, None, 256])),
    }
    if kind == "llm_embedding":
        shared = dict(PRESETS[draw(st.sampled_from(sorted(PRESETS)))])
        if draw(st.booleans()):
            shared.update(embedding_backend="vllm", pooling_max_num_seqs=draw(st.integers(1, 4)))
            entry["shared"] = shared
            return entry
        entry["shared"] = shared
    if kind != "llm":
        entry["tei"] = {
            "max_batch_tokens": draw(st.sampled_from([64, 512, 16384])),
            "max_batch_requests": draw(st.sampled_from([None, 1, 4])),
            "max_concurrent_requests": draw(st.integers(2, 40)),
            "max_client_batch_size": draw(st.integers(1, 8)),
        }
    return entry


SLOS = [SLO(), SLO(ttft_ms=50.0), SLO(ttft_ms=1.0), SLO(e2e_ms=1000.0, tpot_ms=20.0), SLO(e2e_ms=10.0)]


@st.composite
def scenarios(draw) -> tuple[ClusterConfig, list[Request]]:
    n_inst = draw(st.integers(1, 4))
    cluster = ClusterConfig.from_dict({"instances": [draw(instance_entries(i)) for i in range(n_inst)]})
    serves_llm = any(i.kind.value != "embedding" for i in cluster.instances)
    serves_emb = any(i.kind.value != "llm" for i in cluster.instances)
    n = draw(st.integers(1, 24))
    t = 0.0
    reqs: list[Request] = []
    for i in range(n):
        t += draw(st.sampled_from([0.0, 0.0, 0.003, 0.05, 0.4]))  # bursts: several at one instant
        common = {
            "id": f"r{i:02d}",
            "arrival_s": t,
            "priority": Priority(draw(st.integers(0, 4))),
            "tenant": draw(st.sampled_from(["a", "b", "c"])),
            "slo": draw(st.sampled_from(SLOS)),
        }
        # A model nothing serves now and then: rejected, never lost.
        if draw(st.integers(0, 9)) == 0:
            model_llm, model_emb = "other", "other-e"
        else:
            model_llm, model_emb = "m", "e"
        if draw(st.booleans()) if (serves_llm and serves_emb) else serves_emb:
            inputs = draw(st.integers(1, 6))
            tokens = draw(st.sampled_from([inputs, 64, 300, 1024]))
            reqs.append(
                Request(
                    type=RequestType.EMBEDDING,
                    model=model_emb,
                    prompt_tokens=max(tokens, inputs),
                    embedding_inputs=inputs,
                    embedding_tokens=max(tokens, inputs),
                    **common,
                )
            )
        else:
            max_tokens = draw(st.sampled_from([1, 2, 17, 64]))
            reqs.append(
                Request(
                    type=draw(st.sampled_from([RequestType.LLM_CHAT, RequestType.LLM_GENERATE])),
                    model=model_llm,
                    prompt_tokens=draw(st.sampled_from([0, 1, 2, 37, 200, 255, 256, 1300])),
                    max_tokens=max_tokens,
                    output_tokens=draw(st.sampled_from([None, 1, max_tokens])),
                    prefix_hashes=tuple(draw(st.lists(st.integers(0, 3), max_size=3, unique=True))),
                    **common,
                )
            )
    return cluster, reqs


# -- invariants ------------------------------------------------------------------------------------
def expected_output_tokens(req: Request, cluster: ClusterConfig, instance_id: str) -> int:
    """What the driver asks the engine for (`Simulator._dispatch`); a llama.cpp slot stops when its
    context is full (`LlamaCppEngineCore.add`)."""
    out = req.output_tokens if req.output_tokens else req.max_tokens
    if req.max_tokens and out > req.max_tokens:
        out = req.max_tokens
    out = max(1, out)
    cfg = next(i for i in cluster.instances if i.id == instance_id)
    if cfg.engine == "llamacpp":
        engine = load_llamacpp_perf(cfg).config
        out = min(out, engine.n_ctx // engine.n_parallel - req.prompt_tokens)
    return out


def check_records(res, reqs: Sequence[Request], cluster: ClusterConfig) -> None:
    df = res.records
    by_id = {r.id: r for r in reqs}
    instances = {i.id: i for i in cluster.instances}
    # Nothing lost: every request exactly once, ended, and with a reason unless completed.
    assert sorted(df.request_id) == sorted(by_id)
    assert set(df.outcome) <= {"completed", "rejected"}, df[df.outcome == "failed"][["request_id", "reason"]]
    assert (df[df.outcome != "completed"].reason.str.len() > 0).all()
    done = df[df.outcome == "completed"]
    assert (done.arrival_s <= done.dispatch_s).all()
    assert (done.dispatch_s <= done.first_token_s).all()
    assert (done.first_token_s <= done.finish_s).all(), done[done.first_token_s > done.finish_s]
    assert done.instance_id.notna().all()
    for row in df.itertuples():
        req = by_id[row.request_id]
        if not isinstance(row.instance_id, str):
            continue
        inst = instances[row.instance_id]
        # Only placed where the model and the request's type are served.
        assert req.model in inst.models, (req.id, req.model, inst.id)
        assert inst.kind.value != ("llm" if req.is_embedding else "embedding"), (req.id, inst.kind)
        if row.outcome == "completed" and not req.is_embedding:
            assert row.output_tokens == expected_output_tokens(req, cluster, inst.id), req.id
    # The summary agrees with the records.
    s = res.summary()
    assert s["requests"] == len(reqs) == s["completed"] + s["rejected"] + s["failed"]
    assert s["completed"] == len(done)
    assert s["slo_met"] == int(df.slo_met.sum())
    # First arrival to the later of the last finish and the last arrival (refused requests leave none).
    end = df.arrival_s.max() if df.finish_s.isna().all() else max(df.finish_s.max(), df.arrival_s.max())
    duration = end - df.arrival_s.min() if end > df.arrival_s.min() else None
    if s["goodput_rps"] is not None:
        assert duration is not None and s["duration_s"] == pytest.approx(duration)
        assert s["goodput_rps"] == pytest.approx(s["slo_met"] / s["duration_s"])


def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def assert_same_run(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """jump == step: what benchmarks/sim_equivalence.py compares (placements, latencies to 1e-9 s)."""
    a = a.sort_values("request_id").reset_index(drop=True)
    b = b.sort_values("request_id").reset_index(drop=True)
    for col in ("request_id", "outcome", "instance_id", "reason", "rule", "preemptions", "output_tokens"):
        assert a[col].fillna("").equals(b[col].fillna("")), col
    for col in ("dispatch_s", "first_token_s", "finish_s"):
        x, y = a[col].to_numpy(float), b[col].to_numpy(float)
        assert ((np.isnan(x) & np.isnan(y)) | (np.abs(x - y) <= 1e-9)).all(), col


def run(reqs, cluster, policy: str, mode: str, rates: str):
    sim = SimConfig(mode=mode, view_rates=rates, timeline_interval_s=0.5)
    return simulate(reqs, cluster, make_policy(policy), sim, perf_provider=provider)


@pytest.mark.parametrize("policy", POLICIES)
@SETTINGS
@given(scenario=scenarios(), rates=st.sampled_from(["nominal", "learned"]))
def test_every_request_ends_once_in_order_deterministically_and_alike_in_both_modes(policy, scenario, rates):
    cluster, reqs = scenario
    jump = run(reqs, cluster, policy, "jump", rates)
    check_records(jump, reqs, cluster)
    assert parquet_bytes(run(reqs, cluster, policy, "jump", rates).records) == parquet_bytes(jump.records)
    step = run(reqs, cluster, policy, "step", rates)
    check_records(step, reqs, cluster)
    assert_same_run(jump.records, step.records)


# -- regressions -----------------------------------------------------------------------------------
def chat(rid: str, t: float, prompt: int, out: int, model: str = "m") -> Request:
    return Request(
        id=rid,
        type=RequestType.LLM_CHAT,
        model=model,
        arrival_s=t,
        prompt_tokens=prompt,
        max_tokens=out,
        output_tokens=out,
    )


def embed(rid: str, t: float, tokens: int = 9, model: str = "e") -> Request:
    return Request(
        id=rid,
        type=RequestType.EMBEDDING,
        model=model,
        arrival_s=t,
        prompt_tokens=tokens,
        embedding_inputs=1,
        embedding_tokens=tokens,
    )


@pytest.mark.parametrize("mode", ["jump", "step"])
def test_an_empty_prompt_reaching_a_busy_llamacpp_server_is_refused_not_a_crash(mode):
    """It reached the server while a segment ran, was held, and raised out of the segment's end."""
    cluster = ClusterConfig.from_dict(
        {
            "instances": [
                {"id": "cpu", "kind": "llm", "model": "m", "engine": "llamacpp", "llamacpp": {"calibration": LLM_CAL}}
            ]
        }
    )
    reqs = [chat("a", 0.0, 10, 4), chat("empty", 0.0, 0, 4)]
    df = simulate(reqs, cluster, make_policy("fifo"), SimConfig(mode=mode)).records.set_index("request_id")
    assert df.loc["a", "outcome"] == "completed"
    assert df.loc["empty", "outcome"] == "rejected"
    assert df.loc["empty", "reason"] == "backend 400: request empty: empty prompt"


def test_the_serving_frontend_never_delivers_the_last_token_before_the_first():
    """H100's frontend cost grows with the requests in flight; when a whole batch finishes at once,
    fewer are in flight at the finish than at the first token, and the finish used to move ahead of
    the first token (negative TPOT)."""
    cluster = ClusterConfig.from_dict(
        {"instances": [{"id": "g", "kind": "llm", "model": "llama-2-7b", "hardware": "h100"}]}
    )
    reqs = [chat(f"r{i:02d}", 0.0, 16, 2, model="llama-2-7b") for i in range(64)]
    df = simulate(reqs, cluster, make_policy("fifo"), SimConfig()).records
    assert (df.outcome == "completed").all()
    assert (df.first_token_s <= df.finish_s).all()
    assert (df.tpot_ms >= 0).all()
    assert (df.first_token_s - df.dispatch_s > 0).all()  # the frontend's cost is still added


@pytest.mark.parametrize("backend", ["tei", "vllm"])
def test_hybrid_uses_the_one_slot_of_a_mixed_instance_when_both_types_wait(backend):
    """max_inflight 1: the 0.7 / 0.3 split rounds both shares down to 0 slots, so each type was held
    back for the other and both requests stayed queued for ever."""
    entry = {"id": "mix", "kind": "llm_embedding", "model": "m", "embedding_model": "e", "max_inflight": 1}
    if backend == "vllm":
        entry["shared"] = {"embedding_backend": "vllm"}
    cluster = ClusterConfig.from_dict({"instances": [entry]})
    reqs = [chat("llm", 0.0, 10, 1), embed("emb", 0.0)]
    df = simulate(reqs, cluster, make_policy("hybrid"), SimConfig(), perf_provider=TINY).records
    assert (df.outcome == "completed").all(), df[["request_id", "outcome", "reason"]]


def test_a_wakeup_asked_with_nothing_else_to_come_is_honoured():
    """hybrid holds a lone embedding below min_embedding_batch_size until its window closes; the
    driver dropped that wake-up (no arrival left, no engine busy) and the request failed, unplaced."""
    cluster = ClusterConfig.from_dict({"instances": [{"id": "tei", "kind": "embedding", "embedding_model": "e"}]})
    policy = make_policy("hybrid", min_embedding_batch_size=4)
    df = simulate([embed("e0", 0.0)], cluster, policy, SimConfig(), perf_provider=TINY).records
    row = df.iloc[0]
    assert row.outcome == "completed"
    assert row.dispatch_s == pytest.approx(policy.config.window_s)


class AlwaysLater(Policy):
    """Places nothing and always asks to be called again: the loop the driver must still end."""

    name = "test-always-later"
    Config = PolicyConfig

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]):
        return []

    def next_wakeup(self, now: float) -> float | None:
        return now + 1.0


def test_a_policy_that_never_places_and_always_asks_again_still_ends():
    cluster = ClusterConfig.from_dict({"instances": [{"id": "tei", "kind": "embedding", "embedding_model": "e"}]})
    res = simulate([embed("e0", 0.0)], cluster, AlwaysLater(), SimConfig(), perf_provider=TINY)
    row = res.records.iloc[0]
    assert row.outcome == "failed" and "never placed" in row.reason
    assert math.isfinite(res.stats["sim_time_s"])
