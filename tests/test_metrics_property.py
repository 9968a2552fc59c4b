"""Property tests: every summary figure against an independent reference computation.

Random record sets (outcomes, types, classes, SLOs, missing times, one-token outputs, ties, huge
values) go through `records_frame` + `summarize`; each figure is recomputed here from the records
alone with plain Python / numpy, following docs/results.md's definitions:

- TTFT = first token - arrival, E2E = finish - arrival, TPOT = (finish - first token) / (output - 1),
  only with >= 2 output tokens (a one-token request has no TPOT, and its TPOT objective is skipped);
- a request meets its SLO when completed and every objective it has is met with `<=` (equality meets);
- attainment is over all requests (rejected and failed miss), goodput is met / duration;
- duration = last finish - first arrival (last arrival when nothing finished; None when zero);
- percentiles are numpy's linear interpolation over completed LLM (or embedding) requests.

Plus the report's Student-t interval against scipy, the isolated-service bound against simulated
policies (and two regressions: TPOT on mixed hardware, unservable last requests), and the gateway's
Prometheus histograms against the records they fold in.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from scipy import stats

from sagesched.bounds import bound_summary, isolated_latencies, isolated_latency_s
from sagesched.core import Request
from sagesched.core.records import Outcome, RequestRecord
from sagesched.core.request import SLO, RequestType
from sagesched.live.prometheus import LATENCY_BUCKETS, TPOT_BUCKETS, GatewayMetrics
from sagesched.metrics import PERCENTILES, UNCLASSIFIED, records_frame, summarize
from sagesched.policies import make_policy
from sagesched.report import aggregate, t95
from sagesched.sim import ClusterConfig, SimConfig, simulate

FAST = settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIMS = settings(max_examples=5, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TYPES = ("llm_chat", "llm_generate", "embedding")
CLASSES = ("", "interactive", "batch")


# -- random records ------------------------------------------------------------------------------


@st.composite
def record(draw, index: int, big: bool = False) -> RequestRecord:
    scale = 1e6 if big else 100.0
    # A coarse grid makes ties (equal latencies, latencies equal to their SLO) common.
    grid = st.integers(0, 40).map(lambda k: k * scale / 40)
    arrival = draw(grid)
    kind = draw(st.sampled_from(TYPES))
    outcome = draw(st.sampled_from([o.value for o in Outcome]))
    output_tokens = 0 if kind == "embedding" else draw(st.integers(0, 5))
    first = finish = None
    if outcome == Outcome.COMPLETED.value or draw(st.booleans()):
        ttft = draw(grid) / 10
        first = None if (kind == "embedding" and draw(st.booleans())) else arrival + ttft
        finish = arrival + ttft + draw(grid) / 10
    if outcome == Outcome.REJECTED.value and draw(st.booleans()):
        first = finish = None  # the simulator leaves a rejected request without times
    slo_values = st.one_of(st.none(), st.integers(0, 40).map(lambda k: k * scale / 400))
    return RequestRecord(
        request_id=f"r{index}",
        type=kind,
        model="emb" if kind == "embedding" else "llm",
        priority=draw(st.integers(0, 4)),
        tenant="t",
        arrival_s=arrival,
        output_tokens=output_tokens,
        embedding_inputs=draw(st.integers(1, 3)) if kind == "embedding" else 0,
        slo_ttft_ms=draw(slo_values),
        slo_tpot_ms=draw(slo_values),
        slo_e2e_ms=draw(slo_values),
        dispatch_s=None if first is None else arrival,
        first_token_s=first,
        finish_s=finish,
        outcome=outcome,
        workload_class=draw(st.sampled_from(CLASSES)),
    )


@st.composite
def record_sets(draw, max_size: int = 12) -> list[RequestRecord]:
    n = draw(st.integers(0, max_size))
    big = draw(st.booleans())
    return [draw(record(i, big)) for i in range(n)]


# -- reference computations (from the records only) ----------------------------------------------


def ref_latencies(r: RequestRecord) -> tuple[float, float, float]:
    nan = float("nan")
    ttft = (r.first_token_s - r.arrival_s) * 1000.0 if r.first_token_s is not None else nan
    e2e = (r.finish_s - r.arrival_s) * 1000.0 if r.finish_s is not None else nan
    tpot = nan
    if r.first_token_s is not None and r.finish_s is not None and r.output_tokens >= 2:
        tpot = (r.finish_s - r.first_token_s) * 1000.0 / (r.output_tokens - 1)
    return ttft, tpot, e2e


def ref_met(r: RequestRecord) -> bool:
    if r.outcome != "completed":
        return False
    ttft, tpot, e2e = ref_latencies(r)
    for limit, value in ((r.slo_ttft_ms, ttft), (r.slo_tpot_ms, tpot), (r.slo_e2e_ms, e2e)):
        if limit is not None and not math.isnan(value) and not value <= limit:
            return False
    return True


def ref_duration(records: list[RequestRecord]) -> float | None:
    if not records:
        return None
    finishes = [r.finish_s for r in records if r.finish_s is not None]
    last_arrival = max(r.arrival_s for r in records)
    end = max(*finishes, last_arrival) if finishes else last_arrival
    span = end - min(r.arrival_s for r in records)
    return span if span > 0 else None


def ref_pct(values: list[float], q: float) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return float(np.percentile(np.array(values), q, method="linear")) if values else None


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


# -- summaries against the reference -------------------------------------------------------------


@FAST
@given(records=record_sets())
def test_summary_matches_reference(records):
    df = records_frame(records)
    s = summarize(df)
    json.dumps(s, allow_nan=False)  # plain JSON, never NaN

    # Per-row derived columns.
    for r, (_, row) in zip(records, df.iterrows(), strict=True):
        for col, want in zip(("ttft_ms", "tpot_ms", "e2e_ms"), ref_latencies(r), strict=True):
            got = row[col]
            assert (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-12)
        assert bool(row["slo_met"]) == ref_met(r) == r.slo_met

    n = len(records)
    done = [r for r in records if r.outcome == "completed"]
    llm = [r for r in done if r.type != "embedding"]
    emb = [r for r in done if r.type == "embedding"]
    met = [ref_met(r) for r in records]
    duration = ref_duration(records)

    assert s["requests"] == n and s["completed"] == len(done)
    assert s["rejected"] == sum(r.outcome == "rejected" for r in records)
    assert s["failed"] == sum(r.outcome == "failed" for r in records)
    assert close(s["duration_s"], duration)
    for prefix, k, group in (("ttft", 0, llm), ("tpot", 1, llm), ("e2e", 2, llm), ("embedding", 2, emb)):
        values = [ref_latencies(r)[k] for r in group]
        for q in PERCENTILES:
            assert close(s[f"{prefix}_p{q}_ms"], ref_pct(values, q)), (prefix, q)
        finite = [v for v in values if not math.isnan(v)]
        assert close(s[f"{prefix}_mean_ms"], float(np.mean(finite)) if finite else None)

    assert s["slo_met"] == sum(met)
    assert close(s["slo_attainment"], sum(met) / n if n else None)
    assert close(s["goodput_rps"], sum(met) / duration if duration else None)
    assert close(s["throughput_rps"], len(done) / duration if duration else None)
    assert s["output_tokens"] == sum(r.output_tokens for r in llm)

    # Per class: only classes that have requests, attainment over all of that class's requests.
    by_class: dict[str, list[bool]] = {}
    for r, m in zip(records, met, strict=True):
        by_class.setdefault(r.workload_class or UNCLASSIFIED, []).append(m)
    assert set(s["slo_attainment_by_class"]) == set(by_class) == set(s["classes"])
    for cls, flags in by_class.items():
        assert close(s["slo_attainment_by_class"][cls], sum(flags) / len(flags))
        block = s["classes"][cls]
        assert block["requests"] == len(flags)
        assert close(block["slo_attainment"], s["slo_attainment_by_class"][cls])
        assert close(block["goodput_rps"], sum(flags) / duration if duration else None)
    assert sum(b["requests"] for b in s["priorities"].values()) == n


@FAST
@given(records=record_sets())
def test_frame_without_slo_met_and_parquet_round_trip_agree(records, tmp_path_factory):
    df = records_frame(records)
    path = tmp_path_factory.mktemp("rt") / "r.parquet"
    df.to_parquet(path, index=False)
    back = pd.read_parquet(path)
    expected = summarize(df)
    assert summarize(back) == expected
    assert summarize(df.drop(columns=["slo_met"])) == expected


def _rec(**kw) -> RequestRecord:
    base = dict(request_id="x", type="llm_chat", model="m", priority=2, tenant="t", arrival_s=0.0)
    base.update(kw)
    return RequestRecord(**base)


def test_slo_equality_meets_everywhere():
    """`<=`: a latency exactly at its objective meets it (record, frame and bound alike)."""
    r = _rec(
        first_token_s=0.25, finish_s=1.25, output_tokens=5, slo_ttft_ms=250.0, slo_tpot_ms=250.0, slo_e2e_ms=1250.0
    )
    assert r.ttft_ms == 250.0 and r.tpot_ms == 250.0 and r.e2e_ms == 1250.0
    assert r.slo_met and bool(records_frame([r])["slo_met"].iloc[0])
    assert summarize(records_frame([r]).drop(columns=["slo_met"]))["slo_met"] == 1
    cluster = ClusterConfig.uniform(1, model="llama-2-7b")
    req = Request(id="a", type=RequestType.LLM_CHAT, model="llama-2-7b", arrival_s=0.0, prompt_tokens=500,
                  max_tokens=20, output_tokens=20)  # fmt: skip
    ttft, tpot, e2e = isolated_latencies([req], cluster)[0]
    at_bound = dataclasses.replace(req, slo=SLO(ttft_ms=ttft, tpot_ms=tpot, e2e_ms=e2e))
    assert bound_summary([at_bound], cluster)["slo_attainment_upper"] == 1.0


def test_one_output_token_has_no_tpot_and_skips_the_tpot_objective():
    r = _rec(first_token_s=0.1, finish_s=0.1, output_tokens=1, slo_tpot_ms=0.0)
    assert r.tpot_ms is None and r.slo_met
    s = summarize(records_frame([r]))
    assert s["tpot_p99_ms"] is None and s["tpot_mean_ms"] is None and s["slo_attainment"] == 1.0


def test_edge_cases_single_zero_span_all_rejected():
    # A single request that finishes at its arrival: zero span, so no rates (None, not inf).
    s = summarize(records_frame([_rec(first_token_s=0.0, finish_s=0.0, output_tokens=3)]))
    assert s["duration_s"] is None and s["goodput_rps"] is None and s["slo_attainment"] == 1.0
    assert s["ttft_p50_ms"] == s["ttft_p99_ms"] == 0.0
    # All rejected: attainment 0 (they count as misses), goodput 0 over the arrival span, no latency.
    rej = [_rec(request_id=f"r{i}", arrival_s=float(i), outcome="rejected") for i in range(3)]
    s = summarize(records_frame(rej))
    assert s["slo_attainment"] == 0.0 and s["goodput_rps"] == 0.0 and s["duration_s"] == 2.0
    assert s["ttft_p99_ms"] is None and s["completed"] == 0
    # Ties: identical latencies give that latency at every percentile.
    same = [_rec(request_id=f"r{i}", first_token_s=1.0, finish_s=2.0, output_tokens=2) for i in range(5)]
    s = summarize(records_frame(same))
    assert s["ttft_p50_ms"] == s["ttft_p99_ms"] == 1000.0 and s["tpot_p90_ms"] == 1000.0


# -- the report's mean and interval ----------------------------------------------------------------


@FAST
@given(st.lists(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=6), min_size=1, max_size=4))
def test_aggregate_mean_and_student_t_interval_match_scipy(groups):
    rows = [
        {"scenario": "s", "policy": f"p{g}", "rate_scale": 1.0, "seed": i, "goodput_rps": v}
        for g, values in enumerate(groups)
        for i, v in enumerate(values)
    ]
    agg = aggregate(pd.DataFrame(rows)).set_index("policy")
    for g, values in enumerate(groups):
        row = agg.loc[f"p{g}"]
        assert row["runs"] == len(values)
        assert math.isclose(row["goodput_rps"], float(np.mean(values)), rel_tol=1e-9, abs_tol=1e-6)
        ci = row["goodput_rps_ci"]
        if len(values) < 2:
            assert ci is None or (isinstance(ci, float) and math.isnan(ci))
            continue
        sem = stats.sem(values)
        if sem == 0:
            assert ci == 0.0
            continue
        lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sem)
        assert math.isclose(ci, (hi - lo) / 2, rel_tol=1e-9, abs_tol=1e-6)


def test_t95_small_n():
    assert math.isnan(t95(1)) and math.isnan(t95(0))
    assert math.isclose(t95(2), 12.706204736174707, rel_tol=1e-12)
    agg = aggregate(pd.DataFrame([{"scenario": "s", "policy": "p", "rate_scale": 1.0, "x": v} for v in (1.0, 3.0)]))
    assert math.isclose(agg["x_ci"].iloc[0], 12.706204736174707 * math.sqrt(2) / math.sqrt(2), rel_tol=1e-12)


def test_aggregate_skips_missing_values_and_one_run_has_no_interval():
    runs = pd.DataFrame(
        [
            {"scenario": "s", "policy": "p", "rate_scale": 1.0, "x": 1.0, "y": None},
            {"scenario": "s", "policy": "p", "rate_scale": 1.0, "x": 2.0, "y": 5.0},
        ]
    )
    row = aggregate(runs).iloc[0]
    assert row["runs"] == 2 and row["x"] == 1.5 and row["y"] == 5.0 and row["y_ci"] is None


# -- the bound ------------------------------------------------------------------------------------


def _requests(seed: int, n: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(0.05, n))
    out = []
    for i, t in enumerate(arrivals):
        outputs = int(rng.integers(1, 60))
        slo = SLO(
            ttft_ms=float(rng.uniform(20, 400)) if rng.random() < 0.8 else None,
            tpot_ms=float(rng.uniform(10, 30)) if rng.random() < 0.5 else None,
            e2e_ms=float(rng.uniform(200, 2000)) if rng.random() < 0.5 else None,
        )
        out.append(Request(id=f"r{i}", type=RequestType.LLM_CHAT, model="llama-2-7b", arrival_s=float(t),
                           prompt_tokens=int(rng.integers(16, 3000)), max_tokens=outputs, output_tokens=outputs,
                           slo=slo))  # fmt: skip
    return out


@SIMS
@given(st.integers(0, 10_000), st.sampled_from([1, 2]))
def test_no_policy_beats_the_bound_on_small_random_workloads(seed, instances):
    """Attainment and goodput of several policies never exceed the isolated-service bound.

    Only fifo and least_loaded here: they serve every request, which is the bound's stated
    assumption for the span (a policy rejecting the last requests can shorten it).
    """
    requests = _requests(seed, 25)
    cluster = ClusterConfig.uniform(instances, model="llama-2-7b")
    upper = bound_summary(requests, cluster)
    for policy in ("fifo", "least_loaded"):
        result = simulate(requests, cluster, make_policy(policy), SimConfig(timeline_interval_s=0))
        s = summarize(result.records)
        assert s["slo_attainment"] <= upper["slo_attainment_upper"] + 1e-12
        assert s["duration_s"] >= upper["span_lower_s"] - 1e-9
        assert s["goodput_rps"] <= upper["goodput_rps_upper"] + 1e-9


MIXED_HW = ClusterConfig.from_dict(
    {
        "instances": [
            {"id": "fast_prefill", "kind": "llm", "model": "llama-2-7b", "hardware": "a100", "tensor_parallel": 2},
            {
                "id": "fast_decode",
                "kind": "llm",
                "model": "llama-2-7b",
                "hardware": "h100",
                "vllm": {"max_num_batched_tokens": 64},
            },
        ]
    }
)


def test_tpot_bound_is_the_fastest_decode_not_best_finish_minus_best_first_token():
    """Regression: with the fastest first token on one instance and the fastest finish on another,
    (best e2e - best ttft) / (n - 1) overstated TPOT, and a TPOT objective every policy met alone
    counted as unattainable (attainment 1.0 against an 'upper bound' of 0.0)."""
    req = Request(id="r0", type=RequestType.LLM_CHAT, model="llama-2-7b", arrival_s=0.0, prompt_tokens=2000,
                  max_tokens=400, output_tokens=400)  # fmt: skip
    per_instance = [isolated_latency_s(req, inst) for inst in MIXED_HW.instances]
    assert np.argmin([t for t, _ in per_instance]) != np.argmin([e for _, e in per_instance])  # the premise
    fastest_decode_ms = min((e - t) for t, e in per_instance) * 1000.0 / 399
    assert math.isclose(isolated_latencies([req], MIXED_HW)[0, 1], fastest_decode_ms, rel_tol=1e-12)

    slo_req = dataclasses.replace(req, slo=SLO(tpot_ms=fastest_decode_ms * 1.01))
    upper = bound_summary([slo_req], MIXED_HW)
    result = simulate([slo_req], MIXED_HW, make_policy("fifo"), SimConfig(timeline_interval_s=0))
    assert summarize(result.records)["slo_attainment"] <= upper["slo_attainment_upper"] == 1.0


def test_unservable_requests_do_not_stretch_the_bounds_span():
    """Regression: a request no engine admits is rejected by every policy and leaves no finish; the
    bound counted its arrival as a finish, so a late unservable request made the span lower bound
    longer than any policy's span (goodput 9.4 req/s against a 'bound' of 0.2)."""
    cluster = ClusterConfig.uniform(1, model="llama-2-7b")
    reqs = [
        Request(
            id="a",
            type=RequestType.LLM_CHAT,
            model="llama-2-7b",
            arrival_s=0.0,
            prompt_tokens=100,
            max_tokens=10,
            output_tokens=10,
        ),
        Request(
            id="b",
            type=RequestType.LLM_CHAT,
            model="llama-2-7b",
            arrival_s=5.0,
            prompt_tokens=10**7,
            max_tokens=10,
            output_tokens=10,
        ),
    ]
    upper = bound_summary(reqs, cluster)
    assert np.isnan(isolated_latencies(reqs, cluster)[1]).all()
    for policy in ("fifo", "hybrid"):
        s = summarize(simulate(reqs, cluster, make_policy(policy), SimConfig(timeline_interval_s=0)).records)
        assert s["rejected"] == 1
        assert s["duration_s"] >= upper["span_lower_s"] - 1e-9
        assert s["goodput_rps"] <= upper["goodput_rps_upper"] + 1e-9


