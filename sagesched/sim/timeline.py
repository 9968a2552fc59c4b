"""The cluster driver's timeline: every instance sampled on a fixed grid while anything happens.

A SimPy process of its own, cheap by construction: its cost follows the events, not the simulated
span (quiet spans are jumped), and an instance idle and untouched since its last sample repeats
that row. `Simulator` (`sagesched.sim.cluster`) completes this mixin with the run's state.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import simpy

from sagesched.sim.config import SimConfig
from sagesched.sim.instance_state import InstanceState


class TimelineSampler(ABC):
    """The timeline sampler (a mixin of `Simulator`)."""

    env: simpy.Environment
    sim: SimConfig
    requests: Sequence[Any]
    ended: int
    instances: list[InstanceState]
    timeline: list[tuple]

    @abstractmethod
    def _kv_usage(self, inst: InstanceState, now: float) -> float:
        """The instance's KV-cache usage fraction at `now`."""

    def _sampler(self):
        """Sample every instance each `timeline_interval_s`, on that grid, while anything happens.

        Nothing changes between events, so across a quiet span (no event for more than an
        interval) the sampler jumps to the last grid point before the next event: its cost follows
        the events, not the simulated span (a trace stretched by rate_scale=1e-9 spans 6e10 s). The
        sample after a jump averages utilisation over the whole span since the previous one.
        """
        env = self.env
        interval = self.sim.timeline_interval_s
        total = len(self.requests)
        tick = 0
        while self.ended < total:
            tick += 1
            due = tick * interval
            following = env.peek()
            if following == float("inf"):
                return  # nothing else will ever happen (e.g. a policy holding requests forever)
            if following > due + interval:
                tick = max(tick, math.floor(following / interval))
                due = tick * interval
            yield env.timeout(due - env.now)
            self._sample(env.now)

    def _sample(self, now: float) -> None:
        timeline = self.timeline
        for inst in self.instances:
            quiet = inst.sample_quiet
            if quiet is not None and quiet[0] == inst.version and inst.busy_since is None:
                # Idle at the last sample and untouched since (every change bumps the version):
                # the same row, busy 0 (on a large mostly idle pool this was most of a run's time).
                inst.sample_t = now
                timeline.append((now, inst.id, *quiet[1]))
                continue
            since = inst.busy_since  # `inst.busy_total(now)`, spelled out (every instance, every tick)
            busy = inst.busy_acc + (now - since if since is not None else 0.0)
            span = now - inst.sample_t
            frac = (busy - inst.sample_busy) / span if span > 0 else 0.0
            inst.sample_busy, inst.sample_t = busy, now
            running = waiting = batch = 0
            kv = 0.0
            core = inst.llm
            if core is not None:
                running, waiting = core.num_running, core.num_waiting
                kv = self._kv_usage(inst, now)
                run = inst.llm_run
                if run is not None:
                    batch = run.n
                elif inst.llm_plan is not None:
                    batch = inst.llm_plan.batch_size
            if inst.tei is not None:
                waiting_t = inst.tei.waiting_requests()
                running += inst.tei_requests - waiting_t
                waiting += waiting_t
                if inst.tei_batch is not None:
                    batch += inst.tei_batch.num_inputs
            timeline.append((now, inst.id, running, waiting, kv, batch, frac))
            inst.sample_quiet = (inst.version, (running, waiting, kv, batch, 0.0)) if inst.busy_since is None else None
