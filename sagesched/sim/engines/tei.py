"""The text-embeddings-inference router as a pure state machine.

TEI admits a call if it carries at most `max_client_batch_size` inputs (else 413) and the inputs in
flight stay within `max_concurrent_requests` (else 429); each input becomes one queue entry. The
batching task packs entries from the FIFO head greedily while the batch's total tokens stay within
`max_batch_tokens` (a single larger entry still forms a batch of its own) and, if set, its entry
count within `max_batch_requests`; one batch runs at a time, and (`prefetch`) the next one is packed
as soon as the current one starts, or as soon as an input arrives while it runs: an input arriving
later waits for the batch after. Inputs longer than `max_input_length` are truncated to it. Each input
returns its concurrency permit when it is embedded; a call is answered when its last input is.

The same core runs a vLLM *pooling* engine (`vllm serve <encoder> --task embed`, `--runner pooling`
in newer releases) when its config comes from `embedding_engine_config`: the differences between the two
servers that matter to a scheduler are configuration (see there).
"""

from __future__ import annotations

from collections import deque

from sagesched.sim.config import InstanceConfig, TeiEngineConfig, VllmEngineConfig, vllm_defaults_for
from sagesched.sim.engines.types import EngineRejected, EngineRequest
from sagesched.typed_config import ConfigFieldError


class TeiCall:
    """One admitted call: its inputs left to finish and whether any has started."""

    __slots__ = ("id", "num_inputs", "num_requests", "remaining", "started", "tokens")

    def __init__(self, req: EngineRequest) -> None:
        self.id = req.id
        self.num_inputs = len(req.input_tokens)
        self.num_requests = req.num_requests
        self.remaining = self.num_inputs
        self.tokens = sum(req.input_tokens)
        self.started = False


class TeiBatch(list):
    """One forward pass: a list of (call, input tokens) entries, with its totals as attributes."""

    __slots__ = ("max_input_tokens", "num_inputs", "total_tokens")

    def __init__(self, entries: list[tuple[TeiCall, int]]) -> None:
        super().__init__(entries)
        self.num_inputs = len(entries)
        self.total_tokens = sum(t for _, t in entries)
        self.max_input_tokens = max(t for _, t in entries)

    @property
    def entries(self) -> list[tuple[TeiCall, int]]:
        return self


class TeiEngineCore:
    """TEI's queue, admission limits and batcher, timed by an `EmbeddingPerfModel` (`batch_time_s`).

    Counters: `rejected_429`, `rejected_413`, `batches`, `inputs_done`.
    """

    def __init__(self, config: TeiEngineConfig, perf) -> None:
        self.config = config
        self.perf = perf
        self.queue: deque[tuple[TeiCall, int]] = deque()
        self.calls: dict[str, TeiCall] = {}
        self.inflight_inputs = 0
        self.queued_tokens = 0
        self.batch: TeiBatch | None = None
        #: The batch packed while `batch` runs (TEI's batching task works one batch ahead).
        self.prefetched: TeiBatch | None = None
        limit = config.max_input_length
        if limit is None:
            limit = getattr(getattr(perf, "model", None), "max_position_embeddings", None)
        self.max_input_length: int | None = int(limit) if limit else None
        self.rejected_429 = 0
        self.rejected_413 = 0
        self.batches = 0
        self.inputs_done = 0

    # -- gauges ----------------------------------------------------------------------------------
    @property
    def queue_size(self) -> int:
        """Inputs waiting for a batch (the prefetched one included)."""
        return len(self.queue) + (self.prefetched.num_inputs if self.prefetched is not None else 0)

    @property
    def num_calls(self) -> int:
        return len(self.calls)

    def waiting_requests(self) -> int:
        """Gateway requests in calls none of whose inputs has started."""
        return sum(c.num_requests for c in self.calls.values() if not c.started)

    @property
    def has_work(self) -> bool:
        return bool(self.queue) or self.prefetched is not None

    # -- calls -----------------------------------------------------------------------------------
    def submit(self, req: EngineRequest) -> None:
        """Admit a call (inputs in `req.input_tokens`) or raise EngineRejected(413 | 429, reason)."""
        n = len(req.input_tokens)
        cfg = self.config
        if n < 1:
            raise EngineRejected(400, f"call {req.id} has no inputs")
        if n > cfg.max_client_batch_size:
            self.rejected_413 += 1
            raise EngineRejected(
                413, f"batch size {n} > maximum allowed batch size {cfg.max_client_batch_size} (max_client_batch_size)"
            )
        if self.inflight_inputs + n > cfg.max_concurrent_requests:
            self.rejected_429 += 1
            raise EngineRejected(
                429,
                f"model is overloaded: {self.inflight_inputs} inputs in flight + {n} > "
                f"max_concurrent_requests={cfg.max_concurrent_requests}",
            )
        call = TeiCall(req)
        self.calls[req.id] = call
        self.inflight_inputs += n
        limit = self.max_input_length
        for t in req.input_tokens:
            if limit is not None and t > limit:
                t = limit
            self.queue.append((call, t))
            self.queued_tokens += t
        if self.batch is not None and self.prefetched is None and self.config.prefetch:
            self.prefetched = self._pack()

    def next_batch(self) -> TeiBatch | None:
        """The batch to run now (the prefetched one, else packed from the queue head; None if there is
        no work); with `prefetch`, the one after it is packed at once from what is left."""
        batch = self.prefetched if self.prefetched is not None else self._pack()
        self.prefetched = None
        self.batch = batch
        if batch is None:
            return None
        for call, _ in batch:
            call.started = True
        self.queued_tokens -= batch.total_tokens
        if self.config.prefetch:
            self.prefetched = self._pack()
        return batch

    def _pack(self) -> TeiBatch | None:
        """Take the next batch's entries off the queue head (None if it is empty); their tokens stay
        counted in `queued_tokens` until the batch runs."""
        queue = self.queue
        if not queue:
            return None
        cap_tokens = self.config.max_batch_tokens
        cap_n = self.config.max_batch_requests or (1 << 60)
        entries: list[tuple[TeiCall, int]] = []
        total = 0
        while queue and len(entries) < cap_n:
            t = queue[0][1]
            if entries and total + t > cap_tokens:
                break
            entries.append(queue.popleft())
            total += t
            if total >= cap_tokens:
                break
        return TeiBatch(entries)

    def batch_time_s(self, batch: TeiBatch) -> float:
        return self.perf.batch_time_s(batch.num_inputs, batch.total_tokens, batch.max_input_tokens)

    def finish_batch(self, batch: TeiBatch) -> list[str]:
        """Mark the batch done; returns the ids of calls now complete (their permits released)."""
        done: list[str] = []
        for call, _ in batch.entries:
            call.remaining -= 1
            self.inflight_inputs -= 1  # TEI returns an input's permit as soon as it is embedded
            if call.remaining == 0:
                done.append(call.id)
                del self.calls[call.id]
        self.inputs_done += batch.num_inputs
        self.batches += 1
        self.batch = None
        return done


