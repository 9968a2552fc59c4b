"""`sagesched compare`: paired per-request differences, the side-by-side table and the CDF plot."""

from __future__ import annotations

import pandas as pd
import pytest

from sagesched.replay.compare import CompareError, compare, load_run, paired, side_by_side

from .reference_data import CALIBRATION, needs_reference_data


def test_compare_pairs_every_request_of_a_sim_live_pair(run_pair, tmp_path):
    text = compare(run_pair.sim, run_pair.live, tmp_path / "cmp")
    sim = run_pair.records("sim")
    frame = pd.read_parquet(tmp_path / "cmp" / "paired.parquet")
    assert len(frame) == len(sim) and set(frame["request_id"]) == set(sim["request_id"])
    row = frame.set_index("request_id").iloc[0]
    assert row["e2e_ms_diff"] == pytest.approx(row["e2e_ms_b"] - row["e2e_ms_a"], nan_ok=True)
    table = pd.read_csv(tmp_path / "cmp" / "side_by_side.csv").set_index("metric")
    s_sim, s_live = run_pair.summary("sim"), run_pair.summary("live")
    assert table.loc["ttft_p99_ms", "a"] == pytest.approx(s_sim["ttft_p99_ms"])
    assert table.loc["ttft_p99_ms", "b"] == pytest.approx(s_live["ttft_p99_ms"])
    assert table.loc["ttft_p99_ms", "b_minus_a"] == pytest.approx(s_live["ttft_p99_ms"] - s_sim["ttft_p99_ms"])
    assert (tmp_path / "cmp" / "cdf.png").stat().st_size > 1000
    assert "TTFT (ms)" in text and (tmp_path / "cmp" / "compare.md").read_text().startswith("# ")


def test_paired_stats_are_the_distribution_of_b_minus_a(run_pair):
    a, b = load_run(run_pair.sim), load_run(run_pair.live)
    frame, stats, info = paired(a, b)
    both = frame[
        (frame["outcome_a"] == "completed") & (frame["outcome_b"] == "completed") & (frame["type"] != "embedding")
    ]
    ttft = stats.set_index("metric").loc["TTFT (ms)"]
    assert ttft["pairs"] == both["ttft_ms_diff"].notna().sum()
    assert ttft["diff_p50"] == pytest.approx(both["ttft_ms_diff"].median())
    assert info["paired_requests"] == len(frame) and info["only_in_a"] == info["only_in_b"] == 0
    # Comparing a run with itself: every difference is zero, every ratio one.
    _, same, _ = paired(a, a)
    assert (same["diff_p50"] == 0).all() and (same["ratio_p50"] == 1).all()


@needs_reference_data
def test_a_summary_only_run_gets_the_table_but_no_pairs(run_pair, tmp_path):
    from sagesched.replay.formats import import_run

    report = next(CALIBRATION.glob("*codegen/results"))
    import_run("inference-perf", report, tmp_path / "ip")
    a, b = load_run(tmp_path / "ip"), load_run(run_pair.live)
    assert paired(a, b)[2]["paired_requests"] == 0
    assert "ttft_p99_ms" in set(side_by_side(a, b)["metric"])
    compare(tmp_path / "ip", run_pair.live, tmp_path / "out")
    assert (tmp_path / "out" / "compare.md").is_file()


def test_compare_errors_name_the_folder(tmp_path):
    with pytest.raises(CompareError, match="not a run folder"):
        load_run(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    with pytest.raises(CompareError, match=r"no summary\.json"):
        load_run(tmp_path / "run")
    (tmp_path / "run" / "summary.json").write_text("{\n oops")
    with pytest.raises(CompareError, match=r"summary.json:2: column"):
        load_run(tmp_path / "run")


def test_cli_compare(run_pair, capsys):
    from sagesched.cli import main

    assert main(["compare", str(run_pair.sim), str(run_pair.live), "--labels", "sim", "live"]) == 0
    out = capsys.readouterr().out
    assert "# sim vs live" in out and "ttft_p99_ms" in out
