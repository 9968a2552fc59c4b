"""The vLLM engine model running in wall-clock time.

`VllmEngineLoop` owns one `VllmEngineCore` (the simulator's pure engine state machine) and turns
it into a server's engine: HTTP handlers `submit` requests and read their tokens from an asyncio
queue; a single background task plans a step, sleeps the step's predicted duration (scaled by
`time_scale`), finishes the step and hands each request the tokens the step emitted. Batching,
chunked prefill, KV-cache limits, prefix caching and preemption are therefore exactly the
simulator's; only the clock is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from sagesched.live.emulators.pacer import Pacer
from sagesched.sim.config import VllmEngineConfig
from sagesched.sim.engines import EngineRequest, StepOutcome, VllmEngineCore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenEvent:
    """Tokens a step emitted for one request; `finished` closes the stream."""

    count: int
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class RequestHandle:
    """A submitted request's view of the engine: its token queue and timing marks (wall clock)."""

    id: str
    prompt_tokens: int
    max_tokens: int
    queue: asyncio.Queue[TokenEvent] = field(default_factory=asyncio.Queue)
    submitted_wall: float = field(default_factory=time.monotonic)
    first_token_wall: float | None = None
    last_token_wall: float | None = None
    emitted: int = 0
    done: bool = False
    eos: bool = False  # ends at a sampled end of sequence before max_tokens (finish reason "stop")


@dataclass
class LoopStats:
    """Counters the loop keeps itself (the core keeps KV and prefix-cache state)."""

    steps: int = 0
    busy_engine_s: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: int = 0
    aborted: int = 0


class VllmEngineLoop:
    """Drives a `VllmEngineCore` from an asyncio task; start with `await loop.start()`."""

    def __init__(self, core: VllmEngineCore, time_scale: float = 1.0) -> None:
        self.core = core
        self.pacer = Pacer(time_scale)
        self.stats = LoopStats()
        self._handles: dict[str, RequestHandle] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Observers called with (handle, event) after each delivery: the app's metrics hook.
        self.on_first_token: list = []
        self.on_tokens: list = []
        self.on_finish: list = []

    @classmethod
    def build(cls, perf: object, time_scale: float = 1.0, **engine_config: object) -> VllmEngineLoop:
        """A loop over a fresh core; `engine_config` are `VllmEngineConfig` fields (ValueError names unknown ones)."""
        config = VllmEngineConfig.from_dict(engine_config)
        return cls(VllmEngineCore(config, perf), time_scale=time_scale)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="vllm-engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for handle in list(self._handles.values()):
            self._deliver(handle, TokenEvent(0, finished=True, finish_reason="abort"))

    # -- requests ----------------------------------------------------------------------------------
    def submit(
        self,
        request_id: str,
        prompt_tokens: int,
        max_tokens: int,
        *,
        prefix_hashes: tuple[int, ...] = (),
        priority: int = 0,
        pooling: bool = False,
        output_tokens: int | None = None,
    ) -> RequestHandle:
        """Queue a request in the engine; its tokens arrive on `handle.queue`.

        The output length is `output_tokens` when given (an end of sequence the caller sampled; the
        request then finishes with reason "stop"), else `max_tokens` (reason "length").
        `pooling=True` is an embedding pass: prefill only, finished with no token. Raises the core's
        `EngineRejected(400)` if the request could never fit in the KV cache.
        """
        if not self._handles:
            self.pacer.sync_after_idle()
        self.core.add(
            EngineRequest(
                id=request_id,
                prompt_tokens=prompt_tokens,
                output_tokens=max_tokens if output_tokens is None else max(1, min(output_tokens, max_tokens)),
                max_tokens=max_tokens,
                priority=priority,
                pooling=pooling,
                prefix_hashes=prefix_hashes,
            )
        )
        handle = RequestHandle(request_id, prompt_tokens, max_tokens)
        handle.eos = output_tokens is not None and output_tokens < max_tokens
        self._handles[request_id] = handle
        self.stats.prompt_tokens += prompt_tokens
        self._wakeup.set()
        return handle

    def abort(self, request_id: str) -> None:
        """Drop a request (client went away, or a stop string ended it); frees its KV blocks."""
        handle = self._handles.pop(request_id, None)
        if handle is None:
            return
        self.core.abort(request_id)
        self.stats.aborted += 1
        if not handle.done:
            handle.done = True
            handle.queue.put_nowait(TokenEvent(0, finished=True, finish_reason="abort"))

    # -- gauges ------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return int(self.core.num_running)

    @property
    def num_waiting(self) -> int:
        return int(self.core.num_waiting)

    @property
    def kv_usage(self) -> float:
        return float(self.core.kv_usage)

    @property
    def prefix_cache_queries_tokens(self) -> int:
        """Prefix-cache lookups in tokens (the core counts blocks; vLLM's metric counts tokens)."""
        return int(self.core.prefix_queries) * int(self.core.bs)

    @property
    def prefix_cache_hits_tokens(self) -> int:
        return int(self.core.prefix_hits) * int(self.core.bs)

    @property
    def preemptions(self) -> int:
        return int(self.core.preemptions)

    # -- the engine --------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            plan = self.core.plan_step()
            if plan is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                self.pacer.sync_after_idle()
                continue
            duration = float(self.core.step_time_s(plan))
            now = await self.pacer.advance(duration)
            outcome = self.core.finish_step(plan, now)
            self.stats.steps += 1
            self.stats.busy_engine_s += duration
            self._dispatch(outcome)

    def _dispatch(self, outcome: StepOutcome) -> None:
        tokens = outcome.emitted
        finished = set(outcome.finished_ids)
        for request_id in list(tokens) + [f for f in outcome.finished_ids if f not in tokens]:
            handle = self._handles.get(request_id)
            if handle is None:  # aborted while the step ran
                continue
            count = int(tokens.get(request_id, 0))
            done = request_id in finished
            reason = ("stop" if handle.eos else "length") if done else None
            self._deliver(handle, TokenEvent(count, finished=done, finish_reason=reason))

    def _deliver(self, handle: RequestHandle, event: TokenEvent) -> None:
        if handle.done:
            return
        wall = time.monotonic()
        if event.count:
            first = handle.first_token_wall is None
            if first:
                handle.first_token_wall = wall
            handle.emitted += event.count
            self.stats.generation_tokens += event.count
            for hook in self.on_first_token if first else ():
                hook(handle)
            for hook in self.on_tokens:
                hook(handle, event.count, wall)
            handle.last_token_wall = wall
        if event.finished:
            handle.done = True
            self._handles.pop(handle.id, None)
            self.stats.finished += 1
            for hook in self.on_finish:
                hook(handle, event.finish_reason)
        handle.queue.put_nowait(event)
