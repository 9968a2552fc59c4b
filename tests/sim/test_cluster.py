"""The cluster driver: determinism, conservation, rejections, batches, wake-ups, configs, results."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pandas as pd
import pytest
from tiny_perf import make_provider

from sagesched.core import RECORD_COLUMNS, Assignment, InstanceView, Request, RequestType
from sagesched.policies.base import Policy, PolicyConfig
from sagesched.policies.fifo import FifoPolicy
from sagesched.sim import ClusterConfig, InstanceConfig, SimConfig, simulate

provider = make_provider(kv_tokens=20_000)


CLUSTER = ClusterConfig.from_dict(
    {
        "instances": [
            {"id": "llm", "count": 2, "kind": "llm", "model": "llama-2-7b"},
            {"id": "tei", "kind": "embedding", "model": None, "embedding_model": "bge-base"},
            {"id": "mix", "kind": "llm_embedding", "model": "llama-2-7b", "embedding_model": "bge-base"},
        ]
    }
)


def workload(n: int = 120) -> list[Request]:
    reqs = []
    for i in range(n):
        t = 0.037 * i
        if i % 3 == 2:
            reqs.append(
                Request(
                    id=f"e{i}",
                    type=RequestType.EMBEDDING,
                    model="bge-base",
                    arrival_s=t,
                    prompt_tokens=64 * (1 + i % 5),
                    embedding_inputs=1 + i % 4,
                    embedding_tokens=64 * (1 + i % 5),
                )
            )
        else:
            reqs.append(
                Request(
                    id=f"c{i}",
                    type=RequestType.LLM_CHAT,
                    model="llama-2-7b",
                    arrival_s=t,
                    prompt_tokens=50 + (i * 37) % 900,
                    max_tokens=300,
                    output_tokens=5 + (i * 53) % 250,
                )
            )
    return reqs


def run(reqs=None, policy=None, **sim):
    return simulate(reqs or workload(), CLUSTER, policy or FifoPolicy(), SimConfig(**sim), perf_provider=provider)


def test_cluster_config_expands_counts_and_rejects_unknown_keys():
    assert [i.id for i in CLUSTER.instances] == ["llm-0", "llm-1", "tei", "mix"]
    with pytest.raises(ValueError, match="max_num_seq"):
        ClusterConfig.from_dict({"instances": [{"id": "a", "vllm": {"max_num_seq": 3}}]})
    with pytest.raises(ValueError, match="unknown key"):
        SimConfig.from_dict({"mode": "jump", "speed": 2})
    with pytest.raises(ValueError, match="'jump'"):
        SimConfig(mode="fast")
    with pytest.raises(ValueError, match="embedding_model"):
        InstanceConfig(id="x", kind="embedding", model=None)


def test_identical_config_gives_identical_records():
    a, b = run(), run()
    pd.testing.assert_frame_equal(a.records, b.records)
    pd.testing.assert_frame_equal(a.timeline, b.timeline)


def test_every_request_ends_exactly_once_with_ordered_timestamps():
    reqs = workload()
    res = run(reqs)
    df = res.records
    assert list(df.columns) == list(RECORD_COLUMNS)
    assert sorted(df.request_id) == sorted(r.id for r in reqs)
    assert df.request_id.is_unique
    assert set(df.outcome) <= {"completed", "rejected", "failed"}
    done = df[df.outcome == "completed"]
    assert len(done) == len(reqs)
    assert (done.arrival_s <= done.dispatch_s).all()
    assert (done.dispatch_s <= done.first_token_s).all()
    assert (done.first_token_s <= done.finish_s).all()
    llm = done[done.type == "llm_chat"]
    truth = {r.id: r.output_tokens for r in reqs}
    assert (llm.output_tokens == llm.request_id.map(truth)).all()
    assert set(done[done.type == "embedding"].instance_id) <= {"tei", "mix"}


def test_step_mode_gives_the_same_latencies():
    a, b = run(mode="jump"), run(mode="step")
    assert (a.records.instance_id == b.records.instance_id).all()
    assert (a.records.e2e_ms - b.records.e2e_ms).abs().max() < 1e-6
    assert (a.records.ttft_ms - b.records.ttft_ms).abs().max() < 1e-6
    assert a.stats["events"] < b.stats["events"]


def test_unservable_requests_are_rejected_with_a_reason():
    reqs = [
        Request(id="x", type=RequestType.LLM_CHAT, model="gpt-unknown", arrival_s=0.0, prompt_tokens=10, max_tokens=5)
    ]
    row = run(reqs).records.iloc[0]
    assert row.outcome == "rejected" and "gpt-unknown" in row.reason and row.rule == "fifo"


class BatchEveryWindow(Policy):
    """Holds embeddings and sends everything queued as one call at each 0.1 s window end."""

    name = "test-batch-window"
    Config = PolicyConfig

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]):
        self.calls = getattr(self, "calls", 0) + 1
        window_end = (int(now / 0.1 + 1e-9)) * 0.1
        if abs(now - window_end) > 1e-9 or not queue:
            return []
        return [Assignment("tei", tuple(r.id for r in queue), rule="window")]

    def next_wakeup(self, now: float) -> float | None:
        return (int(now / 0.1 + 1e-9) + 1) * 0.1


def test_multi_id_assignment_is_one_call_and_wakeups_are_honoured():
    reqs = [
        Request(
            id=f"e{i}",
            type=RequestType.EMBEDDING,
            model="bge-base",
            arrival_s=0.01 + 0.02 * i,
            prompt_tokens=100,
            embedding_inputs=1,
            embedding_tokens=100,
        )
        for i in range(4)
    ]
    res = run(reqs, policy=BatchEveryWindow())
    df = res.records
    assert (df.outcome == "completed").all()
    assert (df.dispatch_s.round(9) == 0.1).all() and (df.batch_size == 4).all()
    assert df.finish_s.nunique() == 1  # one backend call: one answer time for all four
    assert (df.rule == "window").all()


class HoldForever(Policy):
    name = "test-hold"
    Config = PolicyConfig

    def schedule(self, now, queue, instances):
        return []


def test_requests_a_policy_never_places_fail_with_a_reason():
    res = run(workload(6), policy=HoldForever())
    assert (res.records.outcome == "failed").all()
    assert res.records.reason.str.contains("never placed").all()


def test_max_time_fails_unfinished_requests():
    res = run(workload(60), max_time_s=0.5)
    df = res.records
    assert len(df) == 60 and set(df.outcome) == {"completed", "failed"}
    assert (df[df.outcome == "completed"].finish_s <= 0.5).all()


def test_timeline_summary_and_files(tmp_path):
    res = run()
    tl = res.timeline
    assert list(tl.columns) == ["time_s", "instance_id", "running", "waiting", "kv_usage", "batch_size", "busy"]
    assert set(tl.instance_id) == {"llm-0", "llm-1", "tei", "mix"}
    assert tl.busy.between(0, 1 + 1e-9).all() and tl.kv_usage.between(0, 1).all()
    summary = res.summary()
    assert summary["requests"] == len(res.records)
    assert summary["sim"]["instances"]["llm-0"]["peak_kv_usage"] <= 1.0
    out = res.write(tmp_path / "run")
    assert pd.read_parquet(out / "records.parquet").shape == res.records.shape
    assert (out / "summary.json").exists()


def test_timeline_cost_follows_events_not_the_simulated_span():
    """A trace stretched by rate_scale=1e-9 spans ~1e10 s: the 1 s sampler must skip the quiet
    spans (nothing changes between events) instead of walking every second of them."""
    import time

    reqs = [
        Request(
            id=f"c{i}",
            type=RequestType.LLM_CHAT,
            model="llama-2-7b",
            arrival_s=i * 3e9,
            prompt_tokens=200,
            max_tokens=40,
            output_tokens=40,
        )
        for i in range(4)
    ]
    started = time.perf_counter()
    result = run(reqs, timeline_interval_s=1.0)
    assert time.perf_counter() - started < 10.0
    assert (result.records.outcome == "completed").all()
    timeline = result.timeline
    assert 0 < len(timeline) < 200 * len(CLUSTER.instances)
    times = timeline["t_s"] if "t_s" in timeline else timeline.iloc[:, 0]
    assert (times.to_numpy() % 1.0 == 0).all()  # still on the 1 s grid
    assert times.max() > 9e9  # and sampled through the last request


def test_busy_timeline_is_unchanged_by_skipping_quiet_spans():
    """With no quiet span longer than an interval, there is one sample per interval, as before."""
    result = run(timeline_interval_s=0.5)
    times = sorted(set(result.timeline.iloc[:, 0]))
    assert times[:4] == [0.5, 1.0, 1.5, 2.0]
    assert all(abs(b - a - 0.5) < 1e-9 for a, b in itertools.pairwise(times))


def test_summary_rates_use_the_runs_span_as_live_summaries_do():
    """Goodput and throughput are over last finish - first arrival (sagesched.metrics), in the
    simulator as in the live driver; not over the simulated clock, which runs on to the timeline
    sampler's next tick after the last finish."""
    from sagesched.metrics import summarize

    res = run()
    df = res.records
    span = df.finish_s.max() - df.arrival_s.min()
    assert res.stats["sim_time_s"] > span  # the clock ends on a sampler tick, past the last finish
    summary = res.summary()
    assert summary["duration_s"] == pytest.approx(span)
    assert summary["goodput_rps"] == summarize(df)["goodput_rps"]
