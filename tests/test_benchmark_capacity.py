"""The policy benchmark's capacity search (experiments/policy_benchmark/capacity.py): the report
states each policy's capacity at equal SLO attainment from it, so the search is checked against
known attainment curves, and one real probe against the simulator."""

from __future__ import annotations

import math

import pandas as pd
import pytest


@pytest.fixture(scope="module")
def capacity(load_script):
    return load_script("experiments/policy_benchmark/capacity.py")


def _curve(capacity, threshold: float, calls: list[float]):
    """A probe whose attainment falls linearly and crosses 0.9 at `threshold`."""

    def probe(rate: float):
        calls.append(rate)
        attainment = max(0.0, min(1.0, 0.9 + (threshold - rate) * 0.1))
        return capacity.Probe("s", "p", 1, rate, rate, 100, attainment, attainment, 1.0, 0)

    return probe


@pytest.mark.parametrize("threshold", [0.03, 0.4, 1.0, 1.7, 5.3])
def test_search_brackets_the_crossing_within_the_tolerance(capacity, threshold: float) -> None:
    calls: list[float] = []
    found, capped, probes = capacity.search_capacity(_curve(capacity, threshold, calls), 0.9, 100.0, 1.04)
    assert not capped
    assert found <= threshold + 1e-12  # the target was met there
    assert threshold / found <= 1.04 + 1e-9  # and the bracket's upper end, within 4%, missed it
    assert [p.rate_scale for p in probes] == calls
    assert len(calls) <= 14


def test_every_type_criterion_is_decided_by_the_worst_type(capacity) -> None:
    """All requests meet 90% up to 4x, but one request type only up to 1x: that is its capacity."""

    def probe(rate: float):
        whole = 1.0 if rate <= 4.0 else 0.5
        worst = 1.0 if rate <= 1.0 else 0.2
        return capacity.Probe("s", "p", 1, rate, rate, 100, whole, worst, 1.0, 0)

    everything, _, _ = capacity.search_capacity(probe, 0.9, 100.0, 1.04, "all")
    each, _, _ = capacity.search_capacity(probe, 0.9, 100.0, 1.04, "every_type")
    assert 4.0 / 1.04 <= everything <= 4.0
    assert 1.0 / 1.04 <= each <= 1.0


def test_search_stops_at_the_rate_the_trace_can_fill(capacity) -> None:
    found, capped, _ = capacity.search_capacity(_curve(capacity, 50.0, []), 0.9, 3.0, 1.04)
    assert (found, capped) == (3.0, True)
    found, capped, _ = capacity.search_capacity(_curve(capacity, 2.9, []), 0.9, 3.0, 1.04)
    assert not capped and 2.9 / 1.04 <= found <= 2.9


def test_search_gives_zero_when_even_the_lightest_load_misses(capacity) -> None:
    found, capped, probes = capacity.search_capacity(_curve(capacity, -1.0, []), 0.9, 10.0, 1.04)
    assert (found, capped) == (0.0, False)
    assert min(p.rate_scale for p in probes) < 1 / 32


def test_table_pairs_each_seed_with_fifo(capacity) -> None:
    found = pd.DataFrame(
        {
            "scenario": ["a"] * 4,
            "policy": ["fifo", "fifo", "hybrid", "hybrid"],
            "seed": [1, 2, 1, 2],
            "capacity": [1.0, 2.0, 1.5, 2.0],
            "capped": [False, False, False, True],
        }
    )
    table = capacity.capacity_table(found).set_index("policy")
    assert table.loc["hybrid", "vs_fifo"] == pytest.approx((1.5 + 1.0) / 2)  # paired by seed, not 1.75 / 1.5
    assert table.loc["hybrid", "worst_seed_vs_fifo"] == pytest.approx(1.0)
    assert table.loc["hybrid", "capacity_by_seed"] == "1.50 / 2.00+"
    assert table.loc["fifo", "vs_best"] == pytest.approx(1.5 / 1.75)
    assert math.isclose(table.loc["hybrid", "vs_best"], 1.0)


