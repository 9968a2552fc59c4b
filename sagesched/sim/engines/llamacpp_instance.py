"""A llama-server instance in the cluster simulator: `LlamaCppEngineCore` behind the vLLM core's interface.

Why an adapter rather than a new segment type: the cluster driver (`sim/cluster.py`, `sim/segments.py`)
runs an instance's LLM engine through a handful of calls (add, plan_step, step_time_s, finish_step,
queued_tokens, decode_run_limit, the gauges). Answering them for llama-server's slot scheduler lets a
cluster entry with `engine: llamacpp` run beside vLLM and TEI instances with no branch on the vLLM path.

What it adds to the core:
- **Event order of the single-server driver** (`llamacpp_driver.replay_llamacpp`): requests that reach
  the server while a step runs, or at the very instant it ends, join before the next step is planned,
  as llama-server picks new tasks up between `llama_decode` calls. Requests arriving during a step are
  held (`pending`) and handed to the core after the step's slots are released; and every step (and
  every start from idle) is preceded by a zero-length *sync* segment, a SimPy event at the same
  instant, so that everything else due at that instant (arrivals, other instances' completions and
  the dispatches they cause) lands first.
- **Step by step in both modes**: `decode_run_limit` is 0, so jump mode runs the same segments as
  step mode (llama.cpp's per-step cost depends on slot ids and micro-batch splits; a closed-form jump
  over its decode steps is not worth it on the small CPU runs this models).
- **Views**: running / waiting requests (a request waits in llama-server's deferred queue until a slot
  frees), queued prompt tokens and decode tokens (up to `max_tokens`), KV cells in use over `n_ctx`,
  and for the policy's wait predictions a prefill rate and decode step time from the calibration.
- **Embedding servers** (`--embeddings`, kind `embedding`): a call with k inputs is k slot tasks (the
  tokens split evenly, as the live driver splits them), done when the last input is.
- **A shared host** (optional, `llamacpp.host`): servers on one machine share its cores; while k of
  them run a step, each step runs at 1 / max(1, k / host_cpus) of its calibrated speed, and every
  start or end of a step on the host re-times the others' steps in flight with their work conserved
  (a probe calibration describes a server alone on its core).
- **503**: with `reject_when_busy` a request that reaches the server with every slot busy or claimed
  is refused (llama-server's own default, and this model's, is to queue it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from sagesched.sim.engines.llamacpp import LlamaCppConfig, LlamaCppEngineCore, Slot
from sagesched.sim.engines.llamacpp_perf import LlamaCppCalibration, UBatch, load_llamacpp_calibration
from sagesched.sim.engines.types import EngineRejected, EngineRequest, StepOutcome

#: Context per slot when an entry gives no n_ctx (`sagesched.live.real_backends.DEFAULT_SLOT_CONTEXT`).
DEFAULT_SLOT_CONTEXT = 2048
#: The prompt whose processing rate the views quote (tokens/s of one slot computing it alone).
RATE_PROMPT_TOKENS = 256
#: The context of the single decoding slot whose step time the views quote.
RATE_DECODE_CONTEXT = 256
_SUB = "\x00"  # separates an embedding request's id from its input index in the core's ids


#: Tokens per entry of `Request.prefix_hashes` when an entry does not say (the traces' Mooncake block).
PREFIX_BLOCK_TOKENS = 512


def prefix_block_tokens(entry: Any) -> int:
    """The hash granularity of a `llamacpp:` section: its `prefix_block_tokens`, else the traces' 512."""
    return int(entry.prefix_block_tokens) if entry.prefix_block_tokens is not None else PREFIX_BLOCK_TOKENS


