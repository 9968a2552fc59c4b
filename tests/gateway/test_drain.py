"""A drain that runs out of time ends what is left cleanly: streams with an error event and [DONE],
non-streamed callers with a JSON 503, never a cut connection or a plain-text 500."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
from starlette.responses import StreamingResponse

from tests.gateway.fake_backend import chat_json, json_response


def test_drain_deadline_ends_streams_and_calls_cleanly(start_gateway, fake_backend) -> None:
    async def handler(path, body):
        if body.get("stream"):

            async def slow():
                for i in range(200):
                    chunk = {"choices": [{"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0.1)
                yield "data: [DONE]\n\n"

            return StreamingResponse(slow(), media_type="text/event-stream")
        await asyncio.sleep(6)
        return json_response(chat_json())

    fb = fake_backend(handler)
    gw = start_gateway([{"url": fb.url, "kind": "llm", "models": ["m"]}], drain_timeout_s=1.0)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    got: dict[str, object] = {}
    first_chunk = threading.Event()

    def streamer() -> None:
        lines = []
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    first_chunk.set()
        got["stream"] = lines

    def caller() -> None:
        got["call"] = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30)

    threads = [threading.Thread(target=streamer), threading.Thread(target=caller)]
    for t in threads:
        t.start()
    assert first_chunk.wait(10)
    time.sleep(0.2)
    gw.stop()
    for t in threads:
        t.join(20)
    lines = got["stream"]
    assert isinstance(lines, list)
    assert lines[-1] == "data: [DONE]", lines[-3:]
    error = json.loads(lines[-2].removeprefix("data: "))
    assert error["error"]["code"] == "service_stopping"
    response = got["call"]
    assert isinstance(response, httpx.Response)
    assert response.status_code == 503 and response.json()["error"]["code"] == "service_stopping"
