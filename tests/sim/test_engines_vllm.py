"""The vLLM v1 engine core: budget, chunking, KV accounting, preemption, prefix caching, pooling."""

from __future__ import annotations

import math

import pytest
from tiny_perf import TinyLLMPerf

from sagesched.core import Request, RequestType
from sagesched.policies.fifo import FifoPolicy
from sagesched.sim import ClusterConfig, InstanceConfig, SimConfig, VllmEngineConfig, simulate
from sagesched.sim.engines import EngineRejected, EngineRequest, VllmEngineCore
from sagesched.sim.perf_model import BatchShape, LLMPerfModel


def engine(**kw) -> VllmEngineCore:
    return VllmEngineCore(VllmEngineConfig(**kw), TinyLLMPerf())


def run_to_end(core: VllmEngineCore, limit: int = 100_000):
    """Drive plan/finish until idle; yields (plan, outcome, free blocks before planning)."""
    for _ in range(limit):
        free = core.kv.free_blocks
        plan = core.plan_step()
        if plan is None:
            return
        assert core.kv.used <= core.kv.num_blocks
        yield plan, core.finish_step(plan), free
    raise AssertionError("engine did not drain")


def test_step_respects_token_budget_and_sequence_cap():
    core = engine(max_num_batched_tokens=64, max_num_seqs=3)
    for i in range(6):
        core.add(EngineRequest(id=f"r{i}", prompt_tokens=40, output_tokens=5))
    for plan, _, _ in run_to_end(core):
        assert sum(t for _, t in plan.scheduled) <= 64
        assert plan.batch_size <= 3
        assert core.num_running <= 3


def test_prefill_is_chunked_and_first_token_comes_with_the_last_chunk():
    core = engine(max_num_batched_tokens=100)
    core.add(EngineRequest(id="a", prompt_tokens=250, output_tokens=3))
    steps = list(run_to_end(core))
    assert [p.shape.prefill_tokens for p, _, _ in steps[:3]] == [100, 100, 50]
    assert [o.first_token_ids for _, o, _ in steps[:3]] == [[], [], ["a"]]
    assert [p.shape.decode_tokens for p, _, _ in steps[3:]] == [1, 1]
    assert steps[-1][1].finished_ids == ["a"]
    assert len(steps) == 5  # 3 prefill chunks + 2 decodes for 3 output tokens
    assert core.kv.used == 0


def test_running_decodes_go_before_waiting_prefills():
    core = engine(max_num_batched_tokens=50)
    core.add(EngineRequest(id="a", prompt_tokens=10, output_tokens=20))
    list(zip(range(2), run_to_end(core), strict=False))  # a is decoding now
    core.add(EngineRequest(id="b", prompt_tokens=200, output_tokens=2))
    plan = core.plan_step()
    assert [(s.id, t) for s, t in plan.scheduled] == [("a", 1), ("b", 49)]


def test_kv_capacity_never_exceeded_and_preemption_exactly_when_blocks_run_out():
    core = engine(num_gpu_blocks=10, block_size=16, max_num_batched_tokens=512)
    for i in range(4):
        core.add(EngineRequest(id=f"r{i}", prompt_tokens=30, output_tokens=60))
    saw_preemption = False
    for _ in range(2000):
        if not core.has_work:
            break
        free = core.kv.free_blocks
        # What the running requests need this step if nobody is preempted.
        need = 0
        budget = core.budget
        for seq in core.running:
            new = min(seq.num_tokens - seq.num_computed, budget)
            budget -= new
            need += math.ceil((seq.num_computed + new) / 16) - seq.blocks
        plan = core.plan_step()
        assert core.kv.used <= core.kv.num_blocks
        if plan.preempted:
            saw_preemption = True
            assert need > free, "preempted although the running requests fitted"
        else:
            assert need <= free
        core.finish_step(plan)
    assert saw_preemption
    assert core.preemptions > 0
    assert core.kv.peak_used <= 10
    assert not core.has_work and core.kv.used == 0


def test_no_admission_in_a_step_that_preempted():
    core = engine(num_gpu_blocks=6, block_size=16)
    core.add(EngineRequest(id="a", prompt_tokens=32, output_tokens=40))
    core.add(EngineRequest(id="b", prompt_tokens=32, output_tokens=40))
    while True:
        plan = core.plan_step()
        if plan.preempted:
            break
        core.finish_step(plan)
    # b (admitted last) is the victim; it stays waiting in this step
    assert [s.id for s in plan.preempted] == ["b"]
    assert [s.id for s, _ in plan.scheduled] == ["a"]
    assert core.num_waiting == 1


