"""slo_aware's `ttft_margin_factor` on the indexed paths: the plain reference's floats and records.

`policies.slack_columns` computes best slacks per class from the queue's columns and
`policies.slack` orders and sheds off them; with the factor (LLM TTFT term x factor, shedding by the
factor-1 slack of the late rows only) both must stay bit for bit what `slo_aware.best_slack_s` and
the plain-list `schedule` give (unit behaviour: tests/policies/test_ttft_margin_factor.py).
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pandas as pd
import pytest
from test_indexed_queue import cluster, saturating_workload
from test_slack_indexed import _requests, _same, _views
from tiny_perf import make_provider

from sagesched.core import GatewayQueue
from sagesched.policies import make_policy
from sagesched.policies.base import LoadLedger, class_served_by
from sagesched.policies.slack_columns import class_best_slacks, class_row_slacks
from sagesched.policies.slo_aware import best_slack_s
from sagesched.sim import SimConfig, simulate


@pytest.mark.parametrize("factor", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("homogeneous", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_class_best_slacks_with_a_factor_match_the_reference_exactly(factor, homogeneous, seed):
    rng = random.Random(100 + seed)
    views = _views(rng, homogeneous, rng.choice([2, 4, 9]))
    queue = GatewayQueue(_requests(rng, 300))
    ledger = LoadLedger(views)
    now = rng.uniform(40, 60)
    checked = 0
    for cls in queue.classes():
        served = [v for v in views if v.healthy and class_served_by(v, cls)]
        if not served:
            continue
        cols = queue.columns(cls)
        plain = class_best_slacks(cols, served, ledger, now, cls[0])  # factor 1, kept on the columns
        best = class_best_slacks(cols, served, ledger, now, cls[0], factor)
        assert class_best_slacks(cols, served, ledger, now, cls[0], factor) is best  # memoised
        rows = np.arange(0, cols.n, 3)
        picked = class_row_slacks(cols, served, ledger, now, cls[0], rows, factor)
        for i, request in enumerate(cols.requests):
            ref = best_slack_s(ledger, request, now, factor)
            expected = math.inf if request.slo.empty else ref
            assert expected is not None
            assert _same(float(best[i]), expected), (request, float(best[i]), expected)
            if cls[0] or factor == 1.0:
                assert _same(float(best[i]), float(plain[i]))  # embeddings never stretch
            checked += 1
        for j, i in enumerate(rows.tolist()):
            assert _same(float(picked[j]), float(best[i]))
    assert checked > 50


def _sim(policy, plain: bool, light: bool = False) -> pd.DataFrame:
    reqs = saturating_workload()
    pool = cluster()
    if light:
        reqs = [dataclasses.replace(r, arrival_s=20 * r.arrival_s) for r in reqs]
    result = simulate(
        reqs, pool, policy, SimConfig(timeline_interval_s=0), perf_provider=make_provider(60_000), plain_inputs=plain
    )
    return result.records.sort_values("request_id").reset_index(drop=True)


SPECS = {
    "slo_aware": lambda f: make_policy("slo_aware", admission=True, ttft_margin_factor=f),
    "slo_aware_fair": lambda f: make_policy("slo_aware", admission=True, fair_share=True, ttft_margin_factor=f),
    "hybrid": lambda f: make_policy("hybrid", llm_fallback_config={"ttft_margin_factor": f}),
    "hybrid_noholdback": lambda f: make_policy(
        "hybrid", llm_holdback_ms=0, slack_margin_ms=0, llm_fallback_config={"ttft_margin_factor": f}
    ),
}


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_indexed_paths_give_the_reference_records_with_a_factor(spec):
    fast, reference = _sim(SPECS[spec](1.7), False), _sim(SPECS[spec](1.7), True)
    assert (reference.dispatch_s - reference.arrival_s).max() > 1.0  # a backlog built up
    pd.testing.assert_frame_equal(fast, reference)
    # The factor does something on this workload (else the equality above proves little).
    assert not _sim(SPECS[spec](1.0), False).equals(fast)


@pytest.mark.parametrize("spec", ["slo_aware", "hybrid"])
def test_lone_paths_give_the_reference_records_with_a_factor(spec):
    fast, reference = _sim(SPECS[spec](2.0), False, light=True), _sim(SPECS[spec](2.0), True, light=True)
    pd.testing.assert_frame_equal(fast, reference)


def test_factor_one_is_bit_for_bit_the_default():
    assert _sim(make_policy("hybrid"), False).equals(_sim(SPECS["hybrid"](1.0), False))


def test_shedding_under_a_factor_matches_between_paths():
    """Many late requests and a large budget: the indexed shed pool (factor-1 slacks of the late
    rows only) refuses exactly what the plain path refuses, with the same reasons."""

    def policy():
        return make_policy("slo_aware", admission=True, ttft_margin_factor=2.5, max_shed_fraction=0.5)

    fast, reference = _sim(policy(), False), _sim(policy(), True)
    pd.testing.assert_frame_equal(fast, reference)
    assert (reference.reason.fillna("").str.contains("predicted lateness")).sum() > 5
