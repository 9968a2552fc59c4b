"""`Gateway`: the per-app state and the API hot path (POST /v1/chat/completions, /v1/completions, /v1/embeddings).

Why plain ASGI callables rather than Starlette handlers: the gateway's job is to add almost nothing
to a request's latency; the per-request work is one body read, one decode, one validation, one
policy call (in the executor) and one `send`. The other routes live in `sagesched.live.admin`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from sagesched.live.admin import GatewayRoutes
from sagesched.live.errors import (
    AuthenticationError,
    BodyTimeout,
    InternalError,
    InvalidRequest,
    LiveError,
    MethodNotAllowed,
    PayloadTooLarge,
    UpstreamTimeout,
)
from sagesched.live.gateway_config import GatewayConfig
from sagesched.live.http_protocol import DISCONNECT_EXTENSION
from sagesched.live.openai_body import _dumps, _error_body, _loads, validate_body
from sagesched.live.prometheus import GatewayMetrics
from sagesched.live.requests import request_from_body

if TYPE_CHECKING:
    from sagesched.live.executor import LiveExecutor

log = logging.getLogger(__name__)


_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_DONE = b"data: [DONE]\n\n"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_ENDPOINT_BY_PATH = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


class ClientDisconnected(Exception):
    """The HTTP client went away; its request is cancelled and nothing more is sent."""


@dataclass
class _Counters:
    """Cheap plain counters for /admin/metrics (Prometheus has the full picture)."""

    accepted: int = 0
    completed: int = 0
    errors: int = 0
    disconnected: int = 0


class Gateway(GatewayRoutes):
    """Per-app state and the request handlers; one per `create_app` call (one per process)."""

    def __init__(self, config: GatewayConfig, executor: LiveExecutor | None = None) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self._executor = executor
        self._own_executor = executor is None
        self._api_keys = {f"Bearer {k}".encode() for k in config.api_keys}
        self._admin_key = f"Bearer {config.admin_key}".encode() if config.admin_key else None
        self._ids = itertools.count(1)
        self._id_prefix = f"gw{os.getpid():x}-{int(time.time()) & 0xFFFFFF:x}-"
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        self._drain_timer: asyncio.TimerHandle | None = None
        self.counters = _Counters()
        self._records_seen = 0
        self.body_timeout_s = BODY_TIMEOUT_S
        self._summary_cache: tuple[float, dict[str, Any] | None, int] = (0.0, None, 0)
        self._summary_lock = asyncio.Lock()
        self.started_at = time.time()
        self.policy_name = config.policy
        self.policy_config: dict[str, Any] = dict(config.policy_config)
        # The per-request success counters, resolved once (a `labels()` lookup per request adds up).
        self._ok = {endpoint: self.metrics.requests.labels(endpoint, "200") for endpoint in _ENDPOINT_BY_PATH.values()}

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def executor(self) -> LiveExecutor:
        if self._executor is None:
            raise RuntimeError("the gateway's executor is not started (the app's lifespan did not run)")
        return self._executor

    def build_executor(self) -> LiveExecutor:
        from sagesched.live.executor import ExecutorConfig, LiveExecutor

        cfg = self.config
        fields = {f.name for f in dataclasses.fields(ExecutorConfig)}
        wanted: dict[str, Any] = {
            "max_queue": cfg.max_queue,
            "request_timeout_s": cfg.request_timeout_s,
            "health_interval_s": cfg.health_interval_s,
            "drain_timeout_s": cfg.drain_timeout_s,
        }
        kwargs = {k: v for k, v in wanted.items() if k in fields}
        kwargs.update(cfg.executor)
        return LiveExecutor(cfg.make_policy(), cfg.backend_configs(), ExecutorConfig.from_dict(kwargs))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._idle = asyncio.Event()
        self._idle.set()
        if self._executor is None:
            self._executor = self.build_executor()
        self.metrics.set_policy(self.policy_name)
        if self._own_executor:
            await self._executor.__aenter__()
        log.info("sagesched gateway ready: policy %s, %d backend(s)", self.policy_name, len(self.config.backends))
        try:
            yield
        finally:
            await self.drain()
            if self._own_executor:
                await self._executor.__aexit__(None, None, None)
            log.info("sagesched gateway stopped")

    def begin_drain(self) -> None:
        """Shutdown started: refuse new requests; at drain_timeout_s end the ones still running cleanly."""
        if self._drain_timer is not None:
            return
        self.draining = True
        loop = asyncio.get_running_loop()
        self._drain_timer = loop.call_later(self.config.drain_timeout_s, self._end_inflight)

    def _end_inflight(self) -> None:
        executor = self._executor
        if executor is not None:
            abort = executor.abort_all
            from sagesched.live.errors import ServiceStopping

            count = abort(
                ServiceStopping(
                    f"the gateway shut down before the request finished (drain_timeout_s="
                    f"{self.config.drain_timeout_s:g}s passed); retry on another instance"
                )
            )
            if count:
                log.warning("drain deadline passed: ended %d request(s) with 503 service_stopping", count)

    async def drain(self) -> None:
        """Stop taking requests and wait (up to drain_timeout_s) for those in flight to finish."""
        self.draining = True
        if self.inflight:
            log.info("draining %d in-flight request(s) (up to %.0f s)", self.inflight, self.config.drain_timeout_s)
            try:
                await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout_s)
            except TimeoutError:
                log.warning("drain deadline passed with %d request(s) still in flight", self.inflight)

    # -- helpers -------------------------------------------------------------------------------------
    def _now(self) -> float:
        return self._executor.now() if self._executor is not None else time.monotonic()

    async def _send_json(
        self, send: Send, status: int, payload: bytes, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        headers = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
        if extra:
            headers.extend(extra)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _send_error(self, send: Send, exc: LiveError, endpoint: str = "") -> None:
        extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
        self.metrics.requests.labels(endpoint or "other", str(exc.status)).inc()
        await self._send_json(send, exc.status, _error_body(exc), extra)

    def _request_id(self, given: str | None) -> str:
        """The caller's X-Request-Id when it is a sane token (echoed back and used in records), else ours.

        Ids must be unique among requests in flight; a reused one gets a suffix rather than a 400.
        """
        if given is None:
            return f"{self._id_prefix}{next(self._ids)}"
        if not _REQUEST_ID.fullmatch(given):
            raise InvalidRequest(
                "X-Request-Id must be 1-128 characters of letters, digits and . _ : -", param="X-Request-Id"
            )
        if self._executor is not None and self._executor.in_flight(given):
            return f"{given}~{next(self._ids)}"
        return given

    def _authorized(self, scope: Scope, keys: set[bytes] | None) -> bool:
        if not keys:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                return value in keys
        return False

    # -- the API hot path ------------------------------------------------------------------------------
    async def api(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/chat/completions | /v1/completions | /v1/embeddings."""
        endpoint = _ENDPOINT_BY_PATH[scope["path"].rstrip("/") or scope["path"]]
        if scope["method"] != "POST":
            await self._send_error(send, MethodNotAllowed(f"use POST for {scope['path']}"), endpoint)
            return
        if self._api_keys and not self._authorized(scope, self._api_keys):
            self.metrics.reject(AuthenticationError.code)
            await self._send_error(
                send, AuthenticationError("missing or invalid API key; send 'Authorization: Bearer <key>'"), endpoint
            )
            return
        if self.draining:
            from sagesched.live.errors import ServiceStopping

            await self._send_error(
                send, ServiceStopping("the gateway is shutting down; retry on another instance"), endpoint
            )
            return
        self.inflight += 1
        self._idle.clear()
        try:
            await self._api(endpoint, scope, receive, send)
        finally:
            self.inflight -= 1
            if not self.inflight:
                self._idle.set()

    async def _api(self, endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
        started = False
        submitted = False
        try:
            raw = await self._read_body(scope, receive)
            body = _loads(raw)
            validate_body(endpoint, body, self.config.max_batch_inputs)
            headers = {}
            for name, value in scope["headers"]:
                if name.startswith(b"x-"):
                    headers[name.decode("latin-1")] = value.decode("latin-1")
            request_id = self._request_id(headers.get("x-request-id"))
            try:
                request = request_from_body(endpoint, body, headers, self._now(), request_id=request_id)
            except LiveError:
                raise
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise InvalidRequest(f"invalid request: {exc}") from None
            self.counters.accepted += 1
            stream = endpoint != "embeddings" and body.get("stream") is True
            payload: Any = None
            chunks = None
            if not stream:
                # The executor's deadline timer ends every non-streamed request (a clean 504), so no
                # outer timeout is needed here: a request costs one timer, not two.
                async with _DisconnectWatch(scope, receive):
                    submitted = True
                    response = await self.executor.submit(request, body, endpoint)
                raw_json = response.raw
                out = raw_json if raw_json is not None else _dumps(response.json)
                await self._send_json(send, 200, out, [(b"x-request-id", request_id.encode())])
            else:
                # The executor enforces request_timeout_s itself (a clean 504 wherever the request
                # is); this outer deadline is only a backstop should a stream stall outside its control.
                async with (
                    asyncio.timeout(self.config.request_timeout_s + 5.0),
                    _DisconnectWatch(scope, receive) as watch,
                ):
                    submitted = True
                    response = await self.executor.submit(request, body, endpoint)
                    chunks = response.stream
                    if chunks is None:
                        payload = response.json
                    else:
                        iterator = chunks.__aiter__()
                        try:
                            try:
                                first = await iterator.__anext__()
                            except StopAsyncIteration:
                                first = None
                            await self._sse_start(send, request_id)
                            started = True
                            await self._pump(send, first, iterator, watch)
                        finally:
                            await _aclose(iterator)
                if chunks is None:
                    # A backend that ignored stream=true: its JSON goes out as one SSE chunk.
                    await self._sse_start(send, request_id)
                    await send({"type": "http.response.body", "body": b"data: " + _dumps(payload) + b"\n\n" + _DONE})
            self.counters.completed += 1
            self._ok[endpoint].inc()
        except ClientDisconnected:
            self.counters.disconnected += 1
            self.metrics.reject("client_disconnected")
            log.debug("client disconnected; request cancelled")
        except TimeoutError:
            timeout = UpstreamTimeout(
                f"the request did not finish within {self.config.request_timeout_s:g} s (request_timeout_s)"
            )
            await self._fail(send, timeout, endpoint, started, counted=False)
        except LiveError as exc:
            await self._fail(send, exc, endpoint, started, counted=submitted)
        except Exception as exc:  # a bug must still answer in OpenAI shape and never kill the connection
            log.exception("internal error while serving %s", scope.get("path"))
            await self._fail(
                send, InternalError(f"internal gateway error: {type(exc).__name__}"), endpoint, started, counted=False
            )

    async def _fail(self, send: Send, exc: LiveError, endpoint: str, started: bool, *, counted: bool) -> None:
        """Answer `exc`; `counted` says the executor already recorded it (its rejections, its records)."""
        self.counters.errors += 1
        if not counted:
            self.metrics.reject(exc.code)
        if started:
            # Headers are gone: the error travels as an SSE event the SDKs raise, then the stream ends.
            self.metrics.requests.labels(endpoint, f"{exc.status}-in-stream").inc()
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"data: " + _error_body(exc) + b"\n\n" + _DONE})
            return
        with contextlib.suppress(Exception):
            await self._send_error(send, exc, endpoint)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, within `body_timeout_s` (a half-sent upload must not hold a slot forever)."""
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await self._read_body_unbounded(scope, receive, chunks)
        except TimeoutError:
            message = f"the request body did not arrive within {self.body_timeout_s:g} s"
            declared = _content_length(scope)
            if declared is None:
                raise BodyTimeout(f"{message}; send the whole body promptly") from None
            # A client that sent all it had announced too many bytes: name that fix too, not only "send faster".
            raise BodyTimeout(
                f"{message}: {sum(map(len, chunks))} of the {declared} bytes that Content-Length announces came; "
                "send the whole body promptly, or fix Content-Length if that was all of it"
            ) from None

    async def _read_body_unbounded(self, scope: Scope, receive: Receive, chunks: list[bytes]) -> bytes:
        """Read the body into `chunks` (left there for the timeout message) and return it."""
        limit = self.config.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"the body has {declared} bytes; the limit is {limit} (max_body_bytes)")
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        body = message.get("body", b"")
        if not message.get("more_body"):
            if len(body) > limit:
                raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes (max_body_bytes)")
            return body
        chunks.append(body)
        size = len(body)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes (max_body_bytes)")
            chunks.append(body)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _sse_start(self, send: Send, request_id: str) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*_SSE_HEADERS, (b"x-request-id", request_id.encode())],
            }
        )

    async def _pump(self, send: Send, first: Any, iterator: Any, watch: _DisconnectWatch) -> None:
        if first is not None:
            await send({"type": "http.response.body", "body": b"data: " + _dumps(first) + b"\n\n", "more_body": True})
        async for chunk in iterator:
            await send({"type": "http.response.body", "body": b"data: " + _dumps(chunk) + b"\n\n", "more_body": True})
        # Completing the response wakes uvicorn's receive() with http.disconnect: stop watching first.
        watch.detach()
        await send({"type": "http.response.body", "body": _DONE})


BODY_TIMEOUT_S = 30.0
"""Seconds a client may take to send a request body (408 after that)."""


def _content_length(scope: Scope) -> int | None:
    """The request's Content-Length (None without one); 400 when it is not a number."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                raise InvalidRequest("the Content-Length header is not a number") from None
    return None


