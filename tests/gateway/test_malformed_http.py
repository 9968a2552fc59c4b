"""Malformed requests found by an audit of the gateway in front of the vLLM emulator: each gets a 4xx
that names the fix, a well-formed request on the same connection is still answered, and the gateway
keeps serving afterwards."""

from __future__ import annotations

import json
import socket

import httpx
import pytest


@pytest.fixture
def llm(emulator, start_gateway):
    emu = emulator("vllm", time_scale=0.05)
    gw = start_gateway([{"url": emu.url, "kind": "llm", "models": [emu.model], "id": "v"}])
    return gw, emu.model


def chat_bytes(model: str, content: str = "hi") -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 3}
    return json.dumps(body, ensure_ascii=False).encode()


def post_head(length: int) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )


def exchange(url: str, data: bytes, timeout_s: float = 20.0) -> list[tuple[int, dict]]:
    """Send raw bytes, read until the gateway closes the connection: [(status, JSON body), ...] in order."""
    host, port = url.removeprefix("http://").split(":")
    received = b""
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            received += chunk
    responses = []
    while received:
        head, sep, rest = received.partition(b"\r\n\r\n")
        assert sep, received
        lines = head.split(b"\r\n")
        length = next(int(line.split(b":")[1]) for line in lines[1:] if line.lower().startswith(b"content-length:"))
        responses.append((int(lines[0].split()[1]), json.loads(rest[:length])))
        received = rest[length:]
    return responses


def assert_healthy(gw, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/v1/chat/completions", b'"top_k": 1e400'),
        ("/v1/chat/completions", b'"logit_bias": {"7": -1e999}'),
        ("/v1/completions", b'"vendor_knob": 2.5e308'),
    ],
)
def test_number_beyond_float_range_is_a_400_naming_it(llm, path, extra) -> None:
    # Python reads 1e400 as inf, which went upstream as the non-JSON literal `Infinity`.
    gw, model = llm
    field = b'"messages": [{"role": "user", "content": "hi"}]' if "chat" in path else b'"prompt": "hi"'
    raw = b'{"model": "%s", %s, "max_tokens": 2, %s}' % (model.encode(), field, extra)
    r = httpx.post(gw.url + path, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "out of range" in message and "send a smaller number" in message
    assert_healthy(gw, model)


def test_integer_with_thousands_of_digits_names_an_http_fix(llm) -> None:
    gw, model = llm
    raw = b'{"model": "%s", "prompt": "hi", "vendor_knob": %s}' % (model.encode(), b"7" * 5000)
    r = httpx.post(f"{gw.url}/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "more than 4300 digits" in message
    assert "sys." not in message  # no advice to change the server's Python settings
    assert_healthy(gw, model)


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"Content-Length: 2\r\nContent-Length: 3\r\n", "Duplicate Content-Length"),
        (b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", "Transfer-Encoding can't be present"),
    ],
)
def test_http_parse_error_names_the_parsers_reason(llm, head, reason) -> None:
    gw, model = llm
    responses = exchange(gw.url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head + b"\r\n{}")
    assert [status for status, _ in responses] == [400]
    error = responses[0][1]["error"]
    assert error["code"] == "bad_http_request" and reason in error["message"], error
    assert_healthy(gw, model)


def test_request_followed_by_garbage_is_answered_before_the_400(llm) -> None:
    gw, model = llm
    body = chat_bytes(model)
    responses = exchange(gw.url, post_head(len(body)) + body + b"NOT HTTP AT ALL\r\n\r\n")
    assert [status for status, _ in responses] == [200, 400], responses
    assert responses[0][1]["choices"][0]["message"]["content"]
    assert responses[1][1]["error"]["code"] == "bad_http_request"
    records = gw.gateway.executor.records
    assert [r.outcome for r in records] == ["completed"], [(r.outcome, r.reason) for r in records]
    assert_healthy(gw, model)


def test_pipelined_request_with_a_broken_chunked_body_comes_after_the_answer_before_it(llm) -> None:
    gw, model = llm
    body = chat_bytes(model)
    broken = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    responses = exchange(gw.url, post_head(len(body)) + body + broken)
    assert [status for status, _ in responses] == [200, 400], responses
    assert "chunk size" in responses[1][1]["error"]["message"]
    assert gw.gateway.counters.errors == 0  # no internal error writing to a closed connection
    assert_healthy(gw, model)


def test_content_length_counting_characters_is_a_400_naming_content_length(llm) -> None:
    gw, model = llm
    body = chat_bytes(model, "héllo wörld")
    responses = exchange(gw.url, post_head(len(body.decode())) + body)  # 2 bytes short
    assert responses[0][0] == 400, responses
    assert "Content-Length counts bytes" in responses[0][1]["error"]["message"]
    assert_healthy(gw, model)


def test_body_shorter_than_content_length_times_out_naming_content_length(llm) -> None:
    gw, model = llm
    gw.gateway.body_timeout_s = 0.5
    body = chat_bytes(model)
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(post_head(len(body) + 20) + body)
        data = sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data
    message = json.loads(rest)["error"]["message"]
    assert f"{len(body)} of the {len(body) + 20} bytes" in message and "fix Content-Length" in message
    assert gw.gateway.inflight == 0
    assert_healthy(gw, model)
