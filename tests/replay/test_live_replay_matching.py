"""`reports/live_replay/make_report.py --match-load`: a slower machine gets the same experiment.

The premise of matching the load is that stretching every arrival and SLO by the servers' slowdown
replays the same experiment; these tests check it on the simulator, with a calibration made 1.5x
slower by hand (no servers needed).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "sagesched" / "data" / "profiles" / "calibration" / "llamacpp"


@pytest.fixture
def make_report(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "reports" / "live_replay"))
    module = importlib.import_module("make_report")
    yield module
    sys.modules.pop("make_report", None)
    sys.modules.pop("speed_sensitivity", None)


def slower(name: str, factor: float, folder: Path) -> str:
    """The shipped calibration `name` with every step coefficient and the frontend cost x `factor`."""
    from speed_sensitivity import scaled_calibration  # beside make_report (the fixture's path)

    return scaled_calibration(SHIPPED / f"{name}.yaml", factor, folder, frontend=True)


def fifo_summary(mr, scaling: list[str], folder: Path) -> dict:
    from sagesched.experiment import run

    cluster = mr.cluster_config(*mr.PLACEHOLDER, 2)
    return run(mr.compose(["policy=fifo", *scaling, "driver=sim"], cluster), folder, progress=False)


@pytest.mark.slow
def test_matched_load_replays_the_same_experiment_on_a_slower_machine(make_report, monkeypatch, tmp_path):
    mr = make_report
    monkeypatch.setattr(mr, "HOST_CPUS", 2)
    base = fifo_summary(mr, mr.scaling(), tmp_path / "base")

    monkeypatch.setattr(mr, "LLM_CALIBRATION", slower(mr.LLM_DEFAULT, 1.5, tmp_path))
    monkeypatch.setattr(mr, "EMBEDDING_CALIBRATION", slower(mr.EMBEDDING_DEFAULT, 1.5, tmp_path))
    slowdown = mr.matched_slowdown(mr.RATE_SCALE, mr.DURATION_S, 2, tmp_path / "matching")
    assert slowdown == pytest.approx(1.5, rel=0.01)  # the isolated busy time, not a probe figure

    unmatched = fifo_summary(mr, mr.scaling(), tmp_path / "unmatched")
    matched = fifo_summary(
        mr, mr.scaling(mr.RATE_SCALE / 1.5, mr.DURATION_S, mr.EMBEDDING_RPS / 1.5, 1.5), tmp_path / "matched"
    )
    # Unmatched, the slower servers are a different experiment: further past saturation, fewer SLOs met.
    assert unmatched["slo_attainment"] < base["slo_attainment"] - 0.05
    # Matched (arrivals stretched, SLOs scaled), every request meets or misses exactly as before,
    # and every latency is 1.5x.
    assert matched["requests"] == base["requests"]
    met = {
        run: pd.read_parquet(tmp_path / run / "requests.parquet").set_index("request_id").slo_met
        for run in ("base", "matched")
    }
    assert met["matched"].sort_index().equals(met["base"].sort_index())  # request by request
    assert matched["slo_attainment"] == pytest.approx(base["slo_attainment"], abs=1e-12)
    assert matched["ttft_p50_ms"] == pytest.approx(1.5 * base["ttft_p50_ms"], rel=1e-9)
    assert matched["goodput_rps"] == pytest.approx(base["goodput_rps"] / 1.5, rel=1e-9)


def test_slo_scaling_multiplies_every_class_slo(make_report):
    overrides = make_report.slo_scaling(2.0)
    assert "workload.classes.standard.tpot_ms=200" in overrides
    assert "workload.classes.batch.e2e_ms=240000" in overrides
    assert len(overrides) == sum(len(slo) for slo in make_report.SLOS.values())
    assert make_report.slo_scaling(1.0) == []


def test_the_scaled_slos_are_the_workloads_own(make_report):
    """`SLOS` must follow conf/workload/azure_conv.yaml, or --match-load would scale stale values."""
    classes = yaml.safe_load((ROOT / "conf" / "workload" / "azure_conv.yaml").read_text())["classes"]
    for name, slo in make_report.SLOS.items():
        assert {k: classes[name][k] for k in slo} == slo


def test_repeats_table_reads_a_report_as_its_runs_say(monkeypatch, tmp_path):
    """`reports/live_replay/repeats.py` on the committed report: the figures of its run summaries."""
    import json

    monkeypatch.syspath_prepend(str(ROOT / "reports" / "live_replay"))
    repeats = importlib.import_module("repeats")
    report = ROOT / "reports" / "live_replay"
    summary = {n: json.loads((report / "runs" / n / "summary.json").read_text()) for n in ("fifo_live", "hybrid_live")}
    row = repeats.table([report / "results.md"])[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == [f"{summary[n]['goodput_rps']:.3f}" for n in ("fifo_live", "hybrid_live")]
    change = summary["hybrid_live"]["goodput_rps"] / summary["fifo_live"]["goodput_rps"] - 1
    assert cells[3] == f"{change:+.1%}"
    assert cells[7].endswith("of 20")

    bad = tmp_path / "notes.md"
    bad.write_text("# not a report\n")
    with pytest.raises(ValueError, match=r"written by make_report\.py"):
        repeats.table([bad])


def test_the_readme_quotes_the_matched_load_table_as_repeats_prints_it(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "reports" / "live_replay"))
    repeats = importlib.import_module("repeats")
    folder = ROOT / "reports" / "live_replay" / "matched_load"
    lines = repeats.table(sorted(folder.glob("results_*.md")))
    assert len(lines) == 2 + len(list(folder.glob("results_*.md")))
    assert "\n".join(lines) in (ROOT / "reports" / "live_replay" / "README.md").read_text()


def test_speed_ratio_is_the_fixed_point_at_the_matched_load(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "reports" / "live_replay"))
    fresh_probe = importlib.import_module("fresh_probe")

    def summary(busy: float) -> dict:
        return {"sim": {"sim_time_s": 1.0, "instances": {"llm-0": {"utilization": busy}, "emb": {"utilization": 9.0}}}}

    # Busy time that grows less than the slowdown at the unmatched load (a saturated server batches more).
    calls = []

    def fresh(r: float) -> dict:
        calls.append(r)
        return summary(1.5 - 0.2 / r)

    ratio = fresh_probe.speed_ratio(lambda: summary(1.0), fresh)
    assert ratio == pytest.approx(1.5 - 0.2 / ratio, rel=1e-3)  # r = busy(r) / busy_shipped
    assert calls[0] == 1.0 and len(calls) > 2
    with pytest.raises(RuntimeError, match="shipped calibration"):
        fresh_probe.speed_ratio(lambda: summary(0.0), fresh)
    with pytest.warns(RuntimeWarning, match="did not settle"):
        fresh_probe.speed_ratio(lambda: summary(1.0), lambda r: summary(3.0 / r), rounds=3)  # oscillates
