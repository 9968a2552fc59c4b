"""The engine segments of the cluster driver: when a simulated engine starts and ends work.

An engine spends one SimPy event per *change of batch*: a vLLM step, a jump over pure-decode steps
(`VllmEngineCore.decode_run_limit`; cut short after the step in progress when new work arrives), or
a TEI batch. Each end applies the engine's results, records first tokens and completions, starts
the next segment and offers freed slots to the policy. On an `llm_embedding` instance (`SharedGpu`)
each engine's start or stop re-times the other's segment in flight (work-conserving sharing).
`Simulator` (`sagesched.sim.cluster`) completes this mixin with the run's state and its request
bookkeeping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import simpy

from sagesched.core import RequestRecord
from sagesched.sim.engines.shared_gpu import SharedGpu, retimed_end
from sagesched.sim.instance_state import InstanceState


class EngineSegments(ABC):
    """Starting, cutting and ending engine segments (a mixin of `Simulator`)."""

    env: simpy.Environment
    step_mode: bool
    records: dict[str, RequestRecord]
    events: int
    calls: dict[str, list[str]]
    group_left: dict[str, int]
    group_of: dict[str, str]
    _stale: set[InstanceState]

    @abstractmethod
    def _schedule(self) -> None:
        """Offer the queue to the policy (freed slots)."""

    @abstractmethod
    def _complete(self, rid: str, now: float, inst: InstanceState) -> None:
        """Record request `rid` as completed at `now` on `inst`."""

    # -- the vLLM engine ---------------------------------------------------------------------------
    def _llm_start(self, inst: InstanceState) -> None:
        """Start the next segment (a step, or a jump over pure-decode steps) if there is work."""
        core = inst.llm
        assert core is not None
        env = self.env
        now = env.now
        gpu = inst.gpu
        factor = 1.0 if gpu is None or inst.tei_batch is None else gpu.llm_factor
        inst.version += 1
        self._stale.add(inst)
        if not self.step_mode:
            k = core.decode_run_limit()
            if k >= 2:
                run = core.start_decode_run(k, factor)
                if run.k >= 1:
                    inst.llm_run = run
                    inst.llm_t0 = now
                    if inst.busy_since is None:  # `_set_busy` with the LLM engine busy, inlined (hot)
                        inst.busy_since = now
                    ev = env.timeout(run.cum_time(run.k))
                    ev.callbacks.append(inst.llm_done_cb)
                    inst.llm_event = ev
                    if gpu is not None:
                        self._llm_started(inst, gpu, factor, 0.0)
                    return
                core.run = None
        plan = core.plan_step()
        if plan is None:
            inst.llm_plan = None
            self._set_busy(inst, now)
            if gpu is not None and gpu.llm_busy:
                gpu.llm_busy = False
                self._tei_retime(inst, gpu, 1.0)  # the embedding batch in flight has the GPU to itself now
            return
        for seq in plan.preempted:
            self.records[seq.id].preemptions = seq.preemptions
        inst.llm_plan = plan
        inst.llm_t0 = now
        if inst.busy_since is None:  # `_set_busy` with the LLM engine busy, inlined (hot)
            inst.busy_since = now
        dt = core.step_time_s(plan) * factor
        ev = env.timeout(dt)
        ev.callbacks.append(inst.llm_done_cb)
        inst.llm_event = ev  # re-timed by a shared GPU, or by a llama.cpp server's shared CPU host
        if gpu is not None:
            self._llm_started(inst, gpu, factor, now + dt)

    def _llm_started(self, inst: InstanceState, gpu: SharedGpu, factor: float, end: float) -> None:
        """A vLLM segment started on a shared GPU: note its factor and end (a step's; a decode run
        keeps its own times) and, if the LLM engine was idle, re-time the embedding batch in flight."""
        gpu.llm_now = factor
        gpu.llm_end = end
        if not gpu.llm_busy:
            gpu.llm_busy = True
            self._tei_retime(inst, gpu, gpu.embedding_factor)

    def _llm_retime(self, inst: InstanceState, gpu: SharedGpu, factor: float) -> None:
        """The embedding engine started or stopped work: the vLLM step in progress runs the rest of
        its work at the new factor (work-conserving), and a decode run ends after that step (the
        steps after it start with the new factor)."""
        old = gpu.llm_now
        if old == factor:
            return
        now = self.env.now
        t0 = inst.llm_t0
        run = inst.llm_run
        if run is not None:
            m = run.steps_done_by(now - t0)
            if m >= run.k:
                return  # the run is due now: the next segment starts with the new factor
            end = t0 + run.cum_time(m + 1)
            new = retimed_end(now, end, old, factor)
            if new == end:
                return
            # The steps before m keep their times (snapshots taken mid-run read them); step m, the
            # run's last from now on, ends at the re-timed end.
            cum = run.cum[: m + 1] if run.cum is not None else [run.cum_time(j) for j in range(m + 1)]
            cum.append(new - t0)
            run.cum = cum
            run.truncate(m + 1)
            delay = t0 + cum[-1] - now
        else:
            end = gpu.llm_end
            new = retimed_end(now, end, old, factor)
            if new == end:
                return
            gpu.llm_end = new
            delay = new - now
        gpu.llm_now = factor
        assert inst.llm_event is not None
        inst.llm_event.callbacks.clear()  # stale: `_llm_done` would ignore it (no longer `inst.llm_event`)
        ev = self.env.timeout(delay)
        ev.callbacks.append(inst.llm_done_cb)
        inst.llm_event = ev

    def _cut_run(self, inst: InstanceState) -> None:
        """New work mid-run: end the run after the step in progress (a change on a shared GPU goes
        through `_llm_retime`, which also re-times that step)."""
        run = inst.llm_run
        assert run is not None and inst.llm_event is not None
        now = self.env.now
        m = run.steps_done_by(now - inst.llm_t0)
        if m >= run.k - 1:
            return  # the step in progress is the run's last: its end event is already due
        run.truncate(m + 1)
        # The run's old end event stays in SimPy's queue; dropping its callback spares processing
        # it (`_llm_done` would ignore it anyway: it is no longer `inst.llm_event`).
        inst.llm_event.callbacks.clear()
        ev = self.env.timeout(inst.llm_t0 + run.cum_time(m + 1) - now)
        ev.callbacks.append(inst.llm_done_cb)
        inst.llm_event = ev

    def _llm_done(self, inst: InstanceState, event: object = None) -> None:
        # A SimPy callback through the instance's `functools.partial` (`llm_done_cb`, built once): a
        # C-level call, and no callable built per engine segment.
        if event is not inst.llm_event:
            return  # superseded (a cut or a re-timing clears the old event's callbacks; belt and braces)
        self.events += 1
        core = inst.llm
        assert core is not None
        now = self.env.now
        run = inst.llm_run
        if run is not None:
            out = core.finish_decode_run(run, run.k)
            inst.llm_run = None
        else:
            assert inst.llm_plan is not None
            out = core.finish_step(inst.llm_plan, now)
            inst.llm_plan = None
        records = self.records
        for rid in out.first_token_ids:
            rec = records[rid]
            if rec.first_token_s is None and rid not in self.group_of:
                rec.first_token_s = now
        for rid in out.finished_ids:
            group = self.group_of.pop(rid, None)
            if group is None:
                self._complete(rid, now, inst)
                continue
            left = self.group_left[group] - 1
            self.group_left[group] = left
            if left == 0:
                del self.group_left[group]
                for member in self.calls.pop(group):
                    self._complete(member, now, inst)
                    inst.emb_inflight -= 1
        self._llm_start(inst)
        if out.finished_ids:
            self._schedule()

    # -- the TEI engine ----------------------------------------------------------------------------
    def _tei_start(self, inst: InstanceState) -> None:
        tei = inst.tei
        assert tei is not None
        now = self.env.now
        was_busy = inst.tei_batch is not None
        batch = tei.next_batch()
        inst.tei_batch = batch
        inst.version += 1
        self._stale.add(inst)
        self._set_busy(inst, now)
        gpu = inst.gpu
        if gpu is not None and was_busy != (batch is not None) and gpu.llm_busy:
            self._llm_retime(inst, gpu, gpu.llm_factor if batch is not None else 1.0)
        if batch is None:
            return
        dt = tei.batch_time_s(batch)
        if gpu is not None:
            factor = gpu.embedding_factor if gpu.llm_busy else 1.0
            dt *= factor
            gpu.tei_now = factor
            gpu.tei_end = now + dt
        ev = self.env.timeout(dt)
        ev.callbacks.append(inst.tei_done_cb)
        if gpu is not None:
            gpu.tei_event = ev

    def _tei_retime(self, inst: InstanceState, gpu: SharedGpu, factor: float) -> None:
        """The vLLM engine started or stopped work: the embedding batch in flight runs the rest of its
        work at the new factor (work-conserving)."""
        if inst.tei_batch is None or gpu.tei_now == factor:
            return
        now = self.env.now
        new = retimed_end(now, gpu.tei_end, gpu.tei_now, factor)
        if new == gpu.tei_end:
            return  # due now
        gpu.tei_now = factor
        gpu.tei_end = new
        assert gpu.tei_event is not None
        gpu.tei_event.callbacks.clear()  # stale
        ev = self.env.timeout(new - now)
        ev.callbacks.append(inst.tei_done_cb)
        gpu.tei_event = ev

    def _tei_done(self, inst: InstanceState, _event: object = None) -> None:
        self.events += 1
        now = self.env.now
        assert inst.tei is not None and inst.tei_batch is not None
        done = inst.tei.finish_batch(inst.tei_batch)
        for call_id in done:
            for rid in self.calls.pop(call_id):
                self._complete(rid, now, inst)
                inst.emb_inflight -= 1
                inst.tei_requests -= 1
        self._tei_start(inst)
        if done:
            self._schedule()

    def _set_busy(self, inst: InstanceState, now: float) -> None:
        busy = inst.llm_active or inst.tei_batch is not None
        if busy and inst.busy_since is None:
            inst.busy_since = now
        elif not busy and inst.busy_since is not None:
            inst.busy_acc += now - inst.busy_since
            inst.busy_since = None
