"""Synthetic arrivals have the statistics they claim; mixes, classes, tenants and RAG are built as configured."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from sagesched.core import Priority, RequestType
from sagesched.sim.workloads import build_workload
from sagesched.sim.workloads.arrivals import (
    burst_arrivals,
    diurnal_arrivals,
    gamma_arrivals,
    poisson_arrivals,
    renewal_arrivals,
    weibull_shape_for_cv,
)


def _cv(times: np.ndarray) -> float:
    gaps = np.diff(times)
    return float(gaps.std() / gaps.mean())


def test_poisson_rate_and_cv():
    times = poisson_arrivals(np.random.default_rng(0), 8.0, 0.0, math.inf, limit=50_000)
    assert len(times) == 50_000 and np.all(np.diff(times) >= 0)
    assert np.diff(times).mean() == pytest.approx(1 / 8.0, rel=0.02)
    assert _cv(times) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_cv(cv):
    times = gamma_arrivals(np.random.default_rng(1), 4.0, cv, 0.0, math.inf, limit=100_000)
    assert np.diff(times).mean() == pytest.approx(0.25, rel=0.05)
    assert _cv(times) == pytest.approx(cv, rel=0.1)


def test_gamma_window_counts_match_rate():
    times = gamma_arrivals(np.random.default_rng(2), 5.0, 2.0, 100.0, 2100.0)
    assert times.min() >= 100.0 and times.max() < 2100.0
    assert len(times) == pytest.approx(10_000, rel=0.08)


def test_weibull_matches_requested_cv():
    assert weibull_shape_for_cv(1.0) == pytest.approx(1.0, rel=1e-6)  # Weibull(1) is exponential
    times = renewal_arrivals(np.random.default_rng(3), 2.0, 2.0, 0.0, math.inf, family="Weibull", limit=100_000)
    assert np.diff(times).mean() == pytest.approx(0.5, rel=0.05)
    assert _cv(times) == pytest.approx(2.0, rel=0.1)


def test_bursts_follow_the_on_off_square_wave():
    times = burst_arrivals(np.random.default_rng(4), 2.0, 20.0, on_s=10.0, off_s=50.0, start_s=0.0, end_s=6000.0)
    in_burst = np.mod(times, 60.0) >= 50.0
    assert in_burst.sum() == pytest.approx(20.0 * 1000, rel=0.05)  # 100 on-phases of 10 s
    assert (~in_burst).sum() == pytest.approx(2.0 * 5000, rel=0.05)
    silent = burst_arrivals(np.random.default_rng(5), 0.0, 10.0, 10.0, 50.0, 0.0, 600.0)
    assert len(silent) > 0 and np.all(np.mod(silent, 60.0) >= 50.0)


def test_diurnal_rate_peaks_and_troughs():
    amplitude, period = 0.8, 600.0
    times = diurnal_arrivals(np.random.default_rng(6), 5.0, amplitude, period, 0.0, 0.0, 60_000.0)
    assert len(times) == pytest.approx(5.0 * 60_000, rel=0.02)
    rising = np.mod(times, period) < period / 2  # sin > 0 half
    ratio = rising.sum() / (~rising).sum()
    expected = (1 + 2 * amplitude / math.pi) / (1 - 2 * amplitude / math.pi)
    assert ratio == pytest.approx(expected, rel=0.05)
    counts, _ = np.histogram(np.mod(times, period), bins=4, range=(0, period))
    assert counts.argmax() in (0, 1) and counts.argmin() in (2, 3)


def test_synthetic_workload_samples_length_pairs_jointly_from_the_trace():
    from sagesched.sim.workloads import load_trace

    trace = load_trace("azure_conv")
    pairs = set(zip(trace.prompt_tokens.tolist(), trace.output_tokens.tolist(), strict=True))
    requests = build_workload({"arrival": {"process": "gamma", "rate_rps": 20, "cv": 2}, "duration_s": 300}, 3)
    assert len(requests) == pytest.approx(6000, rel=0.15)
    assert all((r.prompt_tokens, r.output_tokens) in pairs for r in requests)
    assert requests[0].id == "gamma-000000"


def test_fixed_lengths():
    requests = build_workload(
        {
            "arrival": {"process": "poisson"},
            "duration_s": 60,
            "lengths": {"source": "fixed", "prompt_tokens": 100, "output_tokens": 7},
        },
        seed=0,
    )
    assert {(r.prompt_tokens, r.output_tokens, r.max_tokens) for r in requests} == {(100, 7, 7)}


MIXED = {
    "arrival": {"process": "poisson", "rate_rps": 50.0},
    "max_requests": 20_000,
    "mix": {"chat": 0.5, "generate": 0.3, "embedding": 0.2},
    "embedding": {"inputs": 1, "max_inputs": 4},
    "classes": {
        "interactive": {"fraction": 0.25, "priority": "high", "ttft_ms": 300, "tpot_ms": 80, "types": ["chat"]},
        "standard": {"fraction": 0.75, "priority": "normal", "e2e_ms": 30000, "types": ["chat", "generate"]},
        "search": {"fraction": 1.0, "priority": "critical", "e2e_ms": 50, "types": ["embedding"]},
    },
    "tenants": {"a": 3.0, "b": 1.0},
}


def test_mix_classes_and_tenants_follow_their_fractions():
    requests = build_workload(MIXED, seed=7)
    n = len(requests)
    types = Counter(r.type for r in requests)
    assert types[RequestType.LLM_CHAT] / n == pytest.approx(0.5, abs=0.015)
    assert types[RequestType.LLM_GENERATE] / n == pytest.approx(0.3, abs=0.015)
    assert types[RequestType.EMBEDDING] / n == pytest.approx(0.2, abs=0.015)
    chats = [r for r in requests if r.type is RequestType.LLM_CHAT]
    interactive = [r for r in chats if r.tags["class"] == "interactive"]
    assert len(interactive) / len(chats) == pytest.approx(0.25, abs=0.02)
    assert all(r.priority is Priority.HIGH and r.slo.ttft_ms == 300 and r.slo.tpot_ms == 80 for r in interactive)
    assert {r.tags["class"] for r in requests if r.type is RequestType.LLM_GENERATE} == {"standard"}
    assert {r.tags["class"] for r in requests if r.is_embedding} == {"search"}
    assert sum(r.tenant == "a" for r in requests) / n == pytest.approx(0.75, abs=0.015)


def test_embedding_requests_are_well_formed():
    requests = [r for r in build_workload(MIXED, seed=7) if r.is_embedding]
    assert requests
    for r in requests:
        assert r.model == "bge-base" and r.max_tokens == 0 and r.output_tokens == 0
        assert r.prompt_tokens == r.embedding_tokens
        assert 1 <= r.embedding_inputs <= 4
        assert r.embedding_inputs <= r.embedding_tokens <= 512 * r.embedding_inputs
    assert {r.embedding_inputs for r in requests} == {1, 2, 3, 4}


RAG = {
    "trace": "azure_conv",
    "duration_s": 900,
    "rag": {"fraction": 0.6, "query_tokens": 24, "delay_s": 0.08, "context_tokens": 1000, "ingest_rate_rps": 0.2},
    "tenants": 5,
}


def test_rag_turns_pair_a_query_embedding_with_a_later_chat():
    requests = build_workload(RAG, seed=11)
    position = {r.id: i for i, r in enumerate(requests)}
    by_id = {r.id: r for r in requests}
    answers = [r for r in requests if r.tags.get("rag") == "answer"]
    plain = [r for r in requests if r.type is RequestType.LLM_CHAT and "rag" not in r.tags]
    assert len(answers) / (len(answers) + len(plain)) == pytest.approx(0.6, abs=0.03)
    trace_prompts = {r.id: r.prompt_tokens for r in build_workload({"duration_s": 900}, seed=11)}
    for chat in answers:
        query = by_id[f"{chat.id}-q"]
        assert query.is_embedding and query.embedding_tokens == 24 and query.embedding_inputs == 1
        assert query.tags == {"class": chat.tags["class"], "rag": "query", "rag_pair": chat.id}
        assert chat.tags["rag_pair"] == chat.id
        assert query.tenant == chat.tenant and query.priority == chat.priority
        assert chat.arrival_s - query.arrival_s == pytest.approx(0.08)
        assert position[query.id] < position[chat.id]
        assert chat.prompt_tokens == trace_prompts[chat.id] + 1000
    assert len({r.tenant for r in answers}) == 5


def test_rag_ingest_batches_are_bulk_low_priority_embeddings():
    requests = build_workload(RAG, seed=11)
    ingest = [r for r in requests if r.tags.get("rag") == "ingest"]
    horizon = 900.0
    assert len(ingest) == pytest.approx(0.2 * horizon, rel=0.35)
    for r in ingest:
        assert r.is_embedding and r.embedding_inputs == 32 and r.embedding_tokens == 32 * 256
        assert r.priority is Priority.BACKGROUND and r.tenant == "ingest" and r.slo.empty
        assert r.tags["class"] == "ingest" and 0 <= r.arrival_s < horizon


def test_extra_embedding_stream_rides_on_top_of_the_trace():
    base = build_workload({"duration_s": 600}, seed=0)
    mixed = build_workload({"duration_s": 600, "embedding": {"stream_rps": 2.0, "tokens_per_input": 64}}, seed=0)
    stream = [r for r in mixed if r.id.startswith("embed-")]
    assert [r for r in mixed if not r.id.startswith("embed-")] == base
    assert len(stream) == pytest.approx(1200, rel=0.1)
    assert all(r.embedding_tokens == 64 and r.arrival_s < 600 for r in stream)


def _fingerprint(requests):
    return [
        (
            r.id,
            r.type,
            r.arrival_s,
            r.prompt_tokens,
            r.output_tokens,
            r.priority,
            r.tenant,
            r.slo,
            tuple(sorted(r.tags.items())),
        )
        for r in requests
    ]


def test_deterministic_for_a_seed_and_sorted_with_unique_ids():
    config = {**MIXED, "max_requests": 3000, "rag": {"fraction": 0.5, "ingest_rate_rps": 1.0}}
    first = build_workload(config, seed=5)
    assert _fingerprint(first) == _fingerprint(build_workload(config, seed=5))
    assert _fingerprint(first) != _fingerprint(build_workload(config, seed=6))
    times = [r.arrival_s for r in first]
    assert times == sorted(times)
    assert len({r.id for r in first}) == len(first)


def test_changing_one_knob_leaves_other_draws_alone():
    a = build_workload({**MIXED, "max_requests": 2000}, seed=9)
    classes = dict(
        MIXED["classes"],
        interactive={**MIXED["classes"]["interactive"], "fraction": 0.9},
        standard={**MIXED["classes"]["standard"], "fraction": 0.1},
    )
    b = build_workload({**MIXED, "max_requests": 2000, "classes": classes}, seed=9)
    assert [(r.id, r.arrival_s, r.type, r.prompt_tokens, r.tenant) for r in a] == [
        (r.id, r.arrival_s, r.type, r.prompt_tokens, r.tenant) for r in b
    ]
