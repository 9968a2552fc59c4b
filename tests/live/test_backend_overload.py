"""A backend's 503 that outlasts the executor's retries reaches the caller as a 503 with Retry-After.

A 503 from a backend means "overloaded, loading or draining: come back later", so a caller whose
every attempt got one must hear that (503 `backend_overloaded` plus when to retry), not the 502
that a dead or broken backend earns. The gateway runs for real in a thread; the backends are real
HTTP servers on 127.0.0.1: a Starlette one that always answers 503 (with or without Retry-After)
and a raw socket one that drops every POST without answering.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.responses import Response

from sagesched.live.gateway_config import GatewayConfig
from sagesched.live.server import UnifiedAPIServer
from tests.gateway.fake_backend import FakeBackend, json_response

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
EMBED = {"model": "m", "input": ["a", "b"]}
ROUTES = {
    "chat": ("/v1/chat/completions", CHAT),
    "chat-stream": ("/v1/chat/completions", {**CHAT, "stream": True}),
    "embeddings": ("/v1/embeddings", EMBED),
}
# Executor knobs: a quick health loop brings the refusing backend back between attempts.
KNOBS = {"health_interval_s": 0.05, "probe_timeout_s": 1.0, "no_backend_grace_s": 5.0, "max_retries": 1}


def overloaded(retry_after: str | None) -> Callable[[str, Any], Any]:
    async def handler(path: str, body: Any) -> Response:
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        return json_response({"error": {"message": "server overloaded", "code": 503}}, 503, headers)

    return handler


class ScriptedBackend:
    """Raw sockets: GET /health is 200; the n-th POST follows `script[n % len(script)]`: "drop" closes
    the connection without a byte, "503" answers 503 with Retry-After: 3."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.posts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                if head.startswith(b"GET"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    continue
                action = self.script[self.posts % len(self.script)]
                self.posts += 1
                if action == "drop":
                    return
                body = b'{"error":{"message":"busy","code":503}}'
                conn.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 3\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                return

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def gateway() -> Iterator[Callable[..., UnifiedAPIServer]]:
    started: list[UnifiedAPIServer] = []
    backends: list[FakeBackend | ScriptedBackend] = []

    def start(urls: list[str], **knobs: Any) -> UnifiedAPIServer:
        config = GatewayConfig.from_dict(
            {
                "policy": "fifo",
                "request_timeout_s": 30,
                "backends": [
                    {"url": url, "kind": "llm_embedding", "models": ["m"], "id": f"b{i}", "scrape_metrics": False}
                    for i, url in enumerate(urls)
                ],
                "executor": {**KNOBS, **knobs},
            }
        )
        server = UnifiedAPIServer(config, port=0).start(timeout_s=20)
        started.append(server)
        return server

    start.backends = backends  # type: ignore[attr-defined]
    yield start
    for server in started:
        server.stop()
    for backend in backends:
        backend.stop()


def serve(gateway: Any, backend: FakeBackend | ScriptedBackend) -> str:
    gateway.backends.append(backend)
    return backend.url


def post(gw: UnifiedAPIServer, route: str) -> httpx.Response:
    path, body = ROUTES[route]
    return httpx.post(f"{gw.url}{path}", json=body, timeout=30)


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_backend_503_with_retry_after_reaches_the_caller_as_503_with_its_retry_after(gateway, route) -> None:
    url = serve(gateway, FakeBackend(overloaded("7")).start())
    gw = gateway([url])
    r = post(gw, route)
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after") == "7"
    error = r.json()["error"]
    assert error["code"] == "backend_overloaded" and error["type"] == "server_error", error
    assert "every backend" in error["message"] and "retry after 7s" in error["message"], error["message"]
    (record,) = gw.gateway.executor.records
    assert record.outcome == "failed" and record.reason.startswith("backend_overloaded"), record.reason


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_backend_503_without_retry_after_gets_the_executors_retry_after(gateway, route) -> None:
    url = serve(gateway, FakeBackend(overloaded(None)).start())
    gw = gateway([url], retry_after_s=4)
    r = post(gw, route)
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after") == "4"
    error = r.json()["error"]
    assert error["code"] == "backend_overloaded" and "retry after 4s" in error["message"], error


def test_every_backend_answering_503_is_tried_before_the_caller_hears_it(gateway) -> None:
    first, second = FakeBackend(overloaded("2")).start(), FakeBackend(overloaded("9")).start()
    gw = gateway([serve(gateway, first), serve(gateway, second)], max_retries=3)
    r = post(gw, "chat")
    assert r.status_code == 503, r.text
    assert first.calls and second.calls  # retried elsewhere, as before
    # The last refusal's Retry-After wins: it is the freshest word on when to come back.
    last = json.loads(r.text)["error"]["message"]
    assert r.headers["retry-after"] in ("2", "9") and f"retry after {r.headers['retry-after']}s" in last


@pytest.mark.parametrize("route", list(ROUTES))
def test_the_last_failure_decides_and_a_dropped_connection_stays_a_502(gateway, route) -> None:
    """A refused or dropped connection is a broken backend (502, no Retry-After), not an overloaded one."""
    for script, status in ((["503", "drop"], 502), (["drop", "503"], 503)):
        scripted = ScriptedBackend(script)
        r = post(gateway([serve(gateway, scripted)]), route)
        assert r.status_code == status, (script, r.text)
        assert scripted.posts == 2
        error = r.json()["error"]
        if status == 502:
            assert "retry-after" not in r.headers
            assert error["code"] == "backend_unavailable" and "gave up after 2 attempts" in error["message"], error
        else:
            assert r.headers.get("retry-after") == "3"
            assert error["code"] == "backend_overloaded" and "retry after 3s" in error["message"], error
