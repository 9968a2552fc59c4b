"""Malformed traces are reported by file, line and column; bad configs name the key and the valid options."""

from __future__ import annotations

import re
import shutil

import pytest

from sagesched.sim.workloads import (
    TRACE_DIR,
    ClassConfig,
    TraceFormatError,
    WorkloadConfig,
    build_workload,
    load_servegen,
    load_trace,
)
from sagesched.typed_config import ConfigFieldError

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
GOOD_ROW = "2023-11-16 18:15:46.6805900,374,44\n"


def _azure(tmp_path, rows, name="conv.csv", header=HEADER):
    path = tmp_path / name
    path.write_text(header + "".join(rows))
    return path


def test_non_numeric_context_tokens_names_file_line_and_column(tmp_path):
    rows = [GOOD_ROW] * 15 + ["2023-11-16 18:15:47.0000000,abc,12\n"] + [GOOD_ROW] * 3
    path = _azure(tmp_path, rows)
    with pytest.raises(TraceFormatError) as info:
        load_trace("azure_conv", path)
    assert str(info.value) == f"{path}:17: column ContextTokens: expected an integer, got 'abc'"
    assert (info.value.line, info.value.column) == (17, "ContextTokens")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("row", "column", "detail"),
    [
        ("yesterday,10,5\n", "TIMESTAMP", "expected a date-time"),
        ("2023-11-16 18:15:47,10,-5\n", "GeneratedTokens", "non-negative integer, got '-5'"),
        ("2023-11-16 18:15:47,10,5.5\n", "GeneratedTokens", "expected an integer, got '5.5'"),
    ],
)
def test_bad_azure_cells(tmp_path, row, column, detail):
    path = _azure(tmp_path, [GOOD_ROW, GOOD_ROW, row])
    with pytest.raises(TraceFormatError, match=re.escape(f"{path}:4: column {column}: ") + ".*" + re.escape(detail)):
        load_trace("azure_code", path)


def test_azure_wrong_field_count_and_missing_header(tmp_path):
    path = _azure(tmp_path, [GOOD_ROW, "2023-11-16 18:15:47,10\n"])
    with pytest.raises(TraceFormatError, match=re.escape(f"{path}:3: expected 3 fields")):
        load_trace("azure_conv", path)
    path = _azure(tmp_path, [GOOD_ROW], name="nohdr.csv", header="TIMESTAMP,Context,GeneratedTokens\n")
    with pytest.raises(TraceFormatError, match=re.escape(f"{path}:1: column ContextTokens: missing from the header")):
        load_trace("azure_conv", path)


def test_azure_numeric_timestamps_are_seconds(tmp_path):
    path = _azure(tmp_path, ["10.5,100,20\n", "12.0,50,5\n", "11.0,70,9\n"])
    trace = load_trace("azure_conv", path)
    assert trace.arrival_s.tolist() == [0.0, 0.5, 1.5]  # sorted, relative to the first
    assert trace.prompt_tokens.tolist() == [100, 70, 50]


def test_mooncake_errors(tmp_path):
    good = '{"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}\n'
    path = tmp_path / "m.jsonl"
    path.write_text(good + '{"timestamp": 5, "input_length": 600, \n')
    with pytest.raises(TraceFormatError, match=re.escape(f"{path}:2: invalid JSON")):
        load_trace("mooncake", path)
    path.write_text(good + good + '{"timestamp": 5, "input_length": "600", "output_length": 3, "hash_ids": []}\n')
    with pytest.raises(
        TraceFormatError, match=re.escape(f"{path}:3: column input_length: expected a non-negative integer")
    ):
        load_trace("mooncake", path)
    path.write_text('{"timestamp": 5, "input_length": 6, "hash_ids": []}\n')
    with pytest.raises(TraceFormatError, match=re.escape(f"{path}:1: column output_length: missing")):
        load_trace("mooncake", path)
    path.write_text('{"timestamp": 5, "input_length": 6, "output_length": 1, "hash_ids": [1, "x"]}\n')
    with pytest.raises(TraceFormatError, match=re.escape(f"{path}:1: column hash_ids: expected a list of integers")):
        load_trace("mooncake", path)


