"""llama.cpp's llama-server as a pure state machine: slots, a shared token batch, micro-batches, slot caches.

What it models (llama-server's `update_slots` and llama.cpp's batch splitter):
- `n_parallel` slots (`-np`), each with `n_ctx / n_parallel` tokens of context. A request takes an idle
  slot: the one whose cached tokens share the longest prefix with its prompt when that prefix is more
  than `slot_prompt_similarity` of the prompt (the slot prompt cache), else the least recently used
  (a slot's "use" time is when it was released; never-used slots tie and the highest id wins, as
  llama-server's `<=` scan does). With every slot busy it waits in a FIFO queue (deferred tasks), or,
  with `reject_when_busy`, is refused with 503 as a server configured to shed does.
- A prompt that cannot fit its slot's context is refused with 400; generation stops when the slot's
  context is full (no context shift).
- Each step is one `llama_decode` call: one token for every generating slot first (slot order), then
  prompt tokens of the slots still processing their prompt, in slot order, while the batch holds fewer
  than `n_batch` tokens (prompts are processed in chunks; an embedding server's input is non-causal and
  goes in whole or waits for the next step). The first token comes with the step that finishes the prompt.
- The batch is cut into physical micro-batches of at most `n_ubatch` tokens as llama.cpp does:
  with one KV stream per slot (the default, `kv_unified=False`, n_parallel > 1) by `split_equal`
  (sequential): a micro-batch takes sequences in batch order whose slot ids are consecutive, and the
  same number of tokens from each; so decoding slots {0, 1, 3} cost two micro-batches ({0, 1}, {3}),
  and a prompt sharing a step with decodes contributes one token to theirs and the rest alone. With
  one slot or a unified KV cache, `split_simple` (consecutive tokens).
- Models with sliding-window attention (Gemma 3) get a context checkpoint before a prompt's last few
  tokens (`checkpoint_tail_tokens`): the prompt ends in two steps, the tail alone with the first token.
- On reuse, a slot keeps the common prefix of its cached tokens and the new prompt (at most prompt - 1,
  so at least one token is evaluated) and evaluates the rest.

Timing: `perf.ubatches_time_s(list of UBatch)` for a step when the perf model has it (the CPU model,
`llamacpp_perf.CpuStepModel`, fitted by probes of a real llama-server), else for each micro-batch
`perf.step_time_s(BatchShape)` (any `LLMPerfModel`-like object).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

from sagesched.sim.engines.llamacpp_perf import AffineStepModel, CpuStepModel, UBatch
from sagesched.sim.engines.types import EngineRejected, EngineRequest, StepOutcome
from sagesched.sim.perf_model import BatchShape

__all__ = [
    "AffineStepModel",
    "CpuStepModel",
    "LlamaCppConfig",
    "LlamaCppEngineCore",
    "UBatch",
    "split_ubatches",
]


@dataclass(frozen=True)
class LlamaCppConfig:
    """llama-server knobs (defaults: its CLI defaults for `-np 4 -c 8192`).

    n_parallel: slots (`-np`); n_ctx: total context (`-c`), split evenly over the slots;
    n_batch / n_ubatch: logical and physical batch sizes in tokens (`-b`, `-ub`);
    prefix_block_tokens: tokens per entry of `EngineRequest.prefix_hashes` (prompt-cache granularity);
    cache_prompt: reuse a slot's cached prefix; reject_when_busy: 503 instead of queueing;
    slot_prompt_similarity: the share of a prompt a slot's cache must match to be chosen over LRU
    (`--slot-prompt-similarity`, 0.1); kv_unified: one KV stream for all slots (`--kv-unified`),
    which makes llama.cpp split batches simply instead of into equal-length sequence groups;
    embeddings: an embedding server (`--embeddings`): a request is one input, done when its prompt is
    computed, and no row needs logits (the pooled vector is not an output row of the LM head);
    checkpoint_tail_tokens: for models whose memory cannot be rolled back (sliding-window attention,
    recurrent layers: Gemma 3, Qwen 3.5...) llama-server stops a prompt this many tokens before its end,
    saves a context checkpoint, and processes the tail in the next step (4 in the shipped build, seen
    in its log as "created context checkpoint" after n - 4 tokens); 0 for models without;
    kv_pad: attention in a micro-batch runs over the sequence's KV cells rounded up to this many (the
    mask hides the rest but they are computed), so a row's attention cost is its padded KV length.
    """

    n_parallel: int = 4
    n_ctx: int = 8192
    n_batch: int = 2048
    n_ubatch: int = 512
    prefix_block_tokens: int = 16
    cache_prompt: bool = True
    reject_when_busy: bool = False
    slot_prompt_similarity: float = 0.1
    kv_unified: bool = False
    embeddings: bool = False
    checkpoint_tail_tokens: int = 0
    kv_pad: int = 256

    def __post_init__(self) -> None:
        if self.checkpoint_tail_tokens < 0:
            raise ValueError(f"checkpoint_tail_tokens must be >= 0, got {self.checkpoint_tail_tokens}")
        for name in ("n_parallel", "n_ctx", "n_batch", "n_ubatch", "prefix_block_tokens", "kv_pad"):
            if getattr(self, name) < 1:
                raise ValueError(f"llama.cpp {name} must be >= 1, got {getattr(self, name)}")
        if self.n_ctx < self.n_parallel:
            raise ValueError(f"n_ctx={self.n_ctx} gives each of {self.n_parallel} slots no context; raise n_ctx")


class Slot:
    """One llama-server slot: its cached token blocks and the request it serves."""

    __slots__ = ("cached", "id", "last_used", "req")

    def __init__(self, slot_id: int) -> None:
        self.id = slot_id
        self.cached: tuple[Hashable, ...] = ()
        self.last_used: tuple[int, int] = (-1, 0)  # (release step, release order): llama-server's t_last_used
        self.req: SlotRequest | None = None


class SlotRequest:
    """A request in a slot: prompt progress (`n_past`) and tokens generated."""

    __slots__ = ("cached_tokens", "generated", "id", "keys", "n_past", "prompt", "target")

    def __init__(self, req: EngineRequest, target: int) -> None:
        self.id = req.id
        self.prompt = req.prompt_tokens
        self.keys = req.prefix_hashes
        self.target = target
        self.n_past = 0
        self.generated = 0
        self.cached_tokens = 0


class LlamaCppEngineCore:
    """llama-server's slot scheduler, timed by `perf`. No clock: the caller times steps.

    Counters: `steps`, `rejected_503`, `prompt_cache_tokens` (prompt tokens reused).
    """

    def __init__(self, config: LlamaCppConfig, perf) -> None:
        self.config = config
        self.perf = perf
        self.slot_ctx = config.n_ctx // config.n_parallel
        self.slots = [Slot(i) for i in range(config.n_parallel)]
        self.waiting: deque[tuple[EngineRequest, int]] = deque()
        self.steps = 0
        self.rejected_503 = 0
        self.prompt_cache_tokens = 0

    @property
    def num_running(self) -> int:
        return sum(s.req is not None for s in self.slots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running > 0

    def add(self, req: EngineRequest) -> None:
        """Queue or place a request; EngineRejected 400 (does not fit a slot) or 503 (busy, shedding)."""
        if req.prompt_tokens < 1:
            raise EngineRejected(400, f"request {req.id}: empty prompt")
        if req.prompt_tokens >= self.slot_ctx:
            raise EngineRejected(
                400,
                f"request {req.id}: the prompt ({req.prompt_tokens} tokens) exceeds the available context size "
                f"({self.slot_ctx} tokens per slot = n_ctx / n_parallel); raise n_ctx or lower n_parallel",
            )
        want = max(1, req.max_tokens or req.output_tokens)
        target = (
            1 if self.config.embeddings else min(max(1, req.output_tokens), want, self.slot_ctx - req.prompt_tokens)
        )
        idle = [s for s in self.slots if s.req is None]
        if not idle and self.config.reject_when_busy:
            self.rejected_503 += 1
            raise EngineRejected(503, f"no slot available ({self.config.n_parallel} busy); retry later")
        self.waiting.append((req, target))
        self._assign()

    @staticmethod
    def _common(slot: Slot, keys: tuple[Hashable, ...]) -> int:
        n = 0
        for x, y in zip(slot.cached, keys, strict=False):
            if x != y:
                break
            n += 1
        return n

    def _assign(self) -> None:
        cfg = self.config
        while self.waiting:
            idle = [s for s in self.slots if s.req is None]
            if not idle:
                return
            req, target = self.waiting.popleft()
            keys = req.prefix_hashes
            best: Slot | None = None
            if cfg.cache_prompt and keys:
                scored = [(self._common(s, keys), s) for s in idle]
                n, cand = max(scored, key=lambda t: (t[0], -t[1].id))
                if n > 0 and n * cfg.prefix_block_tokens > cfg.slot_prompt_similarity * req.prompt_tokens:
                    best = cand
            if best is None:  # least recently released; never-used slots tie and the highest id wins
                best = min(idle, key=lambda s: (s.last_used, -s.id))
            sr = SlotRequest(req, target)
            if cfg.cache_prompt:
                reuse = min(self._common(best, keys) * cfg.prefix_block_tokens, req.prompt_tokens - 1)
                sr.n_past = sr.cached_tokens = max(0, reuse)
                self.prompt_cache_tokens += sr.n_past
            best.req = sr

    def plan_step(self) -> list[tuple[Slot, int]] | None:
        """The next `llama_decode` batch: (slot, tokens) pairs, or None when idle."""
        batch: list[tuple[Slot, int]] = []
        used = 0
        for slot in self.slots:
            r = slot.req
            if r is not None and r.n_past >= r.prompt:
                batch.append((slot, 1))
                used += 1
        for slot in self.slots:
            r = slot.req
            if r is None or r.n_past >= r.prompt or used >= self.config.n_batch:
                continue
            left = r.prompt - r.n_past
            if self.config.embeddings and left > self.config.n_batch - used:
                continue  # a non-causal input is computed whole in one batch: it waits for the next step
            take = min(left, self.config.n_batch - used)
            tail = self.config.checkpoint_tail_tokens
            if tail and not self.config.embeddings and left > tail:
                take = min(take, left - tail)  # the prompt's last `tail` tokens go in a step of their own
            batch.append((slot, take))
            used += take
        return batch or None

    def _padded(self, kv: int) -> int:
        pad = self.config.kv_pad
        return -(-kv // pad) * pad

    def ubatches(self, batch: list[tuple[Slot, int]]) -> list[UBatch]:
        """The physical micro-batches llama.cpp cuts `batch` into, each described for the perf model."""
        out: list[UBatch] = []
        equal = self.config.n_parallel > 1 and not self.config.kv_unified
        for pieces in split_ubatches([(slot.id, t) for slot, t in batch], self.config.n_ubatch, equal):
            rows = outputs = dec = 0
            pairs = dec_pairs = 0.0
            for i, start, count in pieces:
                r = batch[i][0].req
                assert r is not None  # a planned batch holds busy slots only
                rows += count
                if r.n_past >= r.prompt:  # one decode token over the KV so far
                    dec += 1
                    outputs += 1
                    kv = self._padded(r.n_past + 1)
                    pairs += kv
                    dec_pairs += kv
                else:
                    past = r.n_past + start
                    pairs += count * self._padded(past + count)
                    if past + count >= r.prompt:
                        outputs += 1  # the prompt's last token: logits for the first output token
            if self.config.embeddings:
                outputs = 0
            out.append(UBatch(rows, outputs, len(pieces), pairs, dec, rows - dec, dec_pairs))
        return out

    def step_time_s(self, batch: list[tuple[Slot, int]]) -> float:
        """Sum over the physical micro-batches of the perf model's time for each."""
        ubs = self.ubatches(batch)
        perf = self.perf
        if hasattr(perf, "ubatches_time_s"):
            return float(perf.ubatches_time_s(ubs))
        total = 0.0
        for ub in ubs:  # a GPU-style perf model: each micro-batch as one engine step
            total += perf.step_time_s(
                BatchShape(
                    prefill_tokens=ub.prefill_rows,
                    decode_tokens=ub.decode_rows,
                    prefill_context_tokens=ub.prefill_rows,
                    decode_context_tokens=int(ub.decode_pairs),
                    num_prefills=ub.seqs - ub.decode_rows,
                    prefill_attention_pairs=ub.kv_pairs - ub.decode_pairs,
                )
            )
        return total

    def finish_step(self, batch: list[tuple[Slot, int]]) -> StepOutcome:
        """Apply a planned batch: prompt progress, one token per generating slot, completions (slot freed)."""
        out = StepOutcome()
        for slot, t in batch:
            r = slot.req
            assert r is not None
            if r.n_past < r.prompt:
                r.n_past += t
                if r.n_past < r.prompt:
                    continue
            else:
                r.n_past += 1
            r.generated += 1
            out.emitted[r.id] = 1
            if r.generated == 1:
                out.first_token_ids.append(r.id)
            if r.generated >= r.target:
                out.finished_ids.append(r.id)
                slot.cached = tuple(r.keys)
                slot.req = None
                slot.last_used = (self.steps, slot.id)  # released in slot order within the step
        self.steps += 1
        self._assign()
        return out


