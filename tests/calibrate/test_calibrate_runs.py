"""`sagesched calibrate runs`: reading inference-perf folders, replaying them, recovering known coefficients.

The run folders here are written by the tests themselves: "measurements" produced by simulating a
server with known coefficients, so the fit has a right answer to find (the shared H100 runs are not
shipped with the project; reports/fidelity uses them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sagesched.calibrate.cli import main as calibrate_main
from sagesched.calibrate.fit_runs import anchored_coefficients, fit_runs, perf_for
from sagesched.calibrate.predict import predict_run
from sagesched.calibrate.runs import RunFormatError, build_requests, find_runs, load_inference_perf
from sagesched.sim.perf.calibration import LLMCalibration, parse_calibration, read_calibration_file

TRUE = {"frontend_request_s": 0.012, "step_overhead_s": 0.002}


def write_run(root: Path, name: str, rates: list[float], question_len: int, stats: list[dict] | None = None) -> Path:
    folder = root / f"20260101-000000-llama-2-7b-tp1-{name}"
    (folder / "results").mkdir(parents=True)
    (folder / "exp-config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": "meta-llama/Llama-2-7b-hf",
                "tensor_parallelism": 1,
                "max_model_len": 4096,
                "max_num_batched_tokens": 2048,
                "max_num_seqs": 128,
            }
        )
    )
    cfg = {
        "data": {
            "type": "shared_prefix",
            "shared_prefix": {
                "num_groups": 2,
                "num_prompts_per_group": 5,
                "system_prompt_len": 64,
                "question_len": question_len,
                "output_len": 40,
            },
        },
        "load": {"type": "constant", "stages": [{"rate": r, "duration": 20} for r in rates]},
    }
    (folder / "results" / "config.yaml").write_text(yaml.safe_dump(cfg))
    for i, _ in enumerate(rates):
        st = (stats or [None] * len(rates))[i] or {"e2e_mean": 1, "e2e_p90": 1, "ttft_mean": 1, "ttft_p90": 1}
        body = {
            "load_summary": {"requested_rate": rates[i]},
            "successes": {
                "count": int(20 * rates[i]),
                "latency": {
                    "request_latency": {"mean": st["e2e_mean"], "p90": st["e2e_p90"]},
                    "time_to_first_token": {"mean": st["ttft_mean"], "p90": st["ttft_p90"]},
                },
                "prompt_len": {"mean": 64 + question_len},
            },
            "failures": {"count": 0},
        }
        (folder / "results" / f"stage_{i}_lifecycle_metrics.json").write_text(json.dumps(body))
    return folder


def synthetic_runs(tmp_path: Path) -> Path:
    """Two runs whose 'measurements' are the simulator's own output under the TRUE coefficients."""
    for name, rates, q in (("alpha", [2.0, 6.0], 300), ("beta", [4.0], 900)):
        folder = write_run(tmp_path, name, rates, q)
        run = load_inference_perf(folder)
        pred = predict_run(run, perf_for(run, {**anchored_coefficients("h100"), **TRUE}))
        write_stats = [{k: p[k] for k in ("e2e_mean", "e2e_p90", "ttft_mean", "ttft_p90")} for p in pred]
        for i, st in enumerate(write_stats):
            path = folder / "results" / f"stage_{i}_lifecycle_metrics.json"
            body = json.loads(path.read_text())
            lat = body["successes"]["latency"]
            lat["request_latency"] = {"mean": st["e2e_mean"], "p90": st["e2e_p90"]}
            lat["time_to_first_token"] = {"mean": st["ttft_mean"], "p90": st["ttft_p90"]}
            path.write_text(json.dumps(body))
    return tmp_path


def test_reads_the_run_and_replays_its_workload(tmp_path):
    folder = write_run(tmp_path, "alpha", [2.0, 6.0], 300)
    run = load_inference_perf(folder)
    assert run.name == "alpha" and run.server.max_num_batched_tokens == 2048
    assert [s.rate for s in run.stages] == [2.0, 6.0]
    reqs, spans = build_requests(run, "llama-2-7b")
    assert len(reqs) == 40 + 120 and spans == [(0.0, 20.0), (20.0, 40.0)]
    # prompt i and prompt i + 10 are the same prompt: identical block hashes; group-mates share the system blocks
    assert reqs[0].prefix_hashes == reqs[10].prefix_hashes
    assert reqs[0].prefix_hashes[:4] == reqs[1].prefix_hashes[:4] and reqs[0].prefix_hashes != reqs[1].prefix_hashes
    assert reqs[0].prefix_hashes[:4] != reqs[5].prefix_hashes[:4]  # another group


def test_a_folder_missing_a_file_names_it(tmp_path):
    folder = write_run(tmp_path, "alpha", [2.0], 300)
    (folder / "results" / "stage_0_lifecycle_metrics.json").unlink()
    with pytest.raises(RunFormatError, match=r"stage_0_lifecycle_metrics\.json"):
        load_inference_perf(folder)
    with pytest.raises(RunFormatError, match="no inference-perf run folder"):
        find_runs(folder / "results")


def test_frontend_cost_reaches_ttft_and_e2e_equally_at_light_load(tmp_path):
    run = load_inference_perf(write_run(tmp_path, "alpha", [1.0], 300))
    plain = predict_run(run, perf_for(run, {"frontend_request_s": 0.0}))[0]
    slow = predict_run(run, perf_for(run, {"frontend_request_s": 0.05}))[0]
    assert slow["ttft_mean"] - plain["ttft_mean"] == pytest.approx(0.05, rel=1e-6)
    assert slow["e2e_mean"] - plain["e2e_mean"] == pytest.approx(0.05, rel=1e-6)
    assert slow["itl_mean"] == pytest.approx(plain["itl_mean"], rel=1e-9)


def test_fit_recovers_known_coefficients(tmp_path):
    runs = find_runs(synthetic_runs(tmp_path))
    fit = fit_runs(runs, window_s=None, warmup_s=0.0, free=tuple(TRUE), max_nfev=30)
    assert fit.coefficients["frontend_request_s"] == pytest.approx(TRUE["frontend_request_s"], rel=0.05)
    assert fit.coefficients["step_overhead_s"] == pytest.approx(TRUE["step_overhead_s"], rel=0.15)
    assert fit.rms_relative_error() < 0.01


def test_cli_writes_a_calibration_file_the_perf_model_loads(tmp_path):
    root = synthetic_runs(tmp_path / "runs")
    out = tmp_path / "cal.yaml"
    assert calibrate_main(["runs", str(root), "--out", str(out), "--window", "20", "--no-cv"]) == 0
    data = read_calibration_file(out)
    cal = parse_calibration(data, LLMCalibration, str(out), {"model": "llama-2-7b", "hardware": "h100"})
    assert cal.frontend_request_s is not None and cal.frontend_request_s > 0
    assert set(data["fit"]["residuals"]) == {"alpha/stage0", "alpha/stage1", "beta/stage0"}
