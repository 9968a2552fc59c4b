"""The live executor: a gateway queue, the scheduling policy, and dispatch to real HTTP backends.

This is the live twin of the simulator's driver. Requests wait in one gateway queue; the policy is
called whenever something changes (an arrival, a completion, a health change, a wake-up it asked
for) and its decisions are carried out literally: an `Assignment` with several embedding requests
becomes ONE backend call whose vectors are split back to the callers in order, and a `Rejection`
reaches the caller as `RequestRejected` with the policy's reason.

Guarantees a caller can rely on:

- `submit` always ends with a `LiveResponse` or a `LiveError`: every request has a deadline timer
  (`request_timeout_s`, 504), whether it is queued, in flight or streaming.
- A backend that refuses the connection or drops it before sending a byte is marked unhealthy and
  the request goes back to the queue for the policy to place elsewhere (bounded by `max_retries`).
  Once a stream has delivered a chunk, a failure is an error to the caller: the tokens it already
  has cannot be taken back.
- Every request leaves exactly one `RequestRecord`, in the simulator's schema, with times in
  seconds since the executor started.

All executor state lives on one event loop and is touched only from it, so there are no locks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagesched.core import InstanceView, Outcome, Request, RequestRecord
from sagesched.core.decisions import INVALID_DECISION, Placement, Verdict, decide
from sagesched.live.backends import BackendClient, BackendConfig, BackendMetrics, SSEStream, encode_base64
from sagesched.live.errors import (
    BackendUnavailable,
    InvalidRequest,
    LiveError,
    ModelNotFound,
    NoBackendAvailable,
    QueueFull,
    RequestRejected,
    ServiceStopping,
    UpstreamError,
    UpstreamTimeout,
)
from sagesched.live.requests import ENDPOINTS, backend_body, embedding_inputs, request_from_body
from sagesched.policies.base import Policy

logger = logging.getLogger(__name__)

LLM_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# Embedding body fields that do not split a merged batch (they are per caller or rewritten).
_PER_CALLER_EMBEDDING_FIELDS = frozenset({"input", "encoding_format", "user", "model"})


@dataclass(frozen=True)
class ExecutorConfig:
    """Executor knobs; every one has a default that suits a small pool on one machine.

    max_queue: requests waiting in the gateway queue; beyond it `submit` raises QueueFull (429).
    request_timeout_s: deadline from arrival to the last byte; past it the caller gets 504.
    connect_timeout_s: TCP connect limit per backend call (a dead backend is noticed this fast).
    health_interval_s: seconds between health probes (and metrics scrapes) of every backend.
    probe_timeout_s: limit for one health probe or metrics scrape.
    probe_failures_to_mark_down: consecutive failed probes before a healthy backend is taken out.
        One slow `/health` answer from a busy backend is not an outage; a refused or dropped
        dispatch still takes a backend out at once.
    scrape_metrics: read backends' ``/metrics`` load gauges into the instance views.
    max_retries: how often a request that failed before any byte was sent is re-queued.
    no_backend_grace_s: how long a request may wait while no healthy backend could serve it
        before it fails with NoBackendAvailable (503); backends often come back within seconds.
    drain_timeout_s: default time `stop()` lets queued and in-flight requests finish.
    retry_after_s: the Retry-After a QueueFull error suggests.
    metrics_stale_s: scraped gauges older than this are ignored (in-flight accounting only).
    min_wakeup_s: floor on the delay of a policy wake-up, so a policy asking for "now" again and
        again cannot spin the loop.
    rate_smoothing: weight of a new observation in the moving averages of backend throughput.
    max_records: finished-request records kept in `records` (the newest; ~1.7 KB each). A gateway
        runs for weeks, so the window is bounded and totals live in running counters
        (`records_total`, `outcomes`); None keeps every record (a replay of a finite trace).
    """

    max_queue: int = 1024
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 3.0
    health_interval_s: float = 2.0
    probe_timeout_s: float = 2.0
    probe_failures_to_mark_down: int = 2
    scrape_metrics: bool = True
    max_retries: int = 2
    no_backend_grace_s: float = 10.0
    drain_timeout_s: float = 30.0
    retry_after_s: float = 1.0
    metrics_stale_s: float = 10.0
    min_wakeup_s: float = 0.001
    rate_smoothing: float = 0.2
    max_records: int | None = 10_000

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        for name in ("request_timeout_s", "connect_timeout_s", "health_interval_s", "probe_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.probe_failures_to_mark_down < 1:
            raise ValueError(f"probe_failures_to_mark_down must be >= 1, got {self.probe_failures_to_mark_down}")
        if self.max_retries < 0 or self.no_backend_grace_s < 0 or self.drain_timeout_s < 0:
            raise ValueError("max_retries, no_backend_grace_s and drain_timeout_s must be >= 0")
        if self.max_records is not None and self.max_records < 1:
            raise ValueError(f"max_records must be >= 1 or None (keep all), got {self.max_records}")
        if not 0 < self.rate_smoothing <= 1:
            raise ValueError(f"rate_smoothing must be in (0, 1], got {self.rate_smoothing}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExecutorConfig:
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown executor key(s) {unknown}; valid keys: {', '.join(sorted(valid))}")
        return cls(**dict(data))


@dataclass
class LiveResponse:
    """What `submit` returns: a complete JSON body, or a stream of OpenAI chunk dicts.

    Consume `stream` to the end or `aclose()` it; the request's record is finished when it ends.
    `raw`, when set, is the backend's JSON body exactly as received (the same content as `json`),
    so a gateway can relay it without encoding it again.
    """

    request_id: str
    instance_id: str
    json: dict[str, Any] | None = None
    stream: AsyncIterator[dict[str, Any]] | None = None
    raw: bytes | None = None

    @property
    def is_stream(self) -> bool:
        return self.stream is not None


@dataclass(eq=False)
class _Pending:
    """One accepted request from arrival until its record is final."""

    request: Request
    body: dict[str, Any]
    endpoint: str
    future: asyncio.Future[LiveResponse]
    record: RequestRecord
    deadline: float  # loop time
    stream: bool
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task[None] | None = None
    sse: SSEStream | None = None
    group: list[_Pending] = field(default_factory=list)
    attempts: int = 0
    instance_id: str | None = None
    tokens_seen: int = 0
    first_token: bool = False
    no_backend_since: float | None = None
    done: bool = False
    error: LiveError | None = None
    # What this request adds to its backend's load sums (embedding, prefill tokens, decode tokens).
    share: tuple[int, int, int] = (0, 0, 0)


def _load_share(p: _Pending) -> tuple[int, int, int]:
    """(embedding requests, prompt tokens not yet prefilled, output tokens still to decode)."""
    r = p.request
    if r.is_embedding:
        return 1, (0 if p.first_token else r.work_tokens), 0
    return 0, (0 if p.first_token else r.prompt_tokens), max(0, r.max_tokens - p.tokens_seen)


class _Backend:
    """Executor-side state of one backend: the client, health, scraped gauges, in-flight requests."""

    def __init__(self, config: BackendConfig, client: BackendClient) -> None:
        self.config = config
        self.client = client
        self.healthy = False
        self.failed_probes = 0  # consecutive failed health probes
        # Requests at this backend; change it only through add/remove so the sums stay right.
        self.inflight: dict[str, _Pending] = {}
        # Running sums over `inflight` (kept incrementally: the policy reads them on every arrival,
        # and summing 64+ in-flight requests per call showed up in the gateway's profile).
        self.embedding_inflight = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        # Of prefill_tokens, those of embedding requests, and their inputs (texts): a mixed backend's
        # embedding work does not queue ahead of its LLM work, and TEI admits a bounded number of inputs.
        self.embedding_tokens = 0
        self.embedding_inputs = 0
        self.metrics: BackendMetrics | None = None
        self.own_at_scrape = 0  # len(inflight) when `metrics` was taken
        self.prefill_tokens_per_s = float(config.prefill_tokens_per_s)
        self.decode_step_s = float(config.decode_step_s)
        self.embedding_tokens_per_s = float(config.embedding_tokens_per_s)
        self.completed = 0
        self.failures = 0

    @property
    def id(self) -> str:
        return str(self.config.id)

    def serves(self, request: Request) -> bool:
        return self.config.kind.serves(request.type) and request.model in self.config.models

    def add(self, p: _Pending) -> None:
        self.remove(p.request.id)
        self.inflight[p.request.id] = p
        p.share = share = _load_share(p)
        self.embedding_inflight += share[0]
        self.prefill_tokens += share[1]
        self.decode_tokens += share[2]
        if p.request.is_embedding:
            self.embedding_tokens += share[1]
            self.embedding_inputs += p.request.embedding_inputs

    def remove(self, request_id: str) -> None:
        p = self.inflight.pop(request_id, None)
        if p is not None:
            share = p.share
            self.embedding_inflight -= share[0]
            self.prefill_tokens -= share[1]
            self.decode_tokens -= share[2]
            if p.request.is_embedding:
                self.embedding_tokens -= share[1]
                self.embedding_inputs -= p.request.embedding_inputs

    def refresh(self, p: _Pending) -> None:
        """Re-count `p` after its progress (first token, tokens seen) changed."""
        if self.inflight.get(p.request.id) is p:
            old, new = p.share, _load_share(p)
            if old != new:
                p.share = new
                self.embedding_inflight += new[0] - old[0]
                self.prefill_tokens += new[1] - old[1]
                self.decode_tokens += new[2] - old[2]
                if p.request.is_embedding:
                    self.embedding_tokens += new[1] - old[1]

    def view(self, metrics_stale_s: float) -> InstanceView:
        """Own in-flight accounting, raised to the scraped gauges when those are fresh."""
        own = len(self.inflight)
        embedding = self.embedding_inflight
        prefill = self.prefill_tokens
        decode = self.decode_tokens
        running, waiting, kv, age = own, 0, 0.0, 0.0
        m = self.metrics
        if m is not None and m.age_s() <= metrics_stale_s:
            age = m.age_s()
            scraped_running = int(m.running) if m.running is not None else None
            scraped_waiting = int(m.waiting) if m.waiting is not None else 0
            if scraped_running is not None:
                # The scrape is a picture of the past: what we dispatched or saw finish since then
                # is known exactly, so the scraped total moves with our own count. (Using the raw
                # scrape kept a backend "full" for a whole probe interval after it had drained.)
                total = max(own, scraped_running + scraped_waiting + own - self.own_at_scrape)
                running = min(scraped_running, total) if scraped_running else min(own, total)
                waiting = total - running
            kv = min(1.0, max(0.0, m.kv_usage or 0.0))
        return InstanceView(
            id=self.id,
            kind=self.config.kind,
            models=frozenset(self.config.models),
            healthy=self.healthy,
            running=running,
            waiting=waiting,
            embedding_inflight=min(embedding, running + waiting),
            kv_usage=kv,
            queued_prefill_tokens=prefill,
            queued_decode_tokens=decode,
            max_inflight=self.config.max_inflight,
            max_num_seqs=self.config.max_num_seqs,
            max_batch_tokens=self.config.max_batch_tokens,
            max_client_batch_size=self.config.max_client_batch_size,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            decode_step_s=self.decode_step_s,
            embedding_tokens_per_s=self.embedding_tokens_per_s,
            age_s=age,
            queued_embedding_tokens=self.embedding_tokens,
            embedding_inputs_inflight=self.embedding_inputs,
            max_embedding_inputs=self.config.max_concurrent_inputs,
        )


def _has_content(chunk: Mapping[str, Any]) -> bool:
    """A chunk carries generated content: non-empty delta content / reasoning / tool call, or text."""
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (
            delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")
        ):
            return True
    return False


class LiveExecutor:
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
            self._backends[cfg.id] = _Backend(cfg, client)
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
        found = {m for cfg in self.backend_configs if rtype is None or cfg.kind.serves(rtype) for m in cfg.models}
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
                "kind": b.config.kind.value,
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
            error = ModelNotFound(
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
        pending = _Pending(
            request=request,
            body=body,
            endpoint=endpoint,
            future=self._loop.create_future(),
            record=record,
            deadline=self._t0 + request.arrival_s + self.config.request_timeout_s,
            stream=stream,
        )
        # A request built on another clock must still get its full timeout from now.
        pending.deadline = max(pending.deadline, self._loop.time() + 0.001)
        pending.deadline = min(pending.deadline, self._loop.time() + self.config.request_timeout_s)
        pending.timer = self._loop.call_at(pending.deadline, self._expire, pending)
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
            p.instance_id = backend.id
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
                p.task = self._spawn(self._run_llm(backend, p), p.request.id)
        for group in self._embedding_groups(embeddings):
            task = self._spawn(self._run_embedding(backend, group), group[0].request.id)
            for p in group:
                p.group = group
                p.task = task

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

    # -- dispatch: LLM ---------------------------------------------------------------------------------
    async def _run_llm(self, backend: _Backend, p: _Pending) -> None:
        body = backend_body(p.body)
        body["model"] = p.request.model
        path = LLM_PATHS[p.endpoint]
        try:
            if not p.stream:
                data, raw = await backend.client.post_json_raw(path, body)
                if not isinstance(data, dict):
                    raise UpstreamError(f"backend {backend.id} answered with {type(data).__name__}, not an object")
                usage = data.get("usage") or {}
                tokens = usage.get("completion_tokens")
                if isinstance(tokens, int):
                    p.tokens_seen = tokens
                p.first_token = True
                p.record.first_token_s = self._first_token_from_timings(data)
                self._complete(p, LiveResponse(p.request.id, backend.id, json=data, raw=raw))
                return
            options = dict(body.get("stream_options") or {})
            want_usage = bool(options.get("include_usage"))
            body["stream_options"] = {**options, "include_usage": True}
            sse = await backend.client.open_stream(path, body)
            p.sse = sse
            first = await sse.next_event()
            if p.done:
                await sse.aclose()
                return
            response = LiveResponse(p.request.id, backend.id, stream=self._relay(backend, p, sse, first, want_usage))
            if not p.future.done():
                p.future.set_result(response)
        except asyncio.CancelledError:
            if p.sse is not None:
                with contextlib.suppress(Exception):
                    await p.sse.aclose()
            raise
        except BackendUnavailable as exc:
            if p.sse is not None:
                with contextlib.suppress(Exception):
                    await p.sse.aclose()
                p.sse = None
            self._requeue(backend, [p], exc)
        except LiveError as exc:
            if p.sse is not None:
                with contextlib.suppress(Exception):
                    await p.sse.aclose()
            self._fail(p, exc)
        except Exception as exc:
            logger.exception("dispatch of %s to %s failed", p.request.id, backend.id)
            self._fail(p, UpstreamError(f"backend {backend.id}: {type(exc).__name__}: {exc}"))

    def _first_token_from_timings(self, data: Mapping[str, Any]) -> float | None:
        """First-token time of a non-streamed answer, where the server reports its decode time.

        llama-server's ``timings.predicted_ms`` is the time spent generating after the prompt, so
        the first token came that long before now. Other servers do not say: TTFT stays unknown
        (None) rather than being reported as the end-to-end time.
        """
        timings = data.get("timings")
        if isinstance(timings, dict) and isinstance(timings.get("predicted_ms"), (int, float)):
            n = timings.get("predicted_n")
            per_token = timings["predicted_ms"] / n if isinstance(n, (int, float)) and n > 0 else 0.0
            return max(0.0, self.now() - max(0.0, timings["predicted_ms"] - per_token) / 1000.0)
        return None

    async def _relay(
        self, backend: _Backend, p: _Pending, sse: SSEStream, first: dict[str, Any] | None, want_usage: bool
    ) -> AsyncIterator[dict[str, Any]]:
        """Pass the backend's chunks through as they arrive, measuring TTFT and counting tokens."""
        event = first
        try:
            while event is not None:
                if p.done:
                    raise p.error or UpstreamTimeout("the request ended")
                usage = event.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    p.tokens_seen = max(p.tokens_seen, usage["completion_tokens"])
                    p.record.output_tokens = p.tokens_seen
                if _has_content(event):
                    if not p.first_token:
                        p.first_token = True
                        p.record.first_token_s = self.now()
                    if not isinstance(usage, dict):
                        p.tokens_seen += 1
                backend.refresh(p)
                if want_usage or not usage:
                    yield event
                elif event.get("choices"):
                    yield {k: v for k, v in event.items() if k != "usage"}
                try:
                    event = await sse.next_event()
                except LiveError as exc:
                    if p.done:
                        raise (p.error or exc) from None
                    if isinstance(exc, UpstreamTimeout):
                        raise
                    if exc.code == "stream_broken":
                        self._mark_unhealthy(backend, exc)
                    raise UpstreamError(
                        f"backend {backend.id} failed after the stream started (not retried): {exc.message}",
                        status=exc.status,
                        code=exc.code,
                    ) from exc
                except Exception as exc:
                    if p.done:
                        raise (p.error or UpstreamTimeout("the request ended")) from None
                    raise UpstreamError(f"backend {backend.id} stream failed: {type(exc).__name__}: {exc}") from exc
            if p.done:
                raise p.error or UpstreamTimeout("the request ended")
            self._complete(p, None)
        except LiveError as exc:
            self._fail(p, exc)
            raise
        except (GeneratorExit, asyncio.CancelledError):
            self._fail(p, LiveError("the caller closed the stream", status=499, code="cancelled"))
            raise
        finally:
            with contextlib.suppress(Exception):
                await sse.aclose()

    # -- dispatch: embeddings --------------------------------------------------------------------------
    async def _run_embedding(self, backend: _Backend, group: list[_Pending]) -> None:
        """ONE backend call for the whole group; vectors split back to each caller in order."""
        inputs: list[Any] = []
        counts: list[int] = []
        for p in group:
            items = embedding_inputs(p.body.get("input"))
            inputs.extend(items)
            counts.append(len(items))
        extra = {k: v for k, v in group[0].body.items() if k not in _PER_CALLER_EMBEDDING_FIELDS}
        try:
            vectors, usage_tokens = await self._embed_chunked(backend, group[0].request.model, inputs, extra)
        except BackendUnavailable as exc:
            self._requeue(backend, [p for p in group if not p.done], exc)
            return
        except UpstreamError as exc:
            live = [p for p in group if not p.done]
            if len(live) > 1 and 400 <= exc.status < 500:
                # One caller's input may be at fault: serve the callers one by one so only it fails.
                # Each caller gets its own task, so failing one cancels only its own call (the
                # group's task is this one; cancelling it would strand the others).
                solos = []
                for p in live:
                    p.group = [p]
                    p.task = self._spawn(self._run_embedding(backend, [p]), p.request.id)
                    solos.append(p.task)
                await asyncio.gather(*solos, return_exceptions=True)
                return
            for p in live:
                self._fail(p, exc)
            return
        except LiveError as exc:
            for p in group:
                self._fail(p, exc)
            return
        except Exception as exc:
            logger.exception("embedding batch to %s failed", backend.id)
            for p in group:
                self._fail(p, UpstreamError(f"backend {backend.id}: {type(exc).__name__}: {exc}"))
            return
        total_est = sum(p.request.embedding_tokens for p in group) or 1
        offset = 0
        for p, count in zip(group, counts, strict=True):
            mine = vectors[offset : offset + count]
            offset += count
            if p.done:
                continue
            want_b64 = p.body.get("encoding_format") == "base64"
            tokens = (
                round(usage_tokens * p.request.embedding_tokens / total_est)
                if usage_tokens is not None
                else p.request.embedding_tokens
            )
            payload = {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": encode_base64(vec) if want_b64 else vec}
                    for i, vec in enumerate(mine)
                ],
                "model": p.request.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            p.first_token = True
            p.record.first_token_s = self.now()
            self._complete(p, LiveResponse(p.request.id, backend.id, json=payload))

    @staticmethod
    async def _embed_chunked(
        backend: _Backend, model: str, inputs: list[Any], extra: dict[str, Any]
    ) -> tuple[list[list[float]], int | None]:
        """Embed `inputs` in as few backend calls as its `max_client_batch_size` allows, in order.

        A caller may send far more inputs than one backend call takes (LangChain chunks 1,000,
        TEI takes 32): the chunks go out concurrently and the vectors come back in input order.
        """
        size = max(1, backend.config.max_client_batch_size)
        if len(inputs) <= size:
            return await backend.client.embed(model, inputs, extra)
        parts = await asyncio.gather(
            *(backend.client.embed(model, inputs[i : i + size], extra) for i in range(0, len(inputs), size))
        )
        vectors = [vec for part, _ in parts for vec in part]
        counts = [tokens for _, tokens in parts]
        return vectors, (sum(c for c in counts if c is not None) if all(c is not None for c in counts) else None)

    # -- outcomes ---------------------------------------------------------------------------------------
    def _requeue(self, backend: _Backend, members: list[_Pending], exc: LiveError) -> None:
        """Nothing reached the callers: mark the backend unhealthy and offer them to the policy again."""
        self._mark_unhealthy(backend, exc)
        for p in members:
            if p.done:
                continue
            backend.remove(p.request.id)
            p.task = None
            p.group = []
            p.attempts += 1
            if p.attempts > self.config.max_retries:
                self._fail(p, BackendUnavailable(f"{exc.message} (gave up after {p.attempts} attempts)"))
                continue
            self.retries += 1
            p.instance_id = None
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
            self._learn_rates(backend, p)
        p.record.output_tokens = p.tokens_seen
        self._finish(p, Outcome.COMPLETED, "", response=response)

    def _learn_rates(self, backend: _Backend, p: _Pending) -> None:
        """Refine the backend's throughput estimates from one finished request (moving average)."""
        alpha = self.config.rate_smoothing
        r = p.record
        finish = self.now()
        if r.dispatch_s is None:
            return
        if p.request.is_embedding:
            elapsed = finish - r.dispatch_s
            if elapsed > 0 and p.request.embedding_tokens > 0:
                rate = p.request.embedding_tokens * max(1, r.batch_size) / elapsed
                backend.embedding_tokens_per_s += alpha * (rate - backend.embedding_tokens_per_s)
            return
        if p.stream and r.first_token_s is not None and p.tokens_seen >= 2:
            step = (finish - r.first_token_s) / (p.tokens_seen - 1)
            if step > 0:
                backend.decode_step_s += alpha * (step - backend.decode_step_s)
            ttft = r.first_token_s - r.dispatch_s
            if ttft > 0 and p.request.prompt_tokens >= 16:
                rate = p.request.prompt_tokens / ttft
                backend.prefill_tokens_per_s += alpha * (rate - backend.prefill_tokens_per_s)

    def _fail(self, p: _Pending, error: LiveError) -> None:
        """End `p` with `error` wherever it is; cancels its upstream call unless batch-mates still wait."""
        if p.done:
            return
        code = error.code or "error"
        outcome = Outcome.REJECTED if isinstance(error, (QueueFull, RequestRejected)) else Outcome.FAILED
        self._finish(p, outcome, f"{code}: {error.message}", error=error)
        task = p.task
        solo = not p.group or all(m.done for m in p.group)
        if task is not None and not task.done() and task is not asyncio.current_task() and solo:
            task.cancel()
        if p.sse is not None and task is not None and task.done():
            # Streaming to the caller: close the upstream so the relay wakes up and ends.
            sse = p.sse
            self._spawn(self._close_quietly(sse), f"close-{p.request.id}")

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
        where = "queued" if p.request.id in self._queue else f"at backend {p.instance_id}"
        self._fail(
            p,
            UpstreamTimeout(
                f"request {p.request.id} did not finish within {self.config.request_timeout_s:g}s ({where})"
            ),
        )

    # -- health ---------------------------------------------------------------------------------------
    async def _probe(self, backend: _Backend) -> None:
        healthy = await backend.client.health()
        backend.failed_probes = 0 if healthy else backend.failed_probes + 1
        if not healthy and backend.healthy and backend.failed_probes < self.config.probe_failures_to_mark_down:
            return  # one failed probe of a serving backend: wait for the next before taking it out
        if healthy and self.config.scrape_metrics and backend.config.scrape_metrics:
            own_before = len(backend.inflight)
            metrics = await backend.client.scrape()
            if metrics is not None:
                backend.metrics = metrics
                # The backend answered somewhere between sending and receiving the scrape; taking
                # the larger count errs towards "less loaded", which our own accounting bounds.
                backend.own_at_scrape = max(own_before, len(backend.inflight))
        if healthy != backend.healthy:
            logger.log(
                logging.INFO if healthy else logging.WARNING,
                "backend %s is %s",
                backend.id,
                "healthy" if healthy else "unhealthy (health probe failed)",
            )
            backend.healthy = healthy
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


__all__ = ["ExecutorConfig", "LiveExecutor", "LiveResponse", "records_frame"]
