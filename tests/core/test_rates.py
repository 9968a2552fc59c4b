"""`ThroughputEstimate`: what one finished request teaches, and what it must not."""

from __future__ import annotations

import pytest

from sagesched.core import InstanceKind, InstanceView, Request, RequestRecord, RequestType
from sagesched.core.rates import ThroughputEstimate, starts_clear


def _chat(prompt: int = 400, dispatch: float | None = 1.0, first: float | None = 1.5) -> RequestRecord:
    rec = RequestRecord.from_request(
        Request("c", RequestType.LLM_CHAT, "m", 0.5, prompt_tokens=prompt, max_tokens=11, output_tokens=11)
    )
    rec.dispatch_s, rec.first_token_s = dispatch, first
    return rec


def _embedding(tokens: int = 300, batch: int = 2) -> RequestRecord:
    rec = RequestRecord.from_request(
        Request("e", RequestType.EMBEDDING, "emb", 0.0, embedding_inputs=1, embedding_tokens=tokens)
    )
    rec.dispatch_s, rec.batch_size = 2.0, batch
    return rec


def test_a_streamed_chat_moves_the_decode_step_and_the_prefill_rate_towards_what_it_showed():
    est = ThroughputEstimate(1000.0, 0.02, 5000.0)
    # 400 tokens to the first token in 0.5 s (800 tok/s); 10 more tokens over 1 s (0.1 s each).
    assert est.learn(_chat(), finish_s=2.5, tokens=11, alpha=0.5)
    assert est.prefill_tokens_per_s == pytest.approx(900.0)
    assert est.decode_step_s == pytest.approx(0.06)
    assert est.embedding_tokens_per_s == 5000.0


def test_an_embedding_moves_only_the_embedding_rate_counting_its_batch():
    est = ThroughputEstimate(1000.0, 0.02, 5000.0)
    # 300 tokens in a batch of 2 over 0.2 s: 3000 tok/s.
    assert est.learn(_embedding(), finish_s=2.2, tokens=0, alpha=0.25)
    assert est.embedding_tokens_per_s == pytest.approx(4500.0)
    assert est.as_tuple()[:2] == (1000.0, 0.02)


@pytest.mark.parametrize(
    ("record", "tokens", "streamed"),
    [
        (_chat(dispatch=None), 11, True),  # never dispatched
        (_chat(), 11, False),  # not streamed: the first token's time is not the client's
        (_chat(first=None), 11, True),
        (_chat(), 1, True),  # one token: no decode step to measure
    ],
)
def test_what_teaches_nothing_moves_nothing(record, tokens, streamed):
    est = ThroughputEstimate(1000.0, 0.02, 5000.0)
    assert not est.learn(record, finish_s=2.5, tokens=tokens, alpha=0.5, streamed=streamed)
    assert est.as_tuple() == (1000.0, 0.02, 5000.0)


def test_a_short_prompt_teaches_the_decode_step_but_not_the_prefill_rate():
    est = ThroughputEstimate(1000.0, 0.02, 5000.0)
    assert est.learn(_chat(prompt=8), finish_s=2.5, tokens=11, alpha=0.5)
    assert est.prefill_tokens_per_s == 1000.0 and est.decode_step_s == pytest.approx(0.06)


def test_delivery_time_lengthens_the_time_to_first_token_not_the_decode_step():
    est = ThroughputEstimate(1000.0, 0.02, 5000.0)
    est.learn(_chat(), finish_s=2.5, tokens=11, alpha=1.0, delivery_s=0.3)
    assert est.prefill_tokens_per_s == pytest.approx(400 / 0.8)
    assert est.decode_step_s == pytest.approx(0.1)
    emb = ThroughputEstimate(1000.0, 0.02, 5000.0)
    emb.learn(_embedding(), finish_s=2.2, tokens=0, alpha=1.0, delivery_s=0.1)
    assert emb.embedding_tokens_per_s == pytest.approx(600 / 0.3)


def test_a_request_that_waited_behind_others_teaches_the_decode_step_only():
    est = ThroughputEstimate(1000.0, 0.02, 5000.0)
    assert est.learn(_chat(), finish_s=2.5, tokens=11, alpha=0.5, started_clear=False)
    assert est.prefill_tokens_per_s == 1000.0 and est.decode_step_s == pytest.approx(0.06)


def _view(**kw) -> InstanceView:
    return InstanceView("i", kw.pop("kind", InstanceKind.LLM), frozenset({"m"}), max_num_seqs=4, **kw)


@pytest.mark.parametrize(
    ("view", "clear"),
    [
        (_view(), True),
        (_view(running=3, queued_decode_tokens=300), True),  # decoding only: a slot is free
        (_view(running=1, queued_prefill_tokens=200), False),  # a prompt still in prefill
        (_view(running=4, queued_decode_tokens=400), False),  # every slot taken
        # A shared GPU: the embedding engine's queue is not ahead of LLM prompts, nor are its requests.
        (
            _view(
                kind=InstanceKind.LLM_EMBEDDING,
                running=4,
                embedding_inflight=2,
                queued_prefill_tokens=900,
                queued_embedding_tokens=900,
            ),
            True,
        ),
    ],
)
def test_starts_clear_means_no_prompt_ahead_and_a_free_slot(view, clear):
    assert starts_clear(view) is clear
