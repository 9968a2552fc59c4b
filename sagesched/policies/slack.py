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
instance dominates are skipped (`_dominant_terms`), rows late for good are marked on the queue's
columns and not computed again where only their lateness is read (`class_slo_slacks`), per-row
terms are kept on the columns (`_static_terms`), and a class without a free slot is skipped.
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

if TYPE_CHECKING:
    from sagesched.policies.slo_aware import SloAwarePolicy

_INF = math.inf


def class_best_slacks(
    cols: Columns, views: Sequence[InstanceView], ledger: LoadLedger, now: float, embedding: bool
) -> np.ndarray:
    """`slo_aware.best_slack_s` for every row of one class's columns, over `views` (the healthy
    instances that serve the class, non-empty). Rows without an SLO get +inf. Read-only.

    Only non-dominated instances are computed (`_dominant_terms`): among instances with the same
    rates, one whose predicted wait(s) are no larger than another's has, row by row, a slack at
    least as large (float rounding is monotone), so the other cannot raise the maximum; on a
    homogeneous pool that is one instance instead of all of them. The result is kept on the columns
    for the same rows, `now` and instance figures.
    """
    terms = _dominant_terms(views, ledger, embedding)
    n = cols.n
    key = (now, embedding, terms)
    memo = cols.cache.get("best")
    if memo is not None and memo[0] == key and memo[1] == n:
        return memo[2]
    best = _slacks(cols, terms, now, embedding)
    cols.cache["best"] = (key, n, best)
    return best


def class_slo_slacks(
    cols: Columns, views: Sequence[InstanceView], ledger: LoadLedger, now: float, embedding: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, slacks)``: the exact best slacks (as `class_best_slacks`) of the queued rows with an
    SLO, except rows known to be late for good (`_late_for_good`): every queued SLO row not in
    `rows` has a negative best slack. For callers that need a late row's lateness, not its value
    (`slo_aware` without admission orders late requests by arrival; `adaptive` counts them).

    Past saturation most queued SLO requests have missed their TTFT for good, so a call computes a
    few hundred rows instead of the whole queue. Kept on the columns like `class_best_slacks`'s
    result (`adaptive` measures with the arrays its slo_aware mode then ranks by).
    """
    terms = _dominant_terms(views, ledger, embedding)
    n = cols.n
    key = (now, embedding, terms)
    memo = cols.cache.get("slo")
    if memo is not None and memo[0] == key and memo[1] == n:
        return memo[2]
    live = cols.alive[:n] & cols.has_slo[:n]
    bounded = all(t[2] >= 0 and t[3] >= 0 for t in terms)  # waits never negative: the bound holds
    if bounded:
        live &= ~_late_for_good(cols, terms, now)[:n]
    rows = np.flatnonzero(live)
    slacks = _slacks(cols, terms, now, embedding, rows)
    if bounded:
        # Marking is only a saving (an unmarked late row is computed exactly, and stays late): done
        # every 8th call, it costs an eighth while rows wait at most 7 calls longer to be marked.
        calls = cols.cache["marks"] = cols.cache.get("marks", 0) + 1
        if calls % 8 == 1:
            _mark_late(cols, terms, now, embedding, rows[slacks < 0])
    cols.cache["slo"] = (key, n, (rows, slacks))
    return rows, slacks


def _slacks(
    cols: Columns,
    terms: tuple[tuple[float, float, float, float], ...],
    now: float,
    embedding: bool,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Best slacks of `rows` (default: all n rows), operation for operation as `slo_aware.slack_s`."""
    if all(math.isfinite(v) and v >= 0 for t in terms for v in t) and all(t[0] > 0 for t in terms):
        return _slacks_static(cols, terms, now, embedding, rows)
    n = cols.n

    def col(values: np.ndarray) -> np.ndarray:
        return values[:n] if rows is None else values[rows]

    prompt, max_tokens, work = col(cols.prompt), col(cols.max_tokens), col(cols.work)
    deadline = col(cols.deadline)
    ttft_due = col(cols.ttft_deadline) - now
    e2e_due = deadline - now
    has_ttft = col(cols.has_ttft)
    has_deadline = ~np.isnan(deadline)
    if not embedding:
        tpot = col(cols.tpot_s)
        tpot_mask = ~np.isnan(tpot) & (max_tokens > 1)
        steps_left = max_tokens - 1
    best: np.ndarray | None = None
    inf = np.full(len(prompt), _INF)
    for rate, decode_step, wait, embedding_wait in terms:
        if embedding:
            own = work / rate
            ttft = embedding_wait + own
            service = own
        else:
            own = prompt / rate
            ttft = wait + own
            service = own + max_tokens * decode_step
        slack = np.where(has_ttft, np.minimum(inf, ttft_due - ttft), inf)
        slack = np.where(has_deadline, np.minimum(slack, e2e_due - (wait + service)), slack)
        if not embedding:
            slack = np.where(tpot_mask, np.minimum(slack, (tpot - decode_step) * steps_left), slack)
        best = slack if best is None else np.maximum(best, slack)
    assert best is not None
    return best