def test_priority_mode_preempts_the_least_urgent_request():
    core = engine(num_gpu_blocks=9, block_size=16, scheduling_policy="priority")
    core.add(EngineRequest(id="low", prompt_tokens=32, output_tokens=60, priority=4))
    core.add(EngineRequest(id="high", prompt_tokens=32, output_tokens=60, priority=0))
    core.add(EngineRequest(id="mid", prompt_tokens=32, output_tokens=60, priority=2))
    first = core.plan_step()
    assert [s.id for s, _ in first.scheduled] == ["high", "mid", "low"]
    core.finish_step(first)
    victims = []
    for _ in range(500):
        plan = core.plan_step()
        if plan is None:
            break
        victims += [s.id for s in plan.preempted]
        core.finish_step(plan)
    assert victims and victims[0] == "low"


def test_prefix_cache_hits_cost_no_budget():
    core = engine(block_size=16, prefix_hash_block_tokens=64)
    hashes = (11, 22, 33)  # 3 x 64 tokens = 12 blocks of 16
    core.add(EngineRequest(id="a", prompt_tokens=200, output_tokens=2, prefix_hashes=hashes))
    list(run_to_end(core))
    core.add(EngineRequest(id="b", prompt_tokens=200, output_tokens=2, prefix_hashes=hashes))
    plan = core.plan_step()
    assert plan.shape.prefill_tokens == 200 - 12 * 16
    assert core.seq("b").cached_tokens == 12 * 16
    assert core.prefix_hits == 12
    # a full-prompt hit still recomputes the last token (vLLM caps hits at prompt - 1)
    core.finish_step(plan)
    core.add(EngineRequest(id="c", prompt_tokens=192, output_tokens=2, prefix_hashes=hashes))
    plan = core.plan_step()
    c_new = dict((s.id, t) for s, t in plan.scheduled)["c"]
    assert c_new == 16  # 11 blocks hit, the last block recomputed


def test_pooling_request_is_prefill_only():
    core = engine()
    core.add(EngineRequest(id="e", prompt_tokens=300, pooling=True))
    steps = list(run_to_end(core))
    assert len(steps) == 1
    assert steps[0][1].finished_ids == ["e"] and steps[0][1].emitted == {}
    assert steps[0][0].shape.prefill_tokens == 300


def test_request_that_can_never_fit_is_rejected():
    core = engine(num_gpu_blocks=4, block_size=16)
    with pytest.raises(EngineRejected) as err:
        core.add(EngineRequest(id="big", prompt_tokens=60, output_tokens=10))
    assert err.value.status == 400


def test_decode_run_matches_step_by_step():
    def fresh():
        core = engine(num_gpu_blocks=40, block_size=16)
        for i, (p, o) in enumerate([(30, 50), (70, 80), (5, 120)]):
            core.add(EngineRequest(id=f"r{i}", prompt_tokens=p, output_tokens=o))
        return core

    a, b = fresh(), fresh()
    t_a = t_b = 0.0
    finish_a: dict[str, float] = {}
    finish_b: dict[str, float] = {}
    while a.has_work:
        k = a.decode_run_limit()
        run = a.start_decode_run(k) if k >= 2 else None
        if run is not None and run.k >= 1:
            t_a += run.cum_time(run.k)
            out = a.finish_decode_run(run, run.k)
        else:
            plan = a.plan_step()
            t_a += a.step_time_s(plan)
            out = a.finish_step(plan)
        finish_a.update(dict.fromkeys(out.finished_ids, t_a))
    while b.has_work:
        plan = b.plan_step()
        t_b += b.step_time_s(plan)
        finish_b.update(dict.fromkeys(b.finish_step(plan).finished_ids, t_b))
    assert a.steps == b.steps and a.preemptions == b.preemptions
    assert finish_a.keys() == finish_b.keys()
    for rid in finish_a:
        assert finish_a[rid] == pytest.approx(finish_b[rid], abs=1e-9)


def test_queued_tokens_kept_through_decode_runs_equal_a_recount():
    """`finish_decode_run` updates the cached (prefill, decode) totals instead of recounting; after
    every run they equal a recount over the engine's requests (max_tokens above and at the output,
    runs cut short, requests finishing mid-run)."""
    core = engine(num_gpu_blocks=200, block_size=16)
    for i, (p, o, mx) in enumerate([(30, 50, 50), (70, 80, 400), (5, 120, 0), (300, 7, 9), (12, 60, 61)]):
        core.add(EngineRequest(id=f"r{i}", prompt_tokens=p, output_tokens=o, max_tokens=mx))
    runs = 0
    while core.has_work:
        core.queued_tokens()  # cached now
        k = core.decode_run_limit()
        run = core.start_decode_run(k) if k >= 2 else None
        if run is not None and run.k >= 1:
            kept = core.finish_decode_run(run, max(1, run.k - runs % 3))
            runs += 1
            cached = core.queued_tokens()
            core._qt_version = -1  # force a recount
            assert cached == core.queued_tokens(), kept
        else:
            core.finish_step(core.plan_step())
    assert runs >= 5