def _servegen_copy(tmp_path):
    for suffix in ("trace.csv", "dataset.json"):
        shutil.copy(TRACE_DIR / f"servegen_m-large_chunk-1-{suffix}", tmp_path / f"client-{suffix}")
    return tmp_path / "client-trace.csv", tmp_path / "client-dataset.json"


def test_servegen_rate_errors(tmp_path):
    rates, _ = _servegen_copy(tmp_path)
    lines = rates.read_text().splitlines()
    lines[57] = "34200,fast,10.4,Weibull,0.35,0.29"
    rates.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        TraceFormatError, match=re.escape(f"{rates}:58: column rate_rps: expected a number, got 'fast'")
    ):
        load_servegen(rates)
    lines[57] = "34200,1.6,10.4,Pareto,0.35,0.29"
    rates.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        TraceFormatError, match=re.escape(f"{rates}:58: column pattern: unknown arrival pattern 'Pareto'")
    ):
        load_servegen(rates)


def test_servegen_length_errors_name_the_line(tmp_path):
    rates, lengths = _servegen_copy(tmp_path)
    text = lengths.read_text()
    broken = text.replace('"input_tokens": "{143: 0.0001', '"input_tokens": "{143= 0.0001', 1)
    assert broken != text
    lengths.write_text(broken)
    line = broken[: broken.index("{143=")].count("\n") + 1
    with pytest.raises(TraceFormatError, match=re.escape(f"{lengths}:{line}: column input_tokens: window 21600")):
        load_servegen(rates)


def test_build_workload_surfaces_trace_errors_and_missing_files(tmp_path):
    path = _azure(tmp_path, [GOOD_ROW, "2023-11-16 18:15:47,1x,2\n"])
    with pytest.raises(TraceFormatError, match=":3: column ContextTokens"):
        build_workload({"trace": "azure_conv", "trace_path": str(path)}, seed=0)
    with pytest.raises(FileNotFoundError, match="leave trace_path unset"):
        build_workload({"trace_path": str(tmp_path / "absent.csv")}, seed=0)


# -- configuration ---------------------------------------------------------------------------------


