"""SLO-aware admission: refuse, with a reason, work whose SLO the predicted queue has already lost.

Past saturation a least-slack order keeps goodput up by serving requests that can still meet their
SLO first, but the ones that cannot are then served after everything else: their latency grows
without bound (the benchmark's p99 TTFT past saturation was 1.7-3.5x FIFO's). Admission replaces
"serve it last" with two bounded choices:

- **shed** it: a `Rejection` with code ``queue_full`` and a reason naming the predicted lateness,
  which the live gateway answers with 429 and ``Retry-After`` (`sagesched.live.errors`). A client
  that retries later finds a shorter queue; nothing is dropped silently, and the simulator records
  the request as rejected with the same reason, so shed fractions are reported beside goodput;
- **serve it soon**: a late request that is not shed goes *before* attainable requests whose slack
  exceeds ``defer_slack_s`` (batch work with minutes of slack), in priority-then-arrival order, so
  its wait is bounded by the urgent work alone instead of by the whole backlog.

Shedding is rationed by a budget: over the requests this controller has seen, at most
``max_shed_fraction`` are shed, the most hopeless first (most negative best slack: the ones that
would otherwise wait longest past their SLO, i.e. the tail), lowest class first among equals. Requests at or above ``protect_priority`` in urgency (critical by
default) are never shed. The budget is what keeps shedding from being a hidden win: a policy that
sheds half its load can post any goodput; one that sheds at most 5% cannot.

The controller is deterministic: its state is the set of request ids it has seen and how many it
shed, both functions of the calls it received.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from sagesched.core import GatewayQueue, Priority, RejectCode, Rejection, Request
from sagesched.core.queue import ClassKey, Columns, class_of


@dataclass(frozen=True)
class AdmissionConfig:
    """Admission knobs shared by the policies that use them (slo_aware, hybrid's fallback).

    max_shed_fraction: most of the requests seen that may be shed (0 = never shed; late requests
        are still served ahead of long-slack work).
    defer_slack_s: attainable requests with more best slack than this are served after late ones
        (bounded tails); ``inf`` keeps the old order (late last).
    protect_priority: requests of this priority class or more urgent are never shed.
    late_first_priority: late requests of this class or more urgent that are not shed go first,
        before even the urgent attainable requests (default 1, high: interactive work's tail stays
        bounded by its own queue); less urgent late ones go after the urgent attainable ones.
    late_first_wait_s: a late request of such a class goes first only once it has waited this long
        at the gateway (``now - arrival_s``, with the `now` the policy ranks at: hybrid's fallback
        ranks as of ``now + slack_margin_ms``); until then it is served with the other late
        requests, after the urgent attainable ones. It is late as ranked (its SLO predicted lost, or,
        under a ranking margin, within ``shed_margin_s`` of being lost), so serving it ahead of work
        that can still meet its own mostly moves the miss; the wait bounds how far its tail may
        grow. 0 (the default): at once.
    retry_after_s: what the rejection's reason suggests as a retry delay (the gateway's 429 carries
        its own ``Retry-After``).
    shed_margin_s: the slacks this controller is given are measured this far ahead of the clock
        (hybrid's ``slack_margin_ms``: its fallback ranks as of ``now + margin``); only a request
        late by the clock itself (given slack < ``-shed_margin_s``) may be shed, and its reason
        names that lateness. The rest of the late set is served first instead. 0: the clock's own.
    """

    max_shed_fraction: float = 0.05
    defer_slack_s: float = 5.0
    protect_priority: int = int(Priority.CRITICAL)
    retry_after_s: float = 1.0
    late_first_priority: int = int(Priority.HIGH)
    shed_margin_s: float = 0.0
    late_first_wait_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.late_first_wait_s >= 0 and math.isfinite(self.late_first_wait_s)):
            raise ValueError(
                f"late_first_wait_s must be a finite number >= 0 s (0 = at once), got {self.late_first_wait_s!r}"
            )
        if not (self.shed_margin_s >= 0 and math.isfinite(self.shed_margin_s)):
            raise ValueError(f"shed_margin_s must be a finite number >= 0 s, got {self.shed_margin_s!r}")
        if not 0.0 <= self.max_shed_fraction <= 1.0:
            raise ValueError(f"max_shed_fraction must be within [0, 1], got {self.max_shed_fraction!r}")
        if not self.defer_slack_s >= 0:
            raise ValueError(f"defer_slack_s must be >= 0 s (inf: late requests last), got {self.defer_slack_s!r}")
        if not 0 <= int(self.protect_priority) <= int(Priority.BACKGROUND):
            raise ValueError(f"protect_priority must be 0-4, got {self.protect_priority!r}")
        if not -1 <= int(self.late_first_priority) <= int(Priority.BACKGROUND):
            raise ValueError(f"late_first_priority must be -1 (none) to 4, got {self.late_first_priority!r}")
        if not self.retry_after_s > 0:
            raise ValueError(f"retry_after_s must be > 0 s, got {self.retry_after_s!r}")

    def goes_first(self, request: Request, now: float) -> bool:
        """Whether `request`, late and not shed, goes before the urgent attainable work at `now`:
        its class is ``late_first_priority`` or more urgent and it has waited ``late_first_wait_s``."""
        if int(request.priority) > self.late_first_priority:
            return False
        wait = self.late_first_wait_s
        return wait <= 0.0 or now - request.arrival_s >= wait


class AdmissionControl:
    """The shed budget and the shed decision over one call's late requests."""

    __slots__ = ("_last", "_mark", "config", "seen_count", "shed")

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self.seen_count = 0
        self._last: set[str] = set()
        # After `observe_queue`: (the queue, its `last_serial` then) stands for the ids it offered,
        # which were every request of the offered classes queued then (`_last` is then unused).
        self._mark: tuple[GatewayQueue, int] | None = None
        self.shed = 0

    def observe(self, requests: Iterable[Request]) -> None:
        """Count requests as seen (each id once), so the budget grows with the offered load.

        Ids are deduplicated against the previous call's only: a queued request is offered call
        after call and a dispatched one never comes back, so this counts each once while memory
        stays bounded by the queue (a set of every id ever seen grew without end in a gateway).
        """
        self.observe_ids({r.id for r in requests})

    def observe_ids(self, ids: set[str]) -> None:
        """`observe` given the offered requests' ids (a set the caller built; kept, not copied)."""
        mark = self._mark
        if mark is None:
            self.seen_count += len(ids - self._last)
        else:
            queue, serial = mark
            self.seen_count += sum([not queue.queued_by(rid, serial) for rid in ids])
            self._mark = None
        self._last = ids

    def observe_one(self, request_id: str) -> None:
        """`observe_ids({request_id})` without the set difference (a lone request, every light-load call)."""
        mark = self._mark
        if mark is None:
            self.seen_count += request_id not in self._last
        else:
            self.seen_count += not mark[0].queued_by(request_id, mark[1])
            self._mark = None
        self._last = {request_id}

    def observe_queue(
        self, queue: GatewayQueue, columns: Sequence[tuple[ClassKey, Columns]], exclude: Collection[str]
    ) -> bool:
        """`observe_ids` of the requests of the classes in `columns` queued in `queue`, less `exclude`
        (ids that leave the queue in this call), without building that set; whether any was offered.

        Past saturation the offered set is the whole backlog on every call, and the set arithmetic
        of `observe_ids` was O(queue) per call (~10% of a simulation at 3x load). Callers offer
        every queued request of their classes (less what they place in the same call), so the
        ids offered now and not at the previous call are exactly the ones added to the queue since
        then: O(those) from the queue's insertion order (`GatewayQueue.added_since`).
        """
        offered = sum([len(cols.row) for _, cols in columns])
        if exclude:
            offered -= sum([any(rid in cols.row for _, cols in columns) for rid in exclude])
        if offered <= 0:
            return False
        mark = self._mark
        if mark is not None and mark[0] is queue:
            keys = {cls for cls, _ in columns}
            self.seen_count += sum([class_of(r) in keys and r.id not in exclude for r in queue.added_since(mark[1])])
        else:
            ids: set[str] = set().union(*(cols.row.keys() for _, cols in columns))
            self.observe_ids(ids - set(exclude) if exclude else ids)
        self._mark = (queue, queue.last_serial)
        self._last = set()
        return True

    def shed_rejection(self, request: Request, slack: float, rule: str) -> Rejection:
        """The rejection of a shed late request (best predicted slack `slack` < -shed_margin_s)."""
        return Rejection(
            request.id,
            f"SLO cannot be met given the predicted queue (best predicted lateness "
            f"{-(slack + self.config.shed_margin_s) * 1000:.0f} ms); refused rather than served late, retry after "
            f"{self.config.retry_after_s:g} s",
            RejectCode.QUEUE_FULL,
            rule,
        )

    @property
    def shed_fraction(self) -> float:
        return self.shed / self.seen_count if self.seen_count else 0.0

    def budget(self) -> int:
        """How many more requests may be shed now."""
        return max(0, int(self.config.max_shed_fraction * self.seen_count) - self.shed)

    def split_late(self, late: list[tuple[float, Request]], rule: str) -> tuple[list[Rejection], list[Request]]:
        """Shed what the budget allows of `late` ((best slack, request) pairs of late requests; only
        those whose slack is below ``-shed_margin_s`` may be shed: under slo_aware's
        ``ttft_margin_factor`` a request is late by the stretched slack and given here with its
        slack at factor 1, which may still be >= 0).

        Returns the rejections and the late requests kept, the kept ones in (priority, arrival, id)
        order: the order in which they are served ahead of long-slack work.
        """
        c = self.config
        budget = self.budget()
        rejections: list[Rejection] = []
        kept: list[Request] = []
        if budget > 0:
            sheddable = sorted(
                (item for item in late if int(item[1].priority) > c.protect_priority and item[0] < -c.shed_margin_s),
                key=lambda item: (item[0], -int(item[1].priority), item[1].arrival_s, item[1].id),
            )
            shed_ids = set()
            for slack, request in sheddable[:budget]:
                shed_ids.add(request.id)
                rejections.append(self.shed_rejection(request, slack, rule))
            self.shed += len(shed_ids)
            kept = [r for _, r in late if r.id not in shed_ids]
        else:
            kept = [r for _, r in late]
        kept.sort(key=lambda r: (int(r.priority), r.arrival_s, r.id))
        return rejections, kept


__all__ = ["AdmissionConfig", "AdmissionControl"]