@pytest.mark.parametrize("mode", ["jump", "step"])
@pytest.mark.parametrize("prompt", [300, 5000])
def test_lone_request_latency_equals_the_perf_model_prediction(mode, prompt):
    perf = LLMPerfModel.load("llama-2-7b", "a100")
    out_tokens = 57
    budget = 2048
    # prediction: chunked prefill steps, then one decode step per further token
    ttft, done = 0.0, 0
    while done < prompt:
        chunk = min(budget, prompt - done)
        ttft += perf.step_time_s(BatchShape(prefill_tokens=chunk, prefill_context_tokens=done + chunk, num_prefills=1))
        done += chunk
    e2e = ttft + sum(
        perf.step_time_s(BatchShape(decode_tokens=1, decode_context_tokens=prompt + j + 1))
        for j in range(out_tokens - 1)
    )
    req = Request(
        id="solo",
        type=RequestType.LLM_CHAT,
        model="llama-2-7b",
        arrival_s=1.5,
        prompt_tokens=prompt,
        max_tokens=out_tokens,
        output_tokens=out_tokens,
    )
    cluster = ClusterConfig((InstanceConfig(id="gpu0", model="llama-2-7b"),))
    rec = simulate([req], cluster, FifoPolicy(), SimConfig(mode=mode)).records.iloc[0]
    assert rec.outcome == "completed" and rec.output_tokens == out_tokens
    assert rec.ttft_ms == pytest.approx(ttft * 1000, abs=1e-6)
    assert rec.e2e_ms == pytest.approx(e2e * 1000, abs=1e-6)


def test_max_model_len_rejects_with_400_and_a_reason():
    core = engine(max_model_len=1000)
    core.add(EngineRequest(id="ok", prompt_tokens=900, output_tokens=100))
    with pytest.raises(EngineRejected) as err:
        core.add(EngineRequest(id="long", prompt_tokens=900, output_tokens=50, max_tokens=101))
    assert err.value.status == 400
    assert "maximum context length is 1000" in err.value.reason and "max_tokens" in err.value.reason
    assert "long" not in core.seqs


def test_prefill_attention_is_the_exact_causal_sum_over_chunks():
    core = engine(max_num_batched_tokens=1000)
    core.add(EngineRequest(id="a", prompt_tokens=700, output_tokens=2))
    core.add(EngineRequest(id="b", prompt_tokens=100, output_tokens=2))
    plan = core.plan_step()
    # a: 700 new over 700; b: 100 new over 100 (sum c (L - c/2)), not two equal chunks of 400.
    assert plan.shape.prefill_attention_pairs == 700 * (700 - 350) + 100 * (100 - 50)


def test_step_time_never_falls_when_a_prefill_is_added():
    perf = LLMPerfModel.load("llama-2-7b", "h100")
    long_chunk = BatchShape(
        prefill_tokens=2000, prefill_context_tokens=2000, num_prefills=1, prefill_attention_pairs=2000 * 1000
    )
    for extra in (1, 16, 200):
        both = BatchShape(
            prefill_tokens=2000 + extra,
            prefill_context_tokens=2000 + extra,
            num_prefills=2,
            prefill_attention_pairs=2000 * 1000 + extra * extra / 2,
        )
        assert perf.step_time_s(both) >= perf.step_time_s(long_chunk)
    # The memory floor: a 1-token chunk over a 4000-token context still reads that context's KV.
    short = BatchShape(prefill_tokens=1, prefill_context_tokens=4000, num_prefills=1, prefill_attention_pairs=3999.5)
    parts = perf.components(short)
    assert parts["prefill_attention"] == pytest.approx(
        4000
        * perf.kv_bytes_per_token_per_gpu()
        / (perf.hardware.hbm_bandwidth_bytes_per_s * perf._hw("decode_attention_efficiency"))
    )


