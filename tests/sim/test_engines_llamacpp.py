"""The llama-server engine model: slots, shared n_batch with micro-batches, chunked prompts, prompt cache, 503."""

from __future__ import annotations

import pytest

from sagesched.sim.engines.llamacpp import (
    AffineStepModel,
    CpuStepModel,
    LlamaCppConfig,
    LlamaCppEngineCore,
    UBatch,
    split_ubatches,
)
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
    # a took slot 1 (never-used slots tie; llama-server's LRU scan keeps the last, highest id); b goes to
    # the slot holding a's prompt, not to the least recently used slot 0, and reuses 15 blocks.
    assert slot.id == 1 and tokens == 330 - 15 * 16
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


def test_split_equal_groups_consecutive_slots_with_equal_token_counts():
    # Decoding slots 0, 1, 2 and a 200-token prompt on slot 3: one micro-batch with a token of each,
    # then the rest of the prompt alone (llama.cpp split_equal, sequential).
    assert split_ubatches([(0, 1), (1, 1), (2, 1), (3, 200)], 512, True) == [
        [(0, 0, 1), (1, 0, 1), (2, 0, 1), (3, 0, 1)],
        [(3, 1, 199)],
    ]
    # Decoding slots 0, 1, 3: slot 3 does not follow 1, so it runs in a micro-batch of its own.
    assert split_ubatches([(0, 1), (1, 1), (3, 1)], 512, True) == [[(0, 0, 1), (1, 0, 1)], [(2, 0, 1)]]
    # Two prompts on consecutive slots advance in lockstep while (k + 1) x 2 fits n_ubatch.
    assert split_ubatches([(1, 300), (2, 100)], 512, True) == [[(0, 0, 100), (1, 0, 100)], [(0, 100, 200)]]
    assert split_ubatches([(1, 300), (2, 300)], 512, True)[0] == [(0, 0, 256), (1, 0, 256)]
    # One slot / unified KV: consecutive tokens in n_ubatch pieces.
    assert split_ubatches([(0, 1), (1, 700)], 512, False) == [[(0, 0, 1), (1, 0, 511)], [(1, 511, 189)]]


def test_lru_takes_the_slot_released_longest_ago_and_four_rows_cost_less_than_three():
    cfg = LlamaCppConfig(n_parallel=4, n_ctx=4096)
    # gemv rows dear, gemm blocks cheap: the CPU kernel behaviour the model must keep.
    perf = CpuStepModel(
        ubatch_s=0.001, row_block_s=0.005, row_tail1_s=0.03, row_tail2_s=0.05, row_tail3_s=0.09, output_s=0.004
    )
    core = LlamaCppEngineCore(cfg, perf)
    core.add(EngineRequest(id="a", prompt_tokens=10, output_tokens=1))
    assert [s.id for s in core.slots if s.req] == [3]  # never-used slots tie: highest id
    list(drain(core))
    core.add(EngineRequest(id="b", prompt_tokens=10, output_tokens=5))
    assert [s.id for s in core.slots if s.req] == [2]  # slot 3 was used, 2 never was
    list(drain(core))
    for rid in "cde":
        core.add(EngineRequest(id=rid, prompt_tokens=10, output_tokens=3))
    assert sorted(s.id for s in core.slots if s.req) == [0, 1, 3]  # never-used 1, 0, then 3 (released first)
    core.finish_step(core.plan_step())  # prompts done: three slots decoding
    three = core.plan_step()
    assert [ub.rows for ub in core.ubatches(three)] == [2, 1]  # slots {0, 1} then {3}
    four = UBatch(rows=4, outputs=4, seqs=4, kv_pairs=0.0)
    three_rows = UBatch(rows=3, outputs=3, seqs=3, kv_pairs=0.0)
    assert perf.ubatch_time_s(four) < perf.ubatch_time_s(three_rows)
    assert core.step_time_s(three) == pytest.approx(
        perf.ubatch_time_s(UBatch(2, 2, 2, 22.0)) + perf.ubatch_time_s(UBatch(1, 1, 1, 11.0))
    )


def test_an_embedding_input_is_never_split_across_batches():
    """llama-server computes a non-causal (embedding) input in one batch: what does not fit waits."""
    core = LlamaCppEngineCore(LlamaCppConfig(n_parallel=2, n_ctx=1024, n_batch=64, n_ubatch=64, embeddings=True), PERF)
    for i in range(2):
        core.add(EngineRequest(id=f"e{i}", prompt_tokens=48, output_tokens=1))
    first = core.plan_step()
    assert [t for _, t in first] == [48]
    out = core.finish_step(first)
    second = core.plan_step()
    assert len(out.finished_ids) == 1 and [t for _, t in second] == [48]
