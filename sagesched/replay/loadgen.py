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
import gc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field


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
) -> None:
    """Start `send(i)` as its own task at `schedule.intended_s[i]` on `clock`; append tasks to `tasks`.

    Every send is a timer on the event loop (`call_at`), armed up front: a timer's callback runs
    at the start of the loop iteration in which it expires, ahead of the task steps queued by
    streamed chunks, and creates the request's task directly, one loop hop earlier than a
    generator coroutine that sleeps and then spawns. Returns once every request's task has been
    created (not finished). `schedule.send_s[i]` is stamped when request i's task starts, just
    before `send(i)` hands it over. Cancel the task running this, and the request tasks, to stop
    sending (Ctrl-C): requests whose task had not started keep `send_s = None`.
    """
    loop = asyncio.get_running_loop()
    send_s = schedule.send_s
    n = len(schedule.intended_s)
    if not n:
        return
    # The workload, prompts and schedule live for the whole run: keep the collector from walking
    # them in every full collection (a pause there delays every timer due meanwhile).
    gc.collect()
    gc.freeze()
    offset = loop.time() - clock()
    done: asyncio.Future[None] = loop.create_future()
    fired = 0

    async def start(i: int) -> None:
        send_s[i] = clock()
        await send(i)

    def fire(i: int) -> None:
        nonlocal fired
        tasks.append(loop.create_task(start(i), name=f"replay-{i}"))
        fired += 1
        if fired == n and not done.done():
            done.set_result(None)

    handles = [loop.call_at(t + offset, fire, i) for i, t in enumerate(schedule.intended_s)]
    try:
        await done
    finally:
        gc.unfreeze()
        for handle in handles:
            handle.cancel()


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (numpy's linear method) or None for no values."""
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))