def test_default_step_budgets_follow_the_gpu_like_vllms():
    from sagesched.sim import InstanceConfig as IC

    h100 = IC.from_dict({"id": "a", "hardware": "h100"})
    a100 = IC.from_dict({"id": "b", "hardware": "a100"})
    assert (h100.vllm.max_num_batched_tokens, h100.vllm.max_num_seqs) == (8192, 1024)
    assert (a100.vllm.max_num_batched_tokens, a100.vllm.max_num_seqs) == (2048, 256)
    mine = IC.from_dict({"id": "c", "hardware": "h100", "vllm": {"max_num_batched_tokens": 1024}})
    assert (mine.vllm.max_num_batched_tokens, mine.vllm.max_num_seqs) == (1024, 1024)


def test_h200_beside_h100_same_compute_more_bandwidth_and_memory():
    h100 = LLMPerfModel.load("llama-2-7b", "h100")
    h200 = LLMPerfModel.load("llama-2-7b", "h200")
    assert h200.source == "roofline"  # no Vidur profile on H200: H100's fitted roofline efficiencies
    assert h200.kv_capacity_tokens() > 1.5 * h100.kv_capacity_tokens()
    decode = BatchShape(decode_tokens=64, decode_context_tokens=64 * 1000)
    assert h200.step_time_s(decode) < h100.step_time_s(decode)


@pytest.mark.parametrize("mode", ["jump", "step"])
def test_async_scheduling_hides_the_cpu_part_of_each_step(mode):
    perf = LLMPerfModel.load("llama-2-7b", "h100")
    shape = BatchShape(decode_tokens=32, decode_context_tokens=32 * 600)
    assert perf.step_time_async_s(shape) == pytest.approx(perf.step_time_s(shape) - perf.cpu_time_s(shape))
    reqs = [
        Request(
            id=f"r{i}",
            type=RequestType.LLM_CHAT,
            model="llama-2-7b",
            arrival_s=0.01 * i,
            prompt_tokens=300,
            max_tokens=40,
            output_tokens=40,
        )
        for i in range(20)
    ]

    def e2e(async_scheduling: bool) -> float:
        inst = InstanceConfig(id="v", hardware="h100", vllm=VllmEngineConfig(async_scheduling=async_scheduling))
        res = simulate(reqs, ClusterConfig((inst,)), FifoPolicy(), SimConfig(mode=mode))
        return float(res.records.e2e_ms.mean())

    assert e2e(True) < e2e(False)


def test_async_scheduling_jump_equals_step():
    reqs = [
        Request(
            id=f"r{i}",
            type=RequestType.LLM_CHAT,
            model="llama-2-7b",
            arrival_s=0.003 * i,
            prompt_tokens=200 + i,
            max_tokens=60,
            output_tokens=30 + i,
        )
        for i in range(40)
    ]
    inst = InstanceConfig(id="v", hardware="h100", vllm=VllmEngineConfig(async_scheduling=True))
    a, b = (simulate(reqs, ClusterConfig((inst,)), FifoPolicy(), SimConfig(mode=m)).records for m in ("jump", "step"))
    assert (a.e2e_ms - b.e2e_ms).abs().max() < 1e-6 and (a.ttft_ms - b.ttft_ms).abs().max() < 1e-6


def test_client_latency_includes_the_serving_frontend_in_both_modes():
    perf = LLMPerfModel.load("llama-2-7b", "h100")  # the shipped, calibrated H100 model has a frontend term
    plain = LLMPerfModel.load("llama-2-7b", "a100")  # no frontend measured on A100: nothing added
    req = Request(
        id="solo",
        type=RequestType.LLM_CHAT,
        model="llama-2-7b",
        arrival_s=0.5,
        prompt_tokens=700,
        max_tokens=20,
        output_tokens=20,
    )
    inst = InstanceConfig(id="v", hardware="h100")
    engine_ttft = perf.step_time_s(
        BatchShape(prefill_tokens=700, prefill_context_tokens=700, num_prefills=1, prefill_attention_pairs=700 * 350)
    )
    for mode in ("jump", "step"):
        res = simulate(
            [req], ClusterConfig((inst,)), FifoPolicy(), SimConfig(mode=mode), perf_provider=lambda _c: (perf, None)
        )
        rec = res.records.iloc[0]
        # At its first token the request is the one sequence in flight; at its end, none is.
        assert rec.ttft_ms / 1e3 == pytest.approx(engine_ttft + perf.frontend_s(700, 1), rel=1e-9)
        assert res.stats["frontend_applied"] == 1
    res = simulate([req], ClusterConfig((inst,)), FifoPolicy(), SimConfig(), perf_provider=lambda _c: (plain, None))
    assert res.stats["frontend_applied"] == 0
