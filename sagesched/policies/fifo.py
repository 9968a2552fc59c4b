"""First come, first served: arrival order, each request to the compatible instance with the least
outstanding work. The reference every other policy is measured against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sagesched.core import Decision, InstanceView, Request
from sagesched.policies.base import LoadLedger, Policy, PolicyConfig, arrival_order, reject_unservable
from sagesched.policies.registry import register


@dataclass(frozen=True)
class FifoConfig(PolicyConfig):
    """FIFO has no knobs beyond this one.

    head_of_line_blocking: when True, a request that cannot be placed now (all compatible instances
        full) holds back every later request, as a strict FCFS queue does. When False (default),
        later requests for other models or kinds may pass it.
    """

    head_of_line_blocking: bool = False


@register
class FifoPolicy(Policy):
    name = "fifo"
    Config = FifoConfig
    config: FifoConfig

    reason = "arrival order, least outstanding work"

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        decisions: list[Decision]
        decisions, servable = reject_unservable(queue, instances, self.name)
        if not servable:
            return decisions
        ledger = LoadLedger(instances)
        servable.sort(key=arrival_order)
        blocking = self.config.head_of_line_blocking
        for request in servable:
            target = ledger.least_outstanding(request)
            if target is None:
                if blocking:
                    break
                continue
            decisions.append(ledger.assign(target, [request], self.name, self.reason))
        return decisions
