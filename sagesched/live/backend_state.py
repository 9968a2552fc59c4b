"""Executor-side bookkeeping: one accepted request (`PendingRequest`) and one backend (`BackendState`).

A pending request is three cohesive parts and a little lifecycle: what the caller sent
(`CallerRequest`, immutable), the current dispatch to a backend (`Attempt`, replaced when the
request is re-queued) and how far its answer has come (`Progress`).

`BackendState` keeps running load sums over its in-flight requests, updated incrementally on every
add/remove/progress (the policy reads them on every arrival), and builds the `InstanceView` a policy
sees: our own exact accounting, raised to a backend's scraped gauges only as far as they say more
than we know.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from sagesched.core import InstanceView, Request, RequestRecord
from sagesched.core.rates import ThroughputEstimate
from sagesched.live.backend_metrics import BackendMetrics
from sagesched.live.backends import BackendClient, BackendConfig, SSEStream
from sagesched.live.errors import (
    LiveError,
)
from sagesched.live.executor_config import ExecutorConfig, LiveResponse

logger = logging.getLogger("sagesched.live.executor")


@dataclass(frozen=True, eq=False, slots=True)
class CallerRequest:
    """What the caller sent and waits on; fixed from arrival until the request ends.

    deadline: loop time by which the request must be done (the expiry timer fires then).
    future: resolved once with the `LiveResponse` (a body, or a stream) or a `LiveError`.
    """

    request: Request
    body: dict[str, Any]
    endpoint: str
    stream: bool
    deadline: float
    future: asyncio.Future[LiveResponse]


@dataclass(eq=False, slots=True)
class Attempt:
    """One dispatch of a request to one backend; dropped when the request goes back to the queue.

    task: the dispatch task doing the backend call (shared by an embedding batch's members).
    group: the embedding batch this request went out in (empty for LLM requests).
    sse: the upstream stream, once a streamed LLM call has opened it.
    share: what this request adds to the backend's load sums (embedding requests, prefill tokens,
        decode tokens), so that removing it subtracts exactly what adding it added.
    started_clear: an LLM request found nothing ahead of it at dispatch (`starts_clear`), so its
        time to first token measures the backend's prefill rate (`learn_rates`).
    """

    instance_id: str
    task: asyncio.Task[None] | None = None
    group: list[PendingRequest] = field(default_factory=list)
    sse: SSEStream | None = None
    share: tuple[int, int, int] = (0, 0, 0)
    started_clear: bool = False


@dataclass(eq=False, slots=True)
class Progress:
    """How far the answer has come: it prices the request's remaining load at its backend."""

    tokens_seen: int = 0
    first_token: bool = False


@dataclass(eq=False)
class PendingRequest:
    """One accepted request from arrival until its record is final.

    call: what the caller sent (immutable); record: the request's record, filled as it goes;
    attempt: the current dispatch, None while queued; progress: tokens received so far;
    timer: the deadline timer; attempts: dispatches that failed before any byte reached the caller;
    no_backend_since: loop time since when no healthy backend could serve it (None: one could);
    done / error: the request has ended, and with which error (None: completed).
    """

    call: CallerRequest
    record: RequestRecord
    attempt: Attempt | None = None
    progress: Progress = field(default_factory=Progress)
    timer: asyncio.TimerHandle | None = None
    attempts: int = 0
    no_backend_since: float | None = None
    done: bool = False
    error: LiveError | None = None

    @property
    def request(self) -> Request:
        return self.call.request

    @property
    def body(self) -> dict[str, Any]:
        return self.call.body

    @property
    def future(self) -> asyncio.Future[LiveResponse]:
        return self.call.future

    @property
    def instance_id(self) -> str | None:
        """The backend it is dispatched to; None while queued."""
        return self.attempt.instance_id if self.attempt is not None else None

    def dispatched(self) -> Attempt:
        """The current attempt; dispatch code runs only for a placed request."""
        if self.attempt is None:
            raise RuntimeError(f"request {self.request.id} is not dispatched")
        return self.attempt


def _load_share(p: PendingRequest) -> tuple[int, int, int]:
    """(embedding requests, prompt tokens not yet prefilled, output tokens still to decode)."""
    r, progress = p.request, p.progress
    if r.is_embedding:
        return 1, (0 if progress.first_token else r.work_tokens), 0
    return 0, (0 if progress.first_token else r.prompt_tokens), max(0, r.max_tokens - progress.tokens_seen)


