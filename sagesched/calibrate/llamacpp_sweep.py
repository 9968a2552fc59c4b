"""One workload, replayed live against llama-server and simulated with its probe-calibrated model.

The workload is synthetic and small on purpose (this CPU serves ~1 request/s): `n` requests whose
prompt and output lengths are drawn once (seeded) and whose arrivals are a seeded Poisson process of
unit rate, stretched to the load's rate; so every load replays the same requests in the same order,
only closer together. Live, each request is a streamed `/v1/completions` call with a token-id prompt of
exactly its length (fresh random ids per run, so that a repeated run cannot hit a slot's prompt cache)
and `ignore_eos` with `max_tokens` = its output length; it is sent open loop at its arrival
(`sagesched.replay.loadgen`), and TTFT and E2E count from the intended arrival. Simulated, the same
(arrival, prompt, output) list runs through `replay_llamacpp` with the same server settings.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sagesched.calibrate.llamacpp_client import Timed, embed, new_client, stream_completion, token_ids
from sagesched.replay.loadgen import Schedule, percentile, run_open_loop
from sagesched.sim.engines.llamacpp import LlamaCppConfig
from sagesched.sim.engines.llamacpp_driver import replay_llamacpp
from sagesched.sim.engines.llamacpp_perf import LlamaCppCalibration
from sagesched.sim.engines.types import EngineRequest

#: Requests drawn per workload before truncating to `n` (so every n gives a prefix of one sequence).
POOL = 1000


@dataclass(frozen=True)
class WorkItem:
    """One request of the workload: arrival (s from the run's start) and token counts."""

    id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class WorkloadSpec:
    """How the synthetic workload is drawn. Lengths: prompt log-normal (median, sigma) clipped to
    [prompt_min, prompt_max]; output uniform on [output_min, output_max]. Embedding workloads have no output."""

    n: int = 40
    prompt_median: int = 64
    prompt_sigma: float = 0.7
    prompt_min: int = 8
    prompt_max: int = 320
    output_min: int = 4
    output_max: int = 32
    seed: int = 11
    embeddings: bool = False

    def items(self, rate: float) -> list[WorkItem]:
        """The workload at `rate` requests/s (same requests and order at every rate)."""
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        # Draw a fixed pool and keep the first n: a smaller n is a prefix of the same request sequence.
        pool = max(self.n, POOL)
        rng = np.random.default_rng(self.seed)
        gaps = rng.exponential(1.0, pool)[: self.n]
        gaps[0] = 0.0
        arrivals = np.cumsum(gaps) / rate
        normals = rng.standard_normal(pool)[: self.n]
        prompts = np.clip(
            np.round(self.prompt_median * np.exp(self.prompt_sigma * normals)), self.prompt_min, self.prompt_max
        ).astype(int)
        outputs = rng.integers(self.output_min, self.output_max + 1, pool)[: self.n]
        return [
            WorkItem(f"r{i:03d}", float(a), int(p), 1 if self.embeddings else int(o))
            for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs, strict=True))
        ]


@dataclass
class Outcome:
    """A request's result in one run (live or simulated): latencies in seconds, None if it failed."""

    id: str
    ttft_s: float | None
    e2e_s: float | None
    status: int = 200
    error: str = ""
    send_lateness_s: float = 0.0
    output_tokens: int | None = None


async def _live(url: str, model: str, items: Sequence[WorkItem], seed: int, embeddings: bool) -> list[Outcome]:
    rng = random.Random(seed)
    prompts = [token_ids(rng, it.prompt_tokens) for it in items]
    schedule = Schedule([it.arrival_s for it in items])
    results: list[Timed | None] = [None] * len(items)
    tasks: list[asyncio.Task[None]] = []
    async with new_client() as client:
        t0 = time.monotonic() + 0.2
        clock = lambda: time.monotonic() - t0  # noqa: E731

        async def send(i: int) -> None:
            it = items[i]
            if embeddings:
                results[i] = await embed(client, url, model, [prompts[i]], raise_on_error=False)
            else:
                results[i] = await stream_completion(
                    client, url, model, prompts[i], it.output_tokens, raise_on_error=False
                )

        await asyncio.sleep(0.2)
        await run_open_loop(schedule, send, clock, tasks)
        await asyncio.gather(*tasks)
    out = []
    for it, res, sent in zip(items, results, schedule.send_s, strict=True):
        intended = t0 + it.arrival_s
        if res is None or res.status != 200:
            out.append(Outcome(it.id, None, None, res.status if res else 0, res.error if res else "not sent"))
            continue
        first = res.token_times[0] if res.token_times else res.done
        out.append(
            Outcome(
                it.id,
                first - intended,
                res.done - intended,
                send_lateness_s=(sent - it.arrival_s) if sent is not None else 0.0,
                output_tokens=res.completion_tokens,
            )
        )
    return out


