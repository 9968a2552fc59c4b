"""Engine time to wall-clock time: the one place where an emulator sleeps.

The engine cores compute how long each step or batch takes; the pacer sleeps that long times
`time_scale`. It paces against deadlines rather than sleeping each duration afresh, so the event
loop's own overhead does not accumulate: after N steps the wall clock is within one timer tick of
the model's prediction. `time_scale=0` turns every sleep into a bare yield (a zero-latency backend).
"""

from __future__ import annotations

import asyncio
import time


class Pacer:
    """Keeps an engine clock (seconds since start) and sleeps wall time in step with it."""

    def __init__(self, time_scale: float = 1.0) -> None:
        if time_scale < 0:
            raise ValueError(f"time_scale must be >= 0 (got {time_scale}); 1 is real time, 0 is zero latency")
        self.time_scale = float(time_scale)
        self._t0 = time.monotonic()
        self._deadline = self._t0
        self.engine_now = 0.0

    def sync_after_idle(self) -> float:
        """Bring the engine clock up to the wall clock after an idle spell; return engine now.

        Called when work arrives at an idle engine, so that the next step is timed from now.
        """
        if self.time_scale > 0:
            wall = time.monotonic()
            self.engine_now = max(self.engine_now, (wall - self._t0) / self.time_scale)
            self._deadline = max(self._deadline, wall)
        return self.engine_now

    async def advance(self, engine_seconds: float) -> float:
        """Let `engine_seconds` of engine time pass (scaled into wall time); return engine now."""
        self.engine_now += max(0.0, engine_seconds)
        if self.time_scale == 0:
            await asyncio.sleep(0)
            return self.engine_now
        # Deadlines chain from the previous one, not from "now": a late wake-up (timer granularity,
        # a busy CPU) shortens the next sleep instead of shifting every later token.
        self._deadline += engine_seconds * self.time_scale
        await asyncio.sleep(max(0.0, self._deadline - time.monotonic()))
        return self.engine_now