class BackendState:
    """Executor-side state of one backend: the client, health, scraped gauges, in-flight requests."""

    def __init__(self, config: BackendConfig, client: BackendClient) -> None:
        self.config = config
        self.client = client
        self.healthy = False
        self.failed_probes = 0  # consecutive failed health probes
        # Requests at this backend; change it only through add/remove so the sums stay right.
        self.inflight: dict[str, PendingRequest] = {}
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
        # Learned from finished requests (`learn_rates`); the simulator's "learned" view rates use
        # the same estimator.
        self.rates = ThroughputEstimate(
            config.prefill_tokens_per_s, config.decode_step_s, config.embedding_tokens_per_s
        )
        self.completed = 0
        self.failures = 0

    @property
    def id(self) -> str:
        return str(self.config.id)

    def serves(self, request: Request) -> bool:
        return self.config.instance_kind.serves(request.type) and request.model in self.config.models

    def add(self, p: PendingRequest) -> None:
        """Count `p` (dispatched here: `p.attempt` is set) in the load sums."""
        self.remove(p.request.id)
        self.inflight[p.request.id] = p
        p.dispatched().share = share = _load_share(p)
        self.embedding_inflight += share[0]
        self.prefill_tokens += share[1]
        self.decode_tokens += share[2]
        if p.request.is_embedding:
            self.embedding_tokens += share[1]
            self.embedding_inputs += p.request.embedding_inputs

    def remove(self, request_id: str) -> None:
        p = self.inflight.pop(request_id, None)
        if p is not None and p.attempt is not None:
            share = p.attempt.share
            self.embedding_inflight -= share[0]
            self.prefill_tokens -= share[1]
            self.decode_tokens -= share[2]
            if p.request.is_embedding:
                self.embedding_tokens -= share[1]
                self.embedding_inputs -= p.request.embedding_inputs

    def refresh(self, p: PendingRequest) -> None:
        """Re-count `p` after its progress (first token, tokens seen) changed."""
        attempt = p.attempt
        if attempt is not None and self.inflight.get(p.request.id) is p:
            old, new = attempt.share, _load_share(p)
            if old != new:
                attempt.share = new
                self.embedding_inflight += new[0] - old[0]
                self.prefill_tokens += new[1] - old[1]
                self.decode_tokens += new[2] - old[2]
                if p.request.is_embedding:
                    self.embedding_tokens += new[1] - old[1]

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.rates.prefill_tokens_per_s

    @property
    def decode_step_s(self) -> float:
        return self.rates.decode_step_s

    @property
    def embedding_tokens_per_s(self) -> float:
        return self.rates.embedding_tokens_per_s

    def learn_rates(self, p: PendingRequest, finish: float, alpha: float) -> None:
        """Refine the throughput estimates from one finished request (`ThroughputEstimate.learn`)."""
        clear = p.attempt is not None and p.attempt.started_clear
        self.rates.learn(p.record, finish, p.progress.tokens_seen, alpha, streamed=p.call.stream, started_clear=clear)

    async def probe(self, config: ExecutorConfig) -> bool:
        """One health probe (and, when healthy, a metrics scrape); True when `healthy` changed.

        A serving backend is taken out only after `probe_failures_to_mark_down` failed probes in a
        row: one slow `/health` answer from a busy backend is not an outage.
        """
        healthy = await self.client.health()
        self.failed_probes = 0 if healthy else self.failed_probes + 1
        if not healthy and self.healthy and self.failed_probes < config.probe_failures_to_mark_down:
            return False
        if healthy and config.scrape_metrics and self.config.scrape_metrics:
            own_before = len(self.inflight)
            metrics = await self.client.scrape()
            if metrics is not None:
                self.metrics = metrics
                # The backend answered somewhere between sending and receiving the scrape; taking
                # the larger count errs towards "less loaded", which our own accounting bounds.
                self.own_at_scrape = max(own_before, len(self.inflight))
        if healthy == self.healthy:
            return False
        logger.log(
            logging.INFO if healthy else logging.WARNING,
            "backend %s is %s",
            self.id,
            "healthy" if healthy else "unhealthy (health probe failed)",
        )
        self.healthy = healthy
        return True

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
            kind=self.config.instance_kind,
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


__all__ = ["Attempt", "BackendState", "CallerRequest", "PendingRequest", "Progress"]
