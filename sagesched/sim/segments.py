"""The engine segments of the cluster driver: when a simulated engine starts and ends work.

An engine spends one SimPy event per *change of batch*: a vLLM step, a jump over pure-decode steps
(`VllmEngineCore.decode_run_limit`; cut short after the step in progress when new work arrives), or
a TEI batch. Each end applies the engine's results, records first tokens and completions, starts
the next segment and offers freed slots to the policy. `Simulator` (`sagesched.sim.cluster`)
completes this mixin with the run's state and its request bookkeeping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import simpy

from sagesched.core import RequestRecord
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
        factor = inst.gpu.llm_stretch(inst.tei_batch is not None) if inst.gpu is not None else 1.0
        inst.version += 1
        self._stale.add(inst)
        inst.llm_gen += 1
        gen = inst.llm_gen
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
                    ev.callbacks.append(lambda _e: self._llm_done(inst, gen))
                    inst.llm_event = ev
                    return
                core.run = None
        plan = core.plan_step()
        if plan is None:
            inst.llm_plan = None
            self._set_busy(inst, now)
            if inst.gpu is not None and inst.tei_batch is not None:
                pass  # the partner's batch factor was fixed at its start
            return
        for seq in plan.preempted:
            self.records[seq.id].preemptions = seq.preemptions
        inst.llm_plan = plan
        inst.llm_t0 = now
        if inst.busy_since is None:  # `_set_busy` with the LLM engine busy, inlined (hot)
            inst.busy_since = now
        ev = env.timeout(core.step_time_s(plan) * factor)
        ev.callbacks.append(lambda _e: self._llm_done(inst, gen))

    def _cut_run(self, inst: InstanceState) -> None:
        """New work (or a change on the shared GPU) mid-run: end the run after the step in progress."""
        run = inst.llm_run
        assert run is not None and inst.llm_event is not None
        now = self.env.now
        m = run.steps_done_by(now - inst.llm_t0)
        if m >= run.k - 1:
            return  # the step in progress is the run's last: its end event is already due
        run.truncate(m + 1)
        inst.llm_gen += 1
        gen = inst.llm_gen
        # The run's old end event stays in SimPy's queue; dropping its callback spares processing
        # it (`_llm_done` would ignore it anyway: its generation is stale).
        inst.llm_event.callbacks.clear()
        ev = self.env.timeout(inst.llm_t0 + run.cum_time(m + 1) - now)
        ev.callbacks.append(lambda _e: self._llm_done(inst, gen))
        inst.llm_event = ev

    def _llm_done(self, inst: InstanceState, gen: int) -> None:
        if gen != inst.llm_gen:
            return  # superseded by a cut
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
        if inst.gpu is not None and was_busy != (batch is not None) and inst.llm_run is not None:
            self._cut_run(inst)
        if batch is None:
            return
        factor = inst.gpu.embedding_stretch(inst.llm_active) if inst.gpu is not None else 1.0
        ev = self.env.timeout(tei.batch_time_s(batch) * factor)
        ev.callbacks.append(lambda _e: self._tei_done(inst))

    def _tei_done(self, inst: InstanceState) -> None:
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
