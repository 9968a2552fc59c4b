"""The SimPy cluster driver: a gateway queue, the policy, and simulated vLLM / TEI instances.

Arrivals enter the gateway queue; the policy (any `sagesched.policies` object, unchanged) is called
on every arrival, every completion and every wake-up it asks for, whenever something is queued and
some instance has a free slot. Its decisions go through `sagesched.core.decisions.decide` (the
checks live mode applies too): placements are dispatched (a multi-id assignment is one backend
call), verdicts recorded. Every request ends exactly once: completed, rejected
(policy, backend 4xx/429/413, incompatible placement) or failed (unfinished when the clock stops).

Speed: an engine spends one SimPy event per *change of batch*, not per step or token. A run of pure
decode steps (see `VllmEngineCore.decode_run_limit`) is one event; when new work reaches the
instance mid-run, the run is cut after the step in progress (a real engine also picks new requests
up at the next step), and instance snapshots taken mid-run are computed from the run's closed form
(steps done by now, KV blocks allocated by then), so `mode="step"` (one event per step) sees the
same states and gives the same per-request latencies.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left, insort
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import simpy

from sagesched.core import (
    GatewayQueue,
    InstanceView,
    Outcome,
    Request,
    RequestRecord,
)
from sagesched.core.decisions import Placement, decide
from sagesched.core.pool import InstancePool, ViewList, is_idle
from sagesched.metrics import records_frame
from sagesched.policies.base import Policy
from sagesched.sim.config import ClusterConfig, SimConfig
from sagesched.sim.engines import (
    EngineRejected,
    EngineRequest,
)
from sagesched.sim.engines.llamacpp_instance import bind_llamacpp
from sagesched.sim.frontend import apply_frontend
from sagesched.sim.instance_state import InstanceState
from sagesched.sim.learned_rates import LearnedRates
from sagesched.sim.perf_provider import PerfProvider, default_perf_provider
from sagesched.sim.results import SimResult, timeline_frame
from sagesched.sim.segments import EngineSegments
from sagesched.sim.timeline import TimelineSampler
from sagesched.sim.views import make_view, uniform_llm_rates

log = logging.getLogger(__name__)

# Pools up to this size get a plain list of views built up front, as before the lazy `InstancePool`:
# on 4 instances the pool's indirection cost more per call (~23 vs ~9 us for one fifo call) than
# building four views; its idle index and lazy views pay off on large pools only.
EAGER_VIEWS_MAX = 16

# Wake-ups honoured in a row while a policy places nothing and nothing else is to come (no arrival
# left, no engine busy): enough for any batching window to close, finite for a policy that never acts.
IDLE_WAKEUPS_MAX = 1000


def split_tokens(total: int, n: int) -> tuple[int, ...]:
    """Spread `total` tokens over `n` inputs as evenly as integers allow."""
    base, extra = divmod(total, n)
    return tuple(base + 1 if i < extra else base for i in range(n))


class Simulator(EngineSegments, TimelineSampler):
    """One simulation run. Use `simulate(...)`; this class holds the run's state."""

    def __init__(
        self,
        requests: Sequence[Request],
        cluster: ClusterConfig,
        policy: Policy,
        sim: SimConfig,
        perf_provider: PerfProvider | None = None,
        *,
        plain_inputs: bool = False,
    ) -> None:
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        ids = [r.id for r in self.requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique")
        self.cluster = cluster
        self.policy = policy
        self.sim = sim
        self.step_mode = sim.mode == "step"
        provider = perf_provider or default_perf_provider
        self.instances = [InstanceState(cfg, *provider(cfg)) for cfg in cluster.instances]
        for index, inst in enumerate(self.instances):
            inst.index = index
            inst.llm_done_cb = partial(self._llm_done, inst)
            inst.tei_done_cb = partial(self._tei_done, inst)
        # A call's views are built lazily (`InstancePool`, `_pool`): up front only for the instances
        # whose state changed since the last call (`_stale`, which keeps the idle index exact), so
        # a call's cost follows what changed and what the policy reads, not the pool size.
        self._ids: list[str] | None = None
        self._index: dict[str, int] = {}
        self._stale: set[InstanceState] = set()
        self._idle: list[str] = []  # sorted ids of idle instances (see `InstancePool`)
        self._idle_set: set[str] = set()
        self._uniform_llm: dict[str, tuple[float, float]] | None = None  # `uniform_llm_rates`, once
        self._serves_class: dict = {}  # class -> served by some instance (kinds and models never change)
        # `SimConfig.view_rates == "learned"`: the instances' view rates move as live (`LearnedRates`).
        # Their speeds then differ, so the pool is never uniform (the `uniform_llm_rates` shortcut is off).
        self._learned: LearnedRates | None = None
        if sim.view_rates == "learned":
            self._learned = LearnedRates(self.instances, sim.rate_smoothing)
            self._uniform_llm = {}
        self.by_id = {inst.id: inst for inst in self.instances}
        bind_llamacpp(self.instances, self.requests, self)
        self.env = simpy.Environment()
        self.records: dict[str, RequestRecord] = {r.id: RequestRecord.from_request(r) for r in self.requests}
        # The gateway queue, passed to the policy as is (its indexes let a policy look only at what
        # it can place), and the views as an `InstancePool` (with its idle index); `plain_inputs`
        # passes plain lists instead, as drivers did before the indexes existed: the reference
        # tests/sim/test_indexed_queue.py compares the indexed fast paths against.
        self.queue = GatewayQueue()
        self.plain_inputs = plain_inputs
        self.calls: dict[str, list[str]] = {}  # TEI call / pooling group id -> request ids
        self.group_left: dict[str, int] = {}
        self.group_of: dict[str, str] = {}
        self._call_seq = 0
        self.ended = 0
        self.wakeups: set[float] = set()
        self._idle_wakeups = 0  # policy calls in a row that placed nothing with nothing else to come
        self.arrivals_left = len(self.requests)
        self._arrival_index = 0  # the next request to arrive (`_arrive`)
        self.policy_calls = 0
        # Set when a backend refuses a dispatched call (413/429/400): the slot it would have held
        # is free again at once, and no completion will come to offer it to the policy.
        self.backend_refused = False
        self.policy_s = 0.0
        self.events = 0
        self.timeline: list[tuple] = []
        self._progress = None

    # -- running -----------------------------------------------------------------------------------
    def run(self) -> SimResult:
        start = time.perf_counter()
        env = self.env
        env.process(self._arrivals())
        if self.sim.timeline_interval_s > 0:
            env.process(self._sampler())
        if self.sim.progress:
            from tqdm import tqdm

            self._progress = tqdm(total=len(self.requests), unit="req", desc="simulate")
        try:
            if self.sim.max_time_s is not None:
                env.run(until=self.sim.max_time_s)
            else:
                env.run()
        finally:
            if self._progress is not None:
                self._progress.close()
        self._close_out()
        # Issue 11: the serving frontend's client-visible cost (sagesched/sim/frontend.py), after the run.
        perfs = {i.id: i.llm.perf for i in self.instances if i.llm is not None}
        fe_applied = apply_frontend(self.records.values(), perfs)
        wall = time.perf_counter() - start
        stats = self._stats()
        stats["frontend_applied"] = fe_applied
        return SimResult(
            records=records_frame(self.records.values()),
            timeline=timeline_frame(self.timeline),
            wall_s=wall,
            stats=stats,
        )

    def _arrivals(self):
        """Start the arrivals: a process only to start at the run's first instant; then each arrival
        batch is an event whose callback schedules the next (resuming a generator per arrival cost ~1%
        of a light-load run), created where a process's timeout would be, so event order is the same."""
        self._arrive()
        return
        yield  # a generator, for `env.process`

    def _arrive(self, _event: object = None) -> None:
        """Queue every request arriving now, offer the queue to the policy, wait for the next arrival."""
        env = self.env
        reqs = self.requests
        n = len(reqs)
        i = self._arrival_index
        if i >= n:
            return
        t = reqs[i].arrival_s
        now = env.now
        if t > now:
            env.timeout(t - now).callbacks.append(self._arrive)
            return
        add = self.queue.add
        while i < n and reqs[i].arrival_s <= t:
            add(reqs[i])
            i += 1
        self._arrival_index = i
        self.arrivals_left = n - i
        progress = self._progress
        if progress is not None:
            progress.n = i
            if i % 1000 == 0 or i == n:
                progress.refresh()
        self._schedule()
        if i < n:
            self._arrive()  # the next arrival's event (or, due already, the arrival itself)

    # -- policy ------------------------------------------------------------------------------------
    def _schedule(self) -> None:
        if not self.queue:
            return
        for inst in self.instances:
            if inst.inflight < inst.max_inflight:
                break
        else:
            return
        env = self.env
        now = env.now
        pool: InstancePool | None = None
        views: Sequence[InstanceView]
        if self.plain_inputs or len(self.instances) <= EAGER_VIEWS_MAX:
            view = self._view
            views = ViewList([view(inst, now) for inst in self.instances])
            views.serves_class = self._serves_class
        else:
            views = pool = self._pool(now)
        t0 = time.perf_counter()
        queue = list(self.queue) if self.plain_inputs else self.queue
        decided = decide(self.policy, now, queue, views)
        self.policy_s += time.perf_counter() - t0
        self.policy_calls += 1
        if pool is not None:
            pool.close()
        for placement in decided.placements:
            self._dispatch(placement, now)
        records = self.records
        for verdict in decided.verdicts:
            rid = verdict.request.id
            if self.queue.pop(rid, None) is None:
                continue
            rec = records[rid]
            rec.rule = verdict.rule
            rec.outcome = verdict.outcome
            rec.reason = verdict.message
            self._ended()
        acted = decided.placements or decided.verdicts
        if self.backend_refused:
            # Offer the refused calls' capacity again now; each refusal ends a request, so this stops.
            self.backend_refused = False
            self._schedule()
            return
        wake = self.policy.next_wakeup(now)
        if acted:
            self._idle_wakeups = 0
        elif wake is not None and self.arrivals_left == 0 and not self._any_active():
            # Only the policy's own wake-up can release what it holds now (a batching window closing),
            # as live; one that asks for ever while placing nothing is given up (its requests fail).
            self._idle_wakeups += 1
            if self._idle_wakeups > IDLE_WAKEUPS_MAX:
                wake = None
        if wake is not None and wake > now and wake not in self.wakeups:
            self.wakeups.add(wake)
            ev = env.timeout(wake - now)
            ev.callbacks.append(self._waker(wake))

    def _pool(self, now: float) -> InstancePool:
        """This call's views: built lazily (`InstancePool`), with the sorted ids of idle instances.

        Only instances whose state changed since the last call (`_stale`) are snapshotted up front,
        to keep the idle index exact (an instance in a decode run is never idle, and the others
        only change with their version); the rest are built if and when the policy reads them.
        """
        instances = self.instances
        views: list[InstanceView | None] = [None] * len(instances)
        idle, idle_set = self._idle, self._idle_set
        if self._ids is None:
            self._ids = [inst.id for inst in instances]
            self._index = {inst.id: inst.index for inst in instances}
            self._stale.update(instances)
        view = self._view
        for inst in self._stale:
            v = views[inst.index] = view(inst, now)
            if is_idle(v) != (inst.id in idle_set):
                if inst.id in idle_set:
                    idle_set.discard(inst.id)
                    del idle[bisect_left(idle, inst.id)]
                else:
                    idle_set.add(inst.id)
                    insort(idle, inst.id)
        self._stale.clear()
        if self._uniform_llm is None:
            self._uniform_llm = uniform_llm_rates(instances)
        return InstancePool(
            views,
            self._ids,
            self._index,
            lambda i: view(instances[i], now),
            tuple(idle),
            self._serves_class,
            self._uniform_llm,
        )

    def _any_active(self) -> bool:
        return any(inst.llm_active or inst.tei_batch is not None for inst in self.instances)

    def _waker(self, when: float) -> Callable[[simpy.Event], None]:
        return lambda _e: self._wake(when)

    def _wake(self, when: float) -> None:
        self.wakeups.discard(when)
        self._schedule()

    def _kv_usage(self, inst: InstanceState, now: float) -> float:
        core = inst.llm
        assert core is not None
        run = inst.llm_run
        if run is None:
            return core.kv.used / core.kv.num_blocks
        m = run.steps_done_by(now - inst.llm_t0)
        return core.kv_used_during(run, m) / core.kv.num_blocks

    def _view(self, inst: InstanceState, now: float) -> InstanceView:
        """The instance's snapshot at `now`.

        Hot path (every policy call snapshots every instance, in both modes, so its cost caps the
        jump mode's speed-up): the snapshot is reused while neither the instance's version nor the
        run's step count changed, and during a decode run only the two fields the step count moves
        (KV usage, queued decode tokens) are recomputed; the counts and queued tokens over the
        engine's requests are cached by version.
        """
        run = inst.llm_run
        version = inst.version
        if run is None:
            m = -1
        else:
            m = run.steps_done_by(now - inst.llm_t0)
        cached = inst.cached_view
        if cached is not None and cached[0] == version and cached[1] == m:
            return cached[2]
        load = inst.cached_load
        if load is None or load[0] != version:
            load = inst.cached_load = self._load(inst)
        _, running, waiting, kv, prefill, decode, emb_tokens, emb_inputs = load
        if run is not None:
            # As `core.kv_used_during(run, m)`: the blocks in use while step m executes, and the
            # run's steps done so far are not applied to the core yet.
            kv = (run.used0 + run.alloc_cum(m if m < run.k - 1 else run.k - 1)) / inst.kv_blocks
            decode -= run.n * m
        view = make_view(
            inst.static_view, running, waiting, inst.emb_inflight, kv, prefill, decode, emb_tokens, emb_inputs
        )
        inst.cached_view = (version, m, view)
        return view

    @staticmethod
    def _load(inst: InstanceState) -> tuple:
        """(version, running, waiting, KV usage, queued prefill, queued decode, queued embedding tokens,
        embedding inputs in flight) of the engines' state.

        KV usage and queued decode tokens are as of the last applied step: `_view` adjusts them for
        a decode run in flight.
        """
        running = waiting = prefill = decode = 0
        kv = 0.0
        core = inst.llm
        if core is not None:
            running, waiting = len(core.running), len(core.waiting)
            prefill, decode = core.queued_tokens()
            kv = core.kv.used / core.kv.num_blocks
        tei = inst.tei
        if tei is not None:
            waiting_t = tei.waiting_requests()
            running += inst.tei_requests - waiting_t
            waiting += waiting_t
            emb_tokens = tei.queued_tokens + (tei.batch.total_tokens if tei.batch is not None else 0)
            prefill += emb_tokens
            return (inst.version, running, waiting, kv, prefill, decode, emb_tokens, tei.inflight_inputs)
        return (inst.version, running, waiting, kv, prefill, decode, 0, 0)

    # -- dispatch ----------------------------------------------------------------------------------
    def _dispatch(self, a: Placement, now: float) -> None:
        """Send one validated placement (`core.decisions`) to its instance: one backend call."""
        inst = self.by_id[a.instance_id]
        reqs: list[Request] = []
        records = self.records
        pop = self.queue.pop
        for req in a.requests:
            if pop(req.id, None) is None:
                continue
            rec = records[req.id]
            rec.dispatch_s = now if now > req.arrival_s else req.arrival_s
            rec.rule = a.rule
            rec.batch_size = len(a.requests)
            rec.instance_id = inst.id
            reqs.append(req)
        if not reqs:
            return
        # Learned rates: the first LLM request of the call is judged on the instance's view before
        # this call (taken before the version moves, so the cached snapshot stays that state's); the
        # others have the first ahead of them.
        learned = self._learned
        before = self._view(inst, now) if learned is not None else None
        inst.version += 1
        self._stale.add(inst)
        priority = a.priority_hint
        llm_added = False
        embeddings: list[Request] = []
        for req in reqs:
            if req.is_embedding:
                embeddings.append(req)
                continue
            if learned is not None and before is not None:
                learned.dispatching(req.id, before)
                before = None
            out = req.output_tokens if req.output_tokens else req.max_tokens
            if req.max_tokens and out > req.max_tokens:
                out = req.max_tokens
            # Positional, in `EngineRequest`'s field order (one per dispatched request; keywords cost more).
            ereq = EngineRequest(
                req.id,
                req.prompt_tokens,
                max(1, out),
                req.max_tokens,
                int(req.priority) if priority is None else priority,
                False,
                req.prefix_hashes,
            )
            if self._add_llm(inst, ereq):
                llm_added = True
        if embeddings:
            if inst.tei is not None:
                self._submit_tei(inst, embeddings, a)
            else:
                group = self._new_call_id(inst)
                members: list[str] = []
                for req in embeddings:
                    ereq = EngineRequest(
                        id=req.id,
                        prompt_tokens=req.embedding_tokens or req.prompt_tokens,
                        output_tokens=0,
                        priority=int(req.priority) if priority is None else priority,
                        pooling=True,
                    )
                    if self._add_llm(inst, ereq, embedding=True):
                        llm_added = True
                        members.append(req.id)
                        self.group_of[req.id] = group
                if members:
                    self.calls[group] = members
                    self.group_left[group] = len(members)
        if llm_added:
            if not inst.llm_active:
                self._llm_start(inst)
            elif inst.llm_run is not None:
                self._cut_run(inst)

    def _new_call_id(self, inst: InstanceState) -> str:
        self._call_seq += 1
        return f"{inst.id}/call-{self._call_seq}"

    def _add_llm(self, inst: InstanceState, ereq: EngineRequest, embedding: bool = False) -> bool:
        assert inst.llm is not None
        try:
            inst.llm.add(ereq)
        except EngineRejected as exc:
            self._reject(self.records[ereq.id], f"backend {exc.status}: {exc.reason}")
            self.backend_refused = True
            return False
        inst.seqs[ereq.id] = inst.llm.seqs[ereq.id]
        inst.inflight += 1
        if embedding:
            inst.emb_inflight += 1
        return True

    def _submit_tei(self, inst: InstanceState, reqs: list[Request], a: Placement) -> None:
        call_id = self._new_call_id(inst)
        tokens: list[int] = []
        for req in reqs:
            tokens.extend(split_tokens(req.embedding_tokens or req.prompt_tokens, max(1, req.embedding_inputs)))
        assert inst.tei is not None
        try:
            inst.tei.submit(EngineRequest(id=call_id, input_tokens=tuple(tokens), num_requests=len(reqs)))
        except EngineRejected as exc:
            for req in reqs:
                self._reject(self.records[req.id], f"backend {exc.status}: {exc.reason}")
            self.backend_refused = True
            return
        self.calls[call_id] = [r.id for r in reqs]
        inst.inflight += len(reqs)
        inst.emb_inflight += len(reqs)
        inst.tei_requests += len(reqs)
        if inst.tei_batch is None:
            self._tei_start(inst)

    # -- request endings ---------------------------------------------------------------------------
    def _reject(self, rec: RequestRecord, reason: str) -> None:
        rec.outcome = Outcome.REJECTED.value
        rec.reason = reason
        self._ended()

    def _ended(self) -> None:
        self.ended += 1
        if self._progress is not None and self.ended % 1000 == 0:
            self._progress.set_postfix(done=self.ended, refresh=False)

    def _complete(self, rid: str, now: float, inst: InstanceState) -> None:
        rec = self.records[rid]
        seq = inst.seqs.pop(rid, None)
        if seq is not None:
            rec.output_tokens = seq.generated
            rec.preemptions = seq.preemptions
            rec.cached_prompt_tokens = seq.cached_tokens
        if rec.first_token_s is None:
            rec.first_token_s = now
        rec.finish_s = now
        rec.outcome = Outcome.COMPLETED.value
        inst.inflight -= 1
        if self._learned is not None and self._learned.completed(rec, now, inst):
            self._stale.add(inst)
        self._ended()

    # -- the end -----------------------------------------------------------------------------------
    def _close_out(self) -> None:
        """Give every request without an ending one (failed), so that each request ends exactly once."""
        now = self.env.now
        for rec in self.records.values():
            if rec.outcome == Outcome.COMPLETED.value and rec.finish_s is None:
                rec.outcome = Outcome.FAILED.value
                if self.queue.has(rec.request_id):
                    rec.reason = "still queued at the gateway when the simulation ended (the policy never placed it)"
                elif rec.dispatch_s is None:
                    rec.reason = "had not arrived when the simulation ended"
                else:
                    rec.reason = f"unfinished at the end of the simulation (t={now:.3f}s)"
                self.ended += 1
        for inst in self.instances:
            self._set_busy_final(inst, now)

    def _set_busy_final(self, inst: InstanceState, now: float) -> None:
        if inst.busy_since is not None:
            inst.busy_acc += now - inst.busy_since
            inst.busy_since = now

    def _stats(self) -> dict[str, Any]:
        horizon = self.env.now
        per_instance: dict[str, dict[str, Any]] = {}
        for inst in self.instances:
            s: dict[str, Any] = {
                "kind": inst.kind.value,
                "utilization": inst.busy_acc / horizon if horizon > 0 else 0.0,
            }
            if inst.llm is not None:
                core = inst.llm
                s.update(
                    steps=core.steps,
                    preemptions=core.preemptions,
                    prefix_cache_queries=core.prefix_queries,
                    prefix_cache_hits=core.prefix_hits,
                    kv_blocks=core.kv.num_blocks,
                    peak_kv_blocks=core.kv.peak_used,
                    peak_kv_usage=core.kv.peak_used / core.kv.num_blocks,
                )
            if inst.tei is not None:
                tei = inst.tei
                s.update(batches=tei.batches, rejected_429=tei.rejected_429, rejected_413=tei.rejected_413)
            per_instance[inst.id] = s
        return {
            "sim_time_s": horizon,
            "mode": self.sim.mode,
            "events": self.events,
            "policy": self.policy.name,
            "policy_calls": self.policy_calls,
            "policy_s": self.policy_s,
            "instances": per_instance,
        }


def simulate(
    requests: Sequence[Request],
    cluster: ClusterConfig,
    policy: Policy,
    sim: SimConfig | None = None,
    *,
    perf_provider: PerfProvider | None = None,
    plain_inputs: bool = False,
) -> SimResult:
    """Replay `requests` on `cluster` under `policy`; one record per request.

    `perf_provider` replaces the fitted performance models (tests use tiny deterministic ones).
    `plain_inputs` hands the policy plain lists instead of the indexed `GatewayQueue` and
    `InstancePool` (the reference the indexed fast paths are checked against; same results,
    slower past saturation and on large pools).
    """
    return Simulator(requests, cluster, policy, sim or SimConfig(), perf_provider, plain_inputs=plain_inputs).run()