async def _aclose(iterator: Any) -> None:
    """Close a chunk iterator so that the executor releases (or aborts) the upstream stream."""
    closer = getattr(iterator, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


class _DisconnectWatch:
    """Cancel the handling task when the client disconnects, and say so with ClientDisconnected.

    A vanished client must abort its upstream request (the executor sees the cancellation and frees
    the backend slot). Under the gateway's own uvicorn protocol the connection-lost hook
    (`http_protocol.DISCONNECT_EXTENSION`) reports it for free; under any other ASGI server a task
    waits on `receive()`, which returns ``http.disconnect`` once the body is read and the client
    goes away.
    """

    __slots__ = ("_disconnected", "_hook", "_task", "_waiter")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self._task = asyncio.current_task()
        self._disconnected = False
        self._waiter: asyncio.Future[Any] | None = None
        extensions = scope.get("extensions")
        self._hook = extensions.get(DISCONNECT_EXTENSION) if extensions else None
        if self._hook is not None:
            self._hook(self._on_disconnect)
        else:
            self._waiter = asyncio.ensure_future(receive())
            self._waiter.add_done_callback(self._on_message)

    def _on_disconnect(self) -> None:
        if self._task is not None:
            self._disconnected = True
            self._task.cancel()

    def _on_message(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            return
        if fut.exception() is None and fut.result().get("type") == "http.disconnect":
            self._on_disconnect()

    async def __aenter__(self) -> _DisconnectWatch:
        return self

    def detach(self) -> None:
        """Stop watching (before the response completes, which uvicorn reports as a disconnect)."""
        if self._hook is not None:
            self._hook(None)
            return
        if self._waiter is not None:
            self._waiter.remove_done_callback(self._on_message)
            if not self._waiter.done():
                self._waiter.cancel()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.detach()
        if self._disconnected and exc_type is asyncio.CancelledError:
            if self._task is not None:
                self._task.uncancel()
            raise ClientDisconnected
        return False
