"""summarize() on hand-built records gives exactly the hand-computed numbers, and is JSON-safe."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sagesched.core import RECORD_COLUMNS, RequestRecord
from sagesched.metrics import records_frame, summarize


def _rec(rid, rtype, priority, cls, arrival, *, slo=(None, None, None), outcome="completed", **kw):
    return RequestRecord(
        request_id=rid,
        type=rtype,
        model="bge-base" if rtype == "embedding" else "llama-2-7b",
        priority=priority,
        tenant="t",
        arrival_s=arrival,
        slo_ttft_ms=slo[0],
        slo_tpot_ms=slo[1],
        slo_e2e_ms=slo[2],
        outcome=outcome,
        workload_class=cls,
        **kw,
    )


# Dyadic times so every latency is exact in binary floating point.
RECORDS = [
    # ttft 250 (= limit, met), tpot 100 (> 50, miss) -> miss
    _rec(
        "A",
        "llm_chat",
        1,
        "interactive",
        0.0,
        slo=(250, 50, None),
        dispatch_s=0.125,
        first_token_s=0.25,
        finish_s=1.25,
        output_tokens=11,
        instance_id="llm-0",
        batch_size=4,
    ),
    # ttft 125, tpot 50 (= limit) -> met
    _rec(
        "B",
        "llm_chat",
        1,
        "interactive",
        1.0,
        slo=(250, 50, None),
        dispatch_s=1.0,
        first_token_s=1.125,
        finish_s=1.625,
        output_tokens=11,
        instance_id="llm-0",
        batch_size=2,
    ),
    # e2e 4000 <= 5000 -> met
    _rec(
        "C",
        "llm_generate",
        3,
        "batch",
        2.0,
        slo=(None, None, 5000),
        dispatch_s=2.5,
        first_token_s=3.0,
        finish_s=6.0,
        output_tokens=31,
        instance_id="llm-1",
        batch_size=6,
    ),
    _rec("D", "llm_generate", 3, "batch", 3.0, slo=(None, None, 5000), outcome="rejected", reason="queue full"),
    # embedding e2e 31.25 <= 50 -> met
    _rec(
        "E",
        "embedding",
        0,
        "search",
        4.0,
        slo=(None, None, 50),
        dispatch_s=4.0,
        finish_s=4.03125,
        embedding_inputs=8,
        embedding_tokens=800,
        instance_id="emb-0",
        batch_size=3,
    ),
    # embedding e2e 125 > 50 -> miss
    _rec(
        "F",
        "embedding",
        0,
        "search",
        5.0,
        slo=(None, None, 50),
        dispatch_s=5.0625,
        finish_s=5.125,
        embedding_inputs=4,
        embedding_tokens=400,
        instance_id="emb-0",
        batch_size=3,
    ),
    _rec(
        "G",
        "llm_chat",
        1,
        "interactive",
        6.0,
        slo=(250, 50, None),
        outcome="failed",
        reason="upstream timeout",
        dispatch_s=6.0,
        instance_id="llm-1",
        batch_size=1,
    ),
    _rec(
        "H",
        "embedding",
        0,
        "search",
        7.0,
        slo=(None, None, 50),
        outcome="rejected",
        reason="queue full",
        embedding_inputs=2,
        embedding_tokens=200,
    ),
]


@pytest.fixture(scope="module")
def summary():
    return summarize(records_frame(RECORDS))


def test_counts_and_duration(summary):
    assert (summary["requests"], summary["completed"], summary["rejected"], summary["failed"]) == (8, 5, 2, 1)
    assert (summary["llm_requests"], summary["embedding_requests"]) == (5, 3)
    # To the last arrival (H, rejected at 7.0), past the last finish (C at 6.0), less the first arrival
    # (A at 0.0): refusing the last requests does not end the run early.
    assert summary["duration_s"] == 7.0


def test_latency_percentiles(summary):
    # TTFT of completed LLM requests: [125, 250, 1000]; numpy's linear interpolation.
    assert summary["ttft_p50_ms"] == 250.0
    assert summary["ttft_p90_ms"] == pytest.approx(250 + 0.8 * 750, rel=1e-12)
    assert summary["ttft_p99_ms"] == pytest.approx(250 + 0.98 * 750, rel=1e-12)
    assert summary["ttft_mean_ms"] == pytest.approx(1375 / 3, rel=1e-12)
    # TPOT: A 1000/10 = 100, B 500/10 = 50, C 3000/30 = 100.
    assert (summary["tpot_p50_ms"], summary["tpot_p90_ms"], summary["tpot_p99_ms"]) == (100.0, 100.0, 100.0)
    # E2E of LLM requests: [625, 1250, 4000].
    assert summary["e2e_p50_ms"] == 1250.0
    assert summary["e2e_p90_ms"] == pytest.approx(1250 + 0.8 * 2750, rel=1e-12)
    assert summary["e2e_p99_ms"] == pytest.approx(1250 + 0.98 * 2750, rel=1e-12)
    # Embeddings: [31.25, 125].
    assert summary["embedding_p50_ms"] == 78.125
    assert summary["embedding_p99_ms"] == pytest.approx(31.25 + 0.99 * 93.75, rel=1e-12)
    # Queueing (dispatch - arrival) of completed requests: [0, 0, 62.5, 125, 500].
    assert summary["queue_p50_ms"] == 62.5


def test_slo_attainment_and_goodput(summary):
    # met: B, C, E; missed: A (tpot), F (e2e), D and H (rejected), G (failed).
    assert summary["slo_met"] == 3
    assert summary["slo_attainment"] == 3 / 8
    assert summary["goodput_rps"] == 3 / 7.0
    assert summary["slo_attainment_by_class"] == {"batch": 0.5, "interactive": 1 / 3, "search": 1 / 3}
    assert summary["slo_attainment_by_priority"] == {"critical": 1 / 3, "high": 1 / 3, "low": 0.5}
    assert list(summary["slo_attainment_by_priority"]) == ["critical", "high", "low"]
    assert summary["slo_attainment_by_type"] == {"embedding": 1 / 3, "llm_chat": 1 / 3, "llm_generate": 0.5}
    interactive = summary["classes"]["interactive"]
    assert (interactive["requests"], interactive["completed"], interactive["failed"]) == (3, 2, 1)
    assert interactive["goodput_rps"] == 1 / 7.0
    assert interactive["ttft_p99_ms"] == pytest.approx(125 + 0.99 * 125, rel=1e-12)
    assert summary["classes"]["search"]["ttft_p99_ms"] is None  # no LLM requests in the class
    assert summary["priorities"]["low"]["e2e_p99_ms"] == 4000.0


def test_throughput_rejections_and_instances(summary):
    assert summary["output_tokens"] == 53
    assert summary["throughput_tokens_per_s"] == pytest.approx(53 / 7.0, rel=1e-12)
    assert summary["embeddings"] == 12 and summary["embeddings_per_s"] == 12 / 7.0
    assert summary["throughput_rps"] == 5 / 7.0
    assert summary["rejections_by_reason"] == {"queue full": 2}
    assert summary["failures_by_reason"] == {"upstream timeout": 1}
    assert summary["per_instance"] == {
        "emb-0": {"requests": 2, "completed": 2, "mean_batch_size": 3.0, "output_tokens": 0, "embeddings": 12},
        "llm-0": {"requests": 2, "completed": 2, "mean_batch_size": 3.0, "output_tokens": 22, "embeddings": 0},
        "llm-1": {"requests": 2, "completed": 1, "mean_batch_size": 3.5, "output_tokens": 31, "embeddings": 0},
    }


def test_explicit_duration_drives_every_rate():
    summary = summarize(records_frame(RECORDS), duration_s=12.0)
    assert summary["duration_s"] == 12.0
    assert summary["goodput_rps"] == 0.25 and summary["embeddings_per_s"] == 1.0
    with pytest.raises(ValueError, match="duration_s must be > 0"):
        summarize(records_frame(RECORDS), duration_s=0)


def _plain_json_types(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_json_types(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_json_types(v) for v in value)
    return value is None or type(value) in (int, float, str, bool)


def test_summary_is_plain_json(summary):
    assert _plain_json_types(summary)
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary


def test_empty_and_all_rejected_frames_give_none_not_nan():
    empty = summarize(records_frame([]))
    assert empty["requests"] == 0 and empty["slo_attainment"] is None and empty["ttft_p99_ms"] is None
    assert empty["goodput_rps"] is None and empty["per_instance"] == {}
    assert _plain_json_types(empty)
    rejected = summarize(records_frame([RECORDS[3], RECORDS[7]]))
    assert rejected["slo_attainment"] == 0.0 and rejected["completed"] == 0
    assert rejected["ttft_p50_ms"] is None and rejected["embedding_p99_ms"] is None
    assert rejected["duration_s"] == 4.0  # no finish: last arrival - first arrival
    json.dumps(rejected, allow_nan=False)


def test_records_frame_schema_and_parquet_round_trip(tmp_path, summary):
    frame = records_frame(RECORDS)
    assert tuple(frame.columns) == RECORD_COLUMNS
    assert frame["ttft_ms"].dtype == np.float64 and frame["output_tokens"].dtype == np.int64
    assert frame["slo_met"].tolist() == [False, True, True, False, True, False, False, False]
    path = tmp_path / "requests.parquet"
    frame.to_parquet(path)
    assert summarize(pd.read_parquet(path)) == summary


def test_frame_without_slo_met_uses_the_same_rule(summary):
    frame = records_frame(RECORDS).drop(columns=["slo_met"])
    assert summarize(frame)["slo_attainment"] == summary["slo_attainment"]
    with pytest.raises(ValueError, match="lacks column"):
        summarize(frame.drop(columns=["ttft_ms"]))


def test_records_frame_matches_the_record_properties_row_for_row():
    rng = np.random.default_rng(0)
    records = list(RECORDS)
    for i in range(300):
        arrival = float(rng.uniform(0, 100))
        first = arrival + float(rng.exponential(0.3)) if rng.random() < 0.9 else None
        finish = None if first is None or rng.random() < 0.1 else first + float(rng.exponential(2.0))
        records.append(
            _rec(
                f"r{i}",
                "llm_chat",
                int(rng.integers(0, 5)),
                "x",
                arrival,
                slo=(300.0, 60.0, 4000.0),
                first_token_s=first,
                finish_s=finish,
                output_tokens=int(rng.integers(0, 40)),
                outcome="completed" if finish is not None else "failed",
            )
        )
    fast = records_frame(records)
    slow = pd.DataFrame([r.as_row() for r in records], columns=list(RECORD_COLUMNS))
    for column in ("ttft_ms", "tpot_ms", "e2e_ms"):
        np.testing.assert_array_equal(fast[column].to_numpy(), slow[column].astype("float64").to_numpy())
    assert fast["slo_met"].tolist() == slow["slo_met"].tolist()
    assert fast["request_id"].tolist() == slow["request_id"].tolist()
