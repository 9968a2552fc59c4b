"""Predictions on a mixed GPU: embeddings at the embedding engine's speed behind its own queue only;
the TEI input cap (max_embedding_inputs) honoured by the ledger and the policies that place through it."""

from __future__ import annotations

import pytest

from sagesched.policies import make_policy
from sagesched.policies.base import LoadLedger


def test_a_mixed_gpu_prices_embeddings_at_its_embedding_engine(make_request, make_view):
    # 40k tokens queued at the vLLM engine, 5k of them at the TEI engine beside it.
    mix = make_view(
        "mix",
        "llm_embedding",
        queued_prefill_tokens=40_000,
        queued_embedding_tokens=5_000,
        prefill_tokens_per_s=10_000.0,
        embedding_tokens_per_s=50_000.0,
    )
    query = make_request("q", "embedding", prompt_tokens=500)
    chat = make_request("c", prompt_tokens=1_000)
    # The embedding waits behind the TEI queue only, at TEI's rate: (5000 + 500) / 50k.
    assert mix.predicted_ttft_s(query) == pytest.approx(0.11)
    assert mix.predicted_service_s(query) == pytest.approx(0.01)
    # The chat waits behind the LLM prefill only: (40000 - 5000) / 10k, then its own 0.1 s.
    assert mix.predicted_ttft_s(chat) == pytest.approx(3.6)
    ledger = LoadLedger([mix])
    ledger.add("mix", [make_request("e2", "embedding", prompt_tokens=2_500)])
    assert ledger.predicted_ttft_s("mix", query) == pytest.approx(0.16)  # this call's batch counts...
    assert ledger.predicted_ttft_s("mix", chat) == pytest.approx(3.6)  # ...but not ahead of LLM work
    assert make_view("llm", "llm").predicted_embedding_wait_s() == float("inf")


def test_the_ledger_keeps_inputs_within_the_embedding_engine_cap(make_request, make_view):
    tei = make_view("tei", "embedding", embedding_inputs_inflight=500, max_embedding_inputs=512)
    ledger = LoadLedger([tei])
    assert ledger.embedding_input_room("tei") == 12
    small = make_request("s", "embedding", inputs=8)
    big = make_request("b", "embedding", inputs=16)
    assert ledger.candidates(small) == [tei] and ledger.candidates(big) == []
    ledger.add("tei", [small])
    assert ledger.candidates(make_request("s2", "embedding", inputs=8)) == []
    # A call larger than the whole cap passes: waiting cannot make room, and TEI's own error ends it.
    assert ledger.candidates(make_request("huge", "embedding", inputs=600)) == [tei]
    # Uncapped (0) never limits.
    assert LoadLedger([make_view("t2", "embedding")]).candidates(big)


@pytest.mark.parametrize("name", ["fifo", "slo_aware", "hybrid", "least_loaded"])
def test_policies_hold_calls_the_engine_would_refuse(name, make_request, make_view):
    tei = make_view("tei", "embedding", embedding_inputs_inflight=510, max_embedding_inputs=512)
    queue = [make_request("b", "embedding", inputs=16)]
    assert [d for d in make_policy(name).schedule(1.0, queue, [tei])] == []
