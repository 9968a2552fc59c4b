"""The shipped traces load completely and correctly, fast, and replay faithfully (windows, rate scaling)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from sagesched.core import RequestType
from sagesched.sim.workloads import (
    TRACE_DIR,
    available_traces,
    build_workload,
    clear_trace_cache,
    load_servegen,
    load_trace,
)
from sagesched.sim.workloads.traces import SHIPPED_TRACES


@pytest.mark.parametrize(
    ("name", "count", "duration_s"),
    [("azure_conv", 19_366, 3501.72), ("azure_code", 8_819, 3435.95), ("mooncake", 3_993, 1022.025)],
)
def test_each_trace_loads_every_row(name, count, duration_s):
    trace = load_trace(name)
    assert len(trace) == count
    assert trace.arrival_s.dtype == np.float64 and trace.prompt_tokens.dtype == np.int64
    assert trace.arrival_s[0] == 0.0 and np.all(np.diff(trace.arrival_s) >= 0)
    assert trace.duration_s == pytest.approx(duration_s, abs=0.01)
    assert trace.prompt_tokens.min() >= 1 and trace.output_tokens.min() >= 1


def test_azure_columns_match_the_file():
    trace = load_trace("azure_conv")
    # First rows of AzureLLMInferenceTrace_conv.csv: 18:15:46.680590,374,44 / 18:15:50.995169,396,109
    assert trace.prompt_tokens[:3].tolist() == [374, 396, 879]
    assert trace.output_tokens[:3].tolist() == [44, 109, 55]
    assert trace.arrival_s[1] == pytest.approx(50.995169 - 46.680590, abs=1e-6)
    assert trace.prefix_hashes is None


def test_mooncake_hash_ids_cover_the_prompt_in_512_token_blocks():
    trace = load_trace("mooncake")
    assert trace.prefix_hashes is not None and len(trace.prefix_hashes) == len(trace)
    assert trace.prefix_hashes[0][:3] == (0, 1, 2)
    for prompt, hashes in zip(trace.prompt_tokens.tolist(), trace.prefix_hashes, strict=True):
        assert len(hashes) == math.ceil(prompt / 512)
    # The trace shares prefixes: far fewer distinct blocks than blocks.
    blocks = [h for hashes in trace.prefix_hashes for h in hashes]
    assert len(set(blocks)) < 0.5 * len(blocks)


def test_servegen_windows_and_length_distributions():
    sg = load_servegen()
    assert len(sg.window_start_s) == 2016 and sg.duration_s == 2016 * 600
    assert np.all(np.diff(sg.window_start_s) == 600)
    assert sg.expected_requests() == pytest.approx(361_631, rel=1e-6)
    assert len(sg.input_pmfs) == len(sg.output_pmfs) == len(sg.length_window_s) == 37  # 56 windows, 19 empty
    for pmf in sg.input_pmfs + sg.output_pmfs:
        assert pmf.cdf[-1] == 1.0 and np.all(np.diff(pmf.cdf) >= 0)


def test_shipped_traces_have_licences_and_attribution():
    files = {p.name for p in TRACE_DIR.iterdir()}
    for spec in SHIPPED_TRACES.values():
        assert spec.filename in files
    assert {
        "LICENSE.AzurePublicDataset.CC-BY-4.0.txt",
        "LICENSE.Mooncake.Apache-2.0.txt",
        "LICENSE.ServeGen.Apache-2.0.txt",
        "ATTRIBUTION.md",
    } <= files
    assert available_traces() == ["azure_code", "azure_conv", "mooncake", "servegen"]


def test_loading_is_fast_and_cached():
    clear_trace_cache()
    started = time.perf_counter()
    first = load_trace("azure_conv")
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"parsing the Azure conv trace took {elapsed:.2f} s"
    assert load_trace("azure_conv") is first
    with pytest.raises(ValueError, match=r"writeable|read-only"):
        first.prompt_tokens[0] = 1


def test_replay_keeps_every_row_as_ground_truth():
    trace = load_trace("azure_conv")
    requests = build_workload({}, seed=0)
    assert len(requests) == len(trace)
    assert [r.arrival_s for r in requests] == trace.arrival_s.tolist()
    assert [r.prompt_tokens for r in requests] == trace.prompt_tokens.tolist()
    assert [r.output_tokens for r in requests] == trace.output_tokens.tolist()
    assert all(r.max_tokens == r.output_tokens for r in requests)
    assert all(r.type is RequestType.LLM_CHAT and r.model == "llama-2-7b" for r in requests)
    assert len({r.id for r in requests}) == len(requests)
    assert requests[0].id == "azure_conv-000000" and requests[-1].id == "azure_conv-019365"


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_rate_scale_divides_trace_inter_arrivals(scale):
    base = np.array([r.arrival_s for r in build_workload({"trace": "azure_code"}, seed=0)])
    scaled = np.array([r.arrival_s for r in build_workload({"trace": "azure_code", "rate_scale": scale}, seed=0)])
    assert len(scaled) == len(base)
    assert np.diff(scaled).mean() == pytest.approx(np.diff(base).mean() / scale, rel=1e-9)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_rate_scale_multiplies_synthetic_rates(scale):
    config = {"arrival": {"process": "poisson", "rate_rps": 10.0}, "max_requests": 20_000}
    gaps = np.diff([r.arrival_s for r in build_workload({**config, "rate_scale": scale}, seed=1)])
    assert gaps.mean() == pytest.approx(0.1 / scale, rel=0.03)


def test_window_selects_a_slice_of_the_trace_clock():
    trace = load_trace("azure_conv")
    expected = np.flatnonzero((trace.arrival_s >= 600) & (trace.arrival_s < 900))
    requests = build_workload({"start_s": 600, "duration_s": 300}, seed=0)
    assert [r.id for r in requests] == [f"azure_conv-{i:06d}" for i in expected]
    assert requests[0].arrival_s == pytest.approx(trace.arrival_s[expected[0]] - 600)
    fast = build_workload({"start_s": 600, "duration_s": 300, "rate_scale": 2.0}, seed=0)
    assert [r.id for r in fast] == [r.id for r in requests]  # same slice, faster
    assert max(r.arrival_s for r in fast) < 150.0


def test_max_requests_takes_the_first_arrivals():
    requests = build_workload({"start_s": 100, "max_requests": 50}, seed=0)
    full = build_workload({"start_s": 100}, seed=0)
    assert [r.id for r in requests] == [r.id for r in full[:50]]


def test_servegen_replay_follows_window_rates():
    sg = load_servegen()
    start, duration = 34_200.0, 7_200.0
    requests = build_workload({"trace": "servegen", "start_s": start, "duration_s": duration}, seed=2)
    expected = sg.expected_requests(start, start + duration)
    assert len(requests) == pytest.approx(expected, rel=0.15)  # bursty windows (CV up to ~10): loose
    assert all(0 <= r.arrival_s < duration for r in requests)
    assert np.mean([r.prompt_tokens for r in requests]) == pytest.approx(
        np.mean([sg.input_pmfs[i].mean for i in sg.length_window(np.array([start]))]), rel=0.1
    )


def test_mooncake_replay_carries_prefix_hashes_and_clipping_cuts_them():
    trace = load_trace("mooncake")
    requests = build_workload({"trace": "mooncake", "max_requests": 100}, seed=0)
    by_id = {r.id: r for r in requests}
    assert by_id["mooncake-000000"].prefix_hashes == trace.prefix_hashes[0]
    clipped = build_workload({"trace": "mooncake", "max_requests": 100, "lengths": {"max_prompt_tokens": 4096}}, 0)
    for r in clipped:
        assert r.prompt_tokens <= 4096 and len(r.prefix_hashes) == math.ceil(r.prompt_tokens / 512)


def test_configured_max_tokens_caps_the_ground_truth():
    requests = build_workload({"trace": "azure_code", "max_requests": 500, "lengths": {"max_tokens": 64}}, seed=0)
    truth = load_trace("azure_code").output_tokens[:500]
    assert all(r.max_tokens == 64 for r in requests)
    assert [r.output_tokens for r in requests] == np.minimum(truth, 64).tolist()
