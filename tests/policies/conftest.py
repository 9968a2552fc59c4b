"""Builders for hand-made requests and instance views, and the contract check every policy must pass.

Fixtures (session-scoped factories, so they also work inside hypothesis tests):

- ``make_request(id, kind="chat", model="m", arrival_s=0.0, ...)``: a `Request`; ``kind`` is
  "chat", "generate" or "embedding" (or a `RequestType`); SLO fields ``ttft_ms``, ``tpot_ms``,
  ``e2e_ms``; embedding requests take ``inputs`` and use ``prompt_tokens`` as their token total.
- ``make_view(id, kind="llm", models=("m",), **fields)``: an `InstanceView`; any other field
  (running, waiting, max_inflight, healthy, ...) by keyword.
- ``check_decisions(decisions, queue, instances)``: asserts the policy contract (valid, unique,
  capacity-respecting placements; reasoned rejections; unservable requests rejected) and returns
  ``(assigned_ids, rejected_ids)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import pytest

from sagesched.core import SLO, Assignment, InstanceKind, InstanceView, Priority, Rejection, Request, RequestType

_KINDS = {"chat": RequestType.LLM_CHAT, "generate": RequestType.LLM_GENERATE, "embedding": RequestType.EMBEDDING}


def build_request(
    id: str,
    kind: str | RequestType = "chat",
    model: str = "m",
    arrival_s: float = 0.0,
    prompt_tokens: int = 100,
    max_tokens: int = 50,
    priority: int | str | Priority = Priority.NORMAL,
    inputs: int = 1,
    ttft_ms: float | None = None,
    tpot_ms: float | None = None,
    e2e_ms: float | None = None,
    tenant: str = "default",
) -> Request:
    rtype = kind if isinstance(kind, RequestType) else _KINDS[kind]
    slo = SLO(ttft_ms=ttft_ms, tpot_ms=tpot_ms, e2e_ms=e2e_ms)
    if rtype is RequestType.EMBEDDING:
        return Request(
            id,
            rtype,
            model,
            arrival_s,
            prompt_tokens=prompt_tokens,
            max_tokens=0,
            embedding_inputs=inputs,
            embedding_tokens=prompt_tokens,
            priority=Priority.parse(priority),
            tenant=tenant,
            slo=slo,
        )
    return Request(
        id,
        rtype,
        model,
        arrival_s,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        priority=Priority.parse(priority),
        tenant=tenant,
        slo=slo,
    )


def build_view(id: str, kind: str | InstanceKind = "llm", models: Sequence[str] = ("m",), **fields) -> InstanceView:
    return InstanceView(id, InstanceKind.parse(kind), frozenset(models), **fields)


def assert_contract(
    decisions: Sequence[object], queue: Sequence[Request], instances: Sequence[InstanceView]
) -> tuple[list[str], list[str]]:
    """Fail on any breach of the policy contract; return (assigned ids in order, rejected ids)."""
    by_id = {r.id: r for r in queue}
    views = {v.id: v for v in instances}
    assigned: list[str] = []
    rejected: list[str] = []
    added: Counter[str] = Counter()
    for d in decisions:
        if isinstance(d, Assignment):
            view = views.get(d.instance_id)
            assert view is not None, f"assignment to unknown instance {d.instance_id}"
            assert view.healthy, f"assignment to unhealthy instance {d.instance_id}"
            for rid in d.request_ids:
                assert rid in by_id, f"assigned id {rid} is not in the queue"
                assert view.can_serve(by_id[rid]), f"{rid} ({by_id[rid].type.value}, {by_id[rid].model}) on {view.id}"
            added[view.id] += len(d.request_ids)
            assigned.extend(d.request_ids)
        elif isinstance(d, Rejection):
            assert d.request_id in by_id, f"rejected id {d.request_id} is not in the queue"
            assert d.reason.strip(), f"rejection of {d.request_id} has no reason"
            assert d.code, f"rejection of {d.request_id} has no code"
            rejected.append(d.request_id)
        else:
            raise AssertionError(f"policy returned {type(d).__name__}, not an Assignment or Rejection")
    for iid, n in added.items():
        view = views[iid]
        assert view.inflight + n <= view.max_inflight, (
            f"{iid}: {view.inflight} in flight + {n} assigned > max_inflight {view.max_inflight}"
        )
    counts = Counter(assigned + rejected)
    twice = [rid for rid, n in counts.items() if n > 1]
    assert not twice, f"decided more than once: {twice}"
    for request in queue:
        if not any(v.can_serve(request) for v in instances):
            assert request.id in rejected, f"{request.id} is unservable by every instance but was not rejected"
    return assigned, rejected


@pytest.fixture(scope="session")
def make_request() -> Callable[..., Request]:
    return build_request


@pytest.fixture(scope="session")
def make_view() -> Callable[..., InstanceView]:
    return build_view


@pytest.fixture(scope="session")
def check_decisions() -> Callable[..., tuple[list[str], list[str]]]:
    return assert_contract