def test_unknown_keys_are_named_with_the_valid_ones():
    # The path is the Hydra override to fix (workload.arrival.burst_on=...).
    with pytest.raises(
        ConfigFieldError, match=r"^workload\.rate_scle: unknown key 'rate_scle'; valid keys: .*rate_scale"
    ):
        WorkloadConfig.from_dict({"rate_scle": 2})
    with pytest.raises(
        ValueError, match=r"^workload\.arrival\.burst_on: unknown key 'burst_on'; valid keys: .*burst_on_s"
    ):
        WorkloadConfig.from_dict({"arrival": {"burst_on": 3}})
    with pytest.raises(ValueError, match=r"^workload\.classes\.gold\.slo: unknown key 'slo'; valid keys: .*ttft_ms"):
        WorkloadConfig.from_dict({"classes": {"gold": {"slo": 3}}})
    with pytest.raises(ValueError, match=r"^workload\.classes\[1\]\.slo: unknown key"):
        WorkloadConfig.from_dict({"classes": [{"name": "a"}, {"name": "b", "slo": 3}]})


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({"rate_scale": "fast"}, ("workload", "rate_scale"), "must be a number, got 'fast'"),
        ({"max_requests": True}, ("workload", "max_requests"), "must be a whole number or null, got True"),
        ({"arrival": {"cv": [1]}}, ("workload", "arrival", "cv"), "must be a number, got [1]"),
        ({"lengths": "fixed"}, ("workload", "lengths"), "must be a mapping of LengthConfig fields"),
        (
            {"classes": {"gold": {"types": "chat"}}},
            ("workload", "classes", "gold", "types"),
            "must be a list of strings",
        ),
        ({"tenants": {"a": "x"}}, ("workload", "tenants", "a"), "must be a number (a weight), got 'x'"),
        (
            {"classes": {"gold": {"priority": "urgent"}}},
            ("workload", "classes", "gold", "priority"),
            "unknown priority",
        ),
    ],
)
def test_wrong_types_name_the_field_path(data, path, message):
    with pytest.raises(ConfigFieldError) as info:
        WorkloadConfig.from_dict(data)
    assert info.value.path == path and message in info.value.message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"trace": "sharegpt"}, "unknown trace 'sharegpt'; use one of azure_code, azure_conv, mooncake, servegen"),
        ({"arrival": {"process": "hawkes"}}, "use one of trace, poisson, gamma, burst, diurnal"),
        ({"arrival": {"process": "poisson"}}, "set duration_s"),
        ({"mix": {"chat": 0.7, "embedding": 0.2}}, "must sum to 1, got 0.9"),
        ({"rate_scale": 0}, "rate_scale must be > 0"),
        ({"rate_scale": "fast"}, "workload.rate_scale: must be a number"),
        ({"classes": {"gold": {"priority": "urgent"}}}, "unknown priority 'urgent'"),
        ({"classes": {"gold": {"types": ["image"]}}}, "unknown request type 'image'"),
        ({"tenants": {"a": -1}}, "non-negative weights"),
        ({"lengths": {"source": "sharegpt"}}, "use one of trace, fixed"),
    ],
)
def test_invalid_values_say_how_to_fix_them(data, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        WorkloadConfig.from_dict(data)


def test_no_class_for_a_requested_type_is_an_error():
    config = {
        "mix": {"chat": 0.5, "embedding": 0.5},
        "classes": [{"name": "chat_only", "types": ["chat"]}],
        "max_requests": 10,
    }
    with pytest.raises(ValueError, match="no class with a positive fraction applies to embedding"):
        build_workload(config, seed=0)


def test_from_dict_forms_and_round_trip():
    from omegaconf import OmegaConf

    data = {
        "trace": "mooncake",
        "rate_scale": 2,
        "arrival": {"process": "gamma", "cv": 4},
        "duration_s": 60,
        "classes": [
            {"name": "gold", "fraction": 0.2, "priority": 1, "ttft_ms": 200},
            {"name": "bronze", "fraction": 0.8},
        ],
        "tenants": ["x", "y"],
    }
    config = WorkloadConfig.from_dict(OmegaConf.create(data))
    assert config.rate_scale == 2.0 and config.arrival.cv == 4.0
    assert config.classes[0] == ClassConfig(name="gold", fraction=0.2, priority="1", ttft_ms=200.0)
    assert config.tenants == {"x": 1.0, "y": 1.0}
    assert WorkloadConfig.from_dict(config.to_dict()) == config
    assert WorkloadConfig.from_dict({"tenants": 3}).tenants == {"tenant-0": 1.0, "tenant-1": 1.0, "tenant-2": 1.0}
    assert WorkloadConfig.from_dict(None) == WorkloadConfig()


@pytest.mark.parametrize(
    ("content", "line", "detail"),
    [
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n".encode("utf-16"), 1, "UTF-16"),
        (HEADER.encode() + GOOD_ROW.encode() * 3 + b"\x00\x01\x02binary", 5, "NUL byte"),
        (HEADER.encode() + GOOD_ROW.encode() * 2 + b"2023-11-16 18:15:47,\xff\xfe12,3\n", 4, "not UTF-8"),
    ],
)
def test_binary_and_non_utf8_traces_name_file_line_and_fix(tmp_path, content, line, detail):
    path = tmp_path / "conv.csv"
    path.write_bytes(content)
    with pytest.raises(TraceFormatError) as info:
        load_trace("azure_conv", path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ") and detail in message
    assert "UTF-8" in message  # says what to do


def test_binary_servegen_files_are_refused_by_name(tmp_path):
    shutil.copy(TRACE_DIR / "servegen_m-large_chunk-1-dataset.json", tmp_path / "x-dataset.json")
    rates = tmp_path / "x-trace.csv"
    rates.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(TraceFormatError, match=re.escape(str(rates))):
        load_servegen(rates)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"rate_scale": float("inf")}, "rate_scale"),
        ({"trace": "poisson", "arrival": {"process": "poisson", "rate_rps": float("inf")}}, "arrival.rate_rps"),
        ({"embedding": {"stream_rps": float("inf")}}, "embedding.stream_rps"),
    ],
)
def test_infinite_rates_are_refused_with_the_fix(data, key):
    with pytest.raises(ValueError, match=re.escape(f"{key} must be a finite number, got inf; set workload.{key}")):
        WorkloadConfig.from_dict(data)
