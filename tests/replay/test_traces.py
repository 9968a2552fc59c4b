"""Plain CSV traces: read into requests, used by both drivers, bad cells named by line and column."""

from __future__ import annotations

import pytest

from sagesched.core import Priority, RequestType
from sagesched.experiment import run
from sagesched.replay.traces import build_csv_workload, read_csv_trace
from sagesched.sim.workloads.errors import TraceFormatError
from tests.replay.conftest import compose_config

CSV = """arrival_s,prompt_tokens,output_tokens,type,priority,tenant,prefix_hashes,class,slo_ttft_ms
0.0,100,20,chat,high,acme,1 2,interactive,500
0.5,64,0,embedding,critical,acme,,query,
1.0,300,50,generate,low,beta,1;2;3,batch,
2.5,80,10,,,,,,
"""


def test_csv_rows_become_requests(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(CSV)
    reqs = read_csv_trace(path)
    assert [r.type for r in reqs] == [
        RequestType.LLM_CHAT,
        RequestType.EMBEDDING,
        RequestType.LLM_GENERATE,
        RequestType.LLM_CHAT,
    ]
    assert reqs[0].priority is Priority.HIGH and reqs[0].tenant == "acme" and reqs[0].prefix_hashes == (1, 2)
    assert reqs[0].slo.ttft_ms == 500 and reqs[0].tags == {"class": "interactive"} and reqs[0].max_tokens == 20
    assert reqs[1].embedding_tokens == 64 and reqs[1].model == "bge-base"
    assert reqs[2].prefix_hashes == (1, 2, 3) and reqs[3].priority is Priority.NORMAL and reqs[3].id == "csv-5"
    window = build_csv_workload(
        {"trace": "csv", "trace_path": str(path), "rate_scale": 2.0, "start_s": 0.5, "duration_s": 1.0}
    )
    assert [(r.id, r.arrival_s) for r in window] == [("csv-3", 0.0), ("csv-4", 0.25)]


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("arrival_s,prompt_tokens\n0,1\n", 1, None),
        ("arrival_s,prompt_tokens,output_tokens,colour\n", 1, "colour"),
        ("arrival_s,prompt_tokens,output_tokens\n0,10,5\n1,ten,5\n", 3, "prompt_tokens"),
        ("arrival_s,prompt_tokens,output_tokens\n-1,10,5\n", 2, "arrival_s"),
        ("arrival_s,prompt_tokens,output_tokens,type\n0,10,5,video\n", 2, "type"),
        ("arrival_s,prompt_tokens,output_tokens,priority\n0,10,5,urgent\n", 2, "priority"),
        ("arrival_s,prompt_tokens,output_tokens,prefix_hashes\n0,10,5,1 x\n", 2, "prefix_hashes"),
        ("arrival_s,prompt_tokens,output_tokens\n0,10\n", 2, None),
        ("arrival_s,prompt_tokens,output_tokens\n0,10,0\n", 2, "output_tokens"),
    ],
)
def test_bad_csv_cells_are_named_by_file_line_and_column(tmp_path, text, line, column):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TraceFormatError) as info:
        read_csv_trace(path)
    assert info.value.path == str(path) and info.value.line == line and info.value.column == column
    assert str(info.value).startswith(f"{path}:{line}")


def test_a_csv_workload_runs_in_the_simulator(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(CSV)
    summary = run(compose_config(["workload=csv", f"workload.trace_path={path}"]), tmp_path / "out", progress=False)
    assert summary["requests"] == 4 and summary["completed"] == 4


def test_a_csv_workload_without_a_path_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"workload\.trace_path=PATH"):
        run(compose_config(["workload=csv"]), tmp_path, progress=False)
