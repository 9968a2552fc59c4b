"""Audit regressions: trace cells that used to drop rows silently or crash, and a bad `sim.max_time_s`.

A NaN/Infinity arrival time used to vanish from the trace (NaN sorts nowhere, so the workload window
lost the row); a token count past int64 crashed with a bare OverflowError; `sim.max_time_s <= 0`
failed deep in simpy without naming the setting. Each must now be an error naming where and how to fix.
"""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir

from sagesched.experiment import conf_dir, workload_requests
from sagesched.sim.config import SimConfig
from sagesched.sim.workloads import TraceFormatError, load_trace
from sagesched.typed_config import ConfigFieldError, plain

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
HUGE = "99999999999999999999"
FIX = "fix the value or remove the row"


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _workload(kind: str, path) -> list:
    """The requests `python -m sagesched.experiment workload=<kind> workload.trace_path=PATH` replays."""
    with initialize_config_dir(version_base=None, config_dir=str(conf_dir())):
        cfg = compose(
            config_name="config",
            overrides=[f"workload={kind}", f"workload.trace_path={path}", "workload.duration_s=null"],
        )
    return workload_requests(plain(cfg.workload), 0)


def _mooncake_row(stamp: str, input_length: str = "6", output_length: str = "1") -> str:
    return (
        f'{{"timestamp": {stamp}, "input_length": {input_length}, "output_length": {output_length}, "hash_ids": [1]}}\n'
    )


@pytest.mark.parametrize("stamp", ["nan", "NaN", "inf", "-Infinity", "1e400"])
def test_azure_non_finite_timestamp_is_an_error_not_a_dropped_row(tmp_path, stamp):
    path = _write(tmp_path, "conv.csv", HEADER + "10.0,100,20\n" + f"{stamp},50,5\n" + "11.0,70,9\n")
    with pytest.raises(TraceFormatError) as info:
        load_trace("azure_conv", path)
    err = info.value
    assert (err.path, err.line, err.column) == (str(path), 3, "TIMESTAMP")
    assert str(err).startswith(f"{path}:3: column TIMESTAMP: ")
    assert f"got {stamp!r}" in str(err) and "date-time" in str(err) and FIX in str(err)


def test_azure_nan_timestamp_fails_the_workload_through_trace_path(tmp_path):
    path = _write(tmp_path, "conv.csv", HEADER + "10.0,100,20\nnan,50,5\n11.0,70,9\n")
    with pytest.raises(TraceFormatError, match=re.escape(f"{path}:3: column TIMESTAMP: ")):
        _workload("azure_conv", path)


def test_azure_finite_seconds_still_load_every_row(tmp_path):
    path = _write(tmp_path, "conv.csv", HEADER + "10.0,100,20\n10.5,50,5\n11.0,70,9\n")
    trace = load_trace("azure_conv", path)
    assert trace.arrival_s.tolist() == [0.0, 0.5, 1.0]
    replayed = [r.id for r in _workload("azure_conv", path) if r.id.startswith("azure_conv-")]
    assert replayed == ["azure_conv-000000", "azure_conv-000001", "azure_conv-000002"]  # every row, none dropped


@pytest.mark.parametrize("stamp", ["NaN", "Infinity", "-Infinity", "1e400", str(10**400)])
def test_mooncake_non_finite_timestamp_is_an_error_not_a_dropped_row(tmp_path, stamp):
    path = _write(tmp_path, "m.jsonl", _mooncake_row("0") + _mooncake_row(stamp))
    with pytest.raises(TraceFormatError) as info:
        load_trace("mooncake", path)
    err = info.value
    assert (err.path, err.line, err.column) == (str(path), 2, "timestamp")
    assert str(err).startswith(f"{path}:2: column timestamp: expected finite non-negative milliseconds")
    assert FIX in str(err)


def test_mooncake_nan_timestamp_fails_the_workload_through_trace_path(tmp_path):
    path = _write(tmp_path, "m.jsonl", _mooncake_row("0") + _mooncake_row("NaN"))
    with pytest.raises(TraceFormatError, match=re.escape(f"{path}:2: column timestamp: ")):
        _workload("mooncake", path)


@pytest.mark.parametrize(
    ("row", "column"),
    [
        (f"10.0,{HUGE},20\n", "ContextTokens"),
        (f"10.0,100,{HUGE}\n", "GeneratedTokens"),
    ],
)
def test_azure_token_count_past_int64_names_file_line_and_column(tmp_path, row, column):
    path = _write(tmp_path, "conv.csv", HEADER + "9.0,1,1\n" + row)
    with pytest.raises(TraceFormatError) as info:
        load_trace("azure_conv", path)
    err = info.value
    assert (err.path, err.line, err.column) == (str(path), 3, column)
    assert str(err) == (
        f"{path}:3: column {column}: expected an integer of at most {2**63 - 1} (int64), got {HUGE!r}; {FIX}"
    )


def test_azure_token_count_at_int64_max_still_loads(tmp_path):
    path = _write(tmp_path, "conv.csv", HEADER + f"9.0,{2**63 - 1},0\n")
    assert load_trace("azure_conv", path).prompt_tokens.tolist() == [2**63 - 1]


@pytest.mark.parametrize("column", ["input_length", "output_length"])
def test_mooncake_token_count_past_int64_names_file_line_and_column(tmp_path, column):
    lengths = {"input_length": "6", "output_length": "1", column: HUGE}
    path = _write(tmp_path, "m.jsonl", _mooncake_row("0") + _mooncake_row("5", **lengths))
    with pytest.raises(TraceFormatError) as info:
        load_trace("mooncake", path)
    err = info.value
    assert (err.path, err.line, err.column) == (str(path), 2, column)
    assert str(err).startswith(f"{path}:2: column {column}: expected a non-negative integer of at most {2**63 - 1}")
    assert FIX in str(err)


def test_huge_token_count_fails_the_workload_with_a_trace_error(tmp_path):
    path = _write(tmp_path, "conv.csv", HEADER + f"10.0,{HUGE},20\n11.0,70,9\n")
    with pytest.raises(TraceFormatError, match=re.escape(f"{path}:2: column ContextTokens: ")):
        _workload("azure_conv", path)


@pytest.mark.parametrize("value", [-1, 0, -0.5, float("nan")])
def test_non_positive_max_time_names_the_field_and_the_fix(value):
    with pytest.raises(ConfigFieldError) as info:
        SimConfig.from_dict({"max_time_s": value})
    assert info.value.path == ("sim", "max_time_s")
    assert str(info.value).startswith("sim.max_time_s: must be > 0")
    assert "or null to run until every request ends" in str(info.value)


@pytest.mark.parametrize("value", [None, 0.5, 3600])
def test_positive_or_null_max_time_is_accepted(value):
    assert SimConfig.from_dict({"max_time_s": value}).max_time_s == value
