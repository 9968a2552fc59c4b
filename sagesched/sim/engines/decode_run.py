"""A run of pure-decode steps timed in closed form: the vLLM engine's jump (`VllmEngineCore`).

When every running sequence is decoding and nothing waiting can be admitted, the next k steps
differ only in their KV lengths; their step time is affine in the total KV length (a guarantee of
`LLMPerfModel.step_time_s`, checked when a run starts), so the time of the first m steps is
``factor * (m a + d m (m - 1) / 2)`` and "how many steps have ended by t" is a quadratic's root.
The simulator asks that for every instance snapshot taken mid-run, so both are O(1) here; the KV
blocks the run allocates by step j come from a histogram of KV lengths modulo the block size.
"""

from __future__ import annotations

import math
from itertools import accumulate


class DecodeRun:
    """k pure-decode steps of n sequences, timed in closed form (or from an explicit list of sums).

    `cum_time(m)` is the time of the first m steps; `steps_done_by(elapsed)` how many have ended by
    then. `alloc_cum(j)` counts the KV blocks allocated in steps 0..j (block boundaries are periodic
    in the step index, so a histogram of KV lengths modulo the block size is enough).
    """

    __slots__ = ("_hi", "_lo", "_m", "_total", "_total_k", "a", "bs", "cum", "d", "factor", "k", "n", "prefix", "used0")

    def __init__(self, n: int, k: int, cnt: list[int], bs: int, used0: int) -> None:
        self.n = n
        self.k = k
        # prefix[s]: sequences whose first allocation falls on a step index r <= s (mod bs), so that
        # `alloc_cum` is O(1) rather than a loop over the residues (it runs on every snapshot).
        self.prefix = list(accumulate(cnt))
        self.bs = bs
        self.used0 = used0
        self.a = 0.0
        self.d = 0.0
        self.factor = 1.0
        self.cum: list[float] | None = None
        # Memo of the last `steps_done_by` answer: m for elapsed in [_lo, _hi).
        self._m = -1
        self._lo = 0.0
        self._hi = -1.0
        self._total: float | None = None  # cum_time(k) in closed form, for `_total_k` == k
        self._total_k = -1

    def truncate(self, k: int) -> None:
        """Stop the run after its first `k` steps (new work arrived: it joins at the next step)."""
        self.k = k
        self._hi = -1.0

    def cum_time(self, m: int) -> float:
        if self.cum is not None:
            return self.cum[m]
        return self.factor * (m * self.a + self.d * (m * (m - 1) * 0.5))

    def steps_done_by(self, elapsed: float) -> int:
        """Largest m <= k with cum_time(m) <= elapsed."""
        if self._lo <= elapsed < self._hi:
            return self._m
        if self.cum is None and self.d >= 0.0 and elapsed > 0.0:
            return self._closed_form_steps(elapsed)
        m = self._steps_done_by(elapsed)
        self._m = m
        self._lo = self.cum_time(m)
        self._hi = self.cum_time(m + 1) if m < self.k else float("inf")
        return m

    def _closed_form_steps(self, elapsed: float) -> int:
        """`steps_done_by` for an affine run (the common case), memo included.

        Hot path: every instance snapshot taken mid-run asks for it, and the answer changes between
        snapshots. The expression `f * (m * a + d * (m * (m - 1) * 0.5))` is `cum_time`'s, written
        out so that the bounds stay bit-identical while skipping the method calls.
        """
        k, f, a, d = self.k, self.factor, self.a, self.d
        total = self._total
        if total is None or self._total_k != k:
            # The whole run's time, kept per length (a run is timed once and only ever truncated).
            total = self._total = f * (k * a + d * (k * (k - 1) * 0.5))
            self._total_k = k
        if total <= elapsed:
            self._m, self._lo, self._hi = k, total, float("inf")
            return k
        # Solve f * (a m + d m (m - 1) / 2) = elapsed for m, then correct the rounding.
        e = elapsed / f
        if d > 0.0:
            b = a - 0.5 * d
            m = int((-b + math.sqrt(b * b + 2.0 * d * e)) / d)
        else:
            m = int(e / a) if a > 0.0 else k
        if m < 0:
            m = 0
        elif m > k:
            m = k
        lo = f * (m * a + d * (m * (m - 1) * 0.5))
        while m > 0 and lo > elapsed:
            m -= 1
            lo = f * (m * a + d * (m * (m - 1) * 0.5))
        hi = f * ((m + 1) * a + d * ((m + 1) * m * 0.5)) if m < k else float("inf")
        while m < k and hi <= elapsed:
            m += 1
            lo = hi
            hi = f * ((m + 1) * a + d * ((m + 1) * m * 0.5)) if m < k else float("inf")
        self._m, self._lo, self._hi = m, lo, hi
        return m

    def _steps_done_by(self, elapsed: float) -> int:
        k = self.k
        if self.cum_time(k) <= elapsed:
            return k
        if elapsed <= 0.0:
            return 0
        if self.cum is None and self.d >= 0.0:
            # Solve factor * (a m + d m (m - 1) / 2) = elapsed for m, then correct the rounding.
            a, d = self.a, self.d
            e = elapsed / self.factor
            if d > 0.0:
                b = a - 0.5 * d
                m = int((-b + math.sqrt(b * b + 2.0 * d * e)) / d)
            else:
                m = int(e / a) if a > 0.0 else k
            m = min(max(m, 0), k)
            while m > 0 and self.cum_time(m) > elapsed:
                m -= 1
            while m < k and self.cum_time(m + 1) <= elapsed:
                m += 1
            return m
        lo, hi = 0, k
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if self.cum_time(mid) <= elapsed:
                lo = mid
            else:
                hi = mid
        return lo

    def alloc_cum(self, j: int) -> int:
        """Blocks allocated by steps 0..j (j < 0: none)."""
        if j < 0:
            return 0
        # A sequence with residue r allocates at steps r, r + bs, ...: (j - r) // bs + 1 blocks by
        # step j when r <= j. Writing j = q * bs + s, that is q + 1 blocks for r <= s and q for r > s.
        q, s = divmod(j, self.bs)
        prefix = self.prefix
        return prefix[-1] * q + prefix[s]


__all__ = ["DecodeRun"]
