"""uvicorn's httptools protocol, sending each response's head and body in one write.

uvicorn writes the status line and headers as soon as the app sends ``http.response.start`` and the
body on ``http.response.body``: two ``send()`` system calls and two TCP segments per response, so
the client wakes up twice. For a gateway whose answers are small JSON bodies those calls are a
large share of its CPU time per request. `CoalescingHttpToolsProtocol` hands uvicorn a thin
transport wrapper that holds a response head until the next write (the body, normally in the same
loop step) and sends both together; a head not followed by a write in the same step goes out on
the next one, so nothing waits longer than one event-loop iteration.

It answers uvicorn's own parse errors (a malformed request line or header) as OpenAI-shaped JSON
400s instead of uvicorn's plain text, so every error a client can get has one shape; the message
names the parser's reason, and the 400 goes out after the answers to any complete requests before it.

It also offers the app a cheap way to hear that the client went away: the scope's extension
``DISCONNECT_EXTENSION`` is a function taking a callback (or None to stop watching) that the
protocol calls when the connection is lost before the response is complete. The portable way, a
task waiting on ``receive()`` for ``http.disconnect``, costs a task and several loop steps per
request; the gateway uses the extension where present and falls back to that task elsewhere.

Use it as uvicorn's ``http`` setting (a protocol class is accepted there). It needs httptools,
which ``uvicorn[standard]`` installs; `protocol_class()` returns None where it is missing.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from typing import Any

_HEAD_PREFIX = b"HTTP/1.1 "

DISCONNECT_EXTENSION = "sagesched.on_disconnect"
"""Scope extension: ``scope["extensions"][DISCONNECT_EXTENSION](callback | None)``."""

_CALLBACK_ATTR = "_sagesched_on_disconnect"


class _CoalescingTransport:
    """Forwards everything to the real transport; holds a response head until the next write."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data.startswith(_HEAD_PREFIX):
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def protocol_class() -> type[asyncio.Protocol] | None:
    """The coalescing protocol class, or None when httptools (uvicorn's fast parser) is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's HttpToolsProtocol writing through `_CoalescingTransport`, with the disconnect hook."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not None and cycle.scope is self.scope:
                extensions = self.scope.get("extensions")
                if extensions is None:
                    extensions = self.scope["extensions"] = {}  # type: ignore[typeddict-unknown-key]
                extensions[DISCONNECT_EXTENSION] = functools.partial(setattr, cycle, _CALLBACK_ATTR)  # type: ignore[assignment]

        _pending_400: bytes | None = None

        def send_400_response(self, msg: str) -> None:
            """uvicorn's own parse errors (bad request line, bad headers) in the OpenAI error shape.

            uvicorn calls this inside its ``except httptools.HttpParserError`` block, so the parser's
            reason (``Duplicate Content-Length``, ...) is the exception being handled; the message
            carries it. When the bytes that failed follow complete requests not yet answered (a
            body longer than its Content-Length, a pipelined request), those answers go out first and
            the 400 after them: sending it at once cut them off, and the client read the 400 as theirs.
            """
            reason = str(sys.exc_info()[1] or "")
            detail = f"{msg.rstrip('.')}: {reason}." if reason else msg
            body = json.dumps(
                {
                    "error": {
                        "message": f"{detail} Send a well-formed HTTP/1.1 request.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "bad_http_request",
                    }
                }
            ).encode()
            content = [b"HTTP/1.1 400 Bad Request\r\n"]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.extend(
                [
                    b"content-type: application/json\r\n",
                    b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
            if self._pending_400 is not None:  # the parser repeats its error on any later bytes
                return
            cycle = self.cycle  # the newest request; older ones still unanswered wait in self.pipeline
            if cycle is not None and cycle.more_body and self.pipeline and self.pipeline[0][0] is cycle:
                self.pipeline.popleft()  # a queued request whose body broke: it is never started
            elif cycle is None or cycle.more_body or cycle.response_complete:
                self.transport.write(b"".join(content))  # nothing earlier is waiting for its answer
                self.transport.close()
                return
            self._pending_400 = b"".join(content)
            self.flow.pause_reading()

        def on_response_complete(self) -> None:
            last = not self.pipeline
            super().on_response_complete()
            pending = self._pending_400
            if last and pending is not None:
                self._pending_400 = None
                if not self.transport.is_closing():
                    self.transport.write(pending)
                    self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            cycle = self.cycle
            super().connection_lost(exc)
            if cycle is not None and cycle.disconnected:  # set by uvicorn when the response was unfinished
                callback = getattr(cycle, _CALLBACK_ATTR, None)
                if callback is not None:
                    setattr(cycle, _CALLBACK_ATTR, None)
                    callback()

    return CoalescingHttpToolsProtocol


__all__ = ["DISCONNECT_EXTENSION", "protocol_class"]
