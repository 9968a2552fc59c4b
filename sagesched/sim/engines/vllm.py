"""The vLLM v1 engine as a pure state machine: one scheduler step at a time, or a jump over many.

Step semantics follow vLLM v1's scheduler: a token budget (`max_num_batched_tokens`) and a sequence
cap (`max_num_seqs`) per step; running requests first (a decode takes one token, an unfinished
prefill the rest of its prompt up to the budget: always chunked), then waiting requests while budget
remains and no request was preempted in this step; KV blocks are allocated as tokens are scheduled
and, when none are left, the most recently admitted request (in priority mode: the least urgent,
latest one) is preempted by recompute: its blocks are freed and it goes back to the head of the
waiting queue to recompute its prompt and the tokens it already generated.

The jump (`decode_run_limit` / `start_decode_run` / `finish_decode_run`, timed by
`sagesched.sim.engines.decode_run.DecodeRun`) is what makes the
simulator fast: when every running sequence is decoding and nothing waiting can be admitted, the
next steps differ only in their KV lengths, so k of them are advanced at once with the sum of their
step times in closed form (the decode step time is affine in the total KV length, checked at run
time; otherwise the k step times are summed explicitly). The run stops before the first step whose
KV allocations would not fit, and at the first completion, so it is exactly what k calls of
`plan_step`/`finish_step` would do.
"""

from __future__ import annotations

import logging
from bisect import insort
from collections import deque
from collections.abc import Hashable

from sagesched.sim.config import VllmEngineConfig
from sagesched.sim.engines.decode_run import DecodeRun
from sagesched.sim.engines.kv_cache import KvCache
from sagesched.sim.engines.types import EngineRejected, EngineRequest, StepOutcome
from sagesched.sim.perf_model import BatchShape, LLMPerfModel, StepShape

log = logging.getLogger(__name__)


class Seq:
    """Engine-side state of one request (vLLM's `Request`)."""

    __slots__ = (
        "blocks",
        "cached_tokens",
        "generated",
        "held",
        "id",
        "keys",
        "max_tokens",
        "num_computed",
        "num_tokens",
        "order",
        "pooling",
        "preemptions",
        "priority",
        "prompt_tokens",
        "reg_stop",
        "target",
    )

    def __init__(self, req: EngineRequest, order: int, keys: list[Hashable]) -> None:
        self.id = req.id
        self.prompt_tokens = req.prompt_tokens
        self.pooling = req.pooling
        self.target = 0 if req.pooling else max(1, req.output_tokens)
        self.max_tokens = req.max_tokens if req.max_tokens > 0 else self.target
        self.priority = req.priority
        self.order = order
        self.keys = keys
        self.num_tokens = req.prompt_tokens
        self.num_computed = 0
        self.generated = 0
        self.blocks = 0
        self.held: list[Hashable] = []
        self.reg_stop = False
        self.preemptions = 0
        self.cached_tokens = 0

    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.order)


class StepPlan:
    """What `plan_step` scheduled: (sequence, new tokens) pairs, the batch shape and the preempted."""

    __slots__ = ("preempted", "scheduled", "shape")

    def __init__(self, scheduled: list[tuple[Seq, int]], shape: BatchShape | StepShape, preempted: list[Seq]) -> None:
        self.scheduled = scheduled
        self.shape = shape
        self.preempted = preempted

    @property
    def batch_size(self) -> int:
        return len(self.scheduled)