def test_bound_span_starts_at_the_earliest_arrival_whatever_the_order():
    cluster = ClusterConfig.uniform(1, model="llama-2-7b")
    reqs = _requests(3, 6)
    assert bound_summary(reqs[::-1], cluster)["span_lower_s"] == pytest.approx(
        bound_summary(reqs, cluster)["span_lower_s"], rel=1e-12
    )


# -- Prometheus -------------------------------------------------------------------------------------


def _bucket_counts(metrics: GatewayMetrics, name: str, model: str, buckets) -> list[float]:
    reg = metrics.registry
    return [reg.get_sample_value(f"{name}_bucket", {"model": model, "le": repr(float(b))}) or 0.0 for b in buckets]


@FAST
@given(records=record_sets())
def test_prometheus_histograms_match_the_records(records):
    metrics = GatewayMetrics(CollectorRegistry())
    assert metrics.observe_records(records) == len(records)
    s = summarize(records_frame(records)) if records else None
    done_llm = [r for r in records if r.outcome == "completed" and r.type != "embedding"]
    done_emb = [r for r in records if r.outcome == "completed" and r.type == "embedding"]
    for name, k, group, buckets, model in (
        ("sagesched_ttft_seconds", 0, done_llm, LATENCY_BUCKETS, "llm"),
        ("sagesched_tpot_seconds", 1, done_llm, TPOT_BUCKETS, "llm"),
        ("sagesched_e2e_seconds", 2, done_llm, LATENCY_BUCKETS, "llm"),
        ("sagesched_embedding_seconds", 2, done_emb, LATENCY_BUCKETS, "emb"),
    ):
        values = np.array([v for v in (ref_latencies(r)[k] / 1000.0 for r in group) if not math.isnan(v)])
        # Cumulative buckets, `le` inclusive (the same `<=` as the SLO check).
        want = [float((values <= b).sum()) for b in buckets]
        assert _bucket_counts(metrics, name, model, buckets) == want, name
        count = metrics.registry.get_sample_value(f"{name}_count", {"model": model}) or 0.0
        assert count == len(values)
        total = metrics.registry.get_sample_value(f"{name}_sum", {"model": model}) or 0.0
        assert math.isclose(total, float(values.sum()), rel_tol=1e-9, abs_tol=1e-9)
    for outcome in ("completed", "rejected", "failed"):
        got = sum(
            metrics.registry.get_sample_value("sagesched_request_outcomes_total", {"model": m, "outcome": outcome})
            or 0.0
            for m in ("llm", "emb")
        )
        assert got == sum(r.outcome == outcome for r in records)
        if s is not None:
            assert got == s[outcome]
    out_tokens = metrics.registry.get_sample_value("sagesched_output_tokens_total", {"model": "llm"}) or 0.0
    assert out_tokens == (s["output_tokens"] if s else 0)