def engine_config(entry: Any, embeddings: bool, calibration: LlamaCppCalibration) -> LlamaCppConfig:
    """The `LlamaCppConfig` of a cluster entry's `llamacpp:` section (`LlamaCppInstanceConfig`)."""
    n_ctx = entry.n_ctx if entry.n_ctx is not None else DEFAULT_SLOT_CONTEXT * entry.n_parallel
    if embeddings:  # real_backends: -b n_ctx -ub min(n_ctx, 2048), one input per physical batch
        n_batch = entry.n_batch if entry.n_batch is not None else n_ctx
        n_ubatch = entry.n_ubatch if entry.n_ubatch is not None else min(n_ctx, DEFAULT_SLOT_CONTEXT)
    else:
        n_batch = entry.n_batch if entry.n_batch is not None else 2048
        n_ubatch = entry.n_ubatch if entry.n_ubatch is not None else 512
    n_ubatch = min(n_ubatch, n_batch)  # llama.cpp clamps the physical batch to the logical one
    tail = entry.checkpoint_tail_tokens
    if tail is None:
        tail = int((calibration.server or {}).get("checkpoint_tail_tokens", 0))
    return LlamaCppConfig(
        n_parallel=entry.n_parallel,
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        prefix_block_tokens=prefix_block_tokens(entry),
        cache_prompt=entry.cache_prompt,
        reject_when_busy=entry.reject_when_busy,
        slot_prompt_similarity=entry.slot_prompt_similarity,
        kv_unified=entry.kv_unified,
        embeddings=embeddings,
        checkpoint_tail_tokens=tail,
        kv_pad=entry.kv_pad,
    )