def test_a_probe_runs_the_scenario_over_a_window_that_grows_with_the_rate_above_1x(capacity) -> None:
    half = capacity.run_probe("rag", "fifo", 1, 0.5)
    full = capacity.run_probe("rag", "fifo", 1, 1.0)
    more = capacity.run_probe("rag", "fifo", 1, 1.25)
    # Below 1x the scenario's window (the same requests, spread over a longer run) ...
    assert half.duration_s == full.duration_s == pytest.approx(180.0)
    assert half.requests == full.requests
    # ... above it a window as much longer as the rate is higher, so the run lasts as long as at 1x:
    # `rate_scale` compresses the trace clock, so the request count follows the window.
    assert more.duration_s == pytest.approx(180.0 * 1.25)
    assert 1.1 < more.requests / full.requests < 1.4
    assert half.slo_attainment == pytest.approx(1.0)
    # The worst request type can only be below the whole (a weighted mean of the types).
    assert more.worst_type_attainment <= more.slo_attainment
    assert half == capacity.run_probe("rag", "fifo", 1, 0.5)  # deterministic


def test_probe_cache_resumes_from_its_file(capacity, tmp_path, monkeypatch) -> None:
    path = tmp_path / "probes.csv"
    ran: list[float] = []

    def fake_run(scenario: str, policy: str, seed: int, rate: float):
        ran.append(rate)
        return capacity.Probe(scenario, policy, seed, rate, 180.0 * rate, 10, 0.95, 0.9, 1.5, 1)

    monkeypatch.setattr(capacity, "run_probe", fake_run)
    first = capacity.ProbeCache(path)
    a = first.probe("rag", "hybrid", 1, 2**0.5)
    assert first.probe("rag", "hybrid", 1, 2**0.5) == a and ran == [2**0.5]
    first.probe("rag", "fifo", 1, 1.0)
    # A new search (another process) reads both back and runs neither again.
    again = capacity.ProbeCache(path)
    assert again.probe("rag", "hybrid", 1, 2**0.5) == a
    assert again.probe("rag", "fifo", 1, 1.0).policy == "fifo"
    assert ran == [2**0.5, 1.0]
    again.probe("rag", "fifo", 2, 1.0)  # a different seed is a different probe
    assert ran == [2**0.5, 1.0, 1.0]


def test_mixed_versus_siloed_rows_are_paired_with_the_best_siloed_layout_of_each_seed(capacity) -> None:
    found = pd.DataFrame(
        {
            "scenario": ["m"] * 6,
            "policy": ["hybrid@silo_a/none"] * 2 + ["fifo@silo_b/none"] * 2 + ["hybrid@mixed/mps"] * 2,
            "seed": [1, 2] * 3,
            "capacity": [2.0, 1.0, 1.0, 1.6, 3.0, 2.4],
            "capped": [False] * 6,
        }
    )
    table = capacity.capacity_table(found).set_index("policy")
    # Seed 1's best silo is silo_a (2.0), seed 2's silo_b (1.6): the mixed layout is 1.5x both.
    assert table.loc["hybrid@mixed/mps", "vs_best_silo"] == pytest.approx(1.5)
    assert table.loc["hybrid@mixed/mps", "worst_seed_vs_best_silo"] == pytest.approx(1.5)
    assert table.loc["hybrid@silo_a/none", "worst_seed_vs_best_silo"] == pytest.approx(1.0 / 1.6)
    assert math.isnan(table.loc["hybrid@mixed/mps", "vs_fifo"])  # no plain fifo row to pair with


def test_layouts_are_refused_on_a_scenario_without_them(capacity) -> None:
    with pytest.raises(SystemExit):
        capacity.main(["--scenarios", "rag", "--layouts", "all_mixed_4/mps"])
    with pytest.raises(SystemExit):
        capacity.main(["--scenarios", "mvs_rag", "--layouts", "all_mixed_4"])


def test_a_layout_probe_runs_that_cluster_under_that_preset(capacity) -> None:
    mixed = capacity.run_probe("mvs_embedding_heavy", "fifo@all_mixed_4/time_slice", 1, 0.25)
    siloed = capacity.run_probe("mvs_embedding_heavy", "fifo@silo_2llm_2tei/none", 1, 0.25)
    assert mixed.policy == "fifo@all_mixed_4/time_slice" and mixed.requests == siloed.requests
    # Same requests on another layout: placements differ, so the goodput does too.
    assert mixed.goodput_rps != siloed.goodput_rps
