"""A small misbehaving backend on 127.0.0.1 for fault tests: a real HTTP server whose answers a test scripts.

`FakeBackend(handler)` serves ``/health`` (200), ``/metrics`` (the `metrics_text` attribute) and
hands every other request to ``await handler(path, body) -> starlette Response``. It runs uvicorn in
a daemon thread, like the gateway under test.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

Handler = Callable[[str, Any], Awaitable[Response]]


class FakeBackend:
    def __init__(self, handler: Handler, metrics_text: str = "") -> None:
        self.handler = handler
        self.metrics_text = metrics_text
        self.calls: list[tuple[str, Any]] = []

        async def health(request: Request) -> Response:
            return PlainTextResponse("ok")

        async def metrics(request: Request) -> Response:
            if not self.metrics_text:
                return PlainTextResponse("no metrics", status_code=404)
            return PlainTextResponse(self.metrics_text)

        async def other(request: Request) -> Response:
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw
            self.calls.append((request.url.path, body))
            return await self.handler(request.url.path, body)

        routes = [
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/{path:path}", other, methods=["GET", "POST"]),
        ]
        self.app = Starlette(routes=routes)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> FakeBackend:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the fake backend did not start"
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def chat_json(text: str = "hi", tokens: int = 1) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": 1 + tokens},
    }


def sse(*events: Any, done: bool = True) -> StreamingResponse:
    async def gen():
        for e in events:
            yield f"data: {json.dumps(e) if not isinstance(e, str) else e}\n\n"
        if done:
            yield "data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)
