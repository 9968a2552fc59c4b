"""Keys, admin routes, overload, timeouts, disconnects and drains.

Against a real llama-server, except where a test is about the gateway's own clock (queue limits,
deadlines, drains): there a vLLM emulator with a fixed `time_scale` sets how long a request takes,
whatever the load on the machine, so the test cannot race the model's decode speed.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.backends


def llm(server, **extra):
    return {"url": server.url, "kind": "llm", "models": [server.model], **extra}


def sdk_args(server, max_tokens=2):
    return {
        "model": server.model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": max_tokens,
        "extra_body": {"ignore_eos": True},
    }


def chat_body(server, max_tokens=2, **extra):
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    return {**body, **extra}


def emulated(emu, **extra):
    return {"url": emu.url, "kind": "llm", "models": [emu.model], **extra}


def wait_for(predicate, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_api_keys_and_admin_key(start_gateway, llm_server):
    gw = start_gateway([llm(llm_server)], api_keys=["k-user"], admin_key="k-admin")
    anonymous = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        anonymous.completions.create(model=llm_server.model, prompt="x", max_tokens=1)
    assert info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    user = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k-user", max_retries=0)
    assert user.completions.create(model=llm_server.model, prompt="x", max_tokens=1).choices
    assert httpx.get(f"{gw.url}/admin/policy", headers={"Authorization": "Bearer k-user"}).status_code == 401
    assert httpx.get(f"{gw.url}/admin/metrics").status_code == 401
    admin = {"Authorization": "Bearer k-admin"}
    assert httpx.get(f"{gw.url}/admin/policy", headers=admin).json()["name"] == "fifo"
    assert httpx.get(f"{gw.url}/health").status_code == 200  # probes need no key


def test_admin_policy_switch_and_metrics(start_gateway, llm_server):
    gw = start_gateway([llm(llm_server)], policy="fifo")
    current = httpx.get(f"{gw.url}/admin/policy").json()
    assert current["name"] == "fifo" and "hybrid" in current["available"]
    switched = httpx.put(
        f"{gw.url}/admin/policy", json={"name": "hybrid", "config": {"embedding_batch_size": 8}}
    ).json()
    assert (
        switched["name"] == "hybrid"
        and switched["config"]["embedding_batch_size"] == 8
        and switched["previous"] == "fifo"
    )
    assert gw.gateway.executor.policy.name == "hybrid"
    bad = httpx.put(f"{gw.url}/admin/policy", json={"name": "hybird"})
    assert (
        bad.status_code == 400
        and "available:" in bad.json()["error"]["message"]
        and "fifo" in bad.json()["error"]["message"]
    )
    bad = httpx.put(f"{gw.url}/admin/policy", json={"name": "fifo", "config": {"nope": 1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "config"
    # The original benchmark tool's route and shape.
    assert httpx.post(f"{gw.url}/admin/set_policy", json={"policy": "priority"}).json()["name"] == "priority"
    httpx.post(
        f"{gw.url}/v1/chat/completions", json=chat_body(llm_server), headers={"X-Request-Priority": "high"}, timeout=60
    )
    metrics = httpx.get(f"{gw.url}/admin/metrics").json()
    assert metrics["policy"]["name"] == "priority" and metrics["completed"] == 1
    assert metrics["summary"]["completed"] == 1
    record = gw.gateway.executor.records[-1]
    assert record.priority == 1 and record.outcome == "completed"  # X-Request-Priority: high
    text = httpx.get(f"{gw.url}/metrics").text
    for name in (
        "sagesched_queue_length",
        "sagesched_inflight_requests",
        f'sagesched_ttft_seconds_count{{model="{llm_server.model}"}} 1.0',
        f'sagesched_e2e_seconds_count{{model="{llm_server.model}"}} 1.0',
        'sagesched_policy_decisions_total{rule="priority"',
        'sagesched_policy_info{policy="priority"} 1.0',
        "sagesched_backend_healthy{",
    ):
        assert name in text, name


def test_queue_limit_gives_429_with_retry_after_and_accepted_requests_complete(start_gateway, emulator):
    # One request at a time at the backend, two waiting in the gateway: the rest are refused.
    # Each request takes ~1 s of wall time at the emulator (100 steps of ~10 ms), so all eight
    # arrive while the first is still running, however slowly the client threads start.
    emu = emulator("vllm", time_scale=1.0)
    gw = start_gateway([emulated(emu, max_inflight=1)], max_queue=2)
    body = chat_body(emu, max_tokens=100)

    def call(_):
        return httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(8)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    refused = [r for r in responses if r.status_code == 429]
    assert refused and statuses.count(200) >= 3
    for r in refused:
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
    for r in responses:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 100
    records = gw.gateway.executor.records
    assert sum(r.outcome == "completed" for r in records) == statuses.count(200)
    assert sum(r.reason.startswith("queue_full") for r in records) == len(refused)


def test_timeout_is_504_and_mid_stream_timeout_is_an_sse_error(start_gateway, emulator):
    # The emulator's clock, not the CPU, decides: first token after ~20 ms, 2000 tokens after
    # ~20 s, so the 2.5 s deadline always falls mid-generation (a real model on a loaded CPU
    # could take longer than the deadline to send its first chunk).
    emu = emulator("vllm", time_scale=1.0)
    gw = start_gateway([emulated(emu)], request_timeout_s=2.5)
    started = time.monotonic()
    response = httpx.post(f"{gw.url}/v1/chat/completions", json=chat_body(emu, max_tokens=2000), timeout=30)
    assert response.status_code == 504 and response.json()["error"]["code"] == "upstream_timeout"
    assert 2.4 < time.monotonic() - started < 15, "the 504 came at the deadline, not before, nor long after"
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(**sdk_args(emu, max_tokens=2000), stream=True)
    got = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            got.append(chunk)
    assert got, "the stream had started before the deadline"
    assert "did not finish" in info.value.message
    # Both timed out at the same backend: one reason, so a summary counts them together (the
    # request id is in the record, not in the reason text).
    reasons = {r.reason for r in gw.gateway.executor.records if r.reason and "did not finish" in r.reason}
    assert len(reasons) == 1, reasons


def test_client_disconnect_cancels_the_upstream_request(start_gateway, llm_server):
    gw = start_gateway([llm(llm_server)])
    executor = gw.gateway.executor

    def inflight():
        return executor.snapshot()["inflight"]

    body = chat_body(llm_server, max_tokens=500, stream=True)
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()  # keep a reference: closing this iterator closes the connection
        first = next(line for line in lines if line.startswith("data: "))
        assert '"error"' not in first, first
        assert inflight() == 1, (first, executor.records[-1:] if executor.records else None)
    assert wait_for(lambda: inflight() == 0), "the streamed request kept running after the client left"
    # Non-streaming: the client gives up while the backend works.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gw.url}/v1/chat/completions", json=chat_body(llm_server, max_tokens=500), timeout=0.5)
    assert wait_for(lambda: inflight() == 0), "the request kept running after the client left"
    cancelled = [r for r in executor.records if r.reason.startswith("cancelled")]
    assert len(cancelled) == 2
    # The backend's slots are free again: a new request is served at once.
    ok = httpx.post(f"{gw.url}/v1/chat/completions", json=chat_body(llm_server), timeout=60)
    assert ok.status_code == 200


def test_graceful_shutdown_drains_in_flight_requests(emulator):
    from sagesched.live.gateway_config import GatewayConfig
    from sagesched.live.server import UnifiedAPIServer

    # ~2 s per request at the emulator (200 steps of ~10 ms): all three are in flight together
    # however slowly the client threads start, and each is far from done when the drain begins.
    emu = emulator("vllm", time_scale=1.0)
    config = GatewayConfig.from_dict({"policy": "fifo", "backends": [emulated(emu)], "drain_timeout_s": 30})
    server = UnifiedAPIServer(config, port=0).start()
    results = []

    def call():
        results.append(httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(emu, max_tokens=200), timeout=60))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: server.gateway.inflight == 3), "the three requests never were in flight together"
    finally:
        server.stop()  # returns once drained
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == 200 for r in results)
