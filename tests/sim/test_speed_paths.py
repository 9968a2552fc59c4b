"""The light-load speed paths (issue 12) decide exactly what the plain code they skip would.

Each shortcut is checked against the computation it replaces, on the same state: the decode-run
terms against two `step_time_s` calls, the shape a decode run's end gathers against
`decode_run_limit`'s own walk, hybrid's unrounded load comparison against rounded keys on near-ties,
and the arrival callbacks against "every request arriving at one instant is queued before the call".
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from sagesched.core import Assignment, InstanceKind, InstanceView, Request, RequestType
from sagesched.policies import make_policy
from sagesched.policies.fifo import FifoPolicy
from sagesched.sim import ClusterConfig, InstanceConfig, SimConfig, VllmEngineConfig, simulate
from sagesched.sim.engines import EngineRequest, VllmEngineCore
from sagesched.sim.perf_model import LLMPerfModel, StepShape

PERF = LLMPerfModel.load("llama-2-7b", "a100")


@settings(max_examples=400, deadline=None)
@given(n=st.integers(1, 1024), ctx=st.integers(1, 8_000_000))
def test_decode_run_terms_are_the_two_step_times_bit_for_bit(n, ctx):
    first = PERF.step_time_s(StepShape(0, n, 0, ctx, 0, 0.0))
    second = PERF.step_time_s(StepShape(0, n, 0, ctx + n, 0, 0.0))
    assert PERF.decode_run_terms(n, ctx) == (first, second - first)


def _fresh_limit(core: VllmEngineCore) -> tuple[int, tuple | None]:
    """`decode_run_limit` from its own walk of the batch (the gathered shape dropped)."""
    saved = core._run_shape
    core._run_shape = None
    try:
        k = core.decode_run_limit()
        return k, core._run_shape
    finally:
        core._run_shape = saved


def test_a_decode_run_end_gathers_the_shape_decode_run_limit_would():
    """Drive an engine as the jump mode does (steps, decode runs, runs cut short, new arrivals) and
    compare, at every start, the limit and shape from the run's gathered shape with a fresh walk."""
    rng = random.Random(7)
    core = VllmEngineCore(VllmEngineConfig(num_gpu_blocks=400, max_num_seqs=24), PERF)
    added = used = 0
    for _ in range(3000):
        if added < 300 and rng.random() < 0.15:
            core.add(
                EngineRequest(id=f"r{added}", prompt_tokens=rng.randint(1, 600), output_tokens=rng.randint(1, 300))
            )
            added += 1
        expected = _fresh_limit(core)
        gathered = core._run_shape is not None and core._run_shape[0] == core.version
        k = core.decode_run_limit()
        # The limit, and the shape `start_decode_run` will read (only a run reads it).
        assert (k, core._run_shape if k >= 2 else None) == (expected[0], expected[1] if k >= 2 else None)
        if k >= 2:
            used += gathered
            run = core.start_decode_run(k)
            if run.k >= 1:
                # Cut some runs short, as an arrival does.
                core.finish_decode_run(run, run.k if rng.random() < 0.6 else rng.randint(0, run.k))
                continue
            core.run = None
        plan = core.plan_step()
        if plan is not None:
            core.finish_step(plan)
        elif added >= 300:
            break
    assert used > 100  # the gathered shape was actually the one used


def _llm_view(vid: str, rate: float, running: int = 0) -> InstanceView:
    return InstanceView(vid, InstanceKind.LLM, frozenset({"m"}), running=running, prefill_tokens_per_s=rate)


def test_hybrid_near_tie_loads_go_to_the_rounded_key_order():
    """Loads less than 2e-9 apart round to the same 9-decimal value: the LLM-only instance, then the
    one with fewer in flight, wins; further apart, the lower load wins whatever else."""
    chat = [Request("c", RequestType.LLM_CHAT, "m", 0.0, prompt_tokens=100, max_tokens=50)]  # 150 tokens

    def target(*views):
        (d,) = make_policy("hybrid", llm_holdback_ms=0).schedule(1.0, chat, list(views))
        assert isinstance(d, Assignment)
        return d.instance_id

    # Loads 150/1000 = 0.15 and 150/1000.000001 = 0.15 - 1.5e-10: equal after rounding.
    a = _llm_view("a", 1000.0, running=3)
    b = _llm_view("b", 1000.000001, running=5)
    assert target(a, b) == "a" and target(b, a) == "a"  # fewer in flight, in either order
    # 150/999.99 is 1.5e-6 above 0.15: the lower load wins though it has more in flight.
    c = _llm_view("c", 999.99)
    assert target(c, b) == "b" and target(b, c) == "b"
    # A near-tie met after a clear winner: the later, equal-load view with fewer in flight takes it.
    far = _llm_view("far", 100.0)
    assert target(far, b, a) == "a"


class _Recording(FifoPolicy):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, list[str]]] = []

    def schedule(self, now, queue, instances):
        self.seen.append((now, [r.id for r in queue]))
        return super().schedule(now, queue, instances)


def test_requests_arriving_at_one_instant_reach_the_policy_together():
    def chat(rid: str, at: float) -> Request:
        return Request(rid, RequestType.LLM_CHAT, "llama-2-7b", at, prompt_tokens=50, max_tokens=5, output_tokens=5)

    reqs = [chat("a", 0.0), chat("b", 1.0), chat("c", 1.0), chat("d", 2.5)]
    cluster = ClusterConfig((InstanceConfig(id="i0", model="llama-2-7b", hardware="a100"),))
    policy = _Recording()
    result = simulate(reqs, cluster, policy, SimConfig(mode="jump", timeline_interval_s=1.0))
    arrivals = [(now, ids) for now, ids in policy.seen if now in (0.0, 1.0, 2.5)]
    assert arrivals[0] == (0.0, ["a"])
    assert (1.0, ["b", "c"]) in arrivals  # one call with both, not one each
    assert not any(now == 1.0 and ids == ["b"] for now, ids in policy.seen)
    assert (result.records.outcome == "completed").all()


@settings(max_examples=200, deadline=None)
@given(
    loads=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 8), st.booleans()), min_size=1, max_size=6),
    prompt=st.integers(1, 4000),
)
def test_fifo_places_a_lone_request_where_its_first_placement_of_two_would_go(loads, prompt):
    """FIFO's one-request call skips the ordering and the ledger: its target is the one the general
    loop picks for the same request placed first in a call of two."""
    views = [
        InstanceView(f"i{k}", InstanceKind.LLM, frozenset({"m"}), running=run, queued_decode_tokens=tokens, healthy=up)
        for k, (tokens, run, up) in enumerate(loads)
    ]
    first = Request("a", RequestType.LLM_CHAT, "m", 0.0, prompt_tokens=prompt, max_tokens=10)
    second = Request("b", RequestType.LLM_CHAT, "m", 1.0, prompt_tokens=5, max_tokens=10)
    lone = FifoPolicy().schedule(2.0, [first], views)
    pair = FifoPolicy().schedule(2.0, [first, second], views)
    assert [(d.instance_id, d.request_ids) for d in lone] == [
        (d.instance_id, d.request_ids) for d in pair if d.request_ids == ("a",)
    ]
    assert lone == [] or lone[0].rule == pair[0].rule
