"""Hostile input and misbehaving backends: a malformed request is never a 5xx, a backend never picks
a non-HTTP status or hides Retry-After, and its own faults are never blamed on the caller."""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.responses import PlainTextResponse, Response

from tests.gateway.fake_backend import chat_json, json_response, sse

MODEL = "m"


def llm(fb, **extra):
    return {"url": fb.url, "kind": "llm", "models": [MODEL], "id": "fake", **extra}


def chat(stream: bool = False, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


@pytest.fixture
def ok_gateway(start_gateway, fake_backend):
    async def handler(path, body):
        if path.endswith("/embeddings"):
            return json_response({"data": [{"index": i, "embedding": [0.5, 0.25]} for i in range(len(body["input"]))]})
        return json_response(chat_json())

    fb = fake_backend(handler)
    return start_gateway([llm(fb)])


@pytest.mark.parametrize(
    "extra",
    [
        {"max_tokens": 10**30},
        {"max_completion_tokens": 10**400},
        {"temperature": 10**400},
        {"top_p": 10**400},
        {"deadline_ms": 10**400},
        {"slo_ttft_ms": 10**400},
        {"priority": 10**400},
        {"n": 10**400},
        {"seed": 10**400},
    ],
    ids=lambda e: next(iter(e)),
)
def test_huge_integers_are_400_naming_the_field(ok_gateway, extra) -> None:
    r = httpx.post(f"{ok_gateway.url}/v1/chat/completions", json=chat(**extra), timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == next(iter(extra)) or next(iter(extra)) in err["message"]
    assert len(err["message"]) < 400  # the 400-digit value is not echoed in full
    # The gateway keeps serving the innocent.
    assert httpx.post(f"{ok_gateway.url}/v1/chat/completions", json=chat(), timeout=30).status_code == 200


def test_lone_surrogate_is_400_not_502(ok_gateway) -> None:
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    r = httpx.post(
        f"{ok_gateway.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 400, r.text
    assert "surrogate" in r.json()["error"]["message"]
    # A properly paired surrogate (an emoji) is fine.
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    r = httpx.post(
        f"{ok_gateway.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 200, r.text


def gateway_over(start_gateway, fake_backend, handler, **knobs):
    fb = fake_backend(handler)
    return start_gateway([llm(fb)], **knobs), fb


@pytest.mark.parametrize("code", [101, 999, 200, "boom"])
def test_sse_error_code_never_becomes_the_http_status(start_gateway, fake_backend, code) -> None:
    async def handler(path, body):
        return sse({"error": {"message": "engine exploded", "code": code}})

    gw, _ = gateway_over(start_gateway, fake_backend, handler)
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=chat(stream=True), timeout=30)
    assert r.status_code == 502, (r.status_code, r.text)
    assert "engine exploded" in r.json()["error"]["message"]


def test_sse_error_with_http_code_keeps_it(start_gateway, fake_backend) -> None:
    async def handler(path, body):
        return sse({"error": {"message": "prompt too long", "code": 400}})

    gw, _ = gateway_over(start_gateway, fake_backend, handler)
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=chat(stream=True), timeout=30)
    assert r.status_code == 400 and "prompt too long" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_backend_429_keeps_retry_after(start_gateway, fake_backend, stream) -> None:
    async def handler(path, body):
        return json_response({"error": {"message": "slow down"}}, 429, {"Retry-After": "7"})

    gw, _ = gateway_over(start_gateway, fake_backend, handler)
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=chat(stream=stream), timeout=30)
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "7"


def test_backend_401_is_not_blamed_on_the_callers_key(start_gateway, fake_backend) -> None:
    async def handler(path, body):
        return json_response({"error": {"message": "bad key", "code": "invalid_api_key"}}, 401)

    gw, _ = gateway_over(start_gateway, fake_backend, handler)
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=chat(), timeout=30)
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["code"] == "backend_auth_failed" and "gateway's credentials" in err["message"]


@pytest.mark.parametrize(
    "answer",
    [
        lambda: json_response(chat_json()),  # plain JSON although stream=true was asked
        lambda: PlainTextResponse("garbage\nmore garbage\n", media_type="text/event-stream"),
        lambda: Response(b"", media_type="text/event-stream"),
    ],
    ids=["json", "garbage", "empty"],
)
def test_stream_answered_without_events_is_502(start_gateway, fake_backend, answer) -> None:
    async def handler(path, body):
        return answer()

    gw, _ = gateway_over(start_gateway, fake_backend, handler)
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=chat(stream=True), timeout=30)
    assert r.status_code == 502, (r.status_code, r.text)
    assert r.json()["error"]["message"]


@pytest.mark.parametrize("bad", ["NaN", "Infinity", '"x"', "[1]", "null"])
def test_bad_embedding_values_are_502(start_gateway, fake_backend, bad) -> None:
    async def handler(path, body):
        raw = '{"data": [{"index": 0, "embedding": [0.1, ' + bad + "]}]}"
        return Response(raw.encode(), media_type="application/json")

    fb = fake_backend(handler)
    gw = start_gateway([{"url": fb.url, "kind": "embedding", "models": ["e"], "id": "emb"}])
    r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "e", "input": "hello"}, timeout=30)
    assert r.status_code == 502, (r.status_code, r.text)
    assert "embedding" in r.json()["error"]["message"]


def test_more_inputs_than_a_backend_call_takes_are_split_and_reassembled(start_gateway, fake_backend) -> None:
    async def handler(path, body):
        inputs = body["input"]
        if len(inputs) > 32:
            return json_response({"error": {"message": "batch too large"}}, 413)
        # The vector names its input, so the test can check the order after reassembly.
        return json_response({"data": [{"index": i, "embedding": [float(t[2:]), 1.0]} for i, t in enumerate(inputs)]})

    fb = fake_backend(handler)
    gw = start_gateway(
        [{"url": fb.url, "kind": "embedding", "models": ["e"], "id": "emb", "max_client_batch_size": 32}]
    )
    texts = [f"t-{i}" for i in range(1000)]
    r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "e", "input": texts}, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(1000))
    assert [d["embedding"][0] for d in data] == [float(i) for i in range(1000)]
    assert max(len(body["input"]) for _, body in fb.calls) <= 32
    assert len(fb.calls) >= 1000 // 32


def test_uvicorn_parse_errors_are_openai_shaped(ok_gateway) -> None:
    import socket

    host, port = ok_gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GARBAGE / HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or len(data) < 40:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), data
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
