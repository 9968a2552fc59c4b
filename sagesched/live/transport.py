"""A lean keep-alive HTTP/1.1 client for the executor's calls to its backends.

Why not httpx or aiohttp: the gateway relays every request through this client, so its cost per
request is the gateway's overhead. On the 2-core benchmark machine `httpx.AsyncClient` spent about
13 ms of CPU per request at 64 concurrent requests (its pool re-examines every queued request and
connection on each release) and aiohttp about 0.2 ms; this client, an `asyncio.Protocol` per
connection with the `httptools` response parser (which uvicorn already uses), costs a few tens of
microseconds. It does only what a backend call needs:

- a bounded pool of keep-alive connections per backend (LIFO reuse, idle connections dropped
  after `keepalive_expiry_s`, before the server's own keep-alive timeout can race a new request);
- Content-Length, chunked and close-delimited bodies, read whole (`Response.read`) or line by line
  as they arrive (`Response.aiter_lines`, for server-sent events), with read back-pressure;
- a connect timeout (also bounding the wait for a free connection) and a read timeout that bounds
  each wait for the next bytes.

Failures are typed so callers can map them: `ConnectFailed` (nothing was sent: safe to retry
elsewhere), `ReadTimeout`, `ConnectionDropped` (the server closed before the response ended) and
`ProtocolError` (an unparseable response).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import httptools

__all__ = [
    "ConnectFailed",
    "ConnectionDropped",
    "ConnectionPool",
    "ProtocolError",
    "ReadTimeout",
    "Response",
    "TransportError",
]

_HIGH_WATER = 1 << 20  # buffered body bytes before the socket stops being read (back-pressure)
_LINES_PER_TURN = 32  # body lines handed out before the reader lets other tasks run


class TransportError(Exception):
    """Base of the transport's failures."""


class ConnectFailed(TransportError):
    """No connection could be had (refused, unreachable, connect timeout, no free slot in time)."""


class ReadTimeout(TransportError):
    """The server sent nothing for longer than the read timeout."""


class ConnectionDropped(TransportError):
    """The connection closed before the response was complete."""


class ProtocolError(TransportError):
    """The server's bytes are not a valid HTTP/1.1 response."""


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(ReadTimeout("no data from the server within the read timeout"))


