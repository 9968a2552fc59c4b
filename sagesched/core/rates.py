"""Throughput estimates refined from finished requests: the rates an `InstanceView` carries.

Both drivers give a policy the same three rates per instance (`prefill_tokens_per_s`,
`decode_step_s`, `embedding_tokens_per_s`), and a policy's slack and wait predictions are only
as good as they are. The live executor cannot know them in advance, so it starts from the
configured figures and moves them towards what each finished request shows. The simulator can
do the same (`SimConfig.view_rates = "learned"`), so that a simulated policy sees the estimates
the live gateway would have seen on the same run, not the engine model's nominal figures. One
class does the learning for both, so the two cannot drift apart.

What a finished request shows is the client's view of it. Its time to first token includes any
wait for the prompts ahead of it or for a free sequence slot, and a policy adds that wait
separately (`InstanceView.predicted_wait_s`: the queue ahead at the prefill rate). A prefill rate
learned from every request would count that wait twice and sink under load (on the live replay's
llama-servers to a third of the engine's rate). So the prefill rate learns only from requests
that started clear (`starts_clear`: no LLM prompt ahead of them, a sequence slot free); the
decode step learns from every streamed request, since the batch it shared is exactly what it
measures.
"""

from __future__ import annotations

from sagesched.core.instance import InstanceView
from sagesched.core.records import RequestRecord

# Prompts shorter than this teach nothing about the prefill rate: their time to first token is
# mostly fixed per-request cost (HTTP, tokenisation, one engine step).
MIN_PROMPT_TOKENS_FOR_RATE = 16


def starts_clear(view: InstanceView) -> bool:
    """Whether an LLM request dispatched to the instance `view` shows now would start its prefill
    at once: no LLM prompt is still waiting for (or in) prefill there, and a sequence slot is free.
    Only such a request's time to first token measures the prefill rate (`ThroughputEstimate.learn`)."""
    return view.queued_prefill_tokens - view.queued_embedding_tokens <= 0 and view.llm_inflight < view.max_num_seqs


class ThroughputEstimate:
    """An instance's three rates, each an exponential moving average of what finished requests showed.

    `learn` takes one finished request's record; `alpha` is the weight of the new observation
    (`ExecutorConfig.rate_smoothing`, `SimConfig.rate_smoothing`).
    """

    __slots__ = ("decode_step_s", "embedding_tokens_per_s", "prefill_tokens_per_s")

    def __init__(self, prefill_tokens_per_s: float, decode_step_s: float, embedding_tokens_per_s: float) -> None:
        self.prefill_tokens_per_s = float(prefill_tokens_per_s)
        self.decode_step_s = float(decode_step_s)
        self.embedding_tokens_per_s = float(embedding_tokens_per_s)

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.prefill_tokens_per_s, self.decode_step_s, self.embedding_tokens_per_s)

    def learn(
        self,
        record: RequestRecord,
        finish_s: float,
        tokens: int,
        alpha: float,
        *,
        streamed: bool = True,
        started_clear: bool = True,
        delivery_s: float = 0.0,
    ) -> bool:
        """Fold in one finished request; True when any rate moved.

        An embedding gives its tokens (times the batch it was sent in) over its time at the server.
        An LLM request gives, when it was streamed (the first token's time is then known) and
        produced at least two tokens, its decode step (time after the first token per further
        token) and, when it `started_clear` (`starts_clear` at its dispatch) with a prompt of
        `MIN_PROMPT_TOKENS_FOR_RATE` or more, its prompt over its time to first token. `tokens` is
        how many output tokens it produced. `delivery_s` is added to its first token and its
        finish: the simulator's records get the serving frontend's delivery cost only when the run
        ends (`sagesched.sim.frontend`), while the live client sees it.
        """
        dispatch = record.dispatch_s
        if dispatch is None:
            return False
        finish_s += delivery_s
        if record.type == "embedding":
            elapsed = finish_s - dispatch
            if elapsed <= 0 or record.embedding_tokens <= 0:
                return False
            rate = record.embedding_tokens * max(1, record.batch_size) / elapsed
            self.embedding_tokens_per_s += alpha * (rate - self.embedding_tokens_per_s)
            return True
        first = record.first_token_s
        if not streamed or first is None or tokens < 2:
            return False
        first += delivery_s
        moved = False
        step = (finish_s - first) / (tokens - 1)
        if step > 0:
            self.decode_step_s += alpha * (step - self.decode_step_s)
            moved = True
        ttft = first - dispatch
        if started_clear and ttft > 0 and record.prompt_tokens >= MIN_PROMPT_TOKENS_FOR_RATE:
            rate = record.prompt_tokens / ttft
            self.prefill_tokens_per_s += alpha * (rate - self.prefill_tokens_per_s)
            moved = True
        return moved
