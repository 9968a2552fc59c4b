"""Executor-side bookkeeping: one accepted request (`PendingRequest`) and one backend (`BackendState`).

`BackendState` keeps running load sums over its in-flight requests, updated incrementally on every
add/remove/progress (the policy reads them on every arrival), and builds the `InstanceView` a policy
sees: our own exact accounting, raised to a backend's scraped gauges only as far as they say more
than we know.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from sagesched.core import InstanceView, Request, RequestRecord
from sagesched.live.backends import BackendClient, BackendConfig, BackendMetrics, SSEStream
from sagesched.live.errors import (
    LiveError,
)
from sagesched.live.executor_config import LiveResponse


@dataclass(eq=False)
class PendingRequest:
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
    group: list[PendingRequest] = field(default_factory=list)
    attempts: int = 0
    instance_id: str | None = None
    tokens_seen: int = 0
    first_token: bool = False
    no_backend_since: float | None = None
    done: bool = False
    error: LiveError | None = None
    # What this request adds to its backend's load sums (embedding, prefill tokens, decode tokens).
    share: tuple[int, int, int] = (0, 0, 0)


def _load_share(p: PendingRequest) -> tuple[int, int, int]:
    """(embedding requests, prompt tokens not yet prefilled, output tokens still to decode)."""
    r = p.request
    if r.is_embedding:
        return 1, (0 if p.first_token else r.work_tokens), 0
    return 0, (0 if p.first_token else r.prompt_tokens), max(0, r.max_tokens - p.tokens_seen)


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
        self.prefill_tokens_per_s = float(config.prefill_tokens_per_s)
        self.decode_step_s = float(config.decode_step_s)
        self.embedding_tokens_per_s = float(config.embedding_tokens_per_s)
        self.completed = 0
        self.failures = 0

    @property
    def id(self) -> str:
        return str(self.config.id)

    def serves(self, request: Request) -> bool:
        return self.config.instance_kind.serves(request.type) and request.model in self.config.models

    def add(self, p: PendingRequest) -> None:
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

    def refresh(self, p: PendingRequest) -> None:
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


__all__ = ["BackendState", "PendingRequest"]
