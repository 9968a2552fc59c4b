"""First come, first served: arrival order, each request to the compatible instance with the least
outstanding work. The reference every other policy is measured against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sagesched.core import Assignment, Decision, InstanceView, Request
from sagesched.core.queue import RankedMerge
from sagesched.policies.base import (
    LoadLedger,
    Policy,
    PolicyConfig,
    arrival_order,
    reject_unservable,
    servable_classes,
    use_index,
)
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
        if use_index(queue):
            return self._schedule_indexed(now, queue, instances)
        rejections, servable = reject_unservable(queue, instances, self.name)
        decisions: list[Decision] = [*rejections]
        if not servable:
            return decisions
        ledger = LoadLedger(instances)
        if len(servable) == 1:
            # One request (a light-load call): no order, and no later placement reads the ledger.
            request = servable[0]
            target = ledger.least_outstanding(request)
            if target is not None:
                decisions.append(Assignment(target.id, (request.id,), None, self.name, self.reason))
            return decisions
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

    def _schedule_indexed(
        self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]
    ) -> list[Decision]:
        """`schedule` on the queue's arrival index: the same decisions, without touching the requests
        of a class once none of its instances has a free slot (past saturation, the whole queue)."""
        rejections, indexed, classes = servable_classes(queue, instances, self.name)
        decisions: list[Decision] = [*rejections]
        if not classes:
            return decisions
        ledger = LoadLedger(instances)
        blocking = self.config.head_of_line_blocking
        merge = RankedMerge(indexed, classes)
        for cls, request in merge:
            target = ledger.least_outstanding(request)
            if target is None:
                if blocking:
                    break
                if not ledger.has_room(request):
                    merge.drop(cls)
                continue
            decisions.append(ledger.assign(target, [request], self.name, self.reason))
        return decisions
