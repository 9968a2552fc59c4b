"""`UnifiedAPIServer`: the OpenAI-compatible gateway in front of the live executor, and how it is served.

Routes: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/responses``;
``GET /v1/models``, ``/v1/models/{id}``, ``/health``, ``/ready``, ``/metrics``; ``GET/PUT
/admin/policy``, ``POST /admin/set_policy``, ``GET /admin/metrics``. Every error is ``{"error":
{"message", "type", "param", "code"}}`` with the right status, also for malformed bodies, unknown
routes, uvicorn's own parse errors and internal faults.

The package is split by job: `sagesched.live.gateway` (per-app state and the API hot path),
`sagesched.live.admin` (observability and admin routes), `sagesched.live.openai_body` (decoding and
validating bodies), this module (the Starlette app, uvicorn, worker processes, `UnifiedAPIServer`).

Where a streamed request fails: before the first chunk, the caller gets an ordinary HTTP error
(the first chunk is pulled before the response starts, so queue-full, no-backend and timeouts keep
their status); after it, an SSE ``data: {"error": ...}`` event and ``[DONE]`` end the stream, which
the official SDK raises as `APIError`. A client that disconnects cancels its request in the
executor, which aborts the upstream call. A shutdown ends what is left at ``drain_timeout_s`` the
same way (an error event, or a JSON 503).
"""

from __future__ import annotations

import base64
import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sagesched.live.admin import _error_response
from sagesched.live.errors import (
    InternalError,
    MethodNotAllowed,
    RouteNotFound,
)
from sagesched.live.gateway import _ENDPOINT_BY_PATH, Gateway
from sagesched.live.gateway_config import GatewayConfig
from sagesched.live.openai_body import validate_body
from sagesched.live.openai_schema import MAX_TOKENS_LIMIT

if TYPE_CHECKING:
    from sagesched.live.executor import LiveExecutor

log = logging.getLogger(__name__)


# -- the app -----------------------------------------------------------------------------------------


