"""The llama-server engine model: slots, shared n_batch with micro-batches, chunked prompts, prompt cache, 503."""

from __future__ import annotations

import pytest

from sagesched.sim.engines.llamacpp import AffineStepModel, LlamaCppConfig, LlamaCppEngineCore
from sagesched.sim.engines.types import EngineRejected, EngineRequest
from sagesched.sim.perf_model import BatchShape

PERF = AffineStepModel(step_s=0.01, prefill_token_s=1e-4, decode_seq_s=1e-3, context_pair_s=0.0)


def drain(core: LlamaCppEngineCore, limit: int = 10_000):
    for _ in range(limit):
        batch = core.plan_step()
        if batch is None:
            return
        yield batch, core.step_time_s(batch), core.finish_step(batch)
    raise AssertionError("engine did not drain")


def test_prompts_are_chunked_by_n_batch_and_decodes_go_first():
    core = LlamaCppEngineCore(LlamaCppConfig(n_parallel=2, n_ctx=8192, n_batch=512, n_ubatch=512), PERF)
    core.add(EngineRequest(id="a", prompt_tokens=100, output_tokens=3))
    (batch, _, out), *_ = list(drain(core))[:1]
    assert [(s.req is None, t) for s, t in batch] == [(True, 100)] and out.first_token_ids == ["a"]
    core = LlamaCppEngineCore(LlamaCppConfig(n_parallel=2, n_ctx=8192, n_batch=512, n_ubatch=512), PERF)
    core.add(EngineRequest(id="a", prompt_tokens=10, output_tokens=5))
    core.finish_step(core.plan_step())  # a generating now
    core.add(EngineRequest(id="b", prompt_tokens=1200, output_tokens=2))
    sizes = []
    for batch, _, _ in drain(core):
        sizes.append(sorted(t for _, t in batch))
        if len(sizes) == 3:
            break
    assert sizes == [[1, 511], [1, 511], [1, 178]]  # a's decode token first, b's prompt fills the rest


def test_a_batch_costs_one_step_per_micro_batch():
    core = LlamaCppEngineCore(LlamaCppConfig(n_parallel=1, n_ctx=4096, n_batch=2048, n_ubatch=512), PERF)
    core.add(EngineRequest(id="a", prompt_tokens=2000, output_tokens=1))
    batch = core.plan_step()
    assert core.step_time_s(batch) == pytest.approx(4 * PERF.step_time_s(BatchShape(prefill_tokens=500)))


def test_slots_bound_concurrency_and_queue_or_shed_the_rest():
    core = LlamaCppEngineCore(LlamaCppConfig(n_parallel=2, n_ctx=2048), PERF)
    for i in range(3):
        core.add(EngineRequest(id=f"r{i}", prompt_tokens=50, output_tokens=4))
    assert core.num_running == 2 and core.num_waiting == 1
    finished = [rid for _, _, out in drain(core) for rid in out.finished_ids]
    assert sorted(finished) == ["r0", "r1", "r2"]
    shed = LlamaCppEngineCore(LlamaCppConfig(n_parallel=1, n_ctx=2048, reject_when_busy=True), PERF)
    shed.add(EngineRequest(id="x", prompt_tokens=50, output_tokens=4))
    with pytest.raises(EngineRejected) as err:
        shed.add(EngineRequest(id="y", prompt_tokens=50, output_tokens=4))
    assert err.value.status == 503 and shed.rejected_503 == 1


def test_prompt_longer_than_a_slot_is_400_and_generation_stops_at_the_slot_context():
    core = LlamaCppEngineCore(LlamaCppConfig(n_parallel=4, n_ctx=4096), PERF)  # 1024 per slot
    with pytest.raises(EngineRejected) as err:
        core.add(EngineRequest(id="long", prompt_tokens=1500, output_tokens=1))
    assert err.value.status == 400 and "n_parallel" in err.value.reason
    core.add(EngineRequest(id="a", prompt_tokens=1000, output_tokens=500))
    emitted = sum(out.emitted.get("a", 0) for _, _, out in drain(core))
    assert emitted == 24  # the slot's 1024 tokens of context are full


def test_slot_prompt_cache_reuses_the_common_prefix():
    core = LlamaCppEngineCore(LlamaCppConfig(n_parallel=2, n_ctx=4096, prefix_block_tokens=16), PERF)
    core.add(EngineRequest(id="a", prompt_tokens=320, output_tokens=1, prefix_hashes=tuple(range(20))))
    list(drain(core))
    core.add(EngineRequest(id="b", prompt_tokens=330, output_tokens=1, prefix_hashes=(*range(15), 99, 98, 97)))
    batch = core.plan_step()
    slot, tokens = batch[0]
    assert slot.id == 0 and tokens == 330 - 15 * 16  # the slot holding a's prompt, 15 blocks reused
    assert core.prompt_cache_tokens == 240


def test_replay_driver_queues_past_the_slots_and_times_each_request():
    from sagesched.sim.engines.llamacpp_driver import replay_llamacpp

    cfg = LlamaCppConfig(n_parallel=1, n_ctx=2048)
    reqs = [
        (0.0, EngineRequest(id="a", prompt_tokens=100, output_tokens=3)),
        (0.001, EngineRequest(id="b", prompt_tokens=100, output_tokens=3)),
    ]
    a, b = replay_llamacpp(reqs, cfg, PERF, frontend_request_s=0.002)
    prefill = PERF.step_time_s(
        BatchShape(prefill_tokens=100, prefill_context_tokens=100, num_prefills=1, prefill_attention_pairs=100 * 50)
    )
    decode = PERF.step_time_s(BatchShape(decode_tokens=1))
    assert a.ttft_s == pytest.approx(prefill + 0.002)
    assert a.e2e_s == pytest.approx(prefill + 2 * decode + 0.002)
    # b waited for the only slot: it starts when a finishes.
    assert b.first_token_s == pytest.approx(prefill + 2 * decode + prefill + 0.002)
    shed = replay_llamacpp(reqs, LlamaCppConfig(n_parallel=1, n_ctx=2048, reject_when_busy=True), PERF)
    assert shed[1].status == 503 and shed[1].finish_s is None
