"""The live driver: replay a workload open loop through the live executor, or to one endpoint.

`replay(requests, config, policy=..., backends=...)` runs the workload that `simulate` would, with
the same policy object inside a `LiveExecutor` (mode "policy"), or straight to one URL (mode
"endpoint"), and returns what the simulator returns: per-request records in `RECORD_COLUMNS`, an
instance timeline in `TIMELINE_COLUMNS`, plus a live-only table (send lateness, requested vs.
server token counts) and counters.

Clock: every time in the records is seconds on the workload's clock: `arrival_s` is exactly the
workload's arrival, and dispatch / first token / finish are measured on the same clock, so
latencies count from the *intended* arrival and a run can be paired request by request with its
simulation.

Nothing disappears: a request refused by the executor or the server is `rejected`, one that broke
`failed`, each with its reason; on Ctrl-C sending stops, requests in flight fail with
"cancelled", requests never sent fail with "interrupted: not sent", and the partial run is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from sagesched.core import Outcome, Request, RequestRecord
from sagesched.replay.config import DriverConfig
from sagesched.replay.endpoint import EndpointClient, scheduling_headers
from sagesched.replay.loadgen import Schedule, percentile, run_open_loop
from sagesched.replay.prompts import PromptBuilder, endpoint_of

log = logging.getLogger(__name__)

LIVE_COLUMNS = (
    "request_id",
    "intended_s",
    "send_s",
    "send_lateness_ms",
    "requested_prompt_tokens",
    "server_prompt_tokens",
    "requested_output_tokens",
    "output_tokens",
)
"""Columns of `live.parquet`: what only a live run measures, one row per request."""


@dataclass
class LiveResult:
    """What `replay` returns; `records` and `timeline` have the simulator's schemas."""

    records: pd.DataFrame
    timeline: pd.DataFrame
    live: pd.DataFrame
    wall_s: float
    interrupted: bool = False
    stats: dict[str, Any] = field(default_factory=dict)

    def live_summary(self) -> dict[str, Any]:
        """The live-only summary keys: send lateness, token-count mismatches, interruption."""
        lateness = self.live["send_lateness_ms"].dropna().tolist()
        prompt = self.live.dropna(subset=["server_prompt_tokens"])
        diff = (prompt["server_prompt_tokens"] - prompt["requested_prompt_tokens"]).abs()
        done = self.records[
            (self.records["outcome"] == Outcome.COMPLETED.value) & (self.records["type"] != "embedding")
        ]
        wanted = self.live.set_index("request_id")["requested_output_tokens"]
        out_diff = (done.set_index("request_id")["output_tokens"] - wanted.reindex(done["request_id"])).abs()
        return {
            "send_lateness_p50_ms": percentile(lateness, 50),
            "send_lateness_p99_ms": percentile(lateness, 99),
            "send_lateness_max_ms": max(lateness) if lateness else None,
            "sent": len(lateness),
            "prompt_token_mismatches": int((diff > 0).sum()),
            "prompt_token_abs_error_mean": float(diff.mean()) if len(diff) else None,
            "prompt_token_abs_error_p99": percentile(diff.tolist(), 99),
            "prompt_tokens_reported": len(prompt),
            "output_token_mismatches": int((out_diff > 0).sum()),
            "interrupted": self.interrupted,
        }


def request_body(request: Request, builder: PromptBuilder, config: DriverConfig) -> tuple[str, dict[str, Any]]:
    """(endpoint, OpenAI body) for one request: prompt of the requested size, forced output length."""
    endpoint = endpoint_of(request)
    body: dict[str, Any] = {"model": request.model}
    if endpoint == "embeddings":
        body["input"] = builder.embedding_inputs(request)
        return endpoint, body
    text = builder.text(request, endpoint)
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    n = int(request.output_tokens if request.output_tokens is not None else request.max_tokens) or 1
    body["max_tokens"] = n
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.min_tokens:
        body["min_tokens"] = n
    if config.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return endpoint, body


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="live replay", unit="req", smoothing=0.1)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def replay(
    requests: Sequence[Request],
    config: DriverConfig,
    builder: PromptBuilder,
    *,
    policy: Any = None,
    backends: Sequence[Any] = (),
    progress: bool | None = None,
) -> LiveResult:
    """Run the replay on a fresh event loop (see the module docstring)."""
    if not requests:
        raise ValueError("nothing to replay: the workload has no requests")
    return asyncio.run(_Replay(requests, config, builder, policy, backends, progress).run())


