"""A scriptable OpenAI-compatible backend served in the test's own event loop, for executor logic tests.

Real servers (llama-server, the emulators) prove the executor works against what people run; they
are slow to start and cannot be told to fail on cue. This one is a real HTTP server on 127.0.0.1
(uvicorn + Starlette, the same stack as our gateway) whose answers a test sets field by field:
health, status codes, token timing, embedding vectors. It starts in milliseconds, so a regression in
requeueing, stranding, batching, rate learning or health marking shows in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def vector_for(text: str) -> list[float]:
    """The vector this backend returns for `text`: recognisable, so tests can check order and ownership."""
    return [float(len(text)), float(sum(map(ord, text)) % 9973)]


@dataclass
class FakeBackend:
    """State a test sets; the HTTP handlers read it on every request."""

    model: str = "fake-llm"
    healthy: bool = True
    status: int = 200  # answer to chat/completions/embeddings (503 = "unavailable, retry elsewhere")
    tokens: int = 3  # tokens per completion
    token_delay_s: float = 0.0  # pause before each streamed token
    reject_input: str | None = None  # an embedding input that gets a 400 for its whole call
    llm_calls: int = 0
    embed_calls: list[list[str]] = field(default_factory=list)
    health_calls: int = 0
    url: str = ""
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    # -- handlers ---------------------------------------------------------------------------------
    async def _health(self, request: Request) -> Response:
        self.health_calls += 1
        return JSONResponse({"status": "ok"} if self.healthy else {"error": "loading"}, 200 if self.healthy else 503)

    def _error(self, status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "fake", "code": status}}, status)

    async def _llm(self, request: Request) -> Response:
        self.llm_calls += 1
        body = await request.json()
        if self.status != 200:
            return self._error(self.status, f"fake backend told to answer {self.status}")
        chat = request.url.path.endswith("/chat/completions")
        n = int(body.get("max_tokens") or self.tokens)

        def chunk(i: int) -> dict[str, object]:
            piece = {"delta": {"content": f"t{i} "}} if chat else {"text": f"t{i} "}
            return {"id": "x", "object": "chunk", "model": self.model, "choices": [{"index": 0, **piece}]}

        if not body.get("stream"):
            await asyncio.sleep(self.token_delay_s * n)
            text = "".join(f"t{i} " for i in range(n))
            choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
            out = {"id": "x", "object": "completion", "model": self.model, "usage": usage}
            return JSONResponse({**out, "choices": [{"index": 0, "finish_reason": "length", **choice}]})

        async def events() -> AsyncIterator[bytes]:
            for i in range(n):
                await asyncio.sleep(self.token_delay_s)
                yield f"data: {json.dumps(chunk(i))}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _embed(self, request: Request) -> Response:
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        self.embed_calls.append(list(inputs))
        if self.status != 200:
            return self._error(self.status, f"fake backend told to answer {self.status}")
        if self.reject_input is not None and self.reject_input in inputs:
            return self._error(400, f"input {self.reject_input!r} refused")
        data = [{"object": "embedding", "index": i, "embedding": vector_for(t)} for i, t in enumerate(inputs)]
        tokens = sum(len(t.split()) for t in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": body.get("model"), "usage": usage})

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> FakeBackend:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        app = Starlette(
            routes=[
                Route("/health", self._health),
                Route("/v1/chat/completions", self._llm, methods=["POST"]),
                Route("/v1/completions", self._llm, methods=["POST"]),
                Route("/v1/embeddings", self._embed, methods=["POST"]),
            ]
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        # The test runner owns SIGINT/SIGTERM; uvicorn must not take them over.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._task = asyncio.get_running_loop().create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.005)
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
