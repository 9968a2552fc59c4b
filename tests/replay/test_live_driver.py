"""driver=live writes what driver=sim writes, accounts for every request, and measures honestly."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sagesched.core.records import RECORD_COLUMNS
from sagesched.experiment import ExperimentError, run
from sagesched.replay.prompts import PROBE_ID_PREFIX
from tests.replay.conftest import WINDOW, compose_config


def test_live_run_has_the_sim_runs_columns_dtypes_and_summary_keys(run_pair):
    sim, live = run_pair.records("sim"), run_pair.records("live")
    assert list(live.columns) == list(sim.columns) == list(RECORD_COLUMNS)
    assert dict(live.dtypes.astype(str)) == dict(sim.dtypes.astype(str))
    s_sim, s_live = run_pair.summary("sim"), run_pair.summary("live")
    assert set(s_sim) <= set(s_live), set(s_sim) - set(s_live)
    assert s_sim["driver"] == "sim" and s_live["driver"] == "live"
    for key in ("send_lateness_p50_ms", "send_lateness_p99_ms", "prompt_token_mismatches", "output_token_mismatches"):
        assert key in s_live and key not in s_sim
    for name in ("latency_cdf.png", "timeline.parquet", "live.parquet"):
        assert (run_pair.live / name).is_file(), name


def test_every_workload_request_is_accounted_for_at_its_intended_arrival(run_pair):
    sim, live = run_pair.records("sim"), run_pair.records("live")
    assert sorted(live["request_id"]) == sorted(sim["request_id"])
    assert live["request_id"].is_unique
    assert set(live["outcome"]) <= {"completed", "rejected", "failed"}
    assert (live.loc[live["outcome"] != "completed", "reason"] != "").all()
    # Times are on the workload's clock: arrival_s is the workload's arrival, exactly.
    merged = sim.set_index("request_id")["arrival_s"].align(live.set_index("request_id")["arrival_s"])
    np.testing.assert_allclose(merged[0].to_numpy(), merged[1].to_numpy(), atol=1e-9)
    done = live[live["outcome"] == "completed"]
    assert len(done) == len(live), live.loc[live["outcome"] != "completed", ["request_id", "reason"]]
    # Latency counts from the intended arrival: dispatch and first token never precede it.
    assert (done["dispatch_s"] >= done["arrival_s"]).all()
    llm = done[done["type"] != "embedding"]
    assert (llm["first_token_s"] > llm["dispatch_s"]).all() and (llm["finish_s"] >= llm["first_token_s"]).all()


def test_prompt_and_output_lengths_are_the_workloads(run_pair):
    live_table = pd.read_parquet(run_pair.live / "live.parquet")
    llm = live_table[live_table["requested_output_tokens"] > 0]
    assert len(llm) > 0
    # The emulators' usage.prompt_tokens equals the requested count: calibrated prompts are exact,
    # for chat prompts (template included) and for embedding inputs alike.
    assert (live_table["server_prompt_tokens"] == live_table["requested_prompt_tokens"]).all()
    assert (live_table["requested_output_tokens"] == 0).any()
    assert (llm["output_tokens"] == llm["requested_output_tokens"]).all()
    summary = run_pair.summary("live")
    assert summary["prompt_token_mismatches"] == 0 and summary["output_token_mismatches"] == 0
    assert summary["sent"] == len(live_table) and summary["send_lateness_p99_ms"] is not None


def test_a_cluster_entry_without_url_is_an_error_naming_the_fix(tmp_path):
    cfg = compose_config(["driver=live", *WINDOW])  # the default cluster has no url:s
    with pytest.raises(ValueError, match="has no `url:`"):
        run(cfg, tmp_path, progress=False)


def test_endpoint_mode_needs_a_url():
    with pytest.raises(ValueError, match=r"driver\.endpoint\.url"):
        run(compose_config(["driver=endpoint", *WINDOW]), "/nonexistent", progress=False)


def test_endpoint_mode_measures_a_bare_server_with_no_policy_between(emulators, tmp_path):
    llm, _ = emulators
    overrides = [
        "driver=endpoint",
        f"driver.endpoint.url={llm.url}",
        "workload.embedding.stream_rps=0",  # a bare vLLM serves no bge-base
        *WINDOW,
    ]
    summary = run(compose_config(overrides), tmp_path, progress=False)
    records = pd.read_parquet(tmp_path / "requests.parquet")
    assert summary["policy"] == "endpoint" and summary["completed"] == summary["requests"] == len(records) > 0
    assert set(records["instance_id"]) == {"endpoint"}
    assert records["ttft_ms"].notna().all() and (records["ttft_ms"] > 0).all()
    assert summary["prompt_token_mismatches"] == 0


def test_through_our_gateway_priorities_and_slos_travel_as_headers(emulators, tmp_path):
    from sagesched.live.gateway_config import GatewayConfig
    from sagesched.live.server import UnifiedAPIServer

    llm, tei = emulators
    gateway = UnifiedAPIServer(
        GatewayConfig.from_dict(
            {
                "policy": "priority",
                "backends": [
                    {"url": llm.url, "kind": "llm", "models": [llm.model]},
                    {"url": tei.url, "kind": "embedding", "models": [tei.model]},
                ],
            }
        ),
        port=0,
    ).start()
    try:
        summary = run(
            compose_config(["driver=endpoint", f"driver.endpoint.url={gateway.url}", *WINDOW]), tmp_path, progress=False
        )
        snapshot = gateway.gateway.executor.snapshot()
        gateway_records = list(gateway.gateway.executor.records)
    finally:
        gateway.stop()
    assert summary["completed"] == summary["requests"]
    ours = pd.read_parquet(tmp_path / "requests.parquet").set_index("request_id")
    # The gateway saw our request ids, priorities and SLOs (from the headers), not its defaults.
    seen = {r.request_id: r for r in gateway_records if not r.request_id.startswith(PROBE_ID_PREFIX)}
    assert set(seen) == set(ours.index), snapshot["outcomes"]
    for rid, rec in seen.items():
        assert rec.priority == ours.loc[rid, "priority"]
        theirs, mine = rec.slo_ttft_ms, ours.loc[rid, "slo_ttft_ms"]
        assert (theirs is None and np.isnan(mine)) or theirs == pytest.approx(mine)
        assert rec.workload_class == ours.loc[rid, "workload_class"]


def test_requests_to_a_dead_backend_end_failed_or_rejected_with_reasons(emulators, tmp_path):
    from sagesched.live.emulators.runner import free_port

    _, tei = emulators
    overrides = [
        "cluster=emulators",
        f"cluster.instances.0.url=http://127.0.0.1:{free_port()}",  # nothing listens there
        f"cluster.instances.1.url={tei.url}",
        "driver=live",
        "driver.prompts.calibrate=false",
        "+driver.executor.no_backend_grace_s=0.5",
        *WINDOW,
    ]
    summary = run(compose_config(overrides), tmp_path, progress=False)
    records = pd.read_parquet(tmp_path / "requests.parquet")
    llm_rows = records[records["type"] != "embedding"]
    assert len(llm_rows) > 0 and (llm_rows["outcome"] != "completed").all()
    assert (llm_rows["reason"].str.len() > 0).all()
    assert summary["requests"] == len(records) == summary["completed"] + summary["rejected"] + summary["failed"]
    emb = records[records["type"] == "embedding"]
    assert (emb["outcome"] == "completed").all()


def test_summary_json_is_plain_json(run_pair):
    text = (run_pair.live / "summary.json").read_text()
    data = json.loads(text)
    assert data["live"]["calibration"]["method"] == "probe"
    assert data["interrupted"] is False


def test_missing_groups_are_an_experiment_error(tmp_path):
    from sagesched.replay.config import DriverConfig
    from sagesched.replay.experiment import run_live

    with pytest.raises(ExperimentError, match="cluster"):
        run_live({"policy": {"name": "fifo"}}, DriverConfig(name="live"), tmp_path)