class LlamaCppPerf:
    """The calibration as the cluster reads a perf model: the step model, the frontend cost, view rates.

    `frontend_s` is the calibration's client-visible cost per request (added to first token and finish
    after the run, `sim/frontend.py`, as `replay_llamacpp` adds it), embeddings included.
    """

    frontend_covers_embeddings = True

    def __init__(self, calibration: LlamaCppCalibration, config: LlamaCppConfig) -> None:
        self.calibration = calibration
        self.step = calibration.step
        self.config = config
        fe = float(calibration.frontend_request_s)
        self.frontend_request_s = fe
        pad = config.kv_pad

        def padded(n: int) -> int:
            return -(-n // pad) * pad

        p = min(RATE_PROMPT_TOKENS, config.n_ubatch, config.n_ctx // config.n_parallel - 1)
        outputs = 0 if config.embeddings else 1
        prompt = UBatch(p, outputs, 1, float(p * padded(p)), 0, p, 0.0)
        self.prefill_tokens_per_s = p / self.step.ubatches_time_s([prompt])
        kv = padded(RATE_DECODE_CONTEXT)
        decode = UBatch(1, 1, 1, float(kv), 1, 0, float(kv))
        self.decode_step_s = self.step.ubatches_time_s([decode])
        self.tokens_per_s = self.prefill_tokens_per_s  # an embedding server's rate, as TEI's perf model names it

    def ubatches_time_s(self, ubatches: list[UBatch]) -> float:
        return self.step.ubatches_time_s(ubatches)

    def frontend_s(self, prompt_tokens: int, running: int) -> float:
        return self.frontend_request_s


@lru_cache(maxsize=32)
def _calibration(name: str) -> LlamaCppCalibration:
    return load_llamacpp_calibration(name)


def load_llamacpp_perf(cfg: Any) -> LlamaCppPerf:
    """The perf model of an `engine: llamacpp` instance (`InstanceConfig`); errors name the entry's fix.
    Cached by (id, kind, llamacpp section): bounds ask it once per request."""
    from sagesched.core import InstanceKind

    return _perf(str(cfg.id), cfg.kind is InstanceKind.EMBEDDING, cfg.kind.value, cfg.llamacpp)


@lru_cache(maxsize=64)
def _perf(ident: str, embeddings: bool, kind: str, entry: Any) -> LlamaCppPerf:
    from sagesched.sim.engines.llamacpp_perf import CalibrationFileError

    try:
        cal = _calibration(str(entry.calibration))
    except CalibrationFileError as exc:
        raise CalibrationFileError(f"instance {ident}: llamacpp.calibration: {exc}") from None
    server = cal.server or {}
    if "embeddings" in server and bool(server["embeddings"]) != embeddings:
        want = "an embedding" if embeddings else "a chat"
        raise ValueError(
            f"instance {ident}: llamacpp.calibration {entry.calibration!r} was probed on "
            f"{'an embedding' if server['embeddings'] else 'a chat'} server, but kind {kind} is {want} "
            "server; give the calibration probed on that kind of server"
        )
    return LlamaCppPerf(cal, engine_config(entry, embeddings, cal))


class _Sync:
    """The zero-length segment before a step (see the module docstring)."""

    __slots__ = ()
    preempted: tuple = ()
    batch_size = 0


SYNC = _Sync()


class LlamaCppPlan:
    """A planned `llama_decode` batch: (slot, tokens) pairs."""

    __slots__ = ("batch", "batch_size", "preempted", "time_s")

    def __init__(self, batch: list[tuple[Slot, int]]) -> None:
        self.batch = batch
        self.batch_size = len(batch)
        self.preempted: tuple = ()
        self.time_s: float | None = None  # set when the step starts (`step_time_s`)


@dataclass
class LlamaCppSeq:
    """What the driver reads of a finished request (`Simulator._complete`)."""

    generated: int = 0
    cached_tokens: int = 0
    preemptions: int = 0


class _KvGauge:
    """KV cells in use (tokens in the slots) over n_ctx, shaped as the vLLM core's `kv` for the driver."""

    __slots__ = ("core", "num_blocks", "peak_used")

    def __init__(self, core: LlamaCppEngineCore) -> None:
        self.core = core
        self.num_blocks = core.config.n_ctx
        self.peak_used = 0

    @property
    def used(self) -> int:
        return sum(s.req.n_past for s in self.core.slots if s.req is not None)


def split_inputs(total: int, n: int) -> list[int]:
    """Spread `total` tokens over `n` inputs as the live driver does (the first ones one longer)."""
    base, extra = divmod(max(total, n), n)
    return [base + 1 if i < extra else base for i in range(n)]


class CpuHost:
    """The cores several simulated llama-servers share (`llamacpp.host`).

    Processor sharing: while `busy` of its servers run a step, each runs at 1 / `factor()` of full
    speed. A step's end is scheduled at the factor of its start; when a step starts or ends, the
    others' steps in flight are re-timed (`retime`): their remaining work runs at the new factor.
    """

    __slots__ = ("busy", "cpus", "members", "name", "sim")

    def __init__(self, name: str, cpus: int) -> None:
        self.name = name
        self.cpus = cpus
        self.busy = 0
        self.members: list[tuple[Any, LlamaCppInstanceCore]] = []  # (InstanceState, its core)
        self.sim: Any = None  # the Simulator: its clock, and `_llm_done` for re-timed step ends

    def factor(self) -> float:
        return max(1.0, self.busy / self.cpus)

    def now(self) -> float:
        return float(self.sim.env.now)

    def changed(self, source: LlamaCppInstanceCore) -> None:
        """`source` started or ended a step: re-time every other member's step in flight."""
        new = self.factor()
        for inst, core in self.members:
            if core is not source and core.step_end is not None and core.factor != new:
                self._retime(inst, core, new)

    def _retime(self, inst: Any, core: LlamaCppInstanceCore, new: float) -> None:
        now = self.now()
        end = core.step_end
        assert end is not None
        old, core.factor = core.factor, new
        if end <= now:
            return  # due now: its end event is already on its way
        core.step_end = end = now + (end - now) * (new / old)
        sim = self.sim
        if inst.llm_event is not None:
            inst.llm_event.callbacks.clear()  # superseded (`_llm_done` would ignore it: not `llm_event`)
        ev = sim.env.timeout(end - now)
        ev.callbacks.append(inst.llm_done_cb)
        inst.llm_event = ev


class LlamaCppInstanceCore:
    """llama-server's slot scheduler, driven by the cluster simulator as it drives `VllmEngineCore`.

    `embedding_inputs(request id) -> inputs` tells an embedding server how many inputs a call carries
    (the simulator binds it to its requests); without it a call is one input.
    """

    def __init__(self, perf: LlamaCppPerf) -> None:
        self.perf = perf
        self.config = perf.config
        # The 503 check is made when a request reaches the server (`add`), not when it is handed over.
        self.core = LlamaCppEngineCore(replace(perf.config, reject_when_busy=False), perf)
        self.kv = _KvGauge(self.core)
        self.embeddings = perf.config.embeddings
        self.embedding_inputs: Callable[[str], int] | None = None
        self.seqs: dict[str, LlamaCppSeq] = {}
        self.max_tokens: dict[str, int] = {}
        self.parts_left: dict[str, int] = {}  # embedding request -> inputs not finished yet
        self.pending: list[EngineRequest] = []  # reached the server while a segment ran
        self.in_segment = False
        self.synced = False
        self.preemptions = 0
        self.host: CpuHost | None = None  # set by `bind_llamacpp` for servers that share a host
        self.factor = 1.0  # the step in flight's CPU-sharing stretch now
        self.step_end: float | None = None  # when the step in flight ends (servers on a shared host)
        self.step_plan: LlamaCppPlan | None = None  # the step in flight (not a sync segment)
        self.rejected_503 = 0

    # -- gauges (what `Simulator._load` and the timeline read) -------------------------------------
    @property
    def steps(self) -> int:
        return self.core.steps

    @property
    def prefix_queries(self) -> int:
        """Prompt tokens of the requests placed in slots (the prompt cache's queries, in tokens)."""
        return self._prompt_tokens_placed

    @property
    def prefix_hits(self) -> int:
        """Prompt tokens reused from a slot's cache."""
        return self.core.prompt_cache_tokens

    _prompt_tokens_placed = 0

    def _parent(self, rid: str) -> str:
        return rid.split(_SUB, 1)[0] if self.embeddings else rid

    @property
    def running(self) -> list[str]:
        """Requests with a slot (an embedding call once any of its inputs has one)."""
        ids = [self._parent(s.req.id) for s in self.core.slots if s.req is not None]
        return list(dict.fromkeys(ids)) if self.embeddings else ids

    @property
    def waiting(self) -> list[str]:
        """Requests with no slot yet: llama-server's deferred queue and those not picked up yet."""
        ids = [self._parent(r.id) for r, _ in self.core.waiting] + [self._parent(r.id) for r in self.pending]
        if not self.embeddings:
            return ids
        busy = set(self.running)
        return [i for i in dict.fromkeys(ids) if i not in busy]

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def queued_tokens(self) -> tuple[int, int]:
        """(prompt tokens not computed yet, output tokens still expected up to max_tokens)."""
        prefill = decode = 0
        for slot in self.core.slots:
            r = slot.req
            if r is None:
                continue
            if r.n_past < r.prompt:
                prefill += r.prompt - r.n_past
            if not self.embeddings:
                decode += max(0, self.max_tokens[r.id] - r.generated)
        for req in [r for r, _ in self.core.waiting] + self.pending:
            prefill += req.prompt_tokens
            if not self.embeddings:
                decode += self.max_tokens[req.id]
        return prefill, decode

    # -- requests ----------------------------------------------------------------------------------
    def seq(self, request_id: str) -> LlamaCppSeq:
        return self.seqs[request_id]

    def add(self, req: EngineRequest) -> None:
        """A request reaches the server. EngineRejected 400 (an empty prompt, a prompt or input longer than
        a slot's context) or 503 (`reject_when_busy` and every slot busy or claimed by a request ahead)."""
        if req.id in self.seqs:
            raise ValueError(f"request {req.id} already in the engine")
        core = self.core
        if self.embeddings:
            n = max(1, self.embedding_inputs(req.id)) if self.embedding_inputs is not None else 1
            sizes = split_inputs(req.prompt_tokens, n)
            parts = [
                EngineRequest(id=f"{req.id}{_SUB}{i}", prompt_tokens=size, output_tokens=1, pooling=True)
                for i, size in enumerate(sizes)
            ]
        else:
            parts = [req]
        for part in parts:
            if part.prompt_tokens < 1:
                # As the core's own check, but here, before the request is registered: a request held in
                # `pending` reaches the core only when the segment in flight ends, outside the driver's
                # handling of backend refusals.
                raise EngineRejected(400, f"request {req.id}: empty prompt")
            if part.prompt_tokens >= core.slot_ctx:
                raise EngineRejected(
                    400,
                    f"request {req.id}: the {'input' if self.embeddings else 'prompt'} ({part.prompt_tokens} tokens) "
                    f"exceeds the available context size ({core.slot_ctx} tokens per slot = n_ctx / n_parallel); "
                    "raise llamacpp.n_ctx or lower llamacpp.n_parallel",
                )
            if self.embeddings and part.prompt_tokens > self.config.n_ubatch:
                # llama-server pools an input in one physical batch, and answers 500 when it is longer
                raise EngineRejected(
                    500,
                    f"request {req.id}: input ({part.prompt_tokens} tokens) is too large to process; increase the "
                    f"physical batch size (llamacpp.n_ubatch, now {self.config.n_ubatch})",
                )
        if self.config.reject_when_busy:
            # As the single-server driver decides: when the server loop picks the request up, after the
            # step in flight has released the slots of the requests it finishes.
            busy = sum(s.req is not None for s in core.slots) - self._freed_by_step()
            claimed = len(self.pending) + len(core.waiting) + busy
            if claimed >= self.config.n_parallel:
                self.rejected_503 += 1
                raise EngineRejected(503, f"no slot available ({self.config.n_parallel} busy); retry later")
        self.seqs[req.id] = LlamaCppSeq()
        self.max_tokens[req.id] = max(1, req.max_tokens or req.output_tokens)
        if self.embeddings:
            self.parts_left[req.id] = len(parts)
        if self.in_segment:
            self.pending.extend(parts)
        else:
            self._admit(parts)

    def _admit(self, parts: list[EngineRequest]) -> None:
        core = self.core
        for part in parts:
            core.add(part)  # validated in `add`: queues (reject_when_busy was checked on arrival)
            self._prompt_tokens_placed += part.prompt_tokens

    # -- segments ----------------------------------------------------------------------------------
    def decode_run_limit(self) -> int:
        """0: no jumps over decode steps; jump mode runs the same steps as step mode."""
        return 0

    def plan_step(self) -> _Sync | LlamaCppPlan | None:
        """A sync segment first (see the module docstring), then the next batch; None when idle."""
        if not self.synced:
            self.synced = self.in_segment = True
            return SYNC
        batch = self.core.plan_step()
        if batch is None:
            self.synced = self.in_segment = False
            return None
        self.in_segment = True
        self.step_plan = LlamaCppPlan(batch)
        return self.step_plan

    def _freed_by_step(self) -> int:
        """Slots the step in flight frees when it ends (its requests that finish with it)."""
        plan = self.step_plan
        if plan is None:
            return 0
        n = 0
        for slot, t in plan.batch:
            r = slot.req
            if r is not None and r.n_past + t >= r.prompt and r.generated + 1 >= r.target:
                n += 1
        return n

    def step_time_s(self, plan: _Sync | LlamaCppPlan) -> float:
        """The step's time, as it starts; on a shared host at the host's factor with this step running.

        The driver calls it once per planned step when the step starts, and on a shared host that call
        is the step's start (it joins the host's busy count and re-times the others): a later call for
        the same plan returns the time the first one gave and changes nothing.
        """
        if isinstance(plan, _Sync):
            return 0.0
        if plan.time_s is not None:
            return plan.time_s
        t = self.core.step_time_s(plan.batch)
        host = self.host
        if host is None:
            plan.time_s = t
            return t
        host.busy += 1
        self.factor = host.factor()
        t *= self.factor
        self.step_end = host.now() + t
        host.changed(self)
        plan.time_s = t
        return t

    def finish_step(self, plan: _Sync | LlamaCppPlan, now: float = 0.0) -> StepOutcome:
        """Apply a segment: a step's tokens and completions, then the requests that arrived during it."""
        self.in_segment = False
        if isinstance(plan, _Sync):
            out = StepOutcome(steps=0)
        else:
            self.synced = False
            self.step_plan = None
            if self.host is not None:
                self.host.busy -= 1
                self.step_end = None
                self.host.changed(self)
            cached = {slot.req.id: slot.req.cached_tokens for slot, _ in plan.batch if slot.req is not None}
            out = self.core.finish_step(plan.batch)
            self.kv.peak_used = max(self.kv.peak_used, self.kv.used)
            out = self._outcome(out, cached)
        if self.pending:
            parts, self.pending = self.pending, []
            self._admit(parts)
        return out

    def _outcome(self, out: StepOutcome, cached: dict[str, int]) -> StepOutcome:
        seqs = self.seqs
        if not self.embeddings:
            for rid, n in out.emitted.items():
                seqs[rid].generated += n
            for rid in out.finished_ids:
                seqs.pop(rid).cached_tokens = cached.get(rid, 0)
                del self.max_tokens[rid]
            return out
        done = StepOutcome()
        for part in out.finished_ids:
            rid = self._parent(part)
            seqs[rid].cached_tokens += cached.get(part, 0)
            left = self.parts_left[rid] - 1
            if left:
                self.parts_left[rid] = left
                continue
            del self.parts_left[rid], self.max_tokens[rid], seqs[rid]
            done.finished_ids.append(rid)
        return done


def bind_llamacpp(instances: Any, requests: Any, sim: Any = None) -> None:
    """Wire the llama.cpp servers among `instances` (`InstanceState`s) into one simulation (`sim`, the
    `Simulator`): the embedding servers learn how many inputs each request carries
    (`Request.embedding_inputs`), and servers naming the same `llamacpp.host` share one `CpuHost`.
    A no-op without llama.cpp servers."""
    cores = [(inst, inst.llm) for inst in instances if isinstance(inst.llm, LlamaCppInstanceCore)]
    if not cores:
        return
    hosts: dict[str, CpuHost] = {}
    for inst, core in cores:
        name, cpus = inst.cfg.llamacpp.host, inst.cfg.llamacpp.host_cpus
        if name is None:
            continue
        if sim is None:
            raise ValueError(f"instance {inst.id}: llamacpp.host needs the simulator (bind_llamacpp(..., sim))")
        host = hosts.setdefault(name, CpuHost(name, cpus))
        host.sim = sim
        host.members.append((inst, core))
        if host.cpus != cpus:
            raise ValueError(
                f"instance {inst.id}: llamacpp.host {name!r} has host_cpus {cpus} here but {host.cpus} on another "
                "instance; give every instance on one host the same host_cpus"
            )
        core.host = host
    if any(core.embeddings for _, core in cores):
        inputs = {r.id: r.embedding_inputs for r in requests if r.is_embedding}
        for _, core in cores:
            if core.embeddings:
                core.embedding_inputs = lambda rid: inputs.get(rid, 1)


def llamacpp_admits(request: Any, instance: Any) -> bool:
    """Whether an `engine: llamacpp` instance would take `request` at all (a prompt or input shorter
    than a slot's context, an embedding input within one physical batch; refused otherwise)."""
    perf = load_llamacpp_perf(instance)
    slot_ctx = perf.config.n_ctx // perf.config.n_parallel
    if request.is_embedding:
        longest = max(split_inputs(request.embedding_tokens or request.prompt_tokens, max(1, request.embedding_inputs)))
        return longest < slot_ctx and longest <= perf.config.n_ubatch
    return 0 < request.prompt_tokens < slot_ctx


def isolated_llamacpp_s(request: Any, instance: Any, cached_tokens: int = 0) -> tuple[float, float]:
    """(first token or result, end-to-end) of `request` alone on an `engine: llamacpp` instance, in
    seconds: the engine model run on it alone (`replay_llamacpp`), frontend included; a cached prefix
    (`cached_tokens`) is left out of the prompt, as a slot's prompt cache would skip it."""
    perf = load_llamacpp_perf(instance)
    if request.is_embedding:
        inputs = max(1, request.embedding_inputs)
        key: tuple = (tuple(split_inputs(request.embedding_tokens or request.prompt_tokens, inputs)), 0, 0)
    else:
        outputs = request.output_tokens if request.output_tokens is not None else request.max_tokens
        prompt = max(1, request.prompt_tokens - max(0, cached_tokens))
        key = ((prompt,), max(1, outputs), max(1, request.max_tokens or outputs))
    return _isolated(perf, *key)


@lru_cache(maxsize=4096)
def _isolated(perf: LlamaCppPerf, prompts: tuple[int, ...], outputs: int, max_tokens: int) -> tuple[float, float]:
    from sagesched.sim.engines.llamacpp_driver import replay_llamacpp

    reqs = [
        (0.0, EngineRequest(id=f"i{k}", prompt_tokens=p, output_tokens=max(1, outputs), max_tokens=max_tokens))
        for k, p in enumerate(prompts)
    ]
    recs = replay_llamacpp(reqs, perf.config, perf.step, frontend_request_s=perf.frontend_request_s)
    first = min(r.first_token_s for r in recs if r.first_token_s is not None)
    finish = max(r.finish_s for r in recs if r.finish_s is not None)
    return (finish if perf.config.embeddings else first), finish
