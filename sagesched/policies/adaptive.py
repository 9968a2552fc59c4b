"""Pick FIFO, priority or least-slack scheduling from what the cluster looks like right now.

Each call measures three things from its arguments alone:

- ``load``: mean over healthy instances of in-flight / ``max_inflight`` (capped at 1);
- ``queue``: servable queued requests per healthy instance;
- ``slo_pressure``: the share of servable queued requests whose best slack (see `slo_aware`) is
  below ``slack_threshold_s``; requests without an SLO count as relaxed.

and chooses a mode:

- ``slo_aware`` while SLO pressure is high: deadlines are at risk, so order by slack;
- otherwise ``priority`` while the cluster is congested (load or queue high): with a backlog, the
  order in which classes are served matters;
- otherwise ``fifo``: with spare capacity, arrival order is fair and cheapest.

Hysteresis keeps it from flapping: a mode is entered at its ``enter_*`` threshold and held until
the measure falls below the lower ``exit_*`` threshold, and no switch happens within
``min_dwell_s`` (policy time, from ``now``) of the previous one. Every decision's ``rule`` names
the sub-policy that made it (``adaptive/slo_aware``) and its ``reason`` carries the measured
values and why that mode is active. The three sub-policies are built once and kept, so a
stateful one keeps its state across calls.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from sagesched.core import Assignment, Decision, GatewayQueue, InstanceView, Priority, Rejection, Request
from sagesched.policies.base import LoadLedger, Policy, PolicyConfig, reject_unservable, servable_classes, use_index
from sagesched.policies.fifo import FifoConfig, FifoPolicy
from sagesched.policies.priority import PriorityConfig, PriorityPolicy, priority_number
from sagesched.policies.registry import register
from sagesched.policies.slack import count_below
from sagesched.policies.slo_aware import SloAwareConfig, SloAwarePolicy, best_slack_s
from sagesched.typed_config import parse_with

logger = logging.getLogger(__name__)

MODES = ("fifo", "priority", "slo_aware")


@dataclass(frozen=True)
class AdaptiveConfig(PolicyConfig):
    """Configuration of the adaptive policy (thresholds come in enter >= exit pairs).

    enter_load / exit_load: mean in-flight / max_inflight over healthy instances at which the
        cluster counts as congested (priority mode) / stops counting as congested.
    enter_queue_per_instance / exit_queue_per_instance: the same for servable queued requests per
        healthy instance; congestion is load OR queue above its threshold.
    slack_threshold_s: a queued request with an SLO whose best predicted slack is below this many
        seconds counts as under SLO pressure.
    enter_slo_pressure / exit_slo_pressure: share of queued requests under SLO pressure at which
        slo_aware mode is entered / left. SLO pressure outranks congestion.
    min_dwell_s: no mode switch within this many seconds (of `now`) of the previous switch.
    aging_interval_s, urgent_max_priority: passed to the priority sub-policy (see `priority`).
    shed_unattainable: passed to the slo_aware sub-policy (see `slo_aware`).
    """

    enter_load: float = 0.8
    exit_load: float = 0.6
    enter_queue_per_instance: float = 4.0
    exit_queue_per_instance: float = 1.0
    slack_threshold_s: float = 0.5
    enter_slo_pressure: float = 0.2
    exit_slo_pressure: float = 0.05
    min_dwell_s: float = 5.0
    aging_interval_s: float = 10.0
    urgent_max_priority: int = field(default=int(Priority.HIGH), metadata=parse_with(priority_number))
    shed_unattainable: bool = False

    def __post_init__(self) -> None:
        for measure in ("load", "queue_per_instance", "slo_pressure"):
            enter, exit_ = getattr(self, f"enter_{measure}"), getattr(self, f"exit_{measure}")
            if not (0 <= exit_ <= enter):
                raise ValueError(
                    f"need 0 <= exit_{measure} <= enter_{measure} for hysteresis, got exit={exit_!r}, "
                    f"enter={enter!r}; lower exit_{measure} or raise enter_{measure}"
                )
        if not (self.min_dwell_s >= 0 and math.isfinite(self.min_dwell_s)):  # `not >=`: NaN too
            raise ValueError(f"min_dwell_s must be a finite number >= 0 seconds, got {self.min_dwell_s!r}")
        if not math.isfinite(self.slack_threshold_s):
            raise ValueError(f"slack_threshold_s must be a finite number of seconds, got {self.slack_threshold_s!r}")
        # The sub-policies' own rules, named here (the policy builds them from these fields).
        PriorityConfig(aging_interval_s=self.aging_interval_s, urgent_max_priority=self.urgent_max_priority)


@dataclass(frozen=True)
class Measurement:
    """What one call observed, in the units the thresholds use."""

    load: float
    queue_per_instance: float
    slo_pressure: float

    def __str__(self) -> str:
        return f"load={self.load:.2f} queue/instance={self.queue_per_instance:.1f} slo_pressure={self.slo_pressure:.2f}"


@register
class AdaptivePolicy(Policy):
    name = "adaptive"
    Config = AdaptiveConfig
    config: AdaptiveConfig

    def __init__(self, config: PolicyConfig | None = None, **overrides: object) -> None:
        super().__init__(config, **overrides)
        c = self.config
        self.policies: dict[str, Policy] = {
            "fifo": FifoPolicy(FifoConfig()),
            "priority": PriorityPolicy(
                PriorityConfig(aging_interval_s=c.aging_interval_s, urgent_max_priority=c.urgent_max_priority)
            ),
            "slo_aware": SloAwarePolicy(SloAwareConfig(shed_unattainable=c.shed_unattainable)),
        }
        self.mode = "fifo"
        self.mode_since_s = -math.inf
        self.switches = 0
        self.last_measurement: Measurement | None = None

    # -- measuring and choosing --------------------------------------------------------------------
    def measure(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> Measurement:
        if use_index(queue) and isinstance(queue, GatewayQueue):
            return self._measure_indexed(now, queue, instances)
        healthy = [v for v in instances if v.healthy]
        _, servable = reject_unservable(queue, instances, self.name)
        if not healthy:
            return Measurement(load=1.0, queue_per_instance=float(len(servable)), slo_pressure=0.0)
        load = sum(min(1.0, v.inflight / max(1, v.max_inflight)) for v in healthy) / len(healthy)
        ledger: LoadLedger | None = None  # only requests with an SLO need one
        pressured = 0
        for request in servable:
            if request.slo.empty:
                continue
            if ledger is None:
                ledger = LoadLedger(instances)
            best = best_slack_s(ledger, request, now)
            if best is not None and best < self.config.slack_threshold_s:
                pressured += 1
        pressure = pressured / len(servable) if servable else 0.0
        return Measurement(load=load, queue_per_instance=len(servable) / len(healthy), slo_pressure=pressure)

    def _measure_indexed(self, now: float, queue: GatewayQueue, instances: Sequence[InstanceView]) -> Measurement:
        """`measure` from the queue's per-class counts and numpy columns (`policies.slack`): the
        same figures without a Python pass over every queued request."""
        healthy = [v for v in instances if v.healthy]
        _, queue, classes = servable_classes(queue, instances, self.name)
        counts = queue.counts()
        servable = sum(counts[cls] for cls in classes)
        if not healthy:
            return Measurement(load=1.0, queue_per_instance=float(servable), slo_pressure=0.0)
        load = sum(min(1.0, v.inflight / max(1, v.max_inflight)) for v in healthy) / len(healthy)
        pressured = count_below(queue, classes, LoadLedger(instances), now, self.config.slack_threshold_s)
        pressure = pressured / servable if servable else 0.0
        return Measurement(load=load, queue_per_instance=servable / len(healthy), slo_pressure=pressure)

    def desired_mode(self, m: Measurement) -> tuple[str, str]:
        """The mode the measurement calls for from the current mode, and why (thresholds shown)."""
        c = self.config
        in_slo = self.mode == "slo_aware"
        pressure_threshold = c.exit_slo_pressure if in_slo else c.enter_slo_pressure
        if _reaches(m.slo_pressure, pressure_threshold):
            verb = "held" if in_slo else "entered"
            return "slo_aware", f"slo_pressure {m.slo_pressure:.2f} >= {pressure_threshold:g} ({verb})"
        congested_now = self.mode != "fifo"
        load_threshold = c.exit_load if congested_now else c.enter_load
        queue_threshold = c.exit_queue_per_instance if congested_now else c.enter_queue_per_instance
        verb = "held" if congested_now else "entered"
        if _reaches(m.load, load_threshold):
            return "priority", f"load {m.load:.2f} >= {load_threshold:g} ({verb})"
        if _reaches(m.queue_per_instance, queue_threshold):
            return "priority", f"queue/instance {m.queue_per_instance:.1f} >= {queue_threshold:g} ({verb})"
        calm = f"load {m.load:.2f} < {load_threshold:g}"
        return "fifo", f"{calm} and queue/instance {m.queue_per_instance:.1f} < {queue_threshold:g}"

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        m = self.measure(now, queue, instances)
        self.last_measurement = m
        desired, why = self.desired_mode(m)
        if desired != self.mode:
            dwelt = now - self.mode_since_s
            if dwelt >= self.config.min_dwell_s or now < self.mode_since_s:
                # (`now` going backwards means a new run reusing this policy: switch freely.)
                logger.debug("adaptive: %s -> %s at t=%.3f (%s; %s)", self.mode, desired, now, m, why)
                self.mode, self.mode_since_s = desired, now
                self.switches += 1
            else:
                why = f"{why}, but {self.mode} held for min_dwell_s ({dwelt:.2f} s < {self.config.min_dwell_s:g} s)"
        sub = self.policies[self.mode]
        rule = f"{self.name}/{sub.name}"
        context = ""  # the measurement as text, built only when a decision carries it (most calls place none)
        out: list[Decision] = []
        for decision in sub.schedule(now, queue, instances):
            if isinstance(decision, Assignment):
                # Built directly rather than with dataclasses.replace: same fields, a fraction of the cost.
                d = decision
                context = context or f"{self.mode}: {m}; {why}"
                out.append(Assignment(d.instance_id, d.request_ids, d.priority_hint, rule, f"{context}; {d.reason}"))
            elif isinstance(decision, Rejection):
                out.append(dataclasses.replace(decision, rule=rule))
        return out

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "mode": self.mode, "switches": self.switches}


def _reaches(value: float, threshold: float) -> bool:
    """At or above the threshold; a zero measure never counts, so a 0 threshold cannot pin a mode."""
    return value > 0 and value >= threshold