class VllmEngineCore:
    """vLLM v1 scheduler + KV cache, timed by an `LLMPerfModel` (anything with `step_time_s` and
    `kv_capacity_tokens`). No clock inside: the caller times steps and passes results back.

    Counters: `preemptions`, `prefix_queries` / `prefix_hits` (blocks, counted at a request's first
    admission, so that jump and step mode count the same), `steps`, `peak_kv_blocks`.
    """

    def __init__(self, config: VllmEngineConfig, perf) -> None:
        self.config = config
        self.perf = perf
        # vLLM's --async-scheduling overlaps the CPU side of a step with the GPU side of the previous one.
        self._step_time = perf.step_time_s
        # A model that guarantees step time affine in the decode KV length (LLMPerfModel) times a
        # decode run from two evaluations; others get the affinity checked at every run's start.
        self._affine_decode = bool(getattr(perf, "decode_affine", False)) and not config.async_scheduling
        # The same two evaluations in one call, where the step time is exactly `LLMPerfModel.step_time_s`.
        self._decode_terms = perf.decode_run_terms if self._affine_decode and type(perf) is LLMPerfModel else None
        if config.async_scheduling:
            fn = getattr(perf, "step_time_async_s", None)
            if fn is None:
                raise ValueError("async_scheduling needs a performance model with step_time_async_s (LLMPerfModel)")
            self._step_time = fn
        bs = config.block_size
        if config.num_gpu_blocks is not None:
            blocks = config.num_gpu_blocks
        else:
            blocks = int(perf.kv_capacity_tokens(config.gpu_memory_utilization)) // bs
        if blocks < 1:
            raise ValueError(f"KV cache has no blocks ({blocks}); raise gpu_memory_utilization or set num_gpu_blocks")
        self.kv = KvCache(blocks, bs)
        self.bs = bs
        self.budget = config.max_num_batched_tokens
        self.max_seqs = config.max_num_seqs
        self.priority_mode = config.scheduling_policy == "priority"
        self.caching = config.enable_prefix_caching
        self.hash_ratio = config.prefix_hash_block_tokens // bs
        #: Longest prompt + output accepted (None: unchecked, see `VllmEngineConfig.max_model_len`).
        self.max_model_len: int | None = config.max_model_len
        self.running: list[Seq] = []
        self.waiting: deque[Seq] | list[Seq] = [] if self.priority_mode else deque()
        self.seqs: dict[str, Seq] = {}
        self._order = 0
        self.preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.steps = 0
        self.run: DecodeRun | None = None
        # Bumped by every state change, so that derived gauges can be cached between changes.
        self.version = 0
        self._qt_version = -1
        self._qt = (0, 0)
        # (version, steps to the first completion, KV-length residue histogram, total KV length) of
        # the running batch, all decoding: gathered by `finish_decode_run` (in its walk of the batch)
        # or `decode_run_limit`, and reused by both of them and `start_decode_run` while the version
        # is unchanged.
        self._run_shape: tuple[int, int, list[int], int] | None = None

    # -- gauges ----------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        return self.kv.used / self.kv.num_blocks

    @property
    def peak_kv_blocks(self) -> int:
        return self.kv.peak_used

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def queued_tokens(self) -> tuple[int, int]:
        """(prompt tokens not yet computed, decode tokens still expected by max_tokens) over all requests."""
        if self._qt_version == self.version:
            return self._qt
        prefill = decode = 0
        for seq in self.seqs.values():
            if not (seq.generated and seq.num_computed == seq.num_tokens - 1):
                prefill += seq.num_tokens - seq.num_computed
            if not seq.pooling and seq.max_tokens > seq.generated:
                decode += seq.max_tokens - seq.generated
        self._qt = (prefill, decode)
        self._qt_version = self.version
        return self._qt

    # -- requests --------------------------------------------------------------------------------
    def add(self, req: EngineRequest) -> None:
        """Queue a request (vLLM's add_request). EngineRejected(400) if it could never fit in the KV cache."""
        self.version += 1
        if req.id in self.seqs:
            raise ValueError(f"request {req.id} already in the engine")
        if req.prompt_tokens < 1:
            raise EngineRejected(400, f"request {req.id}: empty prompt")
        total = req.prompt_tokens + (0 if req.pooling else max(1, req.output_tokens))
        limit = self.max_model_len
        if limit is not None:
            asked = req.prompt_tokens + (0 if req.pooling else max(1, req.max_tokens or req.output_tokens))
            if asked > limit:
                raise EngineRejected(
                    400,
                    f"request {req.id}: this model's maximum context length is {limit} tokens, but the request "
                    f"asks for {asked} ({req.prompt_tokens} prompt + {asked - req.prompt_tokens} output); shorten "
                    "the prompt or lower max_tokens (or raise vllm.max_model_len)",
                )
        if -(-total // self.bs) > self.kv.num_blocks:
            raise EngineRejected(
                400,
                f"request needs {total} tokens of KV cache but the engine holds {self.kv.num_blocks * self.bs}",
            )
        keys: list[Hashable] = []
        if self.caching and req.prefix_hashes and not req.pooling:
            ratio = self.hash_ratio
            hashes = req.prefix_hashes
            n = min(len(hashes) * ratio, req.prompt_tokens // self.bs)
            keys = [(hashes[i // ratio], i % ratio) for i in range(n)]
        seq = Seq(req, self._order, keys)
        self._order += 1
        self.seqs[req.id] = seq
        self._enqueue(seq, front=False)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is, freeing its blocks; False if unknown."""
        self.version += 1
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        if seq in self.running:
            self.running.remove(seq)
            self._free(seq)
        else:
            self.waiting.remove(seq)
        return True

    def seq(self, request_id: str) -> Seq:
        return self.seqs[request_id]

    def _enqueue(self, seq: Seq, front: bool) -> None:
        if self.priority_mode:
            insort(self.waiting, seq, key=Seq.sort_key)  # type: ignore[arg-type]
        elif front:
            self.waiting.appendleft(seq)  # type: ignore[union-attr]
        else:
            self.waiting.append(seq)

    def _free(self, seq: Seq) -> None:
        if seq.held:
            self.kv.release(seq.held)
        self.kv.free_private(seq.blocks - len(seq.held))
        seq.blocks = 0
        seq.held = []

    def _preempt(self, seq: Seq) -> None:
        if self.caching and not seq.pooling and not seq.reg_stop:
            # vLLM hashes every full block of prompt and output: the preempted request's own blocks stay
            # cached (evictable) and its recompute re-hits them unless they were evicted meanwhile.
            # Only this request can hit them, so keying them now is the same as keying them when computed.
            full = seq.num_computed // self.bs
            if len(seq.keys) < full:
                seq.keys = seq.keys + [(seq.id, "own", b) for b in range(len(seq.keys), full)]
            if len(seq.held) < full:
                self._register(seq, seq.num_computed)
        self._free(seq)
        seq.num_computed = 0
        seq.reg_stop = False
        seq.preemptions += 1
        self.preemptions += 1
        self._enqueue(seq, front=True)

    def _victim(self) -> Seq:
        if self.priority_mode:
            return max(self.running, key=Seq.sort_key)
        return self.running[-1]

    def _admission(self, seq: Seq, budget: int) -> tuple[int, int, int] | None:
        """(cache hits in blocks, new tokens, new blocks) to admit `seq` now, or None if the KV cache can't."""
        hits = evictable = 0
        if seq.keys:
            hits, evictable = self.kv.lookup(seq.keys, (seq.num_tokens - 1) // self.bs)
        computed = hits * self.bs
        num_new = seq.num_tokens - computed
        if num_new > budget:
            num_new = budget
        need = -(-(computed + num_new) // self.bs) - hits
        kv = self.kv
        if need + evictable > kv.num_blocks - kv.used:  # kv.free_blocks (hot)
            return None
        return hits, num_new, need

    # -- one step --------------------------------------------------------------------------------
    def plan_step(self) -> StepPlan | None:
        """Schedule the next step (allocating KV, preempting if needed); None when there is nothing to run."""
        self.version += 1
        running = self.running
        if not running and not self.waiting:
            return None
        kv = self.kv
        bs = self.bs
        budget = self.budget
        scheduled: list[tuple[Seq, int]] = []
        preempted: list[Seq] = []
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            num_new = seq.num_tokens - seq.num_computed
            if num_new > budget:
                num_new = budget
            need = -(-(seq.num_computed + num_new) // bs) - seq.blocks
            ok = True
            while need > kv.num_blocks - kv.used:  # kv.free_blocks, without the property call (hot)
                victim = self._victim()
                j = running.index(victim)
                running.pop(j)
                if any(s is victim for s, _ in scheduled):
                    budget += next(t for s, t in scheduled if s is victim)
                    scheduled = [(s, t) for s, t in scheduled if s is not victim]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    ok = False
                    break
                if j < i:
                    i -= 1
            if not ok:
                continue
            if need > 0:
                kv.allocate(need)
                seq.blocks += need
            if seq.keys and not seq.reg_stop and len(seq.held) < len(seq.keys):
                self._register(seq, seq.num_computed + num_new)
            scheduled.append((seq, num_new))
            budget -= num_new
            i += 1
        if not preempted:
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < self.max_seqs:
                seq = waiting[0]
                admit = self._admission(seq, budget)
                if admit is None:
                    break
                hits, num_new, need = admit
                if self.priority_mode:
                    waiting.pop(0)  # type: ignore[call-arg]
                else:
                    waiting.popleft()  # type: ignore[union-attr]
                if hits:
                    held = seq.keys[:hits]
                    kv.acquire(held)
                    seq.held = list(held)
                    seq.blocks = hits
                    seq.num_computed = hits * bs
                    if seq.preemptions == 0:
                        self.prefix_hits += hits
                        seq.cached_tokens = hits * bs
                if seq.keys and seq.preemptions == 0:
                    # Counted once per admission (not per lookup), so jump and step mode agree.
                    self.prefix_queries += len(seq.keys)
                kv.allocate(need)
                seq.blocks += need
                if seq.keys and not seq.reg_stop and len(seq.held) < len(seq.keys):
                    # vLLM v1 caches a block's hash when it is allocated: a request admitted later in
                    # this step (or the next) already hits it.
                    self._register(seq, seq.num_computed + num_new)
                running.append(seq)
                scheduled.append((seq, num_new))
                budget -= num_new
        if not scheduled:
            if preempted:
                return StepPlan([], BatchShape(), preempted)
            return None
        pf = pf_ctx = n_pf = dec = dec_ctx = 0
        pairs = 0.0
        for seq, num_new in scheduled:
            if seq.generated and seq.num_computed == seq.num_tokens - 1:
                dec += 1
                dec_ctx += seq.num_tokens
            else:
                pf += num_new
                length = seq.num_computed + num_new
                pf_ctx += length
                n_pf += 1
                # Exact causal attention work of this chunk: c (L - c/2) (query, key) pairs.
                pairs += num_new * (length - 0.5 * num_new)
        return StepPlan(scheduled, StepShape(pf, dec, pf_ctx, dec_ctx, n_pf, pairs), preempted)

    def step_time_s(self, plan: StepPlan) -> float:
        return self._step_time(plan.shape)

    def finish_step(self, plan: StepPlan, now: float = 0.0) -> StepOutcome:
        """Apply a planned step's results: computed tokens, emitted tokens, completions (blocks freed)."""
        self.version += 1
        out = StepOutcome(preempted_ids=[s.id for s in plan.preempted])
        emitted = out.emitted
        finished: list[Seq] = []
        for seq, num_new in plan.scheduled:
            seq.num_computed += num_new
            if seq.num_computed >= seq.num_tokens:
                if seq.pooling:
                    out.first_token_ids.append(seq.id)
                    finished.append(seq)
                    continue
                seq.generated += 1
                seq.num_tokens += 1
                emitted[seq.id] = 1
                if seq.generated == 1:
                    out.first_token_ids.append(seq.id)
                if seq.generated >= seq.target:
                    finished.append(seq)
        for seq in finished:
            self.running.remove(seq)
            self._free(seq)
            del self.seqs[seq.id]
            out.finished_ids.append(seq.id)
        self.steps += 1
        return out

    def _register(self, seq: Seq, tokens: int) -> None:
        """Cache the full blocks among `seq`'s first `tokens` tokens under their keys (as vLLM v1 does
        when it allocates them); stops at the first key another block already holds."""
        upto = min(tokens // self.bs, len(seq.keys))
        for idx in range(len(seq.held), upto):
            key = seq.keys[idx]
            if self.kv.register(key):
                seq.held.append(key)
            else:
                seq.reg_stop = True
                return

    # -- a jump over pure-decode steps -----------------------------------------------------------
    def decode_run_limit(self) -> int:
        """How many next steps are pure decode with an unchanged batch (0: plan a normal step).

        Every running sequence must be decoding, the waiting head must be inadmissible (it stays so
        while blocks only get used up), and the run stops at the first completion and before the
        first step whose block allocations would exceed the free blocks (that step preempts).
        """
        running = self.running
        n = len(running)
        if n == 0 or n > self.budget:
            return 0
        shape = self._run_shape
        if shape is not None and shape[0] == self.version:
            # Nothing changed since the shape was gathered (just after a decode run: its survivors
            # all decode, and the run gathered them in its own walk of the batch).
            _, k, cnt, ctx = shape
        else:
            k = 1 << 60
            bs = self.bs
            cnt = [0] * bs
            ctx = 0
            for seq in running:
                if not seq.generated or seq.num_tokens - seq.num_computed != 1:
                    return 0
                r = seq.target - seq.generated
                if r < k:
                    k = r
                # The run's shape, for `start_decode_run` (gathered here to walk the batch once).
                cnt[-seq.num_computed % bs] += 1
                ctx += seq.num_tokens
            self._run_shape = (self.version, k, cnt, ctx)
        if self.waiting and n < self.max_seqs and self._admission(self.waiting[0], self.budget - n) is not None:
            return 0
        return k

    def start_decode_run(self, k: int, factor: float = 1.0) -> DecodeRun:
        """Prepare up to `k` pure-decode steps (fewer if KV blocks run out first) and time them."""
        bs = self.bs
        shape = self._run_shape
        if shape is not None and shape[0] == self.version:  # nothing changed since it was gathered
            _, _, cnt, ctx = shape
        else:
            cnt = [0] * bs
            ctx = 0
            for seq in self.running:
                cnt[-seq.num_computed % bs] += 1
                ctx += seq.num_tokens
        self._run_shape = None
        n = len(self.running)
        run = DecodeRun(n, k, cnt, bs, self.kv.used)
        free = self.kv.free_blocks
        # Each sequence allocates at most (k - 1) // bs + 1 blocks in k steps; only near a full cache
        # is the exact count (and a search for the last step that fits) needed.
        if n * ((k - 1) // bs + 1) > free and run.alloc_cum(k - 1) > free:
            lo, hi = 0, k - 1  # the largest m with alloc_cum(m - 1) <= free
            while hi > lo:
                mid = (lo + hi + 1) >> 1
                if run.alloc_cum(mid - 1) <= free:
                    lo = mid
                else:
                    hi = mid - 1
            run.k = k = lo
        if k == 0:
            return run
        run.factor = factor
        terms = self._decode_terms
        if terms is not None and k > 1:
            run.a, run.d = terms(n, ctx)
            self.run = run
            return run
        step = self._step_time
        decode = StepShape(0, n, 0, ctx, 0, 0.0)  # one shape for every evaluation below
        a = step(decode)
        if k > 1:
            decode.decode_context_tokens = ctx + n
            d = step(decode) - a
            if self._affine_decode:
                run.a, run.d = a, d
                self.run = run
                return run
            decode.decode_context_tokens = ctx + n * (k - 1)
            last = step(decode)
            if abs(a + d * (k - 1) - last) <= 1e-9 * max(abs(last), 1e-12):
                run.a, run.d = a, d
            else:  # not affine in the KV length: sum the step times explicitly
                cum = [0.0]
                total = 0.0
                for j in range(k):
                    decode.decode_context_tokens = ctx + n * j
                    total += factor * step(decode)
                    cum.append(total)
                run.cum = cum
        else:
            run.a = a
        self.run = run
        return run

    def kv_used_during(self, run: DecodeRun, steps_done: int) -> int:
        """Blocks in use while step `steps_done` of the run is executing (its allocation done)."""
        return run.used0 + run.alloc_cum(min(steps_done, run.k - 1))

    def finish_decode_run(self, run: DecodeRun, m: int) -> StepOutcome:
        """Apply the first `m` steps of `run` (m <= run.k): every sequence gains m tokens.

        Keeps `queued_tokens`'s cache current when it was: every running sequence is decoding (a
        run's precondition), so no prompt tokens change and each sequence's expected decode tokens
        drop by what it generated (all of what is left of a finished one). This loop walks them
        anyway; a full recount per snapshot was ~2% of a light-load simulation.
        """
        cached = self._qt_version == self.version
        self.version += 1
        self.run = None
        out = StepOutcome(steps=m)
        if m <= 0:
            if cached:
                self._qt_version = self.version
            return out
        bs = self.bs
        kv = self.kv
        kv.allocate(run.alloc_cum(m - 1))
        emitted = out.emitted
        finished: list[Seq] = []
        dropped = 0  # expected decode tokens no longer outstanding
        # The next run's shape over the sequences that go on (what `decode_run_limit` would gather
        # in a second walk of the batch): all of them are still decoding.
        k = 1 << 60
        cnt = [0] * bs
        ctx = 0
        for seq in self.running:
            generated = seq.generated
            left = seq.max_tokens - generated
            computed = seq.num_computed + m
            seq.num_computed = computed
            tokens = seq.num_tokens + m
            seq.num_tokens = tokens
            generated += m
            seq.generated = generated
            seq.blocks = -(-computed // bs)
            emitted[seq.id] = m
            if left > 0:
                dropped += left if left < m else m
            r = seq.target - generated
            if r <= 0:
                finished.append(seq)
                if left > m:
                    dropped += left - m  # the rest of a finished sequence's max_tokens
            else:
                if r < k:
                    k = r
                cnt[-computed % bs] += 1
                ctx += tokens
        for seq in finished:
            self.running.remove(seq)
            self._free(seq)
            del self.seqs[seq.id]
            out.finished_ids.append(seq.id)
        self.steps += m
        if cached:
            prefill, decode = self._qt
            self._qt = (prefill, decode - dropped)
            self._qt_version = self.version
        self._run_shape = (self.version, k, cnt, ctx)
        return out
