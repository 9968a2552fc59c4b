"""The client's guarantees without a real model: a bounded call time, precise errors for wrong
arguments, no guessing between models, and no thread left behind by a client nobody closed."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest
from starlette.responses import StreamingResponse

from sagesched.live.client import UnifiedInferenceClient
from sagesched.live.errors import InvalidRequest, UpstreamTimeout
from tests.gateway.fake_backend import FakeBackend, chat_json, json_response


@pytest.fixture
def trickler():
    """Answers every chat slowly, one byte every 0.2 s (each byte resets a per-read timeout)."""

    async def handler(path, body):
        if path == "/v1/models":
            return json_response({"data": [{"id": "chat-a"}, {"id": "chat-b"}, {"id": "bge-small"}]})

        async def trickle():
            for _ in range(200):
                yield b" "
                await asyncio.sleep(0.2)
            yield b"{}"

        return StreamingResponse(trickle(), media_type="application/json")

    fb = FakeBackend(handler).start()
    yield fb
    fb.stop()


def test_timeout_s_bounds_the_whole_call(trickler) -> None:
    with UnifiedInferenceClient(trickler.url, "chat-a", timeout_s=1.0) as client:
        start = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="timeout_s=1"):
            client.chat("hi")
        assert time.monotonic() - start < 5.0


@pytest.fixture
def ok_backend():
    async def handler(path, body):
        if path == "/v1/models":
            return json_response({"data": [{"id": "chat-a"}, {"id": "chat-b"}, {"id": "bge-small"}]})
        if path.endswith("/embeddings"):
            return json_response({"data": [{"index": i, "embedding": [1.0]} for i in range(len(body["input"]))]})
        return json_response(chat_json("fine"))

    fb = FakeBackend(handler).start()
    yield fb
    fb.stop()


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda c: c.chat(None), "messages"),
        (lambda c: c.chat([1, 2]), "messages"),
        (lambda c: c.chat([]), "messages"),
        (lambda c: c.embed(123), "input"),
        (lambda c: c.embed({"a": 1}), "input"),
        (lambda c: c.embed([b"bytes"]), "input"),
        (lambda c: c.generate(None), "prompt"),
    ],
)
def test_wrong_arguments_are_invalid_request_naming_the_parameter(ok_backend, call, param) -> None:
    with UnifiedInferenceClient(ok_backend.url, "chat-a", ok_backend.url, "bge-small") as client:
        with pytest.raises(InvalidRequest) as info:
            call(client)
        assert info.value.param == param
        assert client.chat("hi") == "fine"  # the client still works


def test_gateway_mode_without_llm_model_refuses_to_guess(ok_backend) -> None:
    with UnifiedInferenceClient.create_gateway(ok_backend.url) as client:
        with pytest.raises(InvalidRequest, match=r"chat-a, chat-b.*llm_model="):
            client.chat("hi")
        assert client.embed("x") == [[1.0]]  # one embedding model: unambiguous
        assert client.chat("hi", model="chat-b") == "fine"


def test_a_client_never_closed_leaves_no_thread(ok_backend) -> None:
    def loop_threads() -> int:
        return sum(1 for t in threading.enumerate() if t.name == "sagesched-client-loop")

    before = loop_threads()
    client = UnifiedInferenceClient(ok_backend.url, "chat-a")
    assert client.chat("hi") == "fine"
    assert loop_threads() == before + 1
    del client
    gc.collect()
    deadline = time.monotonic() + 5
    while loop_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loop_threads() == before


@pytest.mark.parametrize(
    ("kw", "param"),
    [({"temperature": 10**400}, "temperature"), ({"n": 0}, "n"), ({"max_tokens": "many"}, "max_tokens")],
)
def test_the_client_applies_the_gateways_body_rules(ok_backend, kw, param) -> None:
    with UnifiedInferenceClient(ok_backend.url, "chat-a") as client:
        calls = len(ok_backend.calls)
        with pytest.raises(InvalidRequest) as info:
            client.chat("hi", **kw)
        assert info.value.param == param
        assert len(ok_backend.calls) == calls  # refused before anything was sent
