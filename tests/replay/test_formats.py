"""Importers and exporters: the field's result formats in, our runs out, bad files named precisely."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sagesched.core.records import RECORD_COLUMNS
from sagesched.replay.formats import (
    ResultFormatError,
    import_run,
    read_aiperf,
    read_inference_perf,
    read_vllm_bench,
    write_inference_perf,
    write_vllm_bench,
)

from .reference_data import CALIBRATION, needs_reference_data
from .reference_data import calibration_reports as _calibration_reports


@needs_reference_data
def test_the_shared_calibration_reports_exist():
    """The inference-perf files these tests read ship in ../shared (the repository's reference data)."""
    assert len(_calibration_reports()) >= 8, f"no inference-perf reports under {CALIBRATION}"


@pytest.mark.parametrize("path", _calibration_reports(), ids=lambda p: f"{p.parents[1].name[-12:]}/{p.name}")
def test_inference_perf_reports_import_into_our_summary_keys(path):
    raw = json.loads(path.read_text())
    summary = read_inference_perf(path)
    ok = raw["successes"]
    assert summary["completed"] == ok["count"]
    assert summary["failed"] == raw["failures"]["count"]
    lat = ok["latency"]
    assert summary["ttft_p50_ms"] == pytest.approx(lat["time_to_first_token"]["median"] * 1000)
    assert summary["ttft_p99_ms"] == pytest.approx(lat["time_to_first_token"]["p99"] * 1000)
    assert summary["e2e_p90_ms"] == pytest.approx(lat["request_latency"]["p90"] * 1000)
    assert summary["tpot_mean_ms"] == pytest.approx(lat["time_per_output_token"]["mean"] * 1000)
    assert summary["send_lateness_p99_ms"] == pytest.approx(raw["load_summary"]["schedule_delay"]["p99"] * 1000)
    assert summary["source"]["per_request"] is False


@needs_reference_data
def test_inference_perf_results_folder_imports_as_a_summary_only_run(tmp_path):
    folder = next(CALIBRATION.glob("*codegen/results"))
    summary = import_run("inference-perf", folder, tmp_path / "run")
    assert (tmp_path / "run" / "summary.json").is_file() and not (tmp_path / "run" / "requests.parquet").exists()
    assert summary["label"].endswith("codegen") and summary["requests"] == 9000


def _vllm_bench_file(tmp_path: Path) -> Path:
    data = {
        "backend": "openai-chat", "model_id": "meta-llama/Llama-2-7b-hf", "duration": 4.0, "completed": 2,
        "input_lens": [100, 200, 300], "output_lens": [3, 2, 0],
        "ttfts": [0.05, 0.10, 0.0], "itls": [[0.01, 0.02], [0.03], []],
        "generated_texts": ["a b c", "d e", ""], "errors": ["", "", "Connection reset"],
    }  # fmt: skip
    path = tmp_path / "vllm.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def test_vllm_bench_detailed_json_imports_per_request(tmp_path):
    records, meta = read_vllm_bench(_vllm_bench_file(tmp_path))
    assert [r.outcome for r in records] == ["completed", "completed", "failed"]
    assert records[0].ttft_ms == pytest.approx(50.0) and records[0].e2e_ms == pytest.approx(80.0)
    assert records[0].tpot_ms == pytest.approx(15.0)
    assert records[2].reason == "vllm-bench: Connection reset" and records[2].output_tokens == 0
    assert records[1].type == "llm_chat" and meta["duration"] == 4.0
    summary = import_run("vllm-bench", tmp_path / "vllm.json", tmp_path / "run")
    frame = pd.read_parquet(tmp_path / "run" / "requests.parquet")
    assert list(frame.columns) == list(RECORD_COLUMNS)
    assert summary["completed"] == 2 and summary["failed"] == 1
    assert summary["throughput_rps"] == pytest.approx(0.5)  # the file's duration, not the span of times


def test_our_run_round_trips_through_the_vllm_bench_format(run_pair, tmp_path):
    exported = write_vllm_bench(run_pair.live)
    path = tmp_path / "export.json"
    path.write_text(json.dumps(exported))
    import_run("vllm-bench", path, tmp_path / "back")
    ours = run_pair.records("live")
    ours = ours[ours["type"] != "embedding"].set_index("request_id")
    back = pd.read_parquet(tmp_path / "back" / "requests.parquet").set_index("request_id")
    assert set(back.index) == set(ours.index)
    pd.testing.assert_series_equal(back["ttft_ms"].sort_index(), ours["ttft_ms"].sort_index(), check_names=False)
    assert (back["prompt_tokens"].sort_index() == ours["prompt_tokens"].sort_index()).all()
    assert exported["completed"] == int((ours["outcome"] == "completed").sum())
    assert exported["p99_ttft_ms"] == pytest.approx(ours["ttft_ms"].quantile(0.99), rel=1e-9)


def test_inference_perf_export_reads_back_through_the_importer(run_pair, tmp_path):
    exported = write_inference_perf(run_pair.live)
    path = tmp_path / "summary_lifecycle_metrics.json"
    path.write_text(json.dumps(exported))
    summary = read_inference_perf(path)
    ours = run_pair.summary("live")
    assert summary["ttft_p50_ms"] == pytest.approx(ours["ttft_p50_ms"])
    assert summary["e2e_p99_ms"] == pytest.approx(ours["e2e_p99_ms"])
    assert summary["send_lateness_p99_ms"] == pytest.approx(ours["send_lateness_p99_ms"])


def _aiperf_line(i: int, start_ns: int, *, error: dict | None = None) -> str:
    metrics = (
        {"error_isl": {"value": 550, "unit": "tokens"}}
        if error
        else {
            "input_sequence_length": {"value": 550, "unit": "tokens"},
            "time_to_first_token": {"value": 25.0, "unit": "ms"},
            "request_latency": {"value": 300.0, "unit": "ms"},
            "output_sequence_length": {"value": 9, "unit": "tokens"},
        }
    )
    meta = {"session_num": i, "x_request_id": f"req-{i}", "request_start_ns": start_ns, "was_cancelled": False}
    return json.dumps({"metadata": meta, "metrics": metrics, "error": error})


def test_aiperf_profile_export_imports_per_request(tmp_path):
    path = tmp_path / "profile_export.jsonl"
    lines = [_aiperf_line(0, 1_000_000_000), _aiperf_line(1, 1_500_000_000)]
    lines.append(_aiperf_line(2, 2_000_000_000, error={"code": 500, "type": "InternalServerError", "message": "boom"}))
    path.write_text("\n".join(lines) + "\n")
    records, _ = read_aiperf(path)
    assert [r.request_id for r in records] == ["req-0", "req-1", "req-2"]
    assert records[1].arrival_s == pytest.approx(0.5)
    assert records[1].ttft_ms == pytest.approx(25.0) and records[1].e2e_ms == pytest.approx(300.0)
    assert records[1].tpot_ms == pytest.approx(275.0 / 8)
    assert records[2].outcome == "failed" and "InternalServerError: boom" in records[2].reason


def test_bad_files_name_file_line_and_column(tmp_path):
    bad_json = tmp_path / "bench.json"
    bad_json.write_text('{\n  "input_lens": [1, 2],\n  "ttfts": [0.1,, 0.2]\n}\n')
    with pytest.raises(ResultFormatError) as info:
        read_vllm_bench(bad_json)
    assert info.value.path == str(bad_json) and info.value.line == 3 and info.value.column
    assert f"{bad_json}:3: column" in str(info.value)

    missing = tmp_path / "short.json"
    missing.write_text('{\n  "input_lens": [1],\n  "output_lens": [1],\n  "ttfts": [0.1],\n  "errors": [""]\n}\n')
    with pytest.raises(ResultFormatError, match="itls") as info:
        read_vllm_bench(missing)
    assert "--save-detailed" in str(info.value)

    jsonl = tmp_path / "profile_export.jsonl"
    jsonl.write_text(_aiperf_line(0, 10) + "\n" + _aiperf_line(1, 20).replace('"ms"', '"fortnights"', 1) + "\n")
    with pytest.raises(ResultFormatError) as info:
        read_aiperf(jsonl)
    assert info.value.line == 2 and info.value.column == "metrics.time_to_first_token.unit"

    report = tmp_path / "summary_lifecycle_metrics.json"
    report.write_text('{"load_summary": {}, "failures": {}}')
    with pytest.raises(ResultFormatError, match="successes"):
        read_inference_perf(report)


def test_cli_import_and_export(run_pair, tmp_path, capsys):
    from sagesched.cli import main

    assert main(["export", "vllm-bench", str(run_pair.live), "--out", str(tmp_path / "vb.json")]) == 0
    assert main(["import", "vllm-bench", str(tmp_path / "vb.json"), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "requests.parquet").is_file()
    assert main(["import", "aiperf", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