def split_ubatches(entries: list[tuple[int, int]], n_ubatch: int, equal_seqs: bool) -> list[list[tuple[int, int, int]]]:
    """Cut a batch into micro-batches as llama.cpp's batch allocator does.

    `entries` are (sequence id, tokens) in batch order, each sequence's tokens contiguous. Returns one
    list per micro-batch of (entry index, first token offset, tokens). `equal_seqs=False` is
    `split_simple` (consecutive tokens up to `n_ubatch`); `True` is `split_equal(sequential)`: sequences
    taken in batch order while their ids run consecutively, the same number of tokens from each, while
    (tokens per sequence + 1) x sequences fits `n_ubatch`.
    """
    left = [t for _, t in entries]
    done = [0] * len(entries)
    out: list[list[tuple[int, int, int]]] = []
    if not equal_seqs:
        i = 0
        while i < len(entries):
            room = n_ubatch
            cur: list[tuple[int, int, int]] = []
            while i < len(entries) and room > 0:
                take = min(left[i], room)
                cur.append((i, done[i], take))
                done[i] += take
                left[i] -= take
                room -= take
                if left[i] == 0:
                    i += 1
            out.append(cur)
        return out
    while any(left):
        group: list[int] = []
        last = None
        for i, (seq, _) in enumerate(entries):
            if left[i] and (last is None or seq == last + 1):
                group.append(i)
                last = seq
                if len(group) > n_ubatch:
                    break
        k = 0
        while all(left[i] > k for i in group):
            k += 1
            if (k + 1) * len(group) > n_ubatch:
                break
        out.append([(i, done[i], k) for i in group])
        for i in group:
            done[i] += k
            left[i] -= k
    return out
