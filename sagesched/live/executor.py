"""The live executor: a gateway queue, the scheduling policy, and dispatch to real HTTP backends.

This is the live twin of the simulator's driver. Requests wait in one gateway queue; the policy is
called whenever something changes (an arrival, a completion, a health change, a wake-up it asked
for) and its decisions are carried out literally: an `Assignment` with several embedding requests
becomes ONE backend call whose vectors are split back to the callers in order, and a `Rejection`
reaches the caller as `RequestRejected` with the policy's reason.

Guarantees a caller can rely on:

- `submit` always ends with a `LiveResponse` or a `LiveError`: every request has a deadline timer
  (`request_timeout_s`, 504), whether it is queued, in flight or streaming.
- A backend that refuses the connection, drops it or answers 503 before sending a byte is marked
  unhealthy and the request goes back to the queue for the policy to place elsewhere (bounded by
  `max_retries`); the last failure decides what the caller then gets (`errors.gave_up`).
  Once a stream has delivered a chunk, a failure is an error to the caller: the tokens it already
  has cannot be taken back.
- Every request leaves exactly one `RequestRecord`, in the simulator's schema, with times in
  seconds since the executor started.

All executor state lives on one event loop and is touched only from it, so there are no locks.

Layout: this module is the queue, the policy calls (through `sagesched.core.decisions`, the same
decision core the simulator uses), outcomes and health; `sagesched.live.dispatch` carries out
placements (the backend calls), `sagesched.live.backend_state` holds the per-request and
per-backend bookkeeping (a backend's load sums, health probes and learned throughput), and
`sagesched.live.executor_config` the knobs and `LiveResponse`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sagesched.core import Outcome, Request, RequestRecord
from sagesched.core.decisions import INVALID_DECISION, Placement, Verdict, decide
from sagesched.core.rates import starts_clear
from sagesched.live.backend_state import Attempt, BackendState, CallerRequest, PendingRequest
from sagesched.live.backends import BackendClient, BackendConfig, SSEStream
from sagesched.live.dispatch import _PER_CALLER_EMBEDDING_FIELDS, Dispatcher
from sagesched.live.errors import (
    InvalidRequest,
    LiveError,
    ModelNotFound,
    NoBackendAvailable,
    QueueFull,
    RequestRejected,
    ServiceStopping,
    UpstreamTimeout,
    gave_up,
)
from sagesched.live.executor_config import ExecutorConfig, LiveResponse
from sagesched.live.requests import ENDPOINTS, request_from_body
from sagesched.policies.base import Policy

logger = logging.getLogger(__name__)

# The names these classes had before the split (tests and tools import them).
_Pending = PendingRequest
_Backend = BackendState


class LiveExecutor(Dispatcher):
    """Schedules requests over real backends with a `Policy`; see the module docstring.

    Use as ``async with LiveExecutor(policy, backends) as ex: resp = await ex.submit(req, body, "chat")``.
    """

    def __init__(
        self,
        policy: Policy,
        backends: Sequence[BackendConfig | Mapping[str, Any]],
        config: ExecutorConfig | None = None,
    ) -> None:
        if not backends:
            raise ValueError("LiveExecutor needs at least one backend")
        self.config = config or ExecutorConfig()
        self._policy = policy
        self.backend_configs = [b if isinstance(b, BackendConfig) else BackendConfig.from_dict(b) for b in backends]
        ids = [b.id for b in self.backend_configs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"backend ids must be unique, got {ids}; set 'id' on backends sharing a host:port")
        self._backends: dict[str, _Backend] = {}
        self._queue: dict[str, _Pending] = {}
        self._pending: dict[str, _Pending] = {}
        # The newest `max_records` records; totals over all of them are the running counters below.
        self.records: collections.deque[RequestRecord] = collections.deque(maxlen=self.config.max_records)
        self.records_total = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.decisions: collections.Counter[str] = collections.Counter()
        self.rejections: collections.Counter[str] = collections.Counter()
        self.retries = 0
        self.invalid_decisions = 0
        self.policy_errors = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0
        self._kick_scheduled = False
        self._wakeup: asyncio.TimerHandle | None = None
        self._strand_timer: asyncio.TimerHandle | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False
        self._closed = False
        self._idle = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the backend clients, probe every backend once, and start the health loop."""
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._idle = asyncio.Event()
        self._idle.set()
        for cfg in self.backend_configs:
            client = BackendClient(
                cfg,
                connect_timeout_s=self.config.connect_timeout_s,
                read_timeout_s=self.config.request_timeout_s,
                probe_timeout_s=self.config.probe_timeout_s,
            )
            self._backends[cfg.backend_id] = _Backend(cfg, client)
        self._started = True
        await asyncio.gather(*(self._probe(b) for b in self._backends.values()))
        self._health_task = self._loop.create_task(self._health_loop(), name="sagesched-health")
        logger.info(
            "live executor started: policy=%s, backends=%s",
            self._policy.name,
            {b.id: ("healthy" if b.healthy else "unhealthy") for b in self._backends.values()},
        )

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop accepting, let queued and in-flight requests finish for up to `drain_timeout_s`,
        then fail what is left with ServiceStopping and close the connections."""
        if not self._started or self._closed:
            return
        self._stopping = True
        drain = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if self._pending and drain > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain):
                    await self._idle.wait()
        for p in list(self._pending.values()):
            self._fail(p, ServiceStopping("the executor stopped before the request finished; retry later"))
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        for timer in (self._wakeup, self._strand_timer):
            if timer is not None:
                timer.cancel()
        # Let cancelled dispatch tasks unwind before their connections go away.
        await asyncio.sleep(0)
        await asyncio.gather(*(b.client.aclose() for b in self._backends.values()), return_exceptions=True)
        self._closed = True
        logger.info("live executor stopped: %d records", len(self.records))

    async def __aenter__(self) -> LiveExecutor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- public API ------------------------------------------------------------------------------------
    def now(self) -> float:
        """Seconds since the executor started (the clock of `arrival_s` and of every record)."""
        if self._loop is None:
            return 0.0
        return self._loop.time() - self._t0

    @property
    def policy(self) -> Policy:
        return self._policy

    def set_policy(self, policy: Policy) -> None:
        """Switch the policy at run time; queued requests are offered to the new one at once."""
        if not isinstance(policy, Policy):
            raise TypeError(f"set_policy needs a Policy instance, got {type(policy).__name__}")
        logger.info("policy switched: %s -> %s", self._policy.name, policy.name)
        self._policy = policy
        self._kick()

    def in_flight(self, request_id: str) -> bool:
        """Whether a request with this id is queued or running now (ids must be unique among those)."""
        return request_id in self._pending

    def abort_all(self, error: LiveError) -> int:
        """End every queued and in-flight request with `error` now (a gateway's drain deadline).

        Streams already started end with `error` as their last event; returns how many ended.
        """
        pending = list(self._pending.values())
        for p in pending:
            self._fail(p, error)
        return len(pending)

    def models(self, endpoint: str | None = None) -> list[str]:
        """Models served by at least one backend (for `endpoint`'s request type, if given)."""
        rtype = ENDPOINTS.get(endpoint) if endpoint else None
        found = {
            m for cfg in self.backend_configs if rtype is None or cfg.instance_kind.serves(rtype) for m in cfg.models
        }
        return sorted(found)

    def backend_for(self, instance_id: str) -> BackendConfig:
        return self._backends[instance_id].config

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able picture of the executor for /admin/metrics and Prometheus gauges."""
        backends = {}
        for b in self._backends.values():
            m = b.metrics
            backends[b.id] = {
                "id": b.id,
                "url": b.config.url,
                "kind": b.config.instance_kind.value,
                "models": list(b.config.models),
                "healthy": b.healthy,
                "inflight": len(b.inflight),
                "embedding_inflight": b.embedding_inflight,
                "max_inflight": b.config.max_inflight,
                "metrics": m.as_dict() if m is not None else None,
                "age_s": round(m.age_s(), 3) if m is not None else None,
                "completed": b.completed,
                "failures": b.failures,
                "prefill_tokens_per_s": round(b.prefill_tokens_per_s, 1),
                "decode_step_s": round(b.decode_step_s, 5),
                "embedding_tokens_per_s": round(b.embedding_tokens_per_s, 1),
            }
        outcomes = self.outcomes
        queue_len = len(self._queue)
        return {
            "uptime_s": round(self.now(), 3),
            "policy": self._policy.describe(),
            "queue_len": queue_len,
            "queue_length": queue_len,
            "inflight": sum(len(b.inflight) for b in self._backends.values()),
            "backends": backends,
            "decisions": dict(self.decisions),
            "rejections": dict(self.rejections),
            "outcomes": dict(outcomes),
            "retries": self.retries,
            "invalid_decisions": self.invalid_decisions,
            "policy_errors": self.policy_errors,
            "stopping": self._stopping,
        }

    async def submit(
        self,
        request: Request | None,
        body: Mapping[str, Any],
        endpoint: str = "chat",
        headers: Mapping[str, str] | None = None,
    ) -> LiveResponse:
        """Queue one request and wait for its response (or stream) or a `LiveError`.

        `request` may be None: it is then built from `body` and `headers` with `request_from_body`
        at the executor's clock. `body` is the OpenAI body as the caller sent it.
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; use one of {', '.join(ENDPOINTS)}")
        if not self._started or self._loop is None:
            raise RuntimeError("the executor is not running; use `async with executor:` or `await executor.start()`")
        if self._stopping:
            raise ServiceStopping("the executor is shutting down and accepts no new requests")
        if request is None:
            request = request_from_body(endpoint, body, headers, self.now())
        if request.type is not ENDPOINTS[endpoint]:
            raise ValueError(
                f"request {request.id} is {request.type.value}, but endpoint {endpoint!r} serves {ENDPOINTS[endpoint].value}"
            )
        if request.id in self._pending:
            raise InvalidRequest(
                f"request id {request.id!r} is already in flight; ids must be unique", param="X-Request-Id"
            )
        record = RequestRecord.from_request(request)
        if not any(b.serves(request) for b in self._backends.values()):
            served = self.models(endpoint)
            error: LiveError = ModelNotFound(
                f"model {request.model!r} is not served for {endpoint}; available: {', '.join(served) or '(none)'}",
                param="model",
            )
            self._reject_early(record, error)
            raise error
        if len(self._queue) >= self.config.max_queue:
            error = QueueFull(
                f"the gateway queue is full ({self.config.max_queue} waiting); retry after {self.config.retry_after_s:g}s",
                retry_after_s=self.config.retry_after_s,
            )
            self._reject_early(record, error)
            raise error

        body = dict(body)
        stream = bool(body.get("stream")) and request.type.is_llm
        # A request built on another clock must still get its full timeout from now.
        now = self._loop.time()
        deadline = self._t0 + request.arrival_s + self.config.request_timeout_s
        deadline = min(max(deadline, now + 0.001), now + self.config.request_timeout_s)
        call = CallerRequest(request, body, endpoint, stream, deadline, self._loop.create_future())
        pending = _Pending(call, record)
        pending.timer = self._loop.call_at(deadline, self._expire, pending)
        self._pending[request.id] = pending
        self._queue[request.id] = pending
        self._idle.clear()
        self._kick()
        try:
            # Awaited directly (no shield, no extra task): if the caller is cancelled the future is
            # cancelled with it, and every place that resolves it checks `done()` first.
            return await pending.future
        except asyncio.CancelledError:
            # The caller went away (client disconnect): stop the upstream work.
            self._fail(pending, LiveError("the caller cancelled the request", status=499, code="cancelled"))
            raise

    # -- scheduling ------------------------------------------------------------------------------------
    def _kick(self) -> None:
        """Run the policy soon (once, however many events arrive in the same loop iteration)."""
        if self._kick_scheduled or self._loop is None or self._closed:
            return
        self._kick_scheduled = True
        self._loop.call_soon(self._run_policy)

    def _run_policy(self) -> None:
        self._kick_scheduled = False
        if self._closed:
            return
        now = self.now()
        if self._queue:
            queue = [p.request for p in self._queue.values()]
            views = [b.view(self.config.metrics_stale_s) for b in self._backends.values()]
            # The decision core gives decisions the simulator's meaning; it never raises for the policy.
            outcome = decide(self._policy, now, queue, views)
            self.invalid_decisions += len(outcome.ignored)
            self.policy_errors += outcome.policy_errors
            for verdict in outcome.verdicts:
                self._apply_verdict(verdict)
            for placement in outcome.placements:
                self._apply_placement(placement)
        self._check_stranded(now)
        self._arm_wakeup(now)

    def _apply_verdict(self, verdict: Verdict) -> None:
        p = self._queue.get(verdict.request.id)
        if p is None:
            return
        p.record.rule = verdict.rule
        if verdict.outcome == "rejected":
            self.rejections[verdict.code] += 1
            self.decisions[verdict.rule or self._policy.name] += 1
            error: LiveError = RequestRejected(verdict.reason, code=verdict.code, rule=verdict.rule)
            self._finish(p, Outcome.REJECTED, verdict.message, error=error)
            return
        # The policy's fault (it raised, returned garbage, or placed the request where it cannot run).
        if verdict.code == INVALID_DECISION:
            self.invalid_decisions += 1
        self._finish(p, Outcome.FAILED, verdict.message, error=LiveError(verdict.reason, status=500, code=verdict.code))

    def _apply_placement(self, placement: Placement) -> None:
        backend = self._backends[placement.instance_id]
        members = [self._queue[r.id] for r in placement.requests if r.id in self._queue]
        if not members:
            return
        self.decisions[placement.rule or self._policy.name] += len(members)
        now = self.now()
        for p in members:
            del self._queue[p.request.id]
            p.attempt = Attempt(backend.id)
            if not p.request.is_embedding:
                p.attempt.started_clear = starts_clear(backend.view(self.config.metrics_stale_s))
            p.no_backend_since = None
            p.record.instance_id = backend.id
            p.record.dispatch_s = now
            p.record.rule = placement.rule
            p.record.batch_size = len(members)
            backend.add(p)
        embeddings = [p for p in members if p.request.is_embedding]
        for p in members:
            if not p.request.is_embedding:
                p.record.batch_size = 1
                p.dispatched().task = self._spawn(self._run_llm(backend, p), p.request.id)
        for group in self._embedding_groups(embeddings):
            task = self._spawn(self._run_embedding(backend, group), group[0].request.id)
            for p in group:
                attempt = p.dispatched()
                attempt.group = group
                attempt.task = task

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        assert self._loop is not None
        return self._loop.create_task(coro, name=f"sagesched-dispatch-{name}")

    @staticmethod
    def _embedding_groups(members: list[_Pending]) -> list[list[_Pending]]:
        """Split a batch where bodies differ in anything that changes the vectors (model, dimensions, ...)."""
        groups: dict[str, list[_Pending]] = {}
        for p in members:
            shared = {k: v for k, v in p.body.items() if k not in _PER_CALLER_EMBEDDING_FIELDS}
            key = json.dumps([p.request.model, shared], sort_keys=True, default=str)
            groups.setdefault(key, []).append(p)
        return list(groups.values())

    def _check_stranded(self, now: float) -> None:
        """Fail requests that waited `no_backend_grace_s` with no healthy backend able to serve them."""
        grace = self.config.no_backend_grace_s
        earliest: float | None = None
        for p in list(self._queue.values()):
            if any(b.healthy and b.serves(p.request) for b in self._backends.values()):
                p.no_backend_since = None
                continue
            if p.no_backend_since is None:
                p.no_backend_since = now
            if now - p.no_backend_since >= grace:
                self._fail(
                    p,
                    NoBackendAvailable(
                        f"no healthy backend serves {p.request.type.value} for model {p.request.model!r} "
                        f"(waited {grace:g}s); check the backends' /health"
                    ),
                )
            else:
                due = p.no_backend_since + grace
                earliest = due if earliest is None else min(earliest, due)
        if self._strand_timer is not None:
            self._strand_timer.cancel()
            self._strand_timer = None
        if earliest is not None and self._loop is not None:
            self._strand_timer = self._loop.call_later(max(self.config.min_wakeup_s, earliest - now), self._kick)

    def _arm_wakeup(self, now: float) -> None:
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        if not self._queue or self._loop is None:
            return
        when = self._policy.next_wakeup(now)
        if when is None:
            return
        delay = max(self.config.min_wakeup_s, when - now)
        self._wakeup = self._loop.call_later(delay, self._kick)

    # -- outcomes ---------------------------------------------------------------------------------------
    def _requeue(self, backend: _Backend, members: list[_Pending], exc: LiveError) -> None:
        """Nothing reached the callers: mark the backend unhealthy and offer them to the policy again."""
        self._mark_unhealthy(backend, exc)
        for p in members:
            if p.done:
                continue
            backend.remove(p.request.id)
            p.attempt = None
            p.attempts += 1
            if p.attempts > self.config.max_retries:
                self._fail(p, gave_up(exc, p.attempts, self.config.retry_after_s))
                continue
            self.retries += 1
            p.record.instance_id = None
            p.record.dispatch_s = None
            self._queue[p.request.id] = p
            logger.info("re-queued %s after %s failed: %s", p.request.id, backend.id, exc.message)
        self._kick()

    def _mark_unhealthy(self, backend: _Backend, exc: LiveError) -> None:
        backend.failures += 1
        if backend.healthy:
            logger.warning("backend %s marked unhealthy: %s", backend.id, exc.message)
        backend.healthy = False

    def _complete(self, p: _Pending, response: LiveResponse | None) -> None:
        if p.done:
            return
        backend = self._backends.get(p.instance_id or "")
        if backend is not None:
            backend.completed += 1
            backend.learn_rates(p, self.now(), self.config.rate_smoothing)
        p.record.output_tokens = p.progress.tokens_seen
        self._finish(p, Outcome.COMPLETED, "", response=response)

    def _fail(self, p: _Pending, error: LiveError) -> None:
        """End `p` with `error` wherever it is; cancels its upstream call unless batch-mates still wait."""
        if p.done:
            return
        code = error.code or "error"
        outcome = Outcome.REJECTED if isinstance(error, (QueueFull, RequestRejected)) else Outcome.FAILED
        self._finish(p, outcome, f"{code}: {error.message}", error=error)
        attempt = p.attempt
        if attempt is None or attempt.task is None:
            return
        task = attempt.task
        solo = not attempt.group or all(m.done for m in attempt.group)
        if not task.done() and task is not asyncio.current_task() and solo:
            task.cancel()
        if attempt.sse is not None and task.done():
            # Streaming to the caller: close the upstream so the relay wakes up and ends.
            self._spawn(self._close_quietly(attempt.sse), f"close-{p.request.id}")

    @staticmethod
    async def _close_quietly(sse: SSEStream) -> None:
        with contextlib.suppress(Exception):
            await sse.aclose()

    def _finish(
        self,
        p: _Pending,
        outcome: Outcome,
        reason: str,
        *,
        response: LiveResponse | None = None,
        error: LiveError | None = None,
    ) -> None:
        p.done = True
        p.error = error
        if p.timer is not None:
            p.timer.cancel()
        self._queue.pop(p.request.id, None)
        self._pending.pop(p.request.id, None)
        if p.instance_id is not None:
            backend = self._backends.get(p.instance_id)
            if backend is not None:
                backend.remove(p.request.id)
        p.record.finish_s = self.now()
        p.record.outcome = outcome.value
        p.record.reason = reason
        if outcome is not Outcome.COMPLETED and p.record.first_token_s is None:
            p.record.output_tokens = 0
        self._keep(p.record)
        if not p.future.done():
            if error is not None:
                p.future.set_exception(error)
            elif response is not None:
                p.future.set_result(response)
        if error is not None and p.future.done() and not p.future.cancelled():
            p.future.exception()  # mark retrieved: a caller that left must not log "never retrieved"
        if not self._pending:
            self._idle.set()
        self._kick()

    def _reject_early(self, record: RequestRecord, error: LiveError) -> None:
        """A request refused before it was queued still leaves its record."""
        record.finish_s = self.now()
        record.outcome = Outcome.REJECTED.value
        record.reason = f"{error.code}: {error.message}"
        self.rejections[error.code] += 1
        self._keep(record)

    def _keep(self, record: RequestRecord) -> None:
        """Store a final record in the bounded window and count it (O(1): this runs per request)."""
        self.records.append(record)
        self.records_total += 1
        self.outcomes[record.outcome] += 1

    def _expire(self, p: _Pending) -> None:
        if p.done:
            return
        # The reason names where the request was, not which request it was (the record carries the
        # id): summaries count failures by reason, and one reason per request would make that useless.
        where = "queued" if p.request.id in self._queue else f"at backend {p.instance_id}"
        self._fail(p, UpstreamTimeout(f"did not finish within {self.config.request_timeout_s:g}s ({where})"))

    # -- health ---------------------------------------------------------------------------------------
    async def _probe(self, backend: _Backend) -> None:
        if await backend.probe(self.config):
            self._kick()

    async def _health_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await asyncio.gather(*(self._probe(b) for b in self._backends.values()))
            except Exception:
                logger.exception("health probing failed")
            self._kick()


def records_frame(executor: LiveExecutor) -> Any:
    """The executor's records as a DataFrame: the simulator's function, so both share one schema."""
    from sagesched.metrics import records_frame as frame

    return frame(executor.records)


__all__ = ["BackendState", "ExecutorConfig", "LiveExecutor", "LiveResponse", "PendingRequest", "records_frame"]