def run_live(url: str, model: str, items: Sequence[WorkItem], seed: int, embeddings: bool = False) -> list[Outcome]:
    """Replay `items` open loop against the server at `url`; one Outcome per item, in order."""
    return asyncio.run(_live(url, model, items, seed, embeddings))


class _BusyMeter:
    """Wraps a step model and adds up the step times the simulation asks for (the server's busy time)."""

    def __init__(self, step) -> None:  # type: ignore[no-untyped-def]
        self.step = step
        self.busy_s = 0.0
        self.steps = 0

    def ubatches_time_s(self, ubatches) -> float:  # type: ignore[no-untyped-def]
        t = float(self.step.ubatches_time_s(ubatches))
        self.busy_s += t
        self.steps += 1
        return t


def simulate(items: Sequence[WorkItem], cal: LlamaCppCalibration, cfg: LlamaCppConfig) -> list[Outcome]:
    """The same items through the llama.cpp engine model timed by the calibration."""
    return simulate_with_work(items, cal, cfg)[0]


def simulate_with_work(
    items: Sequence[WorkItem], cal: LlamaCppCalibration, cfg: LlamaCppConfig
) -> tuple[list[Outcome], float, int]:
    """`simulate`, plus the server's simulated work: busy seconds (steps + frontend per request) and steps."""
    meter = _BusyMeter(cal.step)
    reqs = [
        (
            it.arrival_s,
            EngineRequest(
                id=it.id, prompt_tokens=it.prompt_tokens, output_tokens=it.output_tokens, max_tokens=it.output_tokens
            ),
        )
        for it in items
    ]
    recs = replay_llamacpp(reqs, cfg, meter, frontend_request_s=cal.frontend_request_s)
    outcomes = [Outcome(r.id, r.ttft_s, r.e2e_s, r.status, r.reason, output_tokens=None) for r in recs]
    return outcomes, meter.busy_s + cal.frontend_request_s * len(items), meter.steps


def capacity(spec: WorkloadSpec, cal: LlamaCppCalibration, cfg: LlamaCppConfig) -> float:
    """Requests/s the simulated server sustains on this workload: all requests queued at once, n / makespan."""
    items = spec.items(rate=1e6)
    recs = simulate(items, cal, cfg)
    finish = max(it.arrival_s + (r.e2e_s or 0.0) for it, r in zip(items, recs, strict=True))
    return len(items) / finish


def percentiles(values: Sequence[float | None], qs: Sequence[float] = (50, 90)) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    return {f"p{int(q)}": percentile(vals, q) for q in qs}


def summarize(outcomes: Sequence[Outcome]) -> dict:
    """p50/p90 of TTFT and E2E over the requests that completed, and the failure count."""
    ok = [o for o in outcomes if o.status == 200]
    return {
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "ttft": percentiles([o.ttft_s for o in ok]),
        "e2e": percentiles([o.e2e_s for o in ok]),
        "send_lateness_max_s": max((o.send_lateness_s for o in ok), default=0.0),
    }


def rel_err(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b - 1.0


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used: the server's work in a live run,
    which other processes on its CPU delay but do not inflate (unlike wall time)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def server_counters(url: str) -> dict[str, float]:
    """llama-server's `/metrics` counters (`--metrics`): `n_decode_total` is its number of steps
    (`llama_decode` calls), `prompt_tokens_cached_total` the prompt tokens its caches saved."""
    import httpx

    out: dict[str, float] = {}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("llamacpp:"):
            name, _, value = line.partition(" ")
            try:
                out[name.removeprefix("llamacpp:")] = float(value)
            except ValueError:
                continue
    return out