def create_app(config: GatewayConfig, executor: LiveExecutor | None = None) -> Starlette:
    """Build the gateway's ASGI app; the executor starts and stops with the app's lifespan.

    Pass `executor` to serve an executor the caller manages (entered and exited by the caller).
    """
    gateway = Gateway(config, executor)

    async def not_found(request: HttpRequest, exc: Exception) -> Response:
        return _error_response(RouteNotFound(f"no route {request.method} {request.url.path}; see /v1/models, /health"))

    async def method_not_allowed(request: HttpRequest, exc: Exception) -> Response:
        return _error_response(MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}"))

    async def server_error(request: HttpRequest, exc: Exception) -> Response:
        log.error("unhandled error on %s: %r", request.url.path, exc)
        return _error_response(InternalError("internal gateway error"))

    routes = [Route(path, endpoint=_AsgiEndpoint(gateway.api)) for path in _ENDPOINT_BY_PATH]
    routes += [
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/v1/responses", gateway.responses, methods=["POST"]),
        Route("/v1/models/{model:path}", gateway.model, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/ready", gateway.ready, methods=["GET"]),
        Route("/metrics", gateway.metrics_route, methods=["GET"]),
        Route("/admin/policy", gateway.get_policy, methods=["GET"]),
        Route("/admin/policy", gateway.put_policy, methods=["PUT", "POST"]),
        Route("/admin/set_policy", gateway.put_policy, methods=["POST"]),
        Route("/admin/metrics", gateway.admin_metrics, methods=["GET"]),
    ]
    app = _GatewayApp(
        gateway,
        routes=routes,
        lifespan=gateway.lifespan,
        exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
    )
    app.state.gateway = gateway
    return app


class _GatewayApp(Starlette):
    """Starlette, except that the three API routes skip its middleware and router.

    Those wrappers cost tens of microseconds per request and do nothing for the API handler,
    which answers every error itself; everything else (lifespan, admin, 404/405) goes through
    Starlette as usual.
    """

    def __init__(self, gateway: Gateway, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._api = gateway.api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        if scope["type"] == "http" and scope["path"] in _ENDPOINT_BY_PATH:
            await self._api(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


class _AsgiEndpoint:
    """Marks a plain ASGI callable for Starlette's Route (so no Request object is built)."""

    __slots__ = ("handler",)

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


# -- serving -----------------------------------------------------------------------------------------


def _make_server(config: GatewayConfig, app: Any) -> Any:
    """A uvicorn server that tells the gateway when shutdown starts, so the gateway ends what is left
    at the drain deadline itself: streams get an error event and [DONE], others a JSON 503, instead
    of uvicorn cancelling them (a cut stream, a plain-text 500)."""
    import uvicorn

    class GatewayServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            gateway = getattr(getattr(app, "state", None), "gateway", None)
            if gateway is not None:
                gateway.begin_drain()
            await super().shutdown(sockets)

    return GatewayServer(_uvicorn_config(config, app))


def _uvicorn_config(config: GatewayConfig, app: Any, **extra: Any) -> Any:
    import uvicorn

    kwargs: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "log_level": config.log_level,
        "access_log": False,
        "lifespan": "on",
        # The gateway ends what is left at drain_timeout_s (begin_drain); uvicorn's own cut, which
        # answers plain text or cuts streams, comes only after the answers had time to go out.
        "timeout_graceful_shutdown": config.drain_timeout_s + 2.0,
        "timeout_keep_alive": 30,
        "server_header": False,
        "proxy_headers": False,  # the gateway reads no client address; skips a middleware per request
    }
    try:
        __import__("uvloop")
        kwargs["loop"] = "uvloop"
    except ImportError:
        pass
    from sagesched.live.http_protocol import protocol_class

    protocol = protocol_class()  # httptools, one write per response (head and body together)
    if protocol is not None:
        kwargs["http"] = protocol
    kwargs.update(extra)
    return uvicorn.Config(app, **kwargs)


def _reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _tune_gc() -> None:
    """Make the garbage collector cheap for a long-running server process (not for library use).

    Everything imported and built at start-up is moved out of the collector's sight (`gc.freeze`),
    so full collections do not walk it again and again, and young collections run less often:
    each request allocates hundreds of short-lived objects, and with the default threshold the
    collector ran every few requests (about 4% of the gateway's CPU time in a `perf` profile).
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, 20_000), gen1, gen2)


def serve(config: GatewayConfig) -> None:
    """Serve until SIGINT/SIGTERM (blocking). With `workers` > 1, N processes share the port.

    Several workers: each process binds its own SO_REUSEPORT socket, so the kernel spreads new
    connections over them, and each runs its own executor (queue, policy, health checks). Load is
    balanced per connection, not per request; each worker sees only its share of the backends' load
    through its own accounting plus the backends' /metrics.
    """
    if config.workers <= 1:
        server = _make_server(config, create_app(config))
        _tune_gc()
        server.run()
        return
    _serve_workers(config)


def _worker_main(config: GatewayConfig) -> None:

    sock = _reuseport_socket(config.host, config.port)
    server = _make_server(config, create_app(config))
    _tune_gc()
    server.run(sockets=[sock])


def _serve_workers(config: GatewayConfig) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    # Fail early (and clearly) if something that is not one of our workers holds the port.
    probe = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind((config.host, config.port))
    finally:
        probe.close()
    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workers = [
        ctx.Process(target=_worker_main, args=(config,), name=f"sagesched-gateway-{i}") for i in range(config.workers)
    ]
    for w in workers:
        w.start()
    log.info("sagesched gateway: %d workers on %s (SO_REUSEPORT)", len(workers), config.url)
    while not stopping.is_set():
        for i, w in enumerate(workers):
            if not w.is_alive() and not stopping.is_set():
                log.warning("worker %s exited with %s; restarting it", w.name, w.exitcode)
                workers[i] = ctx.Process(target=_worker_main, args=(config,), name=w.name)
                workers[i].start()
        stopping.wait(0.5)
    for w in workers:
        if w.is_alive() and w.pid is not None:
            os.kill(w.pid, signal.SIGTERM)
    deadline = time.monotonic() + config.drain_timeout_s + 5
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
        if w.is_alive():
            w.kill()


class UnifiedAPIServer:
    """The gateway as an object: `run()` blocks; `start()` serves from a background thread (tests).

    >>> server = UnifiedAPIServer(GatewayConfig.from_dict({...}), port=0)   # doctest: +SKIP
    >>> server.start(); server.url; server.stop()                         # doctest: +SKIP
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        host: str | None = None,
        port: int | None = None,
        executor: LiveExecutor | None = None,
    ) -> None:
        self.config = config.with_overrides(host=host, port=port)
        self.app = create_app(self.config, executor)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def gateway(self) -> Gateway:
        return self.app.state.gateway

    @property
    def url(self) -> str:
        port = self.config.port
        if self._server is not None and self._server.servers:
            port = self._server.servers[0].sockets[0].getsockname()[1]
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{port}"

    def run(self) -> None:
        """Serve in this thread until interrupted (single process; see `serve` for workers)."""

        self._server = _make_server(self.config, self.app)
        self._server.run()

    def start(self, timeout_s: float = 30.0) -> UnifiedAPIServer:
        """Serve from a daemon thread; return once it accepts connections (port 0 picks a free one)."""

        self._server = _make_server(self.config, self.app)
        errors: list[BaseException] = []

        def target() -> None:
            try:
                self._server.run()
            except BaseException as exc:  # surfaced to the caller of start()
                errors.append(exc)

        self._thread = threading.Thread(target=target, name="sagesched-gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if errors or not self._thread.is_alive():
                raise RuntimeError(f"the gateway failed to start: {errors[0] if errors else 'server exited'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start within {timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """Graceful: stop accepting, drain in-flight requests (drain_timeout_s), close the executor."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout_s if timeout_s is not None else self.config.drain_timeout_s + 10)
        self._thread = None

    def __enter__(self) -> UnifiedAPIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def encode_embedding_base64(vector: list[float]) -> str:
    """Little-endian float32 base64, as OpenAI's `encoding_format="base64"` returns (for tests/tools)."""
    import array

    arr = array.array("f", vector)
    if arr.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte floats
        raise RuntimeError("float is not 32-bit here")
    return base64.b64encode(arr.tobytes()).decode("ascii")


__all__ = ["MAX_TOKENS_LIMIT", "Gateway", "UnifiedAPIServer", "create_app", "serve", "validate_body"]
