"""Least-slack ranking read off the indexed gateway queue: `slo_aware`'s decisions in O(placed).

`SloAwarePolicy.schedule` ranks every queued request by its best slack on every call. Past
saturation the queue holds thousands of requests while one slot frees per call, so that ranking
(O(queue x instances) Python arithmetic) was almost all of a simulation's time. Given a
`GatewayQueue`, this module computes the same best slacks for a whole class at once from the
queue's numpy columns, and hands the requests to the same placement loops lazily, best first,
class by class, so that a class whose instances are all full is never looked at again in the call.

The arithmetic below repeats `slo_aware.slack_s` (and the `LoadLedger` / `InstanceView`
predictions it calls) operation for operation, so the floats, and therefore the decisions, are
identical; tests/sim/test_slack_indexed.py checks it on random views and requests, and
tests/sim/test_indexed_queue.py on whole simulations. Change both together.

Past saturation even one numpy pass per queued row and call grows with the queue; what keeps a
call's work to the rows that can still matter (all exact, see the functions): instances another
instance dominates are skipped, rows late for good are marked on the queue's columns and not
computed again where only their lateness is read (`class_slo_slacks`), per-row terms are kept on
the columns (all in `policies.slack_columns`), and a class without a free slot is skipped.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from sagesched.core import Decision, GatewayQueue, InstanceView, RejectCode, Rejection, Request
from sagesched.core.queue import ClassKey, Columns
from sagesched.policies.base import LoadLedger, class_served_by, servable_classes
from sagesched.policies.slack_columns import class_best_slacks, class_row_slacks, class_slo_slacks

if TYPE_CHECKING:
    from sagesched.policies.slo_aware import SloAwarePolicy

_INF = math.inf


def _sorted_rows(keys: np.ndarray, rows: np.ndarray, cols: Columns) -> Iterator[tuple[tuple, Request]]:
    """Rows in ``(key, arrival_s, id)`` order (`keys` indexed by row), lazily (`_sorted_aligned`)."""
    return _sorted_aligned(keys[rows], rows, cols)


def _sorted_aligned(keys: np.ndarray, rows: np.ndarray, cols: Columns) -> Iterator[tuple[tuple, Request]]:
    """Rows in ``(key, arrival_s, id)`` order, `keys[j]` being `rows[j]`'s key, lazily: a sorted
    prefix at a time (4, 16, 64, ... rows, cut at a key value so that ties stay together), each
    sorted by Python on exactly the tuple the reference code sorts by."""
    requests = cols.requests
    chunk = 4  # usually one slot frees per call: sort a few rows first
    while rows.size:
        if rows.size > chunk:
            cut = np.partition(keys, chunk - 1)[chunk - 1]
            take_mask = keys <= cut
            take, take_keys = rows[take_mask], keys[take_mask]
            if not take.size:  # NaN keys only: the rest, as they come
                take, take_keys, rows, keys = rows, keys, rows[:0], keys[:0]
            else:
                rest = ~take_mask
                rows, keys = rows[rest], keys[rest]
        else:
            take, take_keys, rows, keys = rows, keys, rows[:0], keys[:0]
        items = [
            ((key, requests[i].arrival_s, requests[i].id), requests[i])
            for key, i in zip(take_keys.tolist(), take.tolist(), strict=True)
        ]
        items.sort(key=_first)
        yield from items
        chunk *= 4


def _first(item: tuple) -> tuple:
    return item[0]


class _Merge:
    """Merge per-class streams of ``(key, request)`` in key order; `drop` a class mid-way.

    Streams are given as factories and made only for classes not in `dropped` (shared between the
    merges of one call: a class without a free slot has none for the rest of the call).
    """

    def __init__(
        self, streams: list[tuple[ClassKey, Callable[[], Iterator[tuple[tuple, Request]]]]], dropped: set[ClassKey]
    ) -> None:
        self.dropped = dropped
        heap = []
        for n, (cls, make) in enumerate(streams):
            if cls in dropped:
                continue
            it = make()
            first = next(it, None)
            if first is not None:
                heap.append((first[0], n, cls, first[1], it))
        heapq.heapify(heap)
        self.heap = heap

    def drop(self, cls: ClassKey) -> None:
        self.dropped.add(cls)

    def __iter__(self) -> Iterator[tuple[ClassKey, Request]]:
        heap, dropped = self.heap, self.dropped
        while heap:
            _, n, cls, request, it = heap[0]
            if cls not in dropped:
                yield cls, request
            following = None if cls in dropped else next(it, None)
            if following is None:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (following[0], n, cls, following[1], it))


def schedule_indexed(
    policy: SloAwarePolicy, now: float, queue: GatewayQueue, instances: Sequence[InstanceView]
) -> list[Decision]:
    """`SloAwarePolicy.schedule` on a `GatewayQueue`: the same decisions in the same order."""
    from sagesched.policies.slo_aware import best_slack_s

    name = policy.name
    rejections, queue, classes = servable_classes(queue, instances, name)
    decisions: list[Decision] = list(rejections)
    if not classes:
        return decisions
    ledger = LoadLedger(instances)
    shed = policy.config.shed_unattainable
    attainable, best_effort, late = [], [], []
    for cls in classes:
        if not shed and not _class_has_room(ledger, cls):
            # No free slot for the class now, so none in this call (a ledger only adds load): the
            # reference looks at each of its requests and places none. Past saturation this is
            # most calls (an arrival, with a free slot only at the embedding instances).
            continue
        cols = queue.columns(cls)
        best_effort.append((cls, _best_effort_rows(cols, cols.n)))
        views = [v for v in ledger.views.values() if v.healthy and class_served_by(v, cls)]
        if not views:
            continue  # every compatible instance is down: its SLO requests stay queued
        rows, slacks = class_slo_slacks(cols, views, ledger, now, cls[0])  # the rest are late
        ok = slacks >= 0  # (NaN compares False, without a warning)
        attainable.append((cls, _aligned_factory(slacks[ok], rows[ok], cols)))
        late.append((cls, _late_rows(cols, cols.n, rows[ok])))

    dropped: set[ClassKey] = set()  # classes with no free slot left in this call
    moved_late: list[Request] = []
    merge = _Merge(attainable, dropped)
    for cls, request in merge:
        # Not placed: no candidate (the class is dropped once nothing has room) or deferred as late
        # (it had candidates, so there is room and the class stays).
        if not policy._place_by_slack(ledger, request, now, decisions, moved_late) and not ledger.has_room(request):
            merge.drop(cls)

    merge = _Merge(best_effort, dropped)
    for cls, request in merge:
        if not policy._place_soonest(
            ledger, request, decisions, "no SLO: arrival order, earliest predicted completion"
        ) and not ledger.has_room(request):
            merge.drop(cls)

    for request in moved_late:
        cls = (request.is_embedding, request.model)
        late.append((cls, _single(request)))
    # Shedding looks at every late request (it rejects whatever is unattainable, room or not).
    merge = _Merge([(cls, _rekeyed(make)) for cls, make in late], set() if shed else dropped)
    for cls, request in merge:
        if shed:
            best = best_slack_s(ledger, request, now)
            if best is not None and best < 0:
                decisions.append(
                    Rejection(
                        request.id,
                        f"SLO cannot be met on any instance (best predicted slack {best * 1000:.0f} ms); shed",
                        RejectCode.SLO_UNATTAINABLE,
                        name,
                    )
                )
            continue  # shedding: one still attainable on a busy instance waits for a slot there
        if not policy._place_soonest(
            ledger, request, decisions, "SLO no longer attainable: served after requests that can still meet theirs"
        ) and not ledger.has_room(request):
            merge.drop(cls)
    return decisions


def _class_has_room(ledger: LoadLedger, cls: ClassKey) -> bool:
    """`ledger.has_room(request)` for every request of class `cls`."""
    added = ledger.added_requests
    for v in ledger.views.values():
        if v.healthy and v.inflight + added[v.id] < v.max_inflight and class_served_by(v, cls):
            return True
    return False


def _single(request: Request) -> Callable[[], Iterator[tuple[tuple, Request]]]:
    """A one-request stream keyed like the late streams after `_rekeyed`."""
    return lambda: iter([((request.arrival_s, request.arrival_s, request.id), request)])


def _rekeyed(make: Callable[[], Iterator[tuple[tuple, Request]]]) -> Callable[[], Iterator[tuple[tuple, Request]]]:
    """Late requests merge on ``(arrival_s, id)`` (their sort key in `slo_aware`)."""

    def rekeyed() -> Iterator[tuple[tuple, Request]]:
        for _, request in make():
            yield (request.arrival_s, request.id), request

    return rekeyed


def _rows_factory(keys: np.ndarray, mask: np.ndarray, cols: Columns) -> Callable[[], Iterator[tuple[tuple, Request]]]:
    """A `_sorted_rows` stream over the rows in `mask`, made only if a merge asks for it."""
    return lambda: _sorted_rows(keys, np.flatnonzero(mask), cols)


def _aligned_factory(
    keys: np.ndarray, rows: np.ndarray, cols: Columns
) -> Callable[[], Iterator[tuple[tuple, Request]]]:
    return lambda: _sorted_aligned(keys, rows, cols)


def _best_effort_rows(cols: Columns, n: int) -> Callable[[], Iterator[tuple[tuple, Request]]]:
    """The queued rows without an SLO in arrival order; the mask is built only if a merge asks."""
    return lambda: _sorted_rows(cols.arrival, np.flatnonzero(cols.alive[:n] & ~cols.has_slo[:n]), cols)


def _late_rows(cols: Columns, n: int, attainable: np.ndarray) -> Callable[[], Iterator[tuple[tuple, Request]]]:
    """The queued SLO rows not in `attainable`, in arrival order, built only if a merge asks."""

    def make() -> Iterator[tuple[tuple, Request]]:
        mask = cols.alive[:n] & cols.has_slo[:n]
        mask[attainable] = False
        return _sorted_rows(cols.arrival, np.flatnonzero(mask), cols)

    return make


def count_below(queue: GatewayQueue, classes: list[ClassKey], ledger: LoadLedger, now: float, threshold: float) -> int:
    """Queued requests with an SLO whose best slack (fresh ledger) is below `threshold` (`adaptive`)."""
    total = 0
    for cls in classes:
        cols = queue.columns(cls)
        n = cols.n
        views = [v for v in ledger.views.values() if v.healthy and class_served_by(v, cls)]
        if not views:
            continue
        # (NaN compares False without a warning: no errstate needed around these comparisons.)
        if threshold >= 0:  # rows late for good are below it: only the others are computed
            rows, slacks = class_slo_slacks(cols, views, ledger, now, cls[0])
            total += cols.slo_alive - rows.size + int(np.count_nonzero(slacks < threshold))
        else:
            best = class_best_slacks(cols, views, ledger, now, cls[0])
            total += int(np.count_nonzero(cols.alive[:n] & cols.has_slo[:n] & (best < threshold)))
    return total


def schedule_admission_indexed(
    policy: SloAwarePolicy,
    now: float,
    queue: GatewayQueue,
    instances: Sequence[InstanceView],
    classes: list[ClassKey] | None = None,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> list[Decision]:
    """`SloAwarePolicy.schedule` with admission (no fair share) on a `GatewayQueue`: the same
    decisions in the same order.

    `classes` (default: the queue's servable classes, unservable ones rejected first) and `exclude`
    (ids not offered: hybrid's fallback sees only its LLM classes, less what this call placed)
    say which queued requests the call is about; they are exactly the plain path's `servable`.
    Admission counts the ones new since its last call (`AdmissionControl.observe_queue`), best slacks
    come per class from the numpy columns, the budget's most hopeless late requests are found by a
    partition, and the bounded order (late urgent, attainable urgent, other late, relaxed, no SLO)
    is merged lazily per class, a class without a free slot dropped for the rest of the call.
    """
    from sagesched.policies.slo_aware import _LATE, _LATE_FIRST, _NO_SLO, _SLACK

    admission = policy.admission
    assert admission is not None and policy.fair is None
    name = policy.name
    decisions: list[Decision] = []
    if classes is None:
        rejections, queue, classes = servable_classes(queue, instances, name)
        decisions.extend(rejections)
    if not classes:
        return decisions
    columns = [(cls, queue.columns(cls)) for cls in classes]
    if not admission.observe_queue(queue, columns, exclude):
        return decisions
    ledger = LoadLedger(instances)
    config = admission.config
    horizon, first = config.defer_slack_s, config.late_first_priority
    factor = policy.ttft_factor

    # Per class: the rows offered, their best slacks (under `factor`), and which are attainable / late.
    per_class = []
    served_by: dict[ClassKey, list[InstanceView]] = {}
    for cls, cols in columns:
        n = cols.n
        alive = cols.alive[:n]
        if exclude:
            gone = [cols.row[i] for i in exclude if i in cols.row]
            if gone:
                alive = alive.copy()
                alive[gone] = False
        has_slo = cols.has_slo[:n]
        views = served_by[cls] = [v for v in ledger.views.values() if v.healthy and class_served_by(v, cls)]
        if views:
            best = class_best_slacks(cols, views, ledger, now, cls[0], factor)
            with np.errstate(invalid="ignore"):
                ok = best >= 0
            slo_rows = alive & has_slo
            attainable, late = slo_rows & ok, slo_rows & ~ok
        else:  # every compatible instance is down: its SLO requests stay queued
            best = np.full(n, _INF)
            attainable = late = np.zeros(n, dtype=bool)
        per_class.append((cls, cols, alive & ~has_slo, best, attainable, late, _priority_column(policy, cls, cols)))

    # Shedding: the budget's most hopeless sheddable late requests, (slack, -priority, arrival, id);
    # under a `ttft_margin_factor` by their slack at factor 1 (`_shed_slacks` on the plain path).
    budget = admission.budget()
    if budget > 0:
        pool = []
        for cls, cols, _, best, _, late, prio in per_class:
            sheddable = late & (prio > config.protect_priority)
            if factor != 1.0 and not cls[0]:
                rows = np.flatnonzero(sheddable)
                if not rows.size:
                    continue
                best = np.full(cols.n, _INF)
                best[rows] = class_row_slacks(cols, served_by[cls], ledger, now, False, rows)
                sheddable &= best < -config.shed_margin_s
            elif config.shed_margin_s > 0:
                with np.errstate(invalid="ignore"):
                    sheddable &= best < -config.shed_margin_s
            rows = np.flatnonzero(sheddable)
            if rows.size:
                pool.append((cols, best, rows, prio))
        total = sum(rows.size for _, _, rows, _ in pool)
        if total:
            if total > budget:
                cut = np.partition(np.concatenate([best[rows] for _, best, rows, _ in pool]), budget - 1)[budget - 1]
                pool = [(cols, best, rows[best[rows] <= cut], prio) for cols, best, rows, prio in pool]
            items = [
                ((float(best[i]), -int(prio[i]), cols.requests[i].arrival_s, cols.requests[i].id), cols, i)
                for cols, best, rows, prio in pool
                for i in rows.tolist()
            ]
            items.sort(key=_first)
            shed = items[:budget]
            for key, cols, i in shed:
                decisions.append(admission.shed_rejection(cols.requests[i], key[0], name))
            admission.shed += len(shed)
            shed_rows: dict[int, list[int]] = {}
            for _, cols, i in shed:
                shed_rows.setdefault(id(cols), []).append(i)
            for k, (cls, cols, no_slo, best, attainable, late, prio) in enumerate(per_class):
                shed_here = shed_rows.get(id(cols))
                if shed_here:
                    late = late.copy()
                    late[shed_here] = False
                    per_class[k] = (cls, cols, no_slo, best, attainable, late, prio)

    # The late rows split by `AdmissionConfig.goes_first`: urgent class, waited long enough.
    wait = config.late_first_wait_s
    late_first, late_rest = [], []
    for c in per_class:
        go = c[5] & (c[6] <= first)
        if wait > 0:
            go &= (now - c[1].arrival[: c[1].n]) >= wait
        late_first.append((c[0], _priority_rows_factory(c[6], go, c[1])))
        late_rest.append((c[0], _priority_rows_factory(c[6], c[5] & ~go, c[1])))
    with np.errstate(invalid="ignore"):
        stages = [
            (_LATE_FIRST, late_first),
            (_SLACK, [(c[0], _rows_factory(c[3], c[4] & (c[3] <= horizon), c[1])) for c in per_class]),
            (_LATE, late_rest),
            (_SLACK, [(c[0], _rows_factory(c[3], c[4] & ~(c[3] <= horizon), c[1])) for c in per_class]),
            (_NO_SLO, [(c[0], _rows_factory(c[1].arrival[: c[1].n], c[2], c[1])) for c in per_class]),
        ]
    dropped: set[ClassKey] = set()  # classes with no free slot left in this call
    for how, streams in stages:
        merge = _Merge(streams, dropped)
        for cls, request in merge:
            if not policy._place(ledger, request, how, now, decisions) and not ledger.has_room(request):
                merge.drop(cls)
    return decisions


def _priority_column(policy: SloAwarePolicy, cls: ClassKey, cols: Columns) -> np.ndarray:
    """``int(priority)`` per row of `cols`, kept on the policy per class and extended as rows are
    appended (a row's request never changes; a compaction makes a new `Columns`, rebuilt here)."""
    cache: dict[ClassKey, tuple[Columns, np.ndarray, int]] = policy.__dict__.setdefault("_priority_columns", {})
    n = cols.n
    cached = cache.get(cls)
    if cached is not None and cached[0] is cols:
        column, filled = cached[1], cached[2]
        if filled >= n:
            return column[:n]
    else:
        column, filled = np.empty(0, dtype=np.int64), 0
    if column.size < n:
        grown = np.empty(max(n, 2 * column.size), dtype=np.int64)
        grown[:filled] = column[:filled]
        column = grown
    requests = cols.requests
    column[filled:n] = [int(requests[i].priority) for i in range(filled, n)]
    cache[cls] = (cols, column, n)
    return column[:n]


def _priority_rows_factory(
    priority: np.ndarray, mask: np.ndarray, cols: Columns
) -> Callable[[], Iterator[tuple[tuple, Request]]]:
    """The rows in `mask` in ``(priority, arrival_s, id)`` order, lazily: one priority at a time,
    each in arrival order (`_sorted_rows` on the arrival column: a priority holds many rows, so
    sorting on it alone would sort a whole priority's rows at once)."""

    def rows() -> Iterator[tuple[tuple, Request]]:
        found = np.flatnonzero(mask)
        if not found.size:
            return
        prio = priority[found]
        arrival = cols.arrival
        for p in np.unique(prio).tolist():
            for (_, arrival_s, rid), request in _sorted_rows(arrival, found[prio == p], cols):
                yield (p, arrival_s, rid), request

    return rows


__all__ = ["class_best_slacks", "class_slo_slacks", "count_below", "schedule_admission_indexed", "schedule_indexed"]
