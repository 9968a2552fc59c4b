"""The open-loop load generator: every request leaves at its intended time, whatever came before.

The trap this avoids (../shared/SEED.md): a "rate" generator that awaits each response, or a
bounded worker pool, is a closed loop in disguise: when the server slows down, sends slow down
with it and the measured latency hides the queueing a real user would see. Here one task walks the
schedule and *spawns* a task per request at its intended time; nothing it does waits on a
response. Each send records its lateness (actual send time minus intended time), the one number
that says whether the generator itself kept up (benchmarks/replay_lateness.py measures it).

Latency is counted from the intended arrival, not from the send, so a late generator cannot make
the server look faster than it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

# asyncio's timers wake up to ~1 ms late (epoll's timeout is in whole milliseconds); sleeping to
# just before the target and yielding the rest keeps p99 lateness well under a millisecond
# (benchmarks/replay_lateness.py: p99 0.9 ms with the spin vs 1.3 ms without, at 50 req/s).
SPIN_S = 0.0015


@dataclass
class Schedule:
    """Intended send times (seconds on `clock`) and, once sent, the actual send times."""

    intended_s: list[float]
    send_s: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if any(b < a for a, b in zip(self.intended_s, self.intended_s[1:], strict=False)):
            raise ValueError("intended send times must be sorted")
        self.send_s = [None] * len(self.intended_s)

    @property
    def sent(self) -> int:
        return sum(1 for s in self.send_s if s is not None)

    def lateness_ms(self) -> list[float]:
        return [(s - t) * 1000.0 for s, t in zip(self.send_s, self.intended_s, strict=True) if s is not None]


async def run_open_loop(
    schedule: Schedule,
    send: Callable[[int], Awaitable[None]],
    clock: Callable[[], float],
    tasks: list[asyncio.Task[None]],
    *,
    spin_s: float = SPIN_S,
) -> None:
    """Start `send(i)` as its own task at `schedule.intended_s[i]` on `clock`; append tasks to `tasks`.

    Returns when every request's task has been created (not finished). `schedule.send_s[i]` is
    stamped when request i's task starts, just before `send(i)` hands it over. Cancel the task
    running this, and the request tasks, to stop sending (Ctrl-C): requests whose task had not
    started keep `send_s = None`.
    """
    loop = asyncio.get_running_loop()
    sleep = asyncio.sleep
    send_s = schedule.send_s

    async def start(i: int) -> None:
        # Stamped in the request's own task, right before it is handed over: a send is late by
        # however long the loop took to get here, not just by the generator's wake-up.
        send_s[i] = clock()
        await send(i)

    for i, target in enumerate(schedule.intended_s):
        delay = target - clock()
        if delay > spin_s:
            await sleep(delay - spin_s)
        while clock() < target:
            await sleep(0)
        tasks.append(loop.create_task(start(i), name=f"replay-{i}"))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (numpy's linear method) or None for no values."""
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))
