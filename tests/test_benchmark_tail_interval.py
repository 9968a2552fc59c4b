"""The policy benchmark's bootstrap interval on an interactive-tail ratio
(experiments/policy_benchmark/analyze.py, `tail_ratio_interval`): the report reads target misses
against it, so its coverage and its dependence on the sample size are checked on known draws."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def analyze(load_script):
    return load_script("experiments/policy_benchmark/analyze.py")


def test_interval_holds_the_true_ratio_and_narrows_with_more_requests(analyze) -> None:
    rng = np.random.default_rng(7)
    true = np.exp(1.0) / np.exp(2.0)  # lognormal p99s scale with exp(mu): the ratio of two is exp(-1)
    widths = []
    for n in (100, 2000):
        a, b = rng.lognormal(1.0, 0.5, n), rng.lognormal(2.0, 0.5, n)
        lo, hi = analyze.tail_ratio_interval(a, b)
        assert lo < true < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_interval_is_reproducible_and_needs_two_requests(analyze) -> None:
    a, b = np.arange(1.0, 101.0), np.arange(2.0, 202.0, 2.0)
    assert analyze.tail_ratio_interval(a, b) == analyze.tail_ratio_interval(a, b)
    assert all(np.isnan(analyze.tail_ratio_interval(np.array([1.0]), b)))


def _run(label: str, seed: int, goodput: float, p99: float, floor: float, bound: float, refusing: float) -> dict:
    ttfts = np.full(10, p99)
    return {
        "scenario": "s",
        "load": 1.0,
        "label": label,
        "seed": seed,
        "goodput": goodput,
        "goodput_span": goodput,
        "met": goodput * 10,
        "span": 10.0,
        "bound": bound,
        "bound_refusing": refusing,
        "shed": 0.0,
        "rejected": 0.0,
        "inter_ttft_p99_ms": p99,
        "inter_ttft_ms": ttfts,
        "inter_ttft_p99_floor_ms": floor,
        "query_attainment": np.nan,
    }


def test_paired_reports_the_tail_gap_closed_and_both_goodput_bounds_in_the_worst_seed(analyze) -> None:
    import pandas as pd

    df = pd.DataFrame(
        [
            _run("fifo", 1, 10.0, 1000.0, 400.0, 12.0, 13.0),
            _run("hybrid", 1, 11.0, 550.0, 400.0, 12.0, 13.0),  # 450 of FIFO's 600 ms above the floor gone
            _run("fifo", 2, 8.0, 500.0, 300.0, 12.0, 16.0),
            _run("hybrid", 2, 9.0, 550.0, 300.0, 12.0, 16.0),  # worse than FIFO: -50 of 200
        ]
    )
    row = analyze.paired(df).set_index("policy").loc["hybrid"]
    assert row["inter_tail_gap_closed_min"] == pytest.approx(-0.25)
    assert row["bound_vs_fifo_min"] == pytest.approx(1.2)  # 12 / 10 in seed 1, 12 / 8 in seed 2
    assert row["bound_refusing_vs_fifo_min"] == pytest.approx(1.3)  # 13 / 10 and 16 / 8
    assert row["inter_floor_vs_fifo"] == pytest.approx(0.6)  # the worst seed's floor: 300 / 500
