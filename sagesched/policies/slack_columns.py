"""Best slacks per queued row, off the gateway queue's numpy columns (`policies.slack` ranks by them).

`slo_aware.best_slack_s` for a whole class at once: the arithmetic repeats `slo_aware.slack_s` (and
the `LoadLedger` / `InstanceView` predictions it calls) operation for operation, so the floats, and
therefore the rankings, are identical (tests/sim/test_slack_indexed.py, bit for bit). What keeps it
from growing with the queue past saturation, all exact:

- only instances no other instance of the same rates beats on every predicted wait are computed
  (`_dominant_terms`; float rounding is monotone, so a dominated instance never holds a maximum);
- rows late for good (negative slack even with zero wait from now on) are marked on the columns
  and not computed again by callers that read only their lateness (`class_slo_slacks`);
- per-row terms that depend only on the row and an instance's rates are kept on the columns
  (`_static_terms`), and each result is kept for the same rows, time and instance figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from sagesched.core import InstanceView
from sagesched.core.queue import Columns
from sagesched.policies.base import LoadLedger

_INF = math.inf


def class_best_slacks(
    cols: Columns,
    views: Sequence[InstanceView],
    ledger: LoadLedger,
    now: float,
    embedding: bool,
    ttft_factor: float = 1.0,
) -> np.ndarray:
    """`slo_aware.best_slack_s` for every row of one class's columns, over `views` (the healthy
    instances that serve the class, non-empty). Rows without an SLO get +inf. Read-only.
    `ttft_factor`: as `slo_aware.slack_s`'s (LLM rows only; an embedding class ignores it).

    Only non-dominated instances are computed (`_dominant_terms`): among instances with the same
    rates, one whose predicted wait(s) are no larger than another's has, row by row, a slack at
    least as large (float rounding is monotone), so the other cannot raise the maximum; on a
    homogeneous pool that is one instance instead of all of them. The result is kept on the columns
    for the same rows, `now` and instance figures.
    """
    terms = _dominant_terms(views, ledger, embedding)
    n = cols.n
    factor = 1.0 if embedding else float(ttft_factor)
    key = (now, embedding, terms, factor)
    memo = cols.cache.get("best")
    if memo is not None and memo[0] == key and memo[1] == n:
        return memo[2]
    best = _slacks(cols, terms, now, embedding, factor=factor)
    cols.cache["best"] = (key, n, best)
    return best


def class_row_slacks(
    cols: Columns,
    views: Sequence[InstanceView],
    ledger: LoadLedger,
    now: float,
    embedding: bool,
    rows: np.ndarray,
    ttft_factor: float = 1.0,
) -> np.ndarray:
    """`class_best_slacks(...)[rows]`, computing only `rows` (not kept): the same floats. For a few
    rows read at a second factor (admission sheds by the slack at factor 1 under a
    ``ttft_margin_factor``)."""
    terms = _dominant_terms(views, ledger, embedding)
    return _slacks(cols, terms, now, embedding, rows, 1.0 if embedding else float(ttft_factor))


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
    key = (now, embedding, terms, 1.0)
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
    factor: float = 1.0,
) -> np.ndarray:
    """Best slacks of `rows` (default: all n rows), operation for operation as `slo_aware.slack_s`
    (`factor`: its ``ttft_factor``, for LLM rows; 1 leaves the reference's operations untouched)."""
    if all(math.isfinite(v) and v >= 0 for t in terms for v in t) and all(t[0] > 0 for t in terms):
        return _slacks_static(cols, terms, now, embedding, rows, factor)
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
            if factor != 1.0:
                ttft = factor * ttft
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
    factor: float = 1.0,
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
        ttft = (embedding_wait if embedding else wait) + own
        if factor != 1.0:  # (LLM rows only: callers pass 1 for embeddings)
            ttft = factor * ttft
        slack = np.minimum(ttft_due - ttft, e2e_due - (wait + service[pick]))
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


__all__ = ["class_best_slacks", "class_row_slacks", "class_slo_slacks"]
