"""llama.cpp's llama-server as a pure state machine: slots, a shared token batch, slot prompt caches.

What it models (llama-server's `server_context::update_slots`):
- `n_parallel` slots (`-np`), each with `n_ctx / n_parallel` tokens of context. A request takes an idle
  slot: the one whose cached tokens share the longest prefix with its prompt (the slot prompt cache),
  else the least recently used. With every slot busy it waits in a FIFO queue (llama-server's
  deferred tasks), or, with `reject_when_busy`, is refused with 503 as a server configured to shed does.
- A prompt that cannot fit its slot's context is refused with 400; generation stops when the slot's
  context is full (no context shift).
- Each step is one `llama_decode` call: one token for every generating slot first, then prompt tokens
  of the slots still processing their prompt, in slot order, while the batch holds fewer than `n_batch`
  tokens (prompts are processed in chunks); the batch runs as ceil(tokens / n_ubatch) physical
  micro-batches. The first token comes with the step that finishes the prompt.
- On reuse, a slot keeps the common prefix of its cached tokens and the new prompt (at most prompt - 1,
  so at least one token is evaluated) and evaluates the rest.

Timing: `perf.step_time_s(BatchShape)` for each micro-batch (any `LLMPerfModel`-like object, e.g.
`AffineStepModel` fitted by probes of a real llama-server).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

from sagesched.sim.engines.types import EngineRejected, EngineRequest, StepOutcome
from sagesched.sim.perf_model import BatchShape


@dataclass(frozen=True)
class LlamaCppConfig:
    """llama-server knobs (defaults: its CLI defaults for `-np 4 -c 8192`).

    n_parallel: slots (`-np`); n_ctx: total context (`-c`), split evenly over the slots;
    n_batch / n_ubatch: logical and physical batch sizes in tokens (`-b`, `-ub`);
    prefix_block_tokens: tokens per entry of `EngineRequest.prefix_hashes` (prompt-cache granularity);
    cache_prompt: reuse a slot's cached prefix; reject_when_busy: 503 instead of queueing.
    """

    n_parallel: int = 4
    n_ctx: int = 8192
    n_batch: int = 2048
    n_ubatch: int = 512
    prefix_block_tokens: int = 16
    cache_prompt: bool = True
    reject_when_busy: bool = False

    def __post_init__(self) -> None:
        for name in ("n_parallel", "n_ctx", "n_batch", "n_ubatch", "prefix_block_tokens"):
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
        self.last_used = -1
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

    Counters: `steps`, `ubatches`, `rejected_503`, `prompt_cache_tokens` (prompt tokens reused).
    """

    def __init__(self, config: LlamaCppConfig, perf) -> None:
        self.config = config
        self.perf = perf
        self.slot_ctx = config.n_ctx // config.n_parallel
        self.slots = [Slot(i) for i in range(config.n_parallel)]
        self.waiting: deque[tuple[EngineRequest, int]] = deque()
        self.steps = 0
        self.ubatches = 0
        self.rejected_503 = 0
        self.prompt_cache_tokens = 0
        self._clock = 0

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
        target = min(max(1, req.output_tokens), want, self.slot_ctx - req.prompt_tokens)
        idle = [s for s in self.slots if s.req is None]
        if not idle and self.config.reject_when_busy:
            self.rejected_503 += 1
            raise EngineRejected(503, f"no slot available ({self.config.n_parallel} busy); retry later")
        self.waiting.append((req, target))
        self._assign()

    def _assign(self) -> None:
        while self.waiting:
            idle = [s for s in self.slots if s.req is None]
            if not idle:
                return
            req, target = self.waiting.popleft()
            keys = req.prefix_hashes

            def common(slot: Slot, keys=keys) -> int:
                n = 0
                for a, b in zip(slot.cached, keys, strict=False):
                    if a != b:
                        break
                    n += 1
                return n

            best = max(idle, key=lambda s: (common(s), -s.last_used)) if self.config.cache_prompt else None
            if best is None or common(best) == 0:
                best = min(idle, key=lambda s: s.last_used)
            sr = SlotRequest(req, target)
            if self.config.cache_prompt:
                reuse = min(common(best) * self.config.prefix_block_tokens, req.prompt_tokens - 1)
                sr.n_past = sr.cached_tokens = max(0, reuse)
                self.prompt_cache_tokens += sr.n_past
            best.req = sr
            self._clock += 1
            best.last_used = self._clock

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
            take = min(r.prompt - r.n_past, self.config.n_batch - used)
            batch.append((slot, take))
            used += take
        return batch or None

    def step_time_s(self, batch: list[tuple[Slot, int]]) -> float:
        """Sum over the physical micro-batches (n_ubatch tokens each) of the perf model's step time."""
        total = sum(t for _, t in batch)
        if total == 0:
            return 0.0
        dec = pf = dec_ctx = pf_ctx = n_pf = 0
        pairs = 0.0
        for slot, t in batch:
            r = slot.req
            assert r is not None  # a planned batch holds busy slots only
            if r.n_past >= r.prompt:
                dec += 1
                dec_ctx += r.prompt + r.generated
            else:
                pf += t
                pf_ctx += r.n_past + t
                n_pf += 1
                pairs += t * (r.n_past + t - 0.5 * t)
        n_ub = math.ceil(total / self.config.n_ubatch)
        shape = BatchShape(
            prefill_tokens=math.ceil(pf / n_ub),
            decode_tokens=math.ceil(dec / n_ub),
            prefill_context_tokens=math.ceil(pf_ctx / n_ub),
            decode_context_tokens=math.ceil(dec_ctx / n_ub),
            num_prefills=n_pf,
            prefill_attention_pairs=pairs / n_ub,
        )
        return n_ub * self.perf.step_time_s(shape)

    def finish_step(self, batch: list[tuple[Slot, int]]) -> StepOutcome:
        """Apply a planned batch: prompt progress, one token per generating slot, completions (slot freed)."""
        out = StepOutcome()
        self.ubatches += math.ceil(sum(t for _, t in batch) / self.config.n_ubatch)
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
        self.steps += 1
        self._assign()
        return out


@dataclass(frozen=True)
class AffineStepModel:
    """A step-time model for a CPU (or any device without profiles), fitted by probes of a real server:

    t = step_s + prefill_token_s x prefill tokens + decode_seq_s x decode sequences
        + context_pair_s x (query, key) pairs attended (decode context + prefill attention pairs)

    Non-decreasing in every batch term, so llama.cpp's micro-batch sums stay monotone.
    """

    step_s: float
    prefill_token_s: float
    decode_seq_s: float
    context_pair_s: float

    def step_time_s(self, b: BatchShape) -> float:
        if b.prefill_tokens + b.decode_tokens == 0:
            return 0.0
        return (
            self.step_s
            + self.prefill_token_s * b.prefill_tokens
            + self.decode_seq_s * b.decode_tokens
            + self.context_pair_s * (b.decode_context_tokens + b.prefill_attention_pairs)
        )
