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
