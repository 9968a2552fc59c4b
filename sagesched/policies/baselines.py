"""Simple placement baselines that every smarter policy must beat.

All four take the queue in arrival order (ties by id), reject what no instance could ever serve,
and only differ in which healthy, compatible instance with a free slot they pick:

- ``round_robin``: the next candidate after the last instance used, in id order (a cursor kept
  across calls, so load rotates over calls as well as within one);
- ``random``: a uniformly random candidate from a seeded generator;
- ``least_loaded``: the candidate with the fewest requests in flight (running + waiting + this
  call's own assignments), then the least outstanding token work;
- ``power_of_two``: two distinct random candidates, the less loaded of them (Mitzenmacher's "power
  of two choices": nearly the balance of least-loaded at the cost of two probes).

Candidates are always considered in id order, so results do not depend on the order the driver
lists its instances in, and the seeded ones repeat exactly for the same inputs and seed.
"""

from __future__ import annotations

import random
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter

from sagesched.core import Decision, InstanceView, Request
from sagesched.core.queue import RankedMerge, class_of
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


class _PlacementBaseline(Policy):
    """Arrival order; subclasses choose one instance among the candidates (never empty, id order)."""

    reason: str = ""

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        decisions: list[Decision]
        merge: RankedMerge | None = None
        ordered: Iterator[Request]
        if use_index(queue):
            # The queue's arrival index: a class whose instances are all full is skipped whole.
            rejections, indexed, classes = servable_classes(queue, instances, self.name)
            decisions = [*rejections]
            if not classes:
                return decisions
            merge = RankedMerge(indexed, classes)
            ordered = (request for _, request in merge)
        else:
            rejections, servable = reject_unservable(queue, instances, self.name)
            decisions = [*rejections]
            if not servable:
                return decisions
            servable.sort(key=arrival_order)
            ordered = iter(servable)
        ledger = LoadLedger(instances)
        for request in ordered:
            candidates = sorted(ledger.candidates(request), key=_by_id)
            if not candidates:
                if merge is not None and not ledger.has_room(request):
                    merge.drop(class_of(request))
                continue
            target = self.choose(ledger, candidates)
            decisions.append(ledger.assign(target, [request], self.name, self.reason))
        return decisions

    @abstractmethod
    def choose(self, ledger: LoadLedger, candidates: list[InstanceView]) -> InstanceView:
        """Pick one of `candidates` (non-empty, sorted by id)."""


_by_id = attrgetter("id")


def _load_key(ledger: LoadLedger, view: InstanceView) -> tuple[int, int, str]:
    return (ledger.inflight(view.id), ledger.outstanding_tokens(view.id), view.id)


@dataclass(frozen=True)
class RoundRobinConfig(PolicyConfig):
    """Round robin has no knobs: it rotates over instance ids in sorted order."""


@register
class RoundRobinPolicy(_PlacementBaseline):
    name = "round_robin"
    Config = RoundRobinConfig
    reason = "round robin over compatible instances"

    def __init__(self, config: PolicyConfig | None = None, **overrides: object) -> None:
        super().__init__(config, **overrides)
        # Id of the instance used last; the next pick is the first candidate with a larger id
        # (wrapping around). An id survives instances joining or leaving, a list index would not.
        self._last_id: str | None = None

    def choose(self, ledger: LoadLedger, candidates: list[InstanceView]) -> InstanceView:
        pick = candidates[0]
        if self._last_id is not None:
            pick = next((v for v in candidates if v.id > self._last_id), candidates[0])
        self._last_id = pick.id
        return pick


@dataclass(frozen=True)
class RandomConfig(PolicyConfig):
    """Configuration of the random baseline.

    seed: seeds the policy's own generator; the same seed and the same sequence of calls give the
        same placements.
    """

    seed: int = 0


@register
class RandomPolicy(_PlacementBaseline):
    name = "random"
    Config = RandomConfig
    config: RandomConfig
    reason = "uniformly random compatible instance"

    def __init__(self, config: PolicyConfig | None = None, **overrides: object) -> None:
        super().__init__(config, **overrides)
        self._rng = random.Random(self.config.seed)

    def choose(self, ledger: LoadLedger, candidates: list[InstanceView]) -> InstanceView:
        return candidates[self._rng.randrange(len(candidates))]


@dataclass(frozen=True)
class LeastLoadedConfig(PolicyConfig):
    """Least loaded has no knobs: fewest in flight (incl. this call's), then least token work, then id."""


@register
class LeastLoadedPolicy(_PlacementBaseline):
    name = "least_loaded"
    Config = LeastLoadedConfig
    reason = "fewest requests in flight (running + waiting + this call's)"

    def choose(self, ledger: LoadLedger, candidates: list[InstanceView]) -> InstanceView:
        return min(candidates, key=lambda v: _load_key(ledger, v))


@dataclass(frozen=True)
class PowerOfTwoConfig(PolicyConfig):
    """Configuration of the power-of-two-choices baseline.

    seed: seeds the policy's own generator that draws the two candidates; the same seed and the
        same sequence of calls give the same placements.
    """

    seed: int = 0


@register
class PowerOfTwoPolicy(_PlacementBaseline):
    name = "power_of_two"
    Config = PowerOfTwoConfig
    config: PowerOfTwoConfig
    reason = "less loaded of two random compatible instances"

    def __init__(self, config: PolicyConfig | None = None, **overrides: object) -> None:
        super().__init__(config, **overrides)
        self._rng = random.Random(self.config.seed)

    def choose(self, ledger: LoadLedger, candidates: list[InstanceView]) -> InstanceView:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(range(len(candidates)), 2)
        return min(candidates[first], candidates[second], key=lambda v: _load_key(ledger, v))