#: No limit: vLLM's OpenAI server neither caps the inputs of one call nor refuses a call for load.
UNLIMITED = 1 << 30


def embedding_engine_config(cfg: InstanceConfig, max_model_len: int | None) -> TeiEngineConfig:
    """The batcher of an instance's embedding engine: its `tei` knobs, or for
    `shared.embedding_backend: vllm` those of a vLLM pooling engine serving the encoder, as a
    `TeiEngineCore` config. `max_model_len`: the encoder's longest input (its
    max_position_embeddings, vLLM's default max_model_len), None if unknown.

    What recent vLLM V1 does with an encoder-only embedding model such as bge-base, which is what
    the embedding profiles here are (`vllm/engine/arg_utils.py`, `EngineArgs`
    `._set_default_chunked_prefill_and_prefix_caching_args` and
    `._set_default_max_num_seqs_and_batched_tokens_args`; the scheduler
    `vllm/v1/core/sched/scheduler.py`):
    - each input of an `/v1/embeddings` call is one engine request; a call is answered when all are;
    - chunked prefill is off by default for a model that does not support it (encoder-only,
      bidirectional attention), so prompts run whole: a step takes waiting requests from the queue
      head while their tokens fit the step budget and stops at the first that does not (the latest
      V1 scheduler breaks there; early V1 releases skipped it and went on);
    - the budget, unless given (`pooling_max_num_batched_tokens`), is the server's usual default on
      this GPU (`vllm_defaults_for`: 2048 on an A100, 8192 on >= 70 GB GPUs), raised to
      max_model_len with chunked prefill off, then capped at max_num_seqs x max_model_len; the
      sequence cap (`pooling_max_num_seqs`) is the GPU's default (256 / 1024) capped at the budget.
      (Earlier V1 releases used max_model_len alone; V0 used 32768 for pooling models.) vLLM
      refuses to start with a budget under max_model_len (chunked prefill off) or under
      max_num_seqs, and so does this;
    - the scheduler forms the next step when the current one ends, so an input arriving during a
      step joins the next one (`prefetch` False; TEI packs one batch ahead instead);
    - the server queues without bound: no 413 for many inputs, no 429 under load (`UNLIMITED`).
    A step is priced by the encoder's own `EmbeddingPerfModel` (the one the TEI engine uses for that
    model and GPU); an encoder-only model keeps no KV cache, so nothing else limits a step.
    Not modelled: a causal embedding model (Qwen3-Embedding and the like), for which vLLM V1 keeps
    chunked prefill and prefix caching on; vLLM's 400 for an input longer than max_model_len unless
    the client sets `truncate_prompt_tokens` (here it is truncated, as TEI does); vLLM's per-step CPU
    cost and its API server's tokenisation, which may differ from TEI's (the perf model is fitted to
    TEI-like batches).
    """
    shared = cfg.shared
    if shared.embedding_backend != "vllm":
        return cfg.tei
    server = {
        "max_num_batched_tokens": VllmEngineConfig.max_num_batched_tokens,
        "max_num_seqs": VllmEngineConfig.max_num_seqs,
        **vllm_defaults_for(cfg.hardware),
    }
    seqs = shared.pooling_max_num_seqs
    budget = shared.pooling_max_num_batched_tokens
    if budget is None:
        budget = server["max_num_batched_tokens"]
        if max_model_len:
            budget = min(max(budget, max_model_len), (seqs or server["max_num_seqs"]) * max_model_len)
    if seqs is None:
        seqs = min(server["max_num_seqs"], budget)
    field = ("shared", "pooling_max_num_batched_tokens")
    if max_model_len and budget < max_model_len:
        raise ConfigFieldError(
            field,
            f"instance {cfg.id}: {budget} is below the encoder's max_model_len {max_model_len}: vLLM refuses to "
            "start a pooling model without chunked prefill so (raise it, or leave it unset for vLLM's default)",
        )
    if budget < seqs:
        raise ConfigFieldError(
            field, f"instance {cfg.id}: {budget} is below pooling_max_num_seqs {seqs}: vLLM refuses to start so"
        )
    return TeiEngineConfig(
        max_batch_tokens=budget,
        max_batch_requests=seqs,
        max_concurrent_requests=UNLIMITED,
        max_client_batch_size=UNLIMITED,
        max_input_length=None,
        prefetch=False,
    )
