"""slo_aware with admission on a one-request queue (`_schedule_lone`) decides exactly as the list code.

The shortcut skips the ranking and computes each instance's slack once; the decisions (placement,
reason, rejection text) and the admission state (requests seen, shed) must stay the reference's.
"""

from __future__ import annotations

import random

import pytest

from sagesched.core import SLO, InstanceKind, InstanceView, Priority, Request, RequestType
from sagesched.policies import make_policy


def _views(rng: random.Random) -> list[InstanceView]:
    views = []
    for k in range(rng.randint(1, 5)):
        kind = rng.choice([InstanceKind.LLM, InstanceKind.LLM_EMBEDDING, InstanceKind.EMBEDDING])
        models = frozenset({"emb"} if kind is InstanceKind.EMBEDDING else {"llm", "emb"})
        max_inflight = rng.randint(1, 8)
        views.append(
            InstanceView(
                id=f"i{k}",
                kind=kind,
                models=models,
                healthy=rng.random() > 0.15,
                running=rng.randint(0, max_inflight),
                queued_prefill_tokens=rng.randrange(0, 40000),
                queued_decode_tokens=rng.randrange(0, 8000),
                max_inflight=max_inflight,
                prefill_tokens_per_s=rng.choice([5000.0, 9000.0]),
                decode_step_s=rng.choice([0.02, 0.04]),
            )
        )
    return views


def _request(rng: random.Random, i: int) -> Request:
    slo = rng.choice(
        [SLO(ttft_ms=300, tpot_ms=60), SLO(e2e_ms=4000), SLO(), SLO(ttft_ms=2000, tpot_ms=100), SLO(ttft_ms=50)]
    )
    model = rng.choice(["llm", "llm", "llm", "other"])
    if rng.random() < 0.2:
        return Request(
            id=f"e{i}",
            type=RequestType.EMBEDDING,
            model="emb",
            arrival_s=rng.uniform(0, 5),
            embedding_inputs=rng.randint(1, 3),
            embedding_tokens=rng.randint(10, 300),
            priority=Priority(rng.randrange(5)),
            slo=slo,
        )
    out = rng.randint(1, 300)
    return Request(
        id=f"c{i}",
        type=RequestType.LLM_CHAT,
        model=model,
        arrival_s=rng.uniform(0, 5),
        prompt_tokens=rng.randint(1, 6000),
        max_tokens=out,
        output_tokens=out,
        priority=Priority(rng.randrange(5)),
        slo=slo,
    )


@pytest.mark.parametrize("wait", [0.0, 2.0])  # late_first_wait_s: the reason names late-first or late
@pytest.mark.parametrize("seed", range(5))
def test_lone_request_shortcut_matches_the_list_code(seed: int, wait: float) -> None:
    rng = random.Random(seed)
    fast = make_policy("slo_aware", admission=True, max_shed_fraction=0.3, late_first_wait_s=wait)
    ref = make_policy("slo_aware", admission=True, max_shed_fraction=0.3, late_first_wait_s=wait)
    taken = {"placed": 0, "shed": 0}
    for i in range(400):
        views = _views(rng)
        request = _request(rng, i)
        now = rng.uniform(4, 8)
        got = fast.schedule(now, [request], views)
        want = ref._schedule_list(now, [request], views)
        assert got == want, (request, views)
        assert (fast.admission.seen_count, fast.admission.shed) == (ref.admission.seen_count, ref.admission.shed)
        for d in got:
            taken["shed" if getattr(d, "code", None) is not None else "placed"] += 1
    assert taken["placed"] > 50 and taken["shed"] > 0  # both outcomes were exercised


@pytest.mark.parametrize("seed", range(5))
def test_hybrid_lone_llm_request_matches_asking_the_fallback(seed: int) -> None:
    """Hybrid reads the admission fallback's answer for a lone LLM request (`lone_answer`) instead of
    calling it; the decisions (targets, reasons, shed rejections) and the fallback's admission
    state must be those of the call it replaces (`_lone_admitted` off)."""
    rng = random.Random(100 + seed)
    config = {"llm_fallback_config": {"max_shed_fraction": 0.3}}
    fast = make_policy("hybrid", **config)
    ref = make_policy("hybrid", **config)
    assert fast._lone_admitted
    ref._lone_admitted = False
    taken = {"placed": 0, "shed": 0}
    for i in range(400):
        views = _views(rng)
        request = _request(rng, i)
        if request.is_embedding:
            continue
        queue = [request]
        if rng.random() < 0.3:  # an embedding waiting beside it (a mixed instance's share applies)
            queue.append(_request(random.Random(i), 10_000 + i))
        now = rng.uniform(4, 8)
        got = fast.schedule(now, queue, views)
        want = ref.schedule(now, queue, views)
        assert got == want, (queue, views)
        a, b = fast.llm_fallback.admission, ref.llm_fallback.admission
        assert (a.seen_count, a.shed) == (b.seen_count, b.shed)
        for d in got:
            if d.rule.startswith("hybrid/llm"):
                taken["shed" if getattr(d, "code", None) is not None else "placed"] += 1
    assert taken["placed"] > 50 and taken["shed"] > 0  # both outcomes were exercised
