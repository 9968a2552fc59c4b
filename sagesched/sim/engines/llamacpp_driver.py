"""Replay requests on one simulated llama-server: the smallest driver around `LlamaCppEngineCore`.

Why a separate driver: the cluster driver (`sim/cluster.py`) schedules vLLM and TEI instances behind a
policy; until llama-server instances join it, this replays a workload on a single llama-server (as a
client hitting it directly would) so that probe-calibrated models can be compared with live runs.
Event order: arrivals at or before a step's end join before the next step is planned, as llama-server
picks new tasks up between `llama_decode` calls. Deterministic; the frontend cost is added per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sagesched.sim.engines.llamacpp import LlamaCppConfig, LlamaCppEngineCore
from sagesched.sim.engines.types import EngineRejected, EngineRequest


@dataclass
class LlamaCppRecord:
    """One request's outcome: times in seconds (None if rejected), or the rejection status and reason."""

    id: str
    arrival_s: float
    first_token_s: float | None = None
    finish_s: float | None = None
    status: int = 200
    reason: str = ""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s


def replay_llamacpp(
    requests: Sequence[tuple[float, EngineRequest]],
    config: LlamaCppConfig,
    perf,
    frontend_request_s: float = 0.0,
) -> list[LlamaCppRecord]:
    """Replay (arrival time, request) pairs on one llama-server; one record per request, in input order."""
    core = LlamaCppEngineCore(config, perf)
    order = sorted(range(len(requests)), key=lambda i: requests[i][0])
    records = {req.id: LlamaCppRecord(req.id, t) for t, req in requests}
    if len(records) != len(requests):
        raise ValueError("request ids must be unique")
    now = 0.0
    k = 0
    n = len(order)
    while k < n or core.has_work:
        if not core.has_work and k < n:
            now = max(now, requests[order[k]][0])
        while k < n and requests[order[k]][0] <= now:
            _, req = requests[order[k]]
            try:
                core.add(req)
            except EngineRejected as exc:
                rec = records[req.id]
                rec.status, rec.reason = exc.status, exc.reason
            k += 1
        batch = core.plan_step()
        if batch is None:  # nothing runnable: wait for the next arrival, or stop
            if k >= n:
                break
            now = max(now, requests[order[k]][0])
            continue
        now += core.step_time_s(batch)
        out = core.finish_step(batch)
        for rid in out.first_token_ids:
            records[rid].first_token_s = now + frontend_request_s
        for rid in out.finished_ids:
            records[rid].finish_s = now + frontend_request_s
    return [records[req.id] for _, req in requests]
