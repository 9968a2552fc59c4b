"""Executor state that must stay right over a long run: fresh load views, bounded records, and a
misbehaving policy that fails only its own requests (the decision core)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sagesched.core import Assignment, InstanceView, Request, RequestType
from sagesched.live.backend_metrics import BackendMetrics
from sagesched.live.backend_state import Attempt, BackendState, CallerRequest, PendingRequest
from sagesched.live.backends import BackendConfig
from sagesched.live.errors import LiveError
from sagesched.live.executor import ExecutorConfig, LiveExecutor
from sagesched.live.gateway_config import GatewayConfig
from sagesched.live.server import UnifiedAPIServer
from sagesched.policies.base import Policy
from tests.gateway.fake_backend import FakeBackend, chat_json, json_response

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_a_scrape_taken_while_full_does_not_outlive_our_own_completions() -> None:
    cfg = BackendConfig("http://127.0.0.1:1", "llm", ["m"], max_inflight=14)
    backend = BackendState(cfg, client=None)  # type: ignore[arg-type]
    backend.healthy = True
    requests = [Request(f"r{i}", RequestType.LLM_CHAT, "m", 0.0, prompt_tokens=4, max_tokens=4) for i in range(14)]
    pendings = [
        PendingRequest(CallerRequest(r, {}, "chat", False, 0.0, None), record=None, attempt=Attempt(backend.id))  # type: ignore[arg-type]
        for r in requests
    ]
    for p in pendings:
        backend.add(p)
    # The scrape saw the backend full (14 running), with our 14 in flight.
    backend.metrics = BackendMetrics(running=14, waiting=0, taken_at=time.monotonic())
    backend.own_at_scrape = 14
    assert backend.view(10.0).inflight == 14
    for p in pendings:  # all 14 finish before the next scrape
        backend.remove(p.request.id)
    view = backend.view(10.0)
    assert view.inflight == 0, "a stale scrape kept the backend full although all its requests finished"
    # Work the backend has from elsewhere (scraped beyond our own) still counts.
    backend.metrics = BackendMetrics(running=5, waiting=3, taken_at=time.monotonic())
    backend.own_at_scrape = 0
    assert backend.view(10.0).inflight == 8


@pytest.fixture
def llm_fake():
    async def handler(path, body):
        return json_response(chat_json("ok", tokens=3))

    fb = FakeBackend(handler).start()
    yield fb
    fb.stop()


@pytest.fixture
def gateway_over_fake(llm_fake):
    config = GatewayConfig.from_dict(
        {
            "policy": "fifo",
            "backends": [{"url": llm_fake.url, "kind": "llm", "models": ["m"]}],
            "executor": {"max_records": 5, "health_interval_s": 0.2},
        }
    )
    server = UnifiedAPIServer(config, port=0).start()
    yield server
    server.stop()


def test_records_are_a_bounded_window_with_running_counters(gateway_over_fake) -> None:
    gw = gateway_over_fake
    body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
    with httpx.Client(timeout=30) as client:
        for i in range(20):
            assert client.post(f"{gw.url}/v1/chat/completions", json=body).status_code == 200
            if i % 3 == 0:
                client.get(f"{gw.url}/metrics")
        text = client.get(f"{gw.url}/metrics").text
        admin = client.get(f"{gw.url}/admin/metrics").json()
    ex = gw.gateway.executor
    assert len(ex.records) == 5 and ex.records_total == 20
    assert ex.snapshot()["outcomes"] == {"completed": 20}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("sagesched_request_outcomes_total", (("model", "m"), ("outcome", "completed")))] == 20
    assert samples[("sagesched_records_missed_total", ())] == 0
    assert samples[("sagesched_output_tokens_total", (("model", "m"),))] == 60
    assert samples[("sagesched_queue_wait_seconds_count", (("model", "m"), ("type", "llm_chat")))] == 20
    assert admin["summary_over_last"] == 5 and admin["summary"]


class PoisonPolicy(Policy):
    """Places everything on the first instance, but raises (like float(10**400)) on tenant 'poison'."""

    name = "poison"

    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]):
        if any(r.tenant == "poison" for r in queue):
            raise OverflowError("int too large to convert to float")
        return [Assignment(instances[0].id, (r.id,)) for r in queue]


async def test_a_policy_that_raises_fails_only_the_request_it_raises_on(llm_fake) -> None:
    cfg = ExecutorConfig(health_interval_s=0.2, request_timeout_s=30.0)
    async with LiveExecutor(PoisonPolicy(), [BackendConfig(llm_fake.url, "llm", ["m"])], cfg) as ex:

        async def one(tenant: str):
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "user": tenant}
            return await ex.submit(None, body, "chat")

        results = await asyncio.gather(
            *(one("poison" if i == 7 else f"t{i}") for i in range(30)), return_exceptions=True
        )
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [7], [repr(r) for r in results if isinstance(r, BaseException)][:3]
    err = results[7]
    assert isinstance(err, LiveError) and err.code == "policy_error" and "OverflowError" in err.message
    assert ex.snapshot()["outcomes"] == {"completed": 29, "failed": 1}
    assert ex.policy_errors >= 1