def _slacks_static(
    cols: Columns,
    terms: tuple[tuple[float, float, float, float], ...],
    now: float,
    embedding: bool,
    rows: np.ndarray | None,
) -> np.ndarray:
    """`_slacks` with finite non-negative waits and positive finite rates, from per-row terms kept on
    the columns (`_static_terms`): a missing objective's deadline is +inf there, so that its
    slack is +inf without a mask (inf - now - finite = inf), and the other operations are the
    reference's, in its order, on the same operands: the same floats, a third of the numpy calls."""
    n = cols.n
    pick = slice(0, n) if rows is None else rows
    ttft_deadline, deadline = _static_terms(cols, None, 0.0, embedding)[:2]
    ttft_due = ttft_deadline[pick] - now
    e2e_due = deadline[pick] - now
    best: np.ndarray | None = None
    for rate, decode_step, wait, embedding_wait in terms:
        own, service, tpot = _static_terms(cols, rate, decode_step, embedding)
        own = own[pick]
        slack = np.minimum(ttft_due - ((embedding_wait if embedding else wait) + own), e2e_due - (wait + service[pick]))
        if not embedding:
            slack = np.minimum(slack, tpot[pick])
        best = slack if best is None else np.maximum(best, slack)
    assert best is not None
    return best


def _static_terms(
    cols: Columns, rate: float | None, decode_step: float, embedding: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row arrays that depend only on the row (and an instance's rates), kept on the columns and
    extended as rows are appended. ``rate=None``: (TTFT deadline, E2E deadline, -), +inf where the
    objective is missing; else (own time, service time, TPOT slack (+inf where none)) at that rate
    and decode step, computed as `slo_aware.slack_s` computes them."""
    key = ("static", rate, decode_step, embedding)
    n = cols.n
    cached = cols.cache.get(key)
    if cached is not None and cached[0] >= n:
        return cached[1]
    filled = 0 if cached is None else cached[0]
    size = len(cols.alive)
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray]
    if cached is None or len(cached[1][0]) < size:
        arrays = (np.empty(size), np.empty(size), np.empty(size))
        if cached is not None:
            for new, old in zip(arrays, cached[1], strict=True):
                new[:filled] = old[:filled]
    else:
        arrays = cached[1]
    part = slice(filled, n)
    a, b, c = arrays
    if rate is None:
        a[part] = np.where(cols.has_ttft[part], cols.ttft_deadline[part], _INF)
        deadline = cols.deadline[part]
        b[part] = np.where(np.isnan(deadline), _INF, deadline)
    elif embedding:
        a[part] = cols.work[part] / rate
        b[part] = a[part]
    else:
        max_tokens = cols.max_tokens[part]
        a[part] = cols.prompt[part] / rate
        b[part] = a[part] + max_tokens * decode_step
        tpot = cols.tpot_s[part]
        c[part] = np.where(~np.isnan(tpot) & (max_tokens > 1), (tpot - decode_step) * (max_tokens - 1), _INF)
    cols.cache[key] = (n, arrays)
    return arrays


def _late_for_good(cols: Columns, terms: tuple[tuple[float, float, float, float], ...], now: float) -> np.ndarray:
    """Rows known to have a negative best slack at every later call: sized to the columns' capacity.

    Kept per set of instance rates: valid while every call's instances have rates from that set
    (the bound below is a maximum over it) and time does not go back; otherwise it starts afresh.
    """
    rates = frozenset(t[:2] for t in terms)
    state = cols.cache.get("late")
    if state is None or not rates <= state[0] or now < state[2]:
        state = cols.cache["late"] = (rates, np.zeros(len(cols.alive), dtype=bool), now)
    elif len(state[1]) < len(cols.alive):  # the columns grew
        mask = np.zeros(len(cols.alive), dtype=bool)
        mask[: len(state[1])] = state[1]
        state = cols.cache["late"] = (state[0], mask, now)
    else:
        cols.cache["late"] = (state[0], state[1], now)
    return state[1]


def _mark_late(
    cols: Columns, terms: tuple[tuple[float, float, float, float], ...], now: float, embedding: bool, rows: np.ndarray
) -> None:
    """Of `rows` (late now), mark those late for good: late even with zero waits at every rate of the
    set (`_late_for_good`). Waits are never negative and `now` never decreases, and float rounding is
    monotone, so such a row's slack at any later call, at any wait, is no larger than this bound."""
    if not rows.size:
        return
    rates, mask, _ = cols.cache["late"]
    zero = tuple((rate, step, 0.0, 0.0) for rate, step in sorted(rates))
    bound = _slacks(cols, zero, now, embedding, rows)
    mask[rows[bound < 0]] = True


def _dominant_terms(
    views: Sequence[InstanceView], ledger: LoadLedger, embedding: bool
) -> tuple[tuple[float, float, float, float], ...]:
    """``(rate, decode_step_s, wait, embedding_wait)`` of the views that can hold a row's best
    slack, in the views' order: per rate (prefill or embedding tokens/s, and the decode step), the
    views no other view beats on every wait. All of them when any wait is not finite (inf - inf
    would make a NaN that the maximum must see)."""
    terms = []
    for view in views:
        vid = view.id
        wait = ledger.predicted_wait_s(vid)
        if embedding:
            terms.append((view.embedding_tokens_per_s, 0.0, wait, ledger.predicted_embedding_wait_s(vid)))
        else:
            terms.append((view.prefill_tokens_per_s, view.decode_step_s, wait, 0.0))
    if len(terms) < 2 or not all(math.isfinite(t[2]) and math.isfinite(t[3]) for t in terms):
        return tuple(terms)
    kept: list[tuple[float, float, float, float]] = []
    for t in terms:
        if any(k[:2] == t[:2] and k[2] <= t[2] and k[3] <= t[3] for k in kept):
            continue  # an earlier view with the same rates and waits no larger: never the maximum
        kept = [k for k in kept if not (k[:2] == t[:2] and t[2] <= k[2] and t[3] <= k[3])]
        kept.append(t)
    return tuple(kept)


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
    from sagesched.policies.slo_aware import best_slack_s, slack_s

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
        candidates = ledger.candidates(request)
        if not candidates:
            if not ledger.has_room(request):
                merge.drop(cls)
            continue
        by_id = {v.id: slack_s(ledger, v.id, request, now) for v in candidates}
        target = min(candidates, key=lambda v: (-by_id[v.id], ledger.inflight(v.id), v.id))
        if by_id[target.id] < 0:
            moved_late.append(request)
            continue
        decisions.append(
            ledger.assign(
                target,
                [request],
                name,
                f"least slack first: {by_id[target.id] * 1000:.0f} ms slack here, the most of any instance",
                priority_hint=int(request.priority),
            )
        )

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
    Admission counts their ids (`AdmissionControl.observe_ids`, set arithmetic in C), best slacks
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
    ids: set[str] = set().union(*(cols.row.keys() for _, cols in columns))
    if exclude:
        ids -= exclude
    if not ids:
        return decisions
    admission.observe_ids(ids)
    ledger = LoadLedger(instances)
    config = admission.config
    horizon, first = config.defer_slack_s, config.late_first_priority

    # Per class: the rows offered, their best slacks, and which are attainable / late.
    per_class = []
    for cls, cols in columns:
        n = cols.n
        alive = cols.alive[:n]
        if exclude:
            gone = [cols.row[i] for i in exclude if i in cols.row]
            if gone:
                alive = alive.copy()
                alive[gone] = False
        has_slo = cols.has_slo[:n]
        views = [v for v in ledger.views.values() if v.healthy and class_served_by(v, cls)]
        if views:
            best = class_best_slacks(cols, views, ledger, now, cls[0])
            with np.errstate(invalid="ignore"):
                ok = best >= 0
            slo_rows = alive & has_slo
            attainable, late = slo_rows & ok, slo_rows & ~ok
        else:  # every compatible instance is down: its SLO requests stay queued
            best = np.full(n, _INF)
            attainable = late = np.zeros(n, dtype=bool)
        per_class.append((cls, cols, alive & ~has_slo, best, attainable, late, _priority_column(policy, cls, cols)))

    # Shedding: the budget's most hopeless sheddable late requests, (slack, -priority, arrival, id).
    budget = admission.budget()
    if budget > 0:
        pool = []
        for _, cols, _, best, _, late, prio in per_class:
            rows = np.flatnonzero(late & (prio > config.protect_priority))
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

    with np.errstate(invalid="ignore"):
        stages = [
            (_LATE_FIRST, [(c[0], _priority_rows_factory(c[6], c[5] & (c[6] <= first), c[1])) for c in per_class]),
            (_SLACK, [(c[0], _rows_factory(c[3], c[4] & (c[3] <= horizon), c[1])) for c in per_class]),
            (_LATE, [(c[0], _priority_rows_factory(c[6], c[5] & (c[6] > first), c[1])) for c in per_class]),
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
