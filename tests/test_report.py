"""Reports from result folders: aggregation over seeds, the bound's rows, labels, plots and errors.

These tests write summary.json files by hand (the shape `python -m sagesched.experiment` writes), so
every expected number is known; tests/test_experiment.py builds a report from a real sweep.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sagesched.report import ReportError, aggregate, findings, load_runs, t95, write_report


def _summary(policy: str, rate: float, seed: int, goodput: float, slo: float, *, label: str | None = None,
             scenario: str = "conv", classes: dict | None = None) -> dict:  # fmt: skip
    return {
        "policy": policy,
        "label": label or policy,
        "seed": seed,
        "requests": 100,
        "completed": 100,
        "rejected": 0,
        "goodput_rps": goodput,
        "slo_attainment": slo,
        "ttft_p99_ms": 100.0 * rate + seed,
        "embedding_p99_ms": 12.0,
        "offered_rps": 10.0 * rate,
        "slo_attainment_by_class": classes or {"interactive": slo, "batch": 1.0},
        "bound": {
            "kind": "isolated",
            "slo_attainment_upper": 1.0,
            "goodput_rps_upper": 10.0 * rate,
            "ttft_p99_ms_lower": 50.0,
        },
        "config": {"scenario": scenario, "workload": {"name": scenario, "rate_scale": rate}},
    }


def _write(root: Path, name: str, summary: dict) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for policy, base in (("fifo", 5.0), ("hybrid", 6.0)):
        for rate in (0.5, 1.0):
            for seed, noise in ((1, -0.5), (2, 0.5)):
                slo = min(1.0, 0.7 + 0.1 * seed)
                _write(root, f"{policy}_{rate}_{seed}", _summary(policy, rate, seed, base * rate + noise, slo))
    _write(root, "tuned_1.0_1", _summary("hybrid", 1.0, 1, 7.0, 0.95, label="hybrid_tuned"))
    return root


def test_mean_and_student_t_interval_over_seeds(sweep):
    agg = aggregate(load_runs(sweep)).set_index(["scenario", "policy", "rate_scale"])
    row = agg.loc[("conv", "fifo", 1.0)]
    assert row["runs"] == 2
    assert row["goodput_rps"] == pytest.approx(5.0)
    # values 4.5 and 5.5: sd = 1/sqrt(2), half-width = t(1 df) * sd / sqrt(2) = 12.706 * 0.5
    assert row["goodput_rps_ci"] == pytest.approx(12.7062 * 0.5, abs=1e-3)
    assert agg.loc[("conv", "hybrid_tuned", 1.0)]["runs"] == 1
    assert agg.loc[("conv", "hybrid_tuned", 1.0)]["goodput_rps_ci"] is None or math.isnan(
        agg.loc[("conv", "hybrid_tuned", 1.0)]["goodput_rps_ci"]
    )


def test_t_values_shrink_towards_the_normal_quantile():
    assert math.isnan(t95(1))
    assert t95(2) == pytest.approx(12.7062, abs=1e-3)
    assert t95(3) > t95(10) > t95(100) > 1.96
    assert t95(12) == pytest.approx(2.2010, abs=1e-4)  # df=11 (a rounded table said 2.179)
    assert t95(41) == pytest.approx(2.0211, abs=1e-4)  # df=40 (the table fell back to 1.96)


def test_readme_table_holds_the_summaries_numbers_and_the_bound(sweep, tmp_path):
    out = tmp_path / "report"
    text = write_report(sweep, out, title="T", command="bash run.sh").read_text()
    assert "bash run.sh" in text
    # fifo at load 1.0: goodput 4.5 and 5.5 -> 5.000 ± 6.353; the label gets its own row
    assert "| 1 | fifo | 2 | 0.850 ± 0.635 | 5.000 ± 6.353 |" in text
    assert "| 1 | hybrid_tuned | 1 | 0.950 | 7.000 |" in text
    # the bound's row after each load: attainment upper 1, goodput upper 10 x rate, TTFT p99 lower 50
    assert "| 1 | *bound (isolated service)* |  | 1.000 | 10.0 | 50.0 |" in text
    assert "| 0.5 | *bound (isolated service)* |  | 1.000 | 5.000 | 50.0 |" in text
    # per-class table
    assert "SLO attainment per class (conv):" in text
    for name in ("conv_slo_attainment.png", "conv_goodput_rps.png", "conv_ttft_p99_ms.png",
                 "conv_embedding_p99_ms.png", "conv_slo_by_class.png"):  # fmt: skip
        assert (out / name).stat().st_size > 1000, name
        assert f"]({name})" in text
    assert (out / "runs.csv").is_file() and (out / "aggregate.csv").is_file()


def test_findings_name_the_leader_the_bound_and_every_hybrid_variant(sweep):
    lines = findings(aggregate(load_runs(sweep)))
    at_one = next(line for line in lines if "load 1**" in line)
    assert "best goodput 7.00 req/s by `hybrid_tuned`" in at_one
    assert "(bound 10.00)" in at_one
    assert "`hybrid` ranks 2/3 (6.00 req/s" in at_one and "`hybrid_tuned` ranks 1/3" in at_one


def test_ties_share_the_better_rank(tmp_path):
    root = tmp_path / "s"
    for policy in ("a", "hybrid", "z"):
        _write(root, policy, _summary(policy, 1.0, 1, 3.0, 1.0))
    (line,) = findings(aggregate(load_runs(root)))
    assert "`hybrid` ranks 1/3" in line and "`a`, `hybrid`, `z`" in line


def test_scenarios_are_reported_separately(tmp_path):
    root = tmp_path / "s"
    _write(root, "a", _summary("fifo", 1.0, 1, 3.0, 1.0, scenario="conv"))
    _write(root, "b", _summary("fifo", 1.0, 1, 2.0, 0.5, scenario="rag"))
    text = write_report(root, tmp_path / "r").read_text()
    assert "## conv" in text and "## rag" in text
    assert (tmp_path / "r" / "rag_goodput_rps.png").is_file()


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        load_runs(tmp_path / "missing")
    with pytest.raises(ReportError, match=r"no summary\.json"):
        load_runs(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "summary.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        load_runs(tmp_path)


def test_command_line_writes_the_report_and_refuses_a_missing_analysis_file(sweep, tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "sagesched.report", str(sweep), "--out", str(tmp_path / "r"), "--title", "CLI"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "r" / "README.md").read_text().startswith("# CLI")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "sagesched.report",
            str(sweep),
            "--out",
            str(tmp_path / "r2"),
            "--analysis",
            str(tmp_path / "nope.md"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "nope.md" in bad.stderr and "Traceback" not in bad.stderr
