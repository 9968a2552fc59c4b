"""The executor's HTTP/1.1 client (`sagesched.live.transport`) against real sockets on 127.0.0.1.

A small scripted asyncio server answers by path, so each framing (Content-Length, chunked,
close-delimited), pool limit and failure mode is exercised over a real TCP connection.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator

import pytest

from sagesched.live.transport import (
    ConnectFailed,
    ConnectionDropped,
    ConnectionPool,
    ProtocolError,
    ReadTimeout,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScriptedServer:
    """Answers ``GET|POST <path>`` per path; counts connections and tracks how many are open."""

    def __init__(self) -> None:
        self.connections = 0
        self.open_now = 0
        self.max_open = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> ScriptedServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                path = lines[0].split()[1]
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                if not await self._answer(path, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open_now -= 1
            writer.close()

    async def _answer(self, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Write the scripted answer; False closes the connection."""
        if path == "/echo":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        elif path == "/slow":
            await asyncio.sleep(0.2)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        elif path == "/chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"data: one\r\n", b"\r\ndata: t", b"wo\n\n", b"data: [DONE]\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
        elif path == "/until-close":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
            await writer.drain()
            return False
        elif path == "/stall":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await writer.drain()
            await asyncio.sleep(5)
        elif path == "/cut":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            await writer.drain()
            return False
        elif path == "/garbage":
            writer.write(b"this is not HTTP\r\n\r\n")
            await writer.drain()
            return False
        elif path == "/error":
            writer.write(b'HTTP/1.1 503 Service Unavailable\r\nContent-Length: 17\r\n\r\n{"error":"busy"} ')
        await writer.drain()
        return True


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    async with ScriptedServer() as s:
        yield s


def _pool(url: str, **kw: float) -> ConnectionPool:
    args = {"max_connections": 4, "connect_timeout_s": 1.0, "read_timeout_s": 2.0, **kw}
    return ConnectionPool(url, **args)  # type: ignore[arg-type]


async def test_keep_alive_reuses_one_connection_and_sends_the_body(server: ScriptedServer) -> None:
    pool = _pool(server.url)
    try:
        for i in range(20):
            response = await pool.request("POST", "/echo", f"body {i}".encode(), headers={"X-Test": "1"})
            assert response.status == 200 and response.headers["content-length"] == str(len(f"body {i}"))
            assert await response.read() == f"body {i}".encode()
        assert server.connections == 1
        assert pool.idle_connections == 1 and pool.open_connections == 1
    finally:
        await pool.aclose()


async def test_chunked_lines_arrive_split_and_rejoined(server: ScriptedServer) -> None:
    pool = _pool(server.url)
    try:
        response = await pool.request("GET", "/chunked")
        lines = [line async for line in response.aiter_lines()]
        assert lines == ["data: one", "", "data: two", "", "data: [DONE]", ""]
        again = await pool.request("POST", "/echo", b"x")  # the chunked response ended cleanly: reused
        assert await again.read() == b"x"
        assert server.connections == 1
    finally:
        await pool.aclose()


async def test_close_delimited_body_is_read_to_the_end(server: ScriptedServer) -> None:
    pool = _pool(server.url)
    try:
        response = await pool.request("GET", "/until-close")
        assert await response.read() == b"all of it"
        assert pool.open_connections == 0  # never pooled: the server closed it
    finally:
        await pool.aclose()


async def test_pool_bounds_open_connections_and_queues_the_rest(server: ScriptedServer) -> None:
    pool = _pool(server.url, max_connections=2)

    async def call() -> bytes:
        return await (await pool.request("GET", "/slow")).read()

    try:
        assert await asyncio.gather(*(call() for _ in range(6))) == [b"ok"] * 6
        assert server.max_open == 2 and server.connections == 2
    finally:
        await pool.aclose()


async def test_waiting_for_a_free_connection_is_bounded(server: ScriptedServer) -> None:
    pool = _pool(server.url, max_connections=1, connect_timeout_s=0.05)
    try:
        first = asyncio.create_task(pool.request("GET", "/slow"))
        await asyncio.sleep(0.02)
        with pytest.raises(ConnectFailed, match="no free connection"):
            await pool.request("GET", "/slow")
        assert await (await first).read() == b"ok"
    finally:
        await pool.aclose()


