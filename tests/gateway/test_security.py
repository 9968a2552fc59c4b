"""Keys, admin routes against a browser and DNS rebinding, what unauthenticated routes reveal, slow
uploads, and what clients expect from /v1/models and X-Request-Id."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from sagesched.live.gateway_config import GatewayConfig
from tests.gateway.fake_backend import chat_json, json_response


@pytest.fixture
def backend(fake_backend):
    async def handler(path, body):
        if path.endswith("/embeddings"):
            return json_response({"data": [{"index": 0, "embedding": [1.0, 0.0]}]})
        return json_response(chat_json())

    return fake_backend(handler)


def pool(fb) -> list[dict]:
    return [
        {"url": fb.url, "kind": "embedding", "models": ["a-embedder"], "id": "emb"},
        {"url": fb.url, "kind": "llm", "models": ["z-chat"], "id": "llm"},
    ]


def test_empty_env_key_is_a_config_error(monkeypatch, backend) -> None:
    monkeypatch.setenv("SAGESCHED_TEST_KEY", "")
    with pytest.raises(ValueError, match="SAGESCHED_TEST_KEY is empty"):
        GatewayConfig.from_dict({"backends": pool(backend), "api_keys": ["${SAGESCHED_TEST_KEY}"]})
    with pytest.raises(ValueError, match="is empty"):
        GatewayConfig.from_dict({"backends": pool(backend), "admin_key": "${SAGESCHED_TEST_KEY}"})


def test_admin_closed_when_user_keys_are_set_without_an_admin_key(start_gateway, backend) -> None:
    gw = start_gateway(pool(backend), api_keys=["k-user"])
    for headers in ({}, {"Authorization": "Bearer k-user"}):
        r = httpx.post(f"{gw.url}/admin/set_policy", json={"name": "hybrid"}, headers=headers)
        assert r.status_code == 403, r.text
        assert "admin_key" in r.json()["error"]["message"]
    assert gw.gateway.policy_name == "fifo"


def test_admin_refuses_forms_foreign_origins_and_foreign_hosts(start_gateway, backend) -> None:
    gw = start_gateway(pool(backend))  # no keys at all: a local setup, admin open to local callers
    url = f"{gw.url}/admin/set_policy"
    # A cross-site HTML form can only send form or text content types.
    r = httpx.post(url, content=b'{"name": "hybrid"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = httpx.post(url, json={"name": "hybrid"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "Origin" in r.json()["error"]["message"]
    r = httpx.post(url, json={"name": "hybrid"}, headers={"Host": "evil.example"})
    assert r.status_code == 403 and "host" in r.json()["error"]["message"]
    assert gw.gateway.policy_name == "fifo"
    host = gw.url.removeprefix("http://")
    r = httpx.post(url, json={"name": "hybrid"}, headers={"Origin": f"http://{host}"})
    assert r.status_code == 200 and gw.gateway.policy_name == "hybrid"


def test_ready_and_metrics_do_not_reveal_backend_urls(start_gateway, backend) -> None:
    port = backend.url.rsplit(":", 1)[1]
    open_gw = start_gateway(pool(backend))
    assert port not in httpx.get(f"{open_gw.url}/ready").text
    keyed = start_gateway(pool(backend), api_keys=["k-user"])
    r = httpx.get(f"{keyed.url}/ready")
    assert r.status_code == 200 and r.json()["healthy_backends"] == 2 and "backends" not in r.json()
    assert httpx.get(f"{keyed.url}/metrics").status_code == 401
    r = httpx.get(f"{keyed.url}/metrics", headers={"Authorization": "Bearer k-user"})
    assert r.status_code == 200 and "sagesched_requests" in r.text


def test_half_sent_body_times_out_with_408_and_frees_the_slot(start_gateway, backend) -> None:
    gw = start_gateway(pool(backend))
    gw.gateway.body_timeout_s = 0.5
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"model": '
        )
        time.sleep(0.1)
        assert gw.gateway.inflight == 1
        data = sock.recv(4096)
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b"request_body_timeout" in data
    assert gw.gateway.inflight == 0


def test_models_list_llms_first_and_single_model_route(start_gateway, backend) -> None:
    gw = start_gateway(pool(backend))
    ids = [m["id"] for m in httpx.get(f"{gw.url}/v1/models").json()["data"]]
    assert ids == ["z-chat", "a-embedder"]
    one = httpx.get(f"{gw.url}/v1/models/z-chat")
    assert one.status_code == 200 and one.json()["id"] == "z-chat"
    missing = httpx.get(f"{gw.url}/v1/models/nope")
    assert missing.status_code == 404 and "z-chat" in missing.json()["error"]["message"]


def test_x_request_id_is_used_and_echoed(start_gateway, backend) -> None:
    gw = start_gateway(pool(backend))
    body = {"model": "z-chat", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    assert gw.gateway.executor.records[-1].request_id == "trace-42"
    bad = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers={"X-Request-Id": "a b\tc"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"


def test_responses_api_with_the_official_sdk(start_gateway, backend) -> None:
    import openai

    gw = start_gateway(pool(backend))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    response = client.responses.create(model="z-chat", input="hello", instructions="be brief", max_output_tokens=5)
    assert response.output_text == "hi"
    assert response.usage.output_tokens == 1
    with pytest.raises(openai.BadRequestError, match="chat/completions"):
        client.responses.create(model="z-chat", input="hello", stream=True)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="z-chat", input=[{"nope": 1}])


def test_admin_metrics_summary_never_blocks_requests(start_gateway, backend, monkeypatch) -> None:
    import threading

    import sagesched.metrics

    real = sagesched.metrics.summarize

    def slow_summary(*args, **kwargs):
        time.sleep(2.0)  # a blocking computation: on the event loop it would stall every request
        return real(*args, **kwargs)

    monkeypatch.setattr(sagesched.metrics, "summarize", slow_summary)
    gw = start_gateway(pool(backend))
    body = {"model": "z-chat", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{gw.url}/v1/chat/completions", json=body).status_code == 200  # one record to summarise
    finished: list[str] = []

    def admin() -> None:
        r = httpx.get(f"{gw.url}/admin/metrics", timeout=30)
        assert r.status_code == 200 and r.json()["summary"]
        finished.append("admin")

    thread = threading.Thread(target=admin)
    thread.start()
    time.sleep(0.3)  # the admin call is now inside the slow summary
    assert httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30).status_code == 200
    finished.append("chat")
    thread.join(30)
    assert finished == ["chat", "admin"]