class _Replay:
    def __init__(
        self,
        requests: Sequence[Request],
        config: DriverConfig,
        builder: PromptBuilder,
        policy: Any,
        backends: Sequence[Any],
        progress: bool | None,
    ) -> None:
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        self.config = config
        self.endpoint_mode = config.mode == "endpoint"
        if not self.endpoint_mode and (policy is None or not backends):
            raise ValueError("driver mode 'policy' needs a policy and at least one backend (cluster entries with url:)")
        self.policy = policy
        self.backends = list(backends)
        self.bodies = [request_body(r, builder, config) for r in self.requests]
        self.usage: dict[str, dict[str, Any]] = {}
        self.own_records: list[RequestRecord] = []
        self.timeline_rows: list[tuple] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.interrupted = False
        # Set when driver.drain_timeout_s cut requests off: why they ended, as their records say it.
        self.drain_reason: str | None = None
        self.progress = _Progress(len(self.requests), config.progress if progress is None else progress)
        self.offset = self.requests[0].arrival_s

    async def run(self) -> LiveResult:
        started = time.perf_counter()
        if self.endpoint_mode:
            self.client = EndpointClient(
                str(self.config.endpoint.url),
                timeout_s=self.config.request_timeout_s,
                api_key=self.config.endpoint.api_key,
            )
            clock = self.client.now
            self.executor = None
        else:
            from sagesched.live.executor import ExecutorConfig, LiveExecutor

            knobs = {"request_timeout_s": self.config.request_timeout_s, **self.config.executor}
            knobs.setdefault("max_queue", max(1024, len(self.requests)))
            if "max_records" in {f.name for f in dataclasses.fields(ExecutorConfig)}:
                knobs.setdefault("max_records", None)  # keep every record: the run is written from them
            self.executor = LiveExecutor(self.policy, self.backends, ExecutorConfig.from_dict(knobs))
            await self.executor.start()
            clock = self.executor.now
        self.clock = clock
        t0 = clock() + self.config.start_delay_s
        self.shift = t0 - self.offset  # workload time = driver time - shift
        schedule = Schedule([r.arrival_s + self.shift for r in self.requests])
        self.schedule = schedule
        loop = asyncio.get_running_loop()
        sampler = loop.create_task(self._sample()) if self.config.timeline_interval_s > 0 else None
        generator = loop.create_task(run_open_loop(schedule, self._send, clock, self.tasks))
        self._install_interrupt(loop, generator)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await generator
            if self.tasks and not self.interrupted:
                last = schedule.intended_s[-1]
                drain = max(0.0, last - clock()) + self.config.drain_timeout_s
                _, pending = await asyncio.wait(self.tasks, timeout=drain)
                if pending:
                    self._cut_off(pending)
            await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGINT)
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            if self.executor is not None:
                await self.executor.stop(drain_timeout_s=0)
            else:
                await self.client.aclose()
            self.progress.close()
        return self._result(time.perf_counter() - started)

    def _cut_off(self, pending: set[asyncio.Task[None]]) -> None:
        """End the requests still unfinished at the drain deadline, each record saying so as it ends.

        The executor ends its requests with the reason itself (`abort_all`), so no record is written
        as "cancelled" first and relabelled later; an endpoint request's task is cancelled and `_send`
        writes the reason over the client's "interrupted" when the cancellation reaches it.
        """
        from sagesched.live.errors import UpstreamTimeout

        message = f"unfinished {self.config.drain_timeout_s:g}s after the last send (driver.drain_timeout_s)"
        self.drain_reason = f"drain_timeout: {message}"
        if self.executor is not None:
            self.executor.abort_all(UpstreamTimeout(message, code="drain_timeout"))
        for task in pending:
            task.cancel()

    def _install_interrupt(self, loop: asyncio.AbstractEventLoop, generator: asyncio.Task[None]) -> None:
        """First Ctrl-C: stop sending, cancel what is in flight, write the partial run. Second: abort."""

        def interrupt() -> None:
            log.warning("interrupted: stopping the replay and writing partial results (Ctrl-C again aborts)")
            self.interrupted = True
            generator.cancel()
            for task in self.tasks:
                task.cancel()
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGINT)

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, interrupt)

    def _intended(self, i: int) -> Request:
        r = self.requests[i]
        return dataclasses.replace(r, arrival_s=self.schedule.intended_s[i])

    async def _send(self, i: int) -> None:
        request = self._intended(i)
        endpoint, body = self.bodies[i]
        record: RequestRecord | None = None
        try:
            if self.endpoint_mode:
                record = RequestRecord.from_request(request)
                self.own_records.append(record)
                self.usage[request.id] = await self.client.send(request, body, endpoint, record)
            else:
                await self._submit(request, body, endpoint)
        except asyncio.CancelledError:
            if record is not None and self.drain_reason is not None and not self.interrupted:
                record.reason = self.drain_reason
        except Exception:  # the executor has already recorded the outcome
            log.debug("request %s ended with an error", request.id, exc_info=True)
        finally:
            self.progress.update()

    async def _submit(self, request: Request, body: dict[str, Any], endpoint: str) -> None:
        from sagesched.live.errors import LiveError

        assert self.executor is not None
        try:
            response = await self.executor.submit(request, body, endpoint, scheduling_headers(request))
        except LiveError:
            return
        usage: dict[str, Any] = {}
        if response.stream is not None:
            try:
                async for event in response.stream:
                    if isinstance(event.get("usage"), dict):
                        usage = event["usage"]
            except LiveError:
                pass
        elif response.json is not None:
            usage = response.json.get("usage") or {}
        self.usage[request.id] = usage

    async def _sample(self) -> None:
        interval = self.config.timeline_interval_s
        while True:
            now = self.clock() - self.shift
            if self.executor is not None:
                for b in self.executor.snapshot()["backends"].values():
                    m = b.get("metrics") or {}
                    inflight = int(b["inflight"])
                    waiting = int(m.get("waiting") or 0)
                    self.timeline_rows.append(
                        (
                            now,
                            b["id"],
                            inflight,
                            waiting,
                            float(m.get("kv_usage") or 0.0),
                            inflight,
                            float(inflight > 0),
                        )
                    )
            else:
                inflight = sum(1 for t in self.tasks if not t.done())
                self.timeline_rows.append((now, "endpoint", inflight, 0, 0.0, inflight, float(inflight > 0)))
            await asyncio.sleep(interval)

    # -- results -----------------------------------------------------------------------------------
    def _result(self, wall_s: float) -> LiveResult:
        from sagesched.metrics import records_frame
        from sagesched.sim.results import timeline_frame

        records = list(self.executor.records if self.executor is not None else self.own_records)
        seen = {r.request_id for r in records}
        for i, r in enumerate(self.requests):
            if r.id not in seen:
                record = RequestRecord.from_request(self._intended(i))
                record.outcome = Outcome.FAILED.value
                record.reason = (
                    "interrupted: not sent (the replay was stopped)"
                    if self.schedule.send_s[i] is None
                    else "lost: sent but no outcome was recorded (a driver bug; please report)"
                )
                records.append(record)
        frame = records_frame(records)
        for column in ("arrival_s", "dispatch_s", "first_token_s", "finish_s"):
            frame[column] = frame[column] - self.shift
        frame = frame.sort_values(["arrival_s", "request_id"], kind="stable").reset_index(drop=True)
        timeline = timeline_frame(self.timeline_rows)
        live_rows = []
        for i, r in enumerate(self.requests):
            sent = self.schedule.send_s[i]
            usage = self.usage.get(r.id) or {}
            server_prompt = usage.get("prompt_tokens")
            live_rows.append(
                (
                    r.id,
                    r.arrival_s,
                    None if sent is None else sent - self.shift,
                    None if sent is None else (sent - self.schedule.intended_s[i]) * 1000.0,
                    r.embedding_tokens if r.is_embedding else r.prompt_tokens,
                    server_prompt if isinstance(server_prompt, int) else None,
                    0 if r.is_embedding else int(r.output_tokens if r.output_tokens is not None else r.max_tokens),
                    None,
                )
            )
        live = pd.DataFrame(live_rows, columns=list(LIVE_COLUMNS))
        live["output_tokens"] = live["request_id"].map(frame.set_index("request_id")["output_tokens"])
        for column in ("intended_s", "send_s", "send_lateness_ms", "server_prompt_tokens"):
            live[column] = pd.to_numeric(live[column], errors="coerce").astype("float64")
        stats: dict[str, Any] = {"mode": self.config.mode, "wall_s": wall_s}
        if self.executor is not None:
            snap = self.executor.snapshot()
            stats.update(
                retries=snap["retries"], invalid_decisions=snap["invalid_decisions"], decisions=snap["decisions"]
            )
            stats["backends"] = {
                k: {"url": v["url"], "kind": v["kind"], "models": v["models"]} for k, v in snap["backends"].items()
            }
        else:
            stats["endpoint"] = self.client.url
        return LiveResult(frame, timeline, live, wall_s, self.interrupted, stats)
