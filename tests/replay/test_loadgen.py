"""The open-loop generator: sends at intended times, never gated on responses."""

from __future__ import annotations

import asyncio

import pytest

from sagesched.replay.loadgen import Schedule, run_open_loop


def test_sends_start_on_schedule_even_when_no_response_ever_comes():
    async def main() -> tuple[Schedule, list[int], int]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        schedule = Schedule([t0 + 0.05 + 0.01 * i for i in range(20)])
        never = asyncio.Event()
        started: list[int] = []
        tasks: list[asyncio.Task[None]] = []

        async def send(i: int) -> None:
            started.append(i)
            await never.wait()  # the server never answers

        await run_open_loop(schedule, send, loop.time, tasks)
        await asyncio.sleep(0)
        pending = sum(not t.done() for t in tasks)
        for t in tasks:
            t.cancel()
        return schedule, started, pending

    schedule, started, pending = asyncio.run(main())
    assert started == list(range(20)) and pending == 20  # all sent while all 20 still wait
    assert all(s >= t for s, t in zip(schedule.send_s, schedule.intended_s, strict=True))
    assert len(schedule.lateness_ms()) == 20 and schedule.sent == 20


def test_cancelling_the_generator_leaves_unsent_requests_unsent():
    async def main() -> Schedule:
        loop = asyncio.get_running_loop()
        schedule = Schedule([loop.time() + 0.01, loop.time() + 60.0])
        tasks: list[asyncio.Task[None]] = []

        async def send(i: int) -> None:
            return None

        gen = loop.create_task(run_open_loop(schedule, send, loop.time, tasks))
        await asyncio.sleep(0.1)
        gen.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gen
        return schedule

    schedule = asyncio.run(main())
    assert schedule.send_s[0] is not None and schedule.send_s[1] is None and schedule.sent == 1


def test_an_unsorted_schedule_is_refused():
    with pytest.raises(ValueError, match="sorted"):
        Schedule([1.0, 0.5])
