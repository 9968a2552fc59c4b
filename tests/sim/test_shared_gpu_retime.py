"""A shared GPU is work-conserving: the work in flight is re-timed when the other engine starts or stops.

Each engine's step or batch runs at full speed alone and at its share (1 / stretch) while the other
engine has work in flight; when the partner starts or stops, what is left of the work in flight runs
at the new rate. So the outcome does not depend on which engine started first, and the jump mode
(one event per decode run) still equals the step mode (one event per step).
"""

from __future__ import annotations

import pytest
from tiny_perf import TinyEmbPerf, TinyLLMPerf, make_provider

from sagesched.core import Request, RequestType
from sagesched.policies.fifo import FifoPolicy
from sagesched.sim import ClusterConfig, InstanceConfig, SharedGpuConfig, SimConfig, simulate
from sagesched.sim.engines import SharedGpu
from sagesched.sim.perf_model import BatchShape

provider = make_provider(kv_tokens=100_000)
SHARED = SharedGpuConfig()  # defaults: LLM stretch 1/0.84, embedding stretch 1/0.36
GPU = SharedGpu(SHARED)


def cluster() -> ClusterConfig:
    return ClusterConfig(
        (InstanceConfig(id="mix", kind="llm_embedding", model="llama-2-7b", embedding_model="bge-base", shared=SHARED),)
    )


def chat(rid: str, t: float, prompt: int = 2000, out: int = 1) -> Request:
    return Request(
        id=rid,
        type=RequestType.LLM_CHAT,
        model="llama-2-7b",
        arrival_s=t,
        prompt_tokens=prompt,
        max_tokens=out,
        output_tokens=out,
    )


def emb(rid: str, t: float, tokens: int = 2000) -> Request:
    return Request(
        id=rid,
        type=RequestType.EMBEDDING,
        model="bge-base",
        arrival_s=t,
        prompt_tokens=tokens,
        embedding_inputs=1,
        embedding_tokens=tokens,
    )


def finish_times(reqs: list[Request], mode: str = "jump") -> dict[str, float]:
    df = simulate(reqs, cluster(), FifoPolicy(), SimConfig(mode=mode), perf_provider=provider).records
    assert (df.outcome == "completed").all()
    return dict(zip(df.request_id, df.finish_s, strict=True))


def two_jobs(first_work: float, first_rate: float, second_work: float, second_rate: float, delay: float):
    """Finish times of two jobs sharing a GPU (work in full-speed seconds, rates while both run):
    the first starts at 0, the second at `delay`; each runs alone at rate 1."""
    left1 = first_work - delay  # the first ran alone until the second started
    assert left1 > 0
    both = min(left1 / first_rate, second_work / second_rate)  # time until one of them is done
    if left1 / first_rate <= second_work / second_rate:
        end1 = delay + both
        end2 = end1 + (second_work - both * second_rate)
    else:
        end2 = delay + both
        end1 = end2 + (left1 - both * first_rate)
    return end1, end2


# One prefill-only step (the chat asks for one token) and one embedding batch, priced by the stand-ins.
PREFILL_S = TinyLLMPerf().step_time_s(BatchShape(prefill_tokens=2000, prefill_context_tokens=2000, num_prefills=1))
BATCH_S = TinyEmbPerf().batch_time_s(1, 2000, 2000)
LLM_RATE = 1.0 / GPU.llm_factor
EMB_RATE = 1.0 / GPU.embedding_factor


@pytest.mark.parametrize("mode", ["jump", "step"])
def test_a_step_in_flight_is_retimed_when_an_embedding_batch_starts(mode):
    delay = 0.01
    end_llm, end_emb = two_jobs(PREFILL_S, LLM_RATE, BATCH_S, EMB_RATE, delay)
    got = finish_times([chat("c", 0.0), emb("e", delay)], mode)
    assert got["c"] == pytest.approx(end_llm, rel=1e-12)
    assert got["e"] == pytest.approx(end_emb, rel=1e-12)


@pytest.mark.parametrize("mode", ["jump", "step"])
def test_a_batch_in_flight_is_retimed_when_the_llm_starts(mode):
    delay = 0.01
    end_emb, end_llm = two_jobs(BATCH_S, EMB_RATE, PREFILL_S, LLM_RATE, delay)
    got = finish_times([emb("e", 0.0), chat("c", delay)], mode)
    assert got["e"] == pytest.approx(end_emb, rel=1e-12)
    assert got["c"] == pytest.approx(end_llm, rel=1e-12)


def test_which_engine_starts_first_at_the_same_instant_does_not_matter():
    # Both arrive at t=0; the list order decides which engine the policy starts first.
    a = finish_times([chat("c", 0.0), emb("e", 0.0)])
    b = finish_times([emb("e", 0.0), chat("c", 0.0)])
    assert a == pytest.approx(b, rel=1e-12)
    end_llm, end_emb = two_jobs(PREFILL_S, LLM_RATE, BATCH_S, EMB_RATE, 0.0)
    assert a["c"] == pytest.approx(end_llm, rel=1e-12) and a["e"] == pytest.approx(end_emb, rel=1e-12)


