"""driver=live against real llama-server instances: /tokenize-calibrated prompts, forced lengths."""

from __future__ import annotations

import pandas as pd
import pytest

from sagesched.experiment import run
from tests.replay.conftest import compose_config

pytestmark = pytest.mark.backends

CSV = """arrival_s,prompt_tokens,output_tokens,type,priority,prefix_hashes,class,slo_ttft_ms
0.0,120,8,chat,high,7 8,interactive,5000
0.3,200,6,chat,normal,7 9,standard,
0.6,40,0,embedding,high,,query,
0.9,90,5,generate,low,,batch,
1.2,30,0,embedding,high,,query,
"""


def test_live_replay_on_llama_server(llm_server, embedding_server, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text(CSV)
    overrides = [
        "workload=csv",
        f"workload.trace_path={trace}",
        "cluster=emulators",  # the same two-entry shape; the urls point at llama-server
        f"cluster.instances.0.url={llm_server.url}",
        f"cluster.instances.1.url={embedding_server.url}",
        "driver=live",
        "driver.prompts.block_tokens=32",
        "policy=fifo",
    ]
    summary = run(compose_config(overrides), tmp_path / "run", progress=False)
    records = pd.read_parquet(tmp_path / "run" / "requests.parquet")
    live = pd.read_parquet(tmp_path / "run" / "live.parquet")
    assert summary["completed"] == summary["requests"] == 5, records[["request_id", "outcome", "reason"]]
    # llama-server has /tokenize: prompts are built from words it encodes as one token each.
    assert summary["live"]["calibration"]["method"] == "tokenize+probe"
    llm = live[live["requested_output_tokens"] > 0]
    # ignore_eos makes the real model generate exactly max_tokens.
    assert (llm["output_tokens"] == llm["requested_output_tokens"]).all()
    # The server's own prompt count is within a few tokens of the request (BPE merges across words).
    error = (llm["server_prompt_tokens"] - llm["requested_prompt_tokens"]).abs()
    assert (error <= 0.05 * llm["requested_prompt_tokens"] + 2).all(), llm
    done = records[records["type"] != "embedding"]
    assert (done["ttft_ms"] > 0).all() and (done["e2e_ms"] >= done["ttft_ms"]).all()
