"""`policies.slack_columns.class_best_slacks` equals `slo_aware.best_slack_s`, bit for bit.

The vectorised best slacks skip instances another instance dominates (same rates, waits no larger)
and reuse their result for the same rows, time and instance figures; both shortcuts must leave every
float exactly as the per-request reference computes it, or a ranking (and so a placement) changes.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from sagesched.core import SLO, GatewayQueue, InstanceKind, InstanceView, Priority, Request, RequestType
from sagesched.policies.base import LoadLedger, class_served_by
from sagesched.policies.slack_columns import class_best_slacks, class_slo_slacks
from sagesched.policies.slo_aware import best_slack_s


def _views(rng: random.Random, homogeneous: bool, count: int) -> list[InstanceView]:
    views = []
    for k in range(count):
        kind = rng.choice([InstanceKind.LLM, InstanceKind.LLM_EMBEDDING, InstanceKind.EMBEDDING])
        models = frozenset(
            {"llm"} if kind is InstanceKind.LLM else {"emb"} if kind is InstanceKind.EMBEDDING else {"llm", "emb"}
        )
        rates = (
            (9000.0, 0.021, 40000.0)
            if homogeneous
            else (rng.choice([6000.0, 9000.0]), rng.choice([0.02, 0.03]), rng.choice([30000.0, 40000.0]))
        )
        emb = rng.randrange(0, 3000)
        views.append(
            InstanceView(
                id=f"i{k}",
                kind=kind,
                models=models,
                healthy=rng.random() > 0.1,
                running=rng.randrange(0, 40),
                waiting=rng.randrange(0, 10),
                queued_prefill_tokens=emb + rng.randrange(0, 20000),
                queued_decode_tokens=rng.randrange(0, 5000),
                queued_embedding_tokens=emb,
                prefill_tokens_per_s=rates[0],
                decode_step_s=rates[1],
                embedding_tokens_per_s=rates[2],
            )
        )
    return views


def _requests(rng: random.Random, n: int) -> list[Request]:
    reqs = []
    for i in range(n):
        slo = rng.choice(
            [
                SLO(ttft_ms=300, tpot_ms=60),
                SLO(e2e_ms=4000),
                SLO(),
                SLO(ttft_ms=2000, tpot_ms=100),
                SLO(ttft_ms=100, e2e_ms=900),
            ]
        )
        t = rng.uniform(0, 50)
        if rng.random() < 0.3:
            reqs.append(
                Request(
                    id=f"e{i}",
                    type=RequestType.EMBEDDING,
                    model="emb",
                    arrival_s=t,
                    embedding_inputs=rng.randint(1, 4),
                    embedding_tokens=rng.randint(20, 400),
                    priority=Priority(rng.randrange(5)),
                    slo=slo,
                )
            )
        else:
            out = rng.randint(1, 300)
            reqs.append(
                Request(
                    id=f"c{i}",
                    type=RequestType.LLM_CHAT,
                    model="llm",
                    arrival_s=t,
                    prompt_tokens=rng.randint(1, 4000),
                    max_tokens=out,
                    output_tokens=out,
                    priority=Priority(rng.randrange(5)),
                    slo=slo,
                )
            )
    return reqs


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("homogeneous", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_class_best_slacks_match_the_reference_exactly(homogeneous: bool, seed: int) -> None:
    rng = random.Random(seed)
    views = _views(rng, homogeneous, rng.choice([2, 4, 9]))
    queue = GatewayQueue(_requests(rng, 300))
    ledger = LoadLedger(views)
    now = rng.uniform(40, 60)
    for cls in queue.classes():
        served = [v for v in views if v.healthy and class_served_by(v, cls)]
        if not served:
            continue
        cols = queue.columns(cls)
        best = class_best_slacks(cols, served, ledger, now, cls[0])
        again = class_best_slacks(cols, served, ledger, now, cls[0])  # the memoised result
        assert again is best
        for i, request in enumerate(cols.requests):
            ref = best_slack_s(ledger, request, now)
            expected = math.inf if request.slo.empty else ref
            assert _same(float(best[i]), expected), (request, float(best[i]), ref)
        # Another time: a fresh result, still exact.
        later = class_best_slacks(cols, served, ledger, now + 1.0, cls[0])
        assert later is not best
        for i, request in enumerate(cols.requests):
            if not request.slo.empty:
                assert _same(float(later[i]), best_slack_s(ledger, request, now + 1.0))


def test_a_dominated_instance_is_skipped_and_the_result_unchanged() -> None:
    rng = random.Random(7)
    light = InstanceView(id="a", kind=InstanceKind.LLM, models=frozenset({"llm"}), queued_prefill_tokens=100)
    heavy = InstanceView(id="b", kind=InstanceKind.LLM, models=frozenset({"llm"}), queued_prefill_tokens=90_000)
    queue = GatewayQueue([r for r in _requests(rng, 200) if not r.is_embedding])
    cols = queue.columns((False, "llm"))
    both = class_best_slacks(cols, [heavy, light], LoadLedger([heavy, light]), 10.0, False)
    cols.cache.clear()
    alone = class_best_slacks(cols, [light], LoadLedger([light]), 10.0, False)
    assert np.array_equal(both, alone, equal_nan=True)


@pytest.mark.parametrize("homogeneous", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_slo_slacks_are_exact_and_the_rows_left_out_are_late(homogeneous: bool, seed: int) -> None:
    """Over calls at increasing times with changing loads (rows popped and added in between),
    `class_slo_slacks` gives the exact best slack of the rows it returns, and every other queued row
    with an SLO has a negative best slack."""
    rng = random.Random(100 + seed)
    reqs = _requests(rng, 400)
    queue = GatewayQueue(reqs[:250])
    now = 0.0
    left_out = 0
    for step in range(12):
        now += rng.uniform(0.0, 3.0)
        views = _views(random.Random(seed * 50 + step), homogeneous, 4)
        ledger = LoadLedger(views)
        for cls in queue.classes():
            served = [v for v in views if v.healthy and class_served_by(v, cls)]
            if not served:
                continue
            cols = queue.columns(cls)
            rows, slacks = class_slo_slacks(cols, served, ledger, now, cls[0])
            assert cols.slo_alive == int(np.count_nonzero(cols.alive[: cols.n] & cols.has_slo[: cols.n]))
            computed = dict(zip(rows.tolist(), slacks.tolist(), strict=True))
            for i, request in enumerate(cols.requests):
                if not cols.alive[i] or request.slo.empty:
                    assert i not in computed
                    continue
                exact = best_slack_s(ledger, request, now)
                assert exact is not None
                if i in computed:
                    assert _same(computed[i], exact), (request, computed[i], exact)
                else:
                    assert exact < 0, (request, exact)
                    left_out += 1
        for request in rng.sample(list(queue), 20):
            queue.pop(request.id)
        for request in reqs[250 + 12 * step : 262 + 12 * step]:
            queue.add(request)
    assert left_out > 0  # the shortcut was taken
