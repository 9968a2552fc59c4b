"""The load generator of `gateway_overhead.py`, and the null server that measures its ceiling.

    python benchmarks/http_loadgen.py _load --port P --mode open --rate 200 --duration 5   # one JSON line
    python benchmarks/http_loadgen.py _null --port P                                       # until killed

The gateway's added latency is a difference of a few hundred microseconds between two runs of a
client, so the client must cost less than that and must not queue behind its own work: this is a
raw-HTTP/1.1 asyncio client (uvloop when installed) that writes one canned request per keep-alive
connection and parses only the status line and the body's length, a few microseconds per request.
It runs in its own process (one per measurement, started by `gateway_overhead.py`) so it competes
with the servers only for cores, and prints its result as one JSON line on stdout:

- `closed`: N clients, each on its own connection, send again as soon as they are answered;
- `open`: requests leave at t0 + i/rate whatever the answers do, and latency counts from the
  scheduled time (so a stalled server cannot hide its queueing);
- `transport` / `httpx`: the same closed loop through the executor's backend client
  (`sagesched.live.transport`) and through `httpx.AsyncClient`, to compare those clients' ceilings.

`_null` serves one canned response to every request: driven by this generator it gives the
generator's own ceiling, and driven by `transport` / `httpx` the ceiling of those clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import time
from typing import Any

import httpx

MODEL = "llama-2-7b"
BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, "temperature": 0}
).encode()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; parses Content-Length and chunked responses."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        status = int(head[9:12])
        match = re.search(rb"\r\ncontent-length: *(\d+)", head)
        if match:
            total = end + 4 + int(match.group(1))
            if len(self.buf) < total:
                return
        elif b"transfer-encoding: chunked" in head:
            tail = self.buf.find(b"\r\n0\r\n\r\n", end)
            if tail < 0:
                return
            total = tail + 7
        else:
            total = end + 4
        del self.buf[:total]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    async def request(self, payload: bytes) -> int:
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(payload)
        return await self.waiter


def _request_bytes(port: int) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


async def _connect(port: int) -> _Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Conn, "127.0.0.1", port)
    return conn


async def closed_loop(port: int, clients: int, duration_s: float) -> dict[str, Any]:
    payload = _request_bytes(port)
    conns = [await _connect(port) for _ in range(clients)]
    for c in conns:  # warm up every connection (and the server's code paths)
        await c.request(payload)
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration_s

    async def client(conn: _Conn) -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            status = await conn.request(payload)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors += 1

    t_start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in conns))
    elapsed = time.perf_counter() - t_start
    for c in conns:
        c.transport.close()  # type: ignore[union-attr]
    ms = [x * 1000 for x in latencies]
    return {
        "mode": "closed",
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "duration_s": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
    }


async def open_loop(port: int, rate: float, duration_s: float) -> dict[str, Any]:
    """Requests leave at t0 + i/rate; latency counts from that scheduled time, not from the send."""
    payload = _request_bytes(port)
    idle = [await _connect(port) for _ in range(32)]
    for c in idle:
        await c.request(payload)
    loop = asyncio.get_running_loop()
    count = int(rate * duration_s)
    latencies: list[float] = []
    service: list[float] = []
    lateness: list[float] = []
    errors = 0
    opened = 0
    pending: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        nonlocal errors, opened
        if idle:
            conn = idle.pop()
        else:
            opened += 1
            conn = await _connect(port)
        sent = time.perf_counter()
        lateness.append(sent - scheduled)
        try:
            status = await conn.request(payload)
        except ConnectionError:
            errors += 1
            return
        done = time.perf_counter()
        latencies.append(done - scheduled)
        service.append(done - sent)
        if status != 200:
            errors += 1
        if not conn.closed:
            idle.append(conn)

    t0 = time.perf_counter() + 0.05
    i = 0
    while i < count:
        now = time.perf_counter()
        while i < count and t0 + i / rate <= now:
            task = loop.create_task(one(t0 + i / rate))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        if i < count:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
    if pending:
        await asyncio.wait(pending, timeout=30)
    for c in idle:
        c.transport.close()  # type: ignore[union-attr]
    ms = [x * 1000 for x in latencies]
    svc = [x * 1000 for x in service]
    return {
        "mode": "open",
        "rate": rate,
        "requests": len(latencies),
        "errors": errors,
        "extra_connections": opened,
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "service_p50_ms": round(percentile(svc, 50), 3),
        "service_p99_ms": round(percentile(svc, 99), 3),
        "send_lateness_p99_ms": round(percentile([x * 1000 for x in lateness], 99), 3),
    }


async def transport_closed_loop(port: int, clients: int, duration_s: float) -> dict[str, Any]:
    """The same closed loop through the executor's backend client (`sagesched.live.transport`)."""
    from sagesched.live.transport import ConnectionPool

    pool = ConnectionPool(
        f"http://127.0.0.1:{port}", max_connections=clients + 4, connect_timeout_s=3.0, read_timeout_s=30.0
    )
    headers = {"Content-Type": "application/json"}
    count = 0
    t0 = time.perf_counter()

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() - t0 < duration_s:
            response = await pool.request("POST", "/v1/chat/completions", BODY, headers=headers)
            await response.read()
            count += 1

    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    await pool.aclose()
    return {"mode": "transport", "clients": clients, "requests": count, "rps": round(count / elapsed, 1)}


async def httpx_closed_loop(port: int, clients: int, duration_s: float) -> dict[str, Any]:
    """The same closed loop through `httpx.AsyncClient` (what the executor's backend client used before)."""
    body = json.loads(BODY)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:
        count = 0
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() - t0 < duration_s:
                (await client.post("/v1/chat/completions", json=body)).read()
                count += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"mode": "httpx", "clients": clients, "requests": count, "rps": round(count / elapsed, 1)}


def install_uvloop() -> str:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    except ImportError:
        return "asyncio"


def load_main(args: argparse.Namespace) -> None:
    loop_name = install_uvloop()
    if args.mode == "closed":
        result = asyncio.run(closed_loop(args.port, args.clients, args.duration))
    elif args.mode == "httpx":
        result = asyncio.run(httpx_closed_loop(args.port, args.clients, args.duration))
    elif args.mode == "transport":
        result = asyncio.run(transport_closed_loop(args.port, args.clients, args.duration))
    else:
        result = asyncio.run(open_loop(args.port, args.rate, args.duration))
    result["loop"] = loop_name
    print(json.dumps(result))


# -- the null server: the load generator's ceiling ---------------------------------------------------


class _NullServer(asyncio.Protocol):
    """Answers every request with one canned response: the load generator's ceiling."""

    RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", bytes(self.buf[:end]))
            total = end + 4 + (int(match.group(1)) if match else 0)
            if len(self.buf) < total:
                return
            del self.buf[:total]
            self.transport.write(self.RESPONSE)  # type: ignore[attr-defined]


def null_main(args: argparse.Namespace) -> None:
    install_uvloop()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_NullServer, "127.0.0.1", args.port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


ROLES = {"_load": load_main, "_null": null_main}


def parse_role_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of a role process: `ROLE --port P [--mode M --rate R --clients C --duration S]`."""
    sub = argparse.ArgumentParser()
    sub.add_argument("role")
    sub.add_argument("--port", type=int, required=True)
    sub.add_argument("--mode", default="closed")
    sub.add_argument("--rate", type=float, default=100)
    sub.add_argument("--clients", type=int, default=64)
    sub.add_argument("--duration", type=float, default=5.0)
    return sub.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ROLES:
        raise SystemExit(__doc__)
    a = parse_role_args()
    ROLES[a.role](a)
