"""The gateway in front of backends that misbehave at the HTTP level, and the client over them.

Each backend here is a raw asyncio server on 127.0.0.1 (no HTTP framework: it writes the bytes a
broken or unusual server would) running in its own thread, like the gateway under test. Each test
checks what the caller gets (status, message), how long it takes, the request's record, and that
the gateway still serves afterwards.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from sagesched.live.client import UnifiedInferenceClient
from sagesched.live.errors import UpstreamError
from sagesched.live.gateway_config import GatewayConfig
from sagesched.live.server import UnifiedAPIServer

# (method, path, body, writer) -> keep the connection open?
Answer = Callable[[str, str, bytes, asyncio.StreamWriter], Awaitable[bool]]

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def chat_json(text: str = "hi") -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def chunk(i: int, finish: str | None = None) -> bytes:
    event = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
    if finish is not None:
        event["choices"][0]["finish_reason"] = finish
    return f"data: {json.dumps(event)}\n\n".encode()


def json_answer(writer: asyncio.StreamWriter, payload: Any, status: str = "200 OK") -> None:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
    writer.write(head.encode() + raw)


async def answer_ok(method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
    if path.endswith("/embeddings"):
        inputs = json.loads(body)["input"]
        data = [{"object": "embedding", "index": i, "embedding": [0.5, 0.25]} for i in range(len(inputs))]
        json_answer(writer, {"object": "list", "data": data, "usage": {"prompt_tokens": 1, "total_tokens": 1}})
    else:
        json_answer(writer, chat_json())
    return True


class RawBackend:
    """Serves /health (unless `health` is set) and hands every other request to `answer`."""

    def __init__(self, answer: Answer = answer_ok, health: Answer | None = None) -> None:
        self.answer = answer
        self.health = health
        self.calls: list[str] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="raw-backend", daemon=True)
        self.thread.start()
        start = asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, path, _ = head[0].split(" ", 2)
                fields = dict(line.split(":", 1) for line in head[1:] if ":" in line)
                length = int(next((v for k, v in fields.items() if k.lower() == "content-length"), "0"))
                body = await reader.readexactly(length) if length else b""
                if path == "/health" and self.health is not None:
                    keep = await self.health(method, path, body, writer)
                elif path in ("/health", "/v1/models"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    keep = True
                else:
                    self.calls.append(path)
                    keep = await self.answer(method, path, body, writer)
                await writer.drain()
                if not keep:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            for writer in list(self._writers):
                writer.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def raw_backend() -> Iterator[Callable[..., RawBackend]]:
    started: list[RawBackend] = []

    def start(answer: Answer = answer_ok, health: Answer | None = None) -> RawBackend:
        backend = RawBackend(answer, health)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def gateway() -> Iterator[Callable[..., UnifiedAPIServer]]:
    """Factory: `gateway(backends, request_timeout_s=..., **executor_knobs)` -> a started gateway."""
    started: list[UnifiedAPIServer] = []

    def start(backends: list[dict[str, Any]], request_timeout_s: float = 30.0, **executor: Any) -> UnifiedAPIServer:
        knobs = {"health_interval_s": 0.2, "connect_timeout_s": 2.0, "no_backend_grace_s": 5.0, **executor}
        config = GatewayConfig.from_dict(
            {"policy": "fifo", "request_timeout_s": request_timeout_s, "backends": backends, "executor": knobs}
        )
        server = UnifiedAPIServer(config, port=0).start(timeout_s=20)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def backend(raw: RawBackend, bid: str = "raw", kind: str = "llm_embedding", model: str = "m") -> dict[str, Any]:
    return {"url": raw.url, "kind": kind, "models": [model], "id": bid, "scrape_metrics": False}


def assert_still_serving(gw: UnifiedAPIServer) -> None:
    assert httpx.get(f"{gw.url}/health", timeout=30).status_code == 200
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200, r.text


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} (waited {timeout_s:g}s)"
        time.sleep(0.05)


# -- a non-streamed answer larger than the transport's read buffer ---------------------------------


async def answer_big(method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
    if path.endswith("/embeddings"):
        # A normal batch of a 4096-dimension model: 32 vectors are ~3 MB of JSON.
        inputs = json.loads(body)["input"]
        data = [{"object": "embedding", "index": i, "embedding": [0.123456789] * 4096} for i in range(len(inputs))]
        payload = json.dumps({"object": "list", "data": data}).encode()
    else:
        payload = json.dumps(chat_json("x" * 3_000_000)).encode()
    writer.write(
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
    )
    for i in range(0, len(payload), 65536):  # in pieces, as a real server's socket writes go
        writer.write(payload[i : i + 65536])
        await writer.drain()
    return True


def test_a_non_streamed_answer_over_a_mebibyte_is_relayed_whole(raw_backend, gateway) -> None:
    raw = raw_backend(answer_big)
    # Before the fix the body stalled at the transport's 1 MiB buffer until the request deadline (504).
    gw = gateway([backend(raw)], request_timeout_s=20)
    started = time.monotonic()
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["choices"][0]["message"]["content"]) == 3_000_000
    r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "m", "input": ["x"] * 32}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    assert [len(item["embedding"]) for item in r.json()["data"]] == [4096] * 32
    assert time.monotonic() - started < 15
    assert [rec.outcome for rec in gw.gateway.executor.records] == ["completed", "completed"]


# -- a health answer trickled byte by byte ---------------------------------------------------------


def trickling_health(after: int) -> Answer:
    """/health answers at once `after` times, then trickles a 10 kB body one byte at a time."""
    count = 0

    async def health(method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        nonlocal count
        count += 1
        if count <= after:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n")
        for _ in range(10000):
            writer.write(b"o")
            await writer.drain()
            await asyncio.sleep(0.2)
        return False

    return health


def test_a_backend_trickling_its_health_answer_does_not_block_start_up(raw_backend, gateway) -> None:
    good = raw_backend()
    trickler = raw_backend(health=trickling_health(after=0))
    started = time.monotonic()
    # Before the fix start-up waited for the trickled answer (~2,000 s here).
    gw = gateway([backend(good, "good"), backend(trickler, "trickler", model="other")], probe_timeout_s=0.5)
    assert time.monotonic() - started < 15
    backends = gw.gateway.executor.snapshot()["backends"]
    assert backends["good"]["healthy"] and not backends["trickler"]["healthy"]
    assert_still_serving(gw)


def test_a_backend_trickling_its_health_answer_does_not_freeze_the_health_of_others(raw_backend, gateway) -> None:
    async def refuse(method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        return False  # close without an answer: the dispatch fails and the backend is marked unhealthy

    good = raw_backend(refuse)
    trickler = raw_backend(health=trickling_health(after=1))
    gw = gateway([backend(good, "good"), backend(trickler, "trickler", model="other")], probe_timeout_s=0.5)
    executor = gw.gateway.executor
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code in (502, 503), r.text
    good.answer = answer_ok  # it recovers; its next probe must say so although the trickler stalls its own
    # Before the fix every probe round waited for the trickler, so "good" stayed unhealthy and requests
    # for its model failed with 503 no_backend_available.
    wait_for(lambda: executor.snapshot()["backends"]["good"]["healthy"], 10, "the recovered backend stayed unhealthy")
    assert_still_serving(gw)


# -- a stream that ends without [DONE] -------------------------------------------------------------


def streaming(*, close_delimited: bool, finish: bool) -> Answer:
    """Three chunks, then the body ends (no [DONE]): by closing the connection, or a chunked body's end."""

    async def answer(method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        if not json.loads(body).get("stream"):
            json_answer(writer, chat_json())
            return True
        events = [chunk(0), chunk(1), chunk(2, "stop" if finish else None)]
        if close_delimited:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            writer.write(b"".join(events))
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for event in events:
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
        writer.write(b"0\r\n\r\n")
        return True

    return answer


@pytest.mark.parametrize("close_delimited", [True, False], ids=["server-closed", "body-ended"])
def test_a_stream_cut_short_without_done_is_an_error_not_a_completion(raw_backend, gateway, close_delimited) -> None:
    raw = raw_backend(streaming(close_delimited=close_delimited, finish=False))
    gw = gateway([backend(raw)])
    started = time.monotonic()
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60)
    assert time.monotonic() - started < 10
    assert r.status_code == 200  # the first chunk went out before the cut
    events = [line[len("data: ") :] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "stream_broken" and "cut short" in error["message"], error
    (record,) = gw.gateway.executor.records
    assert record.outcome == "failed" and record.reason.startswith("stream_broken"), record.reason

    # The Python client over the gateway raises it too (sync and async), rather than returning partial text.
    client = UnifiedInferenceClient.create_gateway(gw.url, llm_model="m", embedding_model="m", timeout_s=30)
    try:
        with pytest.raises(UpstreamError, match="cut short"):
            list(client.stream_chat("hi"))

        async def consume() -> list[str]:
            return [piece async for piece in client.astream_chat("hi")]

        with pytest.raises(UpstreamError, match="cut short"):
            asyncio.run(consume())
    finally:
        client.close()
    assert_still_serving(gw)


@pytest.mark.parametrize("close_delimited", [True, False], ids=["server-closed", "body-ended"])
def test_a_stream_with_a_finish_reason_but_no_done_still_completes(raw_backend, gateway, close_delimited) -> None:
    raw = raw_backend(streaming(close_delimited=close_delimited, finish=True))
    gw = gateway([backend(raw)])
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60)
    assert r.status_code == 200 and '"error"' not in r.text and r.text.rstrip().endswith("data: [DONE]"), r.text
    assert [rec.outcome for rec in gw.gateway.executor.records] == ["completed"]


# -- the client straight at a backend (simple mode) -------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"<html>oops</html>", b"[1, 2, 3]", b'{"data": [1, 2]}'],
    ids=["not-json", "json-list", "bad-items"],
)
def test_simple_client_raises_upstream_error_for_a_malformed_200(raw_backend, payload) -> None:
    async def answer(method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        json_answer(writer, payload)
        return True

    raw = raw_backend(answer)
    client = UnifiedInferenceClient(raw.url, "m", raw.url, "m", timeout_s=30)
    try:
        with pytest.raises(UpstreamError):
            client.embed(["a", "b"])
        if payload != b'{"data": [1, 2]}':  # an object is a chat answer of the wrong shape, a separate check
            with pytest.raises(UpstreamError):
                client.chat_completion("hi")

        async def both() -> None:
            with pytest.raises(UpstreamError):
                await client.aembed(["a", "b"])

        asyncio.run(both())
    finally:
        client.close()
