"""Bad input at the entry points (experiment, CSV traces, report, compare/export, `sagesched inference`):
a clear error naming the fix, never a traceback, a silent default or silently dropped rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sagesched.experiment import ExperimentError, conf_dir, run
from sagesched.replay.traces import build_csv_workload, read_csv_trace
from sagesched.report import ReportError, load_runs, write_report
from sagesched.sim.workloads.errors import TraceFormatError

GATEWAY_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gateway.yaml"
GOOD_CSV = "arrival_s,prompt_tokens,output_tokens\n0,10,5\n1,10,5\n"


def _compose(overrides: list[str]):
    with initialize_config_dir(version_base=None, config_dir=str(conf_dir())):
        return compose(config_name="config", overrides=["workload.duration_s=5", "sim.progress=false", *overrides])


# -- experiment: top-level keys and config groups -----------------------------------------------------


@pytest.mark.parametrize("override", ["seed=1.5", "seed=true", "seed=null", "seed=abc"])
def test_a_seed_that_is_not_a_whole_number_is_refused(tmp_path, override):
    # seed=1.5 and seed=true used to run silently as seed 1; seed=null was a TypeError traceback.
    with pytest.raises(ExperimentError, match=r"seed must be a whole number \(e\.g\. seed=1\)"):
        run(_compose([override]), tmp_path)


def test_a_whole_float_seed_is_that_seed(tmp_path):
    summary = run(_compose(["seed=2.0", "workload=poisson", "workload.duration_s=2"]), tmp_path)
    assert summary["seed"] == 2 and isinstance(summary["seed"], int)


def test_fail_on_unserved_must_be_a_boolean(tmp_path):
    # The string 'false' is truthy: it used to make a run with rejections exit 3.
    with pytest.raises(ExperimentError, match="fail_on_unserved must be true or false, got 'false'"):
        run(_compose(["fail_on_unserved='false'"]), tmp_path)


@pytest.mark.parametrize("override", ["policy=[]", "~policy"])
def test_an_empty_policy_group_names_the_options(tmp_path, override):
    with pytest.raises(ExperimentError, match=r"no policy is selected.*policy=<option>: .*hybrid"):
        run(_compose([override]), tmp_path)


def test_group_null_is_a_one_line_error_not_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sagesched.experiment", "policy=null", f"hydra.run.dir={tmp_path / 'r'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "'policy=null' selects no policy; choose one with policy=<option>" in proc.stderr


# -- CSV traces (workload=csv) ----------------------------------------------------------------------


def _csv(tmp_path: Path, text: str | bytes, name: str = "trace.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _workload(path: Path, **settings) -> dict:
    return {"trace": "csv", "trace_path": str(path), **settings}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rate_scale": 0}, "workload.rate_scale must be a number > 0, got 0"),  # was silently 1.0
        ({"rate_scale": "abc"}, "workload.rate_scale must be a number > 0, got 'abc'"),
        ({"max_requests": -1}, "workload.max_requests must be a whole number >= 1, got -1"),  # dropped the last row
        ({"max_requests": 1.5}, "workload.max_requests must be a whole number >= 1, got 1.5"),
        ({"start_s": -1}, "workload.start_s must be a number >= 0, got -1"),
        ({"duration_s": 0}, "workload.duration_s must be a number > 0, got 0"),
    ],
)
def test_csv_workload_settings_are_checked_and_named(tmp_path, settings, message):
    path = _csv(tmp_path, GOOD_CSV)
    with pytest.raises(ValueError) as info:
        build_csv_workload(_workload(path, **settings))
    assert str(info.value) == message


def test_csv_workload_null_settings_keep_their_defaults(tmp_path):
    path = _csv(tmp_path, GOOD_CSV)
    reqs = build_csv_workload(_workload(path, rate_scale=None, start_s=None, duration_s=None, max_requests=None))
    assert [r.arrival_s for r in reqs] == [0.0, 1.0]


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        (GOOD_CSV + "inf,10,5\n", 4, "arrival_s"),  # an infinite arrival used to drop the row silently
        (GOOD_CSV + "1e400,10,5\n", 4, "arrival_s"),
        (GOOD_CSV + "2,99999999999999999999,5\n", 4, "prompt_tokens"),  # an int64 overflow traceback at the end
    ],
)
def test_csv_cells_that_are_not_finite_int64_values_are_named(tmp_path, text, line, column):
    path = _csv(tmp_path, text)
    with pytest.raises(TraceFormatError) as info:
        read_csv_trace(path)
    assert (info.value.line, info.value.column) == (line, column)
    assert "must be a finite number" in str(info.value) or "must be <= 9223372036854775807" in str(info.value)


@pytest.mark.parametrize(
    "data",
    [b"PAR1\x15\x04\x15\x80\x01\x00\x00garbage", GOOD_CSV.encode("utf-16"), b"arrival_s,prompt\xe9\n"],
    ids=["parquet", "utf-16", "latin-1"],
)
def test_a_binary_or_non_utf8_csv_trace_names_the_file(tmp_path, data):
    path = _csv(tmp_path, data, "trace.parquet")
    with pytest.raises(TraceFormatError) as info:
        read_csv_trace(path)
    assert str(info.value).startswith(str(path))


def test_a_header_only_csv_trace_says_so(tmp_path):
    path = _csv(tmp_path, "arrival_s,prompt_tokens,output_tokens\n")
    with pytest.raises(TraceFormatError, match=r"only a header"):
        read_csv_trace(path)


def test_a_csv_trace_with_a_byte_order_mark_reads(tmp_path):
    # Spreadsheets save "CSV UTF-8" with a BOM; the header used to read as lacking arrival_s.
    path = _csv(tmp_path, b"\xef\xbb\xbf" + GOOD_CSV.encode())
    assert len(read_csv_trace(path)) == 2


# -- report ---------------------------------------------------------------------------------------------


def _summary(**overrides) -> dict:
    summary = {
        "policy": "fifo",
        "label": "fifo",
        "seed": 1,
        "goodput_rps": 2.0,
        "slo_attainment": 0.9,
        "config": {"workload": {"name": "conv", "rate_scale": 1.0}},
    }
    summary.update(overrides)
    return summary


def _run_dir(root: Path, name: str, summary: object, *, written: bool = True) -> Path:
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    if written:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.mark.parametrize(
    ("summary", "message"),
    [
        ([], "expected a JSON object"),
        (None, "expected a JSON object"),
        (_summary(config="x"), "config must be a JSON object"),
        (_summary(config={"workload": {"rate_scale": "abc"}}), "config.workload.rate_scale must be a number"),
    ],
)
def test_report_refuses_a_malformed_summary_by_file(tmp_path, summary, message):
    _run_dir(tmp_path, "0_fifo", summary)
    with pytest.raises(ReportError, match=message) as info:
        load_runs(tmp_path)
    assert "0_fifo/summary.json" in str(info.value)


def test_report_reads_a_null_rate_scale_as_one(tmp_path):
    _run_dir(tmp_path, "0_fifo", _summary(config={"workload": {"name": "csv", "rate_scale": None}}))
    assert load_runs(tmp_path)["rate_scale"].tolist() == [1.0]


def test_report_over_runs_without_goodput_has_no_ranking_but_no_crash(tmp_path):
    # e.g. `sagesched import inference-perf` folders: no SLOs, so no goodput_rps.
    summary = _summary()
    del summary["goodput_rps"], summary["slo_attainment"]
    _run_dir(tmp_path / "sweep", "0_fifo", summary)
    text = write_report(tmp_path / "sweep", tmp_path / "out").read_text()
    assert "no ranking" in text


def test_report_names_run_folders_left_out_for_lack_of_a_summary(tmp_path):
    root = tmp_path / "sweep"
    _run_dir(root, "0_fifo", _summary())
    _run_dir(root, "1_hybrid", {}, written=False)  # a job that failed before writing its summary
    proc = subprocess.run(
        [sys.executable, "-m", "sagesched.report", str(root), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 run folder(s)" in proc.stderr and "1_hybrid" in proc.stderr
    assert "Left out: 1 run folder(s) without summary.json:** 1_hybrid" in (tmp_path / "out" / "README.md").read_text()


def test_report_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    from sagesched.report import main

    _run_dir(tmp_path / "sweep", "0_fifo", _summary())
    target = tmp_path / "taken"
    target.write_text("x")
    assert main([str(tmp_path / "sweep"), "--out", str(target)]) == 2
    assert f"report folder {target} is a file" in capsys.readouterr().err


# -- compare / export: run folders -----------------------------------------------------------------------


def test_compare_names_an_unreadable_run_folder(tmp_path):
    from sagesched.replay.compare import CompareError, load_run

    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "summary.json").write_text("[]")
    with pytest.raises(CompareError, match="expected a JSON object"):
        load_run(listed)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "summary.json").write_text(json.dumps(_summary()))
    (truncated / "requests.parquet").write_bytes(b"PAR1\x00\x00")
    with pytest.raises(CompareError, match=r"requests\.parquet: unreadable"):
        load_run(truncated)


@pytest.mark.parametrize("fmt", ["vllm-bench", "inference-perf"])
def test_export_refuses_a_summary_that_is_not_an_object(tmp_path, fmt):
    from sagesched.replay.formats import ResultFormatError, export_run

    (tmp_path / "summary.json").write_text("[]")
    with pytest.raises(ResultFormatError, match="expected a JSON object"):
        export_run(fmt, tmp_path)


# -- sagesched inference --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--port", "70000", "--port: 70000 is out of range"),
        ("--workers", "0", "--workers: 0 is out of range"),
        ("--log-level", "loud", "--log-level: 'loud': use one of"),
    ],
)
def test_inference_start_names_an_out_of_range_flag(tmp_path, monkeypatch, capsys, flag, value, message):
    from sagesched.live.inference_cli import EXIT_USAGE, main

    monkeypatch.setenv("SAGESCHED_STATE_DIR", str(tmp_path))
    assert main(["start", "--config", str(GATEWAY_EXAMPLE), flag, value]) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_inference_logs_line_count_is_checked(tmp_path, monkeypatch, capsys):
    from sagesched.live.inference_cli import main

    monkeypatch.setenv("SAGESCHED_STATE_DIR", str(tmp_path))
    (tmp_path / "gateway.log").write_text("".join(f"line{i}\n" for i in range(1, 8)))
    assert main(["logs", "-n", "0"]) == 0
    assert capsys.readouterr().out == ""  # used to print the whole log
    assert main(["logs", "-n", "2"]) == 0
    assert capsys.readouterr().out == "line6\nline7\n"
    with pytest.raises(SystemExit) as info:
        main(["logs", "-n", "-2"])  # used to print all but the first two lines
    assert info.value.code == 2
    assert "expected a whole number >= 0, got '-2'" in capsys.readouterr().err


# -- sagesched emulate: arguments checked before anything starts --------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "--port: 70000 is not a port number (1-65535)"),  # uvicorn served on 4464
        (["--port", "-1"], "--port: -1 is not a port number"),
        (["--port", "8123", "--time-scale", "nan"], "--time-scale: 'nan': give a finite number >= 0"),
        (["--port", "8123", "--log-level", "loud"], "--log-level: invalid choice: 'loud'"),
    ],
)
def test_emulator_arguments_are_checked(capsys, args, message):
    from sagesched.live.emulators.cli import main as emulate

    with pytest.raises(SystemExit) as exit_info:
        emulate(["vllm", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