class _Connection(asyncio.Protocol):
    """One keep-alive connection; holds the state of the exchange in progress (one at a time)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._counted = True  # holds one of the pool's connection slots until it closes
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.busy = False  # a request is out (or its response unread); bytes at other times are an error
        self.reset()

    def reset(self) -> None:
        """Clear the exchange state before a new request goes out."""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.complete = False
        self.reusable = False
        self.error: TransportError | None = None
        self.buf = bytearray()

    # -- asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # nothing was asked: a server that talks out of turn cannot be reused
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = ProtocolError(f"invalid HTTP response: {exc}")
            self.close()
        if len(self.buf) > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        delimited = "content-length" in self.headers or "transfer-encoding" in self.headers
        if self.headers_done and not self.complete and self.error is None and not delimited:
            self.complete = True  # a close-delimited body ends with the connection
        if not self.complete and self.error is None:
            self.error = ConnectionDropped(f"the server closed the connection ({exc or 'EOF'})")
        self.pool._forget(self)
        self._wake()

    # -- httptools callbacks -----------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.buf += body

    def on_message_complete(self) -> None:
        # Read it now: once the message ends the parser resets and no longer knows.
        self.reusable = self.parser.should_keep_alive()
        self.complete = True

    # -- helpers ---------------------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Wait for any progress (bytes, end, close) for at most `timeout` seconds."""
        loop = self.pool.loop
        fut = loop.create_future()
        self._waiter = fut
        timer = loop.call_later(timeout, _expire, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiter = None

    def take_body(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self.pool._forget(self)

    def keep_alive(self) -> bool:
        return self.complete and self.reusable and not self.closed and self.error is None


class Response:
    """A response whose status and headers are in; read the body whole or line by line, once.

    The connection goes back to the pool when the body is fully read (or `aclose` is called after
    that); closing earlier closes the connection, since the rest of the body is still on its way.
    """

    __slots__ = ("_conn", "_done", "_timeout", "headers", "status")

    def __init__(self, conn: _Connection, timeout: float) -> None:
        self._conn = conn
        self._timeout = timeout
        self._done = False
        self.status: int = conn.status
        self.headers: dict[str, str] = conn.headers

    async def read(self) -> bytes:
        """The whole body."""
        conn = self._conn
        parts: list[bytes] = []
        try:
            while not conn.complete:
                if conn.error is not None:
                    raise conn.error
                if len(conn.buf) > _HIGH_WATER:
                    # Reading paused at the high-water mark: take what is buffered so it resumes
                    # (the whole body is wanted; waiting here would stall until the read timeout).
                    parts.append(conn.take_body())
                await conn.wait(self._timeout)
        except BaseException:
            await self.aclose()
            raise
        parts.append(conn.take_body())
        await self.aclose()
        return b"".join(parts) if len(parts) > 1 else parts[0]

    async def aiter_lines(self) -> AsyncIterator[str]:
        """Body lines as they arrive (split at LF, a trailing CR removed), decoded as UTF-8."""
        conn = self._conn
        pending = b""
        try:
            while True:
                if conn.buf:
                    lines = (pending + conn.take_body()).split(b"\n")
                    pending = lines.pop()
                    for i, line in enumerate(lines, 1):
                        yield (line[:-1] if line.endswith(b"\r") else line).decode("utf-8", "replace")
                        if i % _LINES_PER_TURN == 0:
                            # A server that sends hundreds of events at once would otherwise hold
                            # the loop for their whole parse (~27 us each): timers due meanwhile
                            # (an open-loop sender's next request) would fire late.
                            await asyncio.sleep(0)
                elif conn.complete:
                    break
                elif conn.error is not None:
                    raise conn.error
                else:
                    await conn.wait(self._timeout)
            if pending:
                yield pending.decode("utf-8", "replace")
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Release the connection (reused if the response ended cleanly, else closed)."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        if conn.keep_alive() and not conn.buf:
            conn.pool._release(conn)
        else:
            conn.close()


class ConnectionPool:
    """Keep-alive connections to one server (``http://host:port`` or ``https://...``).

    `max_connections` bounds the connections open at once; a request beyond it waits (at most the
    connect timeout) for one to be released. `headers` are sent with every request.
    """

    def __init__(
        self,
        url: str,
        *,
        max_connections: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        keepalive_expiry_s: float = 4.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url {url!r} must look like http://127.0.0.1:8001")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if parts.scheme == "https" else None
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_expiry_s = keepalive_expiry_s
        netloc = parts.netloc.rpartition("@")[2]
        fixed = {"Host": netloc, **(headers or {})}
        self._head_fields = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._closed = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # bound on first use

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send one request and return once the status line and headers are in.

        `timeout` replaces both the connect and read timeouts for this call (probes use it).
        """
        if self._closed:
            raise ConnectFailed("the connection pool is closed")
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        head = f"{method} {path} HTTP/1.1\r\n{self._head_fields}"
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if body is not None:
            head += f"Content-Length: {len(body)}\r\n"
        payload = (head + "\r\n").encode("latin-1")
        if body:
            payload += body
        read_timeout = self.read_timeout_s if timeout is None else timeout
        conn = await self._acquire(self.connect_timeout_s if timeout is None else timeout)
        conn.reset()
        conn.busy = True
        assert conn.transport is not None
        conn.transport.write(payload)
        try:
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(read_timeout)
        except BaseException:
            conn.close()
            raise
        return Response(conn, read_timeout)

    async def aclose(self) -> None:
        """Close every connection; requests waiting for one fail with ConnectFailed."""
        self._closed = True
        for conn in list(self._idle):
            conn.close()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the connection pool was closed"))

    # -- the pool ----------------------------------------------------------------------------------------
    async def _acquire(self, timeout: float) -> _Connection:
        now = self.loop.time()
        while self._idle:
            conn = self._idle.pop()
            transport = conn.transport
            fresh = now - conn.idle_since < self.keepalive_expiry_s
            if fresh and not conn.closed and transport is not None and not transport.is_closing():
                return conn
            conn.close()
        if self._open < self.max_connections:
            return await self._connect(timeout)
        waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                conn_or_slot = await waiter
        except TimeoutError:
            raise ConnectFailed(
                f"no free connection to {self.host}:{self.port} within {timeout:g}s ({self.max_connections} in use)"
            ) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()
                if handed is not None:
                    self._release(handed)
                else:
                    self._wake_waiter()
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        if conn_or_slot is not None:
            return conn_or_slot
        return await self._acquire(timeout)

    async def _connect(self, timeout: float) -> _Connection:
        self._open += 1
        conn = _Connection(self)
        try:
            async with asyncio.timeout(timeout):
                await self.loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError:
            self._forget(conn)
            raise ConnectFailed(f"connecting to {self.host}:{self.port} took longer than {timeout:g}s") from None
        except OSError as exc:
            self._forget(conn)
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        except BaseException:
            self._forget(conn)
            raise
        return conn

    def _release(self, conn: _Connection) -> None:
        if self._closed or conn.closed:
            conn.close()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.busy = False
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        """A connection closed (or never opened): free its slot and let a waiter connect."""
        if not conn._counted:
            return
        conn._counted = False
        self._open -= 1
        if conn in self._idle:
            self._idle.remove(conn)
        self._wake_waiter()

    def _wake_waiter(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