async def test_refused_connection_is_connect_failed() -> None:
    pool = _pool(f"http://127.0.0.1:{_free_port()}")
    try:
        with pytest.raises(ConnectFailed, match="cannot connect"):
            await pool.request("GET", "/")
        assert pool.open_connections == 0
    finally:
        await pool.aclose()


async def test_stalled_body_times_out_and_the_connection_is_dropped(server: ScriptedServer) -> None:
    pool = _pool(server.url, read_timeout_s=0.2)
    try:
        response = await pool.request("GET", "/stall")
        with pytest.raises(ReadTimeout):
            await response.read()
        assert pool.open_connections == 0
        assert await (await pool.request("POST", "/echo", b"fresh")).read() == b"fresh"
        assert server.connections == 2
    finally:
        await pool.aclose()


async def test_cut_body_is_connection_dropped(server: ScriptedServer) -> None:
    pool = _pool(server.url)
    try:
        response = await pool.request("GET", "/cut")
        with pytest.raises(ConnectionDropped):
            await response.read()
    finally:
        await pool.aclose()


async def test_garbage_is_a_protocol_error(server: ScriptedServer) -> None:
    pool = _pool(server.url)
    try:
        with pytest.raises((ProtocolError, ConnectionDropped)):
            await pool.request("GET", "/garbage")
    finally:
        await pool.aclose()


async def test_error_status_keeps_the_body(server: ScriptedServer) -> None:
    pool = _pool(server.url)
    try:
        response = await pool.request("GET", "/error")
        assert response.status == 503
        assert await response.read() == b'{"error":"busy"} '
    finally:
        await pool.aclose()


async def test_closing_a_stream_early_closes_its_connection(server: ScriptedServer) -> None:
    pool = _pool(server.url)
    try:
        response = await pool.request("GET", "/chunked")
        lines = response.aiter_lines()
        assert await lines.__anext__() == "data: one"
        await lines.aclose()  # the rest is still on its way: the connection cannot be reused
        assert pool.open_connections == 0
        assert await (await pool.request("POST", "/echo", b"y")).read() == b"y"
        assert server.connections == 2
    finally:
        await pool.aclose()


async def test_idle_connections_expire(server: ScriptedServer) -> None:
    pool = _pool(server.url, keepalive_expiry_s=0.05)
    try:
        assert await (await pool.request("POST", "/echo", b"a")).read() == b"a"
        await asyncio.sleep(0.1)
        assert await (await pool.request("POST", "/echo", b"b")).read() == b"b"
        assert server.connections == 2
    finally:
        await pool.aclose()


async def test_cancelled_request_frees_its_slot(server: ScriptedServer) -> None:
    pool = _pool(server.url, max_connections=1)
    try:
        task = asyncio.create_task(pool.request("GET", "/slow"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.open_connections == 0
        assert await (await pool.request("POST", "/echo", b"z")).read() == b"z"
    finally:
        await pool.aclose()


class _RecordingTransport:
    """Stands in for a socket transport: records what would be sent, call by call."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


async def test_coalescing_transport_joins_head_and_body_and_flushes_a_lone_head() -> None:
    from sagesched.live.http_protocol import _CoalescingTransport

    raw = _RecordingTransport()
    transport = _CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert raw.writes == []
    transport.write(b"{}")
    assert raw.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")  # an SSE head, body later
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert raw.writes[-1] == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    transport.write(b"5\r\nhello\r\n")
    assert raw.writes[-1] == b"5\r\nhello\r\n" and len(raw.writes) == 3
    transport.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    transport.close()  # a held head still goes out before the close
    assert raw.writes[-1].startswith(b"HTTP/1.1 500") and raw.closed
    assert transport.get_extra_info("peername", "none") == "none"  # everything else is forwarded


def test_gateway_protocol_serves_keep_alive_requests() -> None:
    """uvicorn runs with the gateway's protocol subclass: responses arrive whole, connection reused."""
    import time

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from sagesched.live.http_protocol import protocol_class

    protocol = protocol_class()
    assert protocol is not None, "httptools (a dependency of sagesched[live]) is not installed"

    async def hello(request: object) -> JSONResponse:
        return JSONResponse({"hello": "world"})

    port = _free_port()
    config = uvicorn.Config(
        Starlette(routes=[Route("/", hello)]), host="127.0.0.1", port=port, http=protocol, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            for _ in range(3):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                data = sock.recv(65536)
                assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"hello":"world"}'), data
    finally:
        server.should_exit = True
        thread.join(10)