def test_the_embedding_batch_speeds_up_when_the_llm_goes_idle():
    # A long batch starts while a short prefill runs; once the prefill ends, the batch has the GPU.
    end_llm, end_emb = two_jobs(PREFILL_S, LLM_RATE, 0.002 + 1e-5 * 16000, EMB_RATE, 0.005)
    got = finish_times([chat("c", 0.0), emb("e", 0.005, tokens=16000)])
    assert got["c"] == pytest.approx(end_llm, rel=1e-12) and got["e"] == pytest.approx(end_emb, rel=1e-12)
    stretched_throughout = 0.005 + (0.002 + 1e-5 * 16000) * GPU.embedding_factor
    assert got["e"] < stretched_throughout


@pytest.mark.parametrize("order", ["llm_first", "embedding_first"])
def test_jump_equals_step_when_both_engines_overlap(order):
    # Decode runs cut and re-timed by embedding batches that start and stop mid-run, and embedding
    # batches re-timed by LLM work that starts and stops mid-batch, in both orders.
    chats = [chat(f"c{i}", 0.004 * i, prompt=300 + 37 * i, out=40 + 11 * i) for i in range(6)]
    embs = [emb(f"e{i}", 0.013 * i, tokens=700 + 410 * i) for i in range(10)]
    if order == "llm_first":
        embs = [emb(e.id, e.arrival_s + 0.05, tokens=e.embedding_tokens) for e in embs]
    else:
        chats = [chat(c.id, c.arrival_s + 0.003, prompt=c.prompt_tokens, out=c.output_tokens) for c in chats]
    reqs = chats + embs
    jump = simulate(reqs, cluster(), FifoPolicy(), SimConfig(mode="jump"), perf_provider=provider).records
    step = simulate(reqs, cluster(), FifoPolicy(), SimConfig(mode="step"), perf_provider=provider).records
    assert (jump.outcome == "completed").all()
    assert list(jump.request_id) == list(step.request_id)
    assert (jump.e2e_ms - step.e2e_ms).abs().max() < 1e-6
    assert (jump.ttft_ms - step.ttft_ms).abs().max() < 1e-6
    # The interference is real: every LLM request that overlapped embedding work took longer than alone.
    alone = simulate(chats, cluster(), FifoPolicy(), SimConfig(mode="jump"), perf_provider=provider).records
    slower = jump.set_index("request_id").loc[list(alone.request_id), "e2e_ms"].to_numpy() - alone.e2e_ms.to_numpy()
    assert (slower >= -1e-9).all() and slower.max() > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jump_equals_step_under_many_retimings(seed, monkeypatch):
    # Ten chats decoding while 120 small embedding batches come and go over 2.5 s: the embedding
    # engine starts and stops ~100 times mid-run, so decode runs are cut and re-timed mid-step
    # (jump mode) as often as single steps are (step mode).
    import random

    import sagesched.sim.segments as segments

    retimed: dict[tuple[bool, str], int] = {}
    original = segments.EngineSegments._llm_retime

    def counting(self, inst, gpu, factor):
        kind = "run" if inst.llm_run is not None else "step"
        event = inst.llm_event
        original(self, inst, gpu, factor)
        if inst.llm_event is not event:  # re-timed: a new end event
            key = (self.step_mode, kind)
            retimed[key] = retimed.get(key, 0) + 1

    monkeypatch.setattr(segments.EngineSegments, "_llm_retime", counting)
    rng = random.Random(seed)
    chats = [
        chat(f"c{i}", rng.uniform(0, 0.5), prompt=rng.randint(50, 3000), out=rng.randint(1, 600)) for i in range(10)
    ]
    embs = [emb(f"e{i}", rng.uniform(0, 2.5), tokens=rng.randint(20, 400)) for i in range(120)]
    reqs = sorted(chats + embs, key=lambda r: r.arrival_s)
    jump = simulate(reqs, cluster(), FifoPolicy(), SimConfig(mode="jump"), perf_provider=provider).records
    step = simulate(reqs, cluster(), FifoPolicy(), SimConfig(mode="step"), perf_provider=provider).records
    assert (jump.outcome == "completed").all() and (step.outcome == "completed").all()
    assert list(jump.request_id) == list(step.request_id)
    assert (jump.e2e_ms - step.e2e_ms).abs().max() < 1e-6
    assert (jump.ttft_ms - step.ttft_ms).abs().max() < 1e-6
    assert retimed.get((False, "run"), 0) >= 50  # decode runs re-timed mid-step in jump mode
    assert retimed.get((True, "step"), 0) >= 50
