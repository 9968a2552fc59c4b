"""Reading an emulator's `/metrics` in tests: one value per metric name, and polling for a state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from sagesched.live.emulators.promtext import parse_text


def by_name(text: str) -> dict[str, float]:
    """Samples summed per metric name (label sets dropped), histogram buckets left out."""
    out: dict[str, float] = {}
    for key, value in parse_text(text).items():
        name = key.split("{", 1)[0]
        if "_bucket" not in name:
            out[name] = out.get(name, 0.0) + value
    return out


def scrape(url: str) -> dict[str, float]:
    return by_name(httpx.get(f"{url}/metrics", timeout=5).text)


async def until(
    client: httpx.AsyncClient,
    url: str,
    predicate: Callable[[dict[str, float]], bool],
    what: str,
    timeout_s: float = 30.0,
) -> dict[str, float]:
    """Scrape `/metrics` until `predicate(metrics)` holds and return that scrape; fail naming `what`.

    Polling for a state instead of sleeping a fixed time and hoping the server got there: on a
    loaded machine a request can take far longer than usual to reach the emulator.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        out = by_name((await client.get(f"{url}/metrics")).text)
        if predicate(out):
            return out
        assert time.monotonic() < deadline, f"{what} (waited {timeout_s:g}s; last scrape {out})"
        await asyncio.sleep(0.005)
