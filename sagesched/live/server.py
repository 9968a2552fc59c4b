"""`UnifiedAPIServer`: the OpenAI-compatible gateway in front of the live executor.

Routes: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``; ``GET /v1/models``,
``/health``, ``/ready``, ``/metrics``; ``GET/PUT /admin/policy``, ``POST /admin/set_policy``,
``GET /admin/metrics``. Every error is ``{"error": {"message", "type", "param", "code"}}`` with the
right status, also for malformed bodies, unknown routes and internal faults.

Why the API routes are plain ASGI callables rather than Starlette request handlers: the gateway's
whole job is to add almost nothing to a request's latency, and the per-request work here is one
body read, one `json.loads`, one policy call (inside the executor) and one `send`. Starlette still
provides routing, lifespan and the admin/observability routes.

Where a streamed request fails: before the first chunk, the caller gets an ordinary HTTP error
(the first chunk is pulled before the response starts, so queue-full, no-backend and timeouts keep
their status); after it, an SSE ``data: {"error": ...}`` event ends the stream, which the official
SDK raises as `APIError`. A client that disconnects cancels its request in the executor, which
aborts the upstream call.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sagesched.live.errors import (
    AuthenticationError,
    InvalidRequest,
    LiveError,
    PayloadTooLarge,
    UpstreamTimeout,
)
from sagesched.live.gateway_config import GatewayConfig
from sagesched.live.http_protocol import DISCONNECT_EXTENSION
from sagesched.live.prometheus import CONTENT_TYPE_LATEST, GatewayMetrics
from sagesched.live.requests import _short, request_from_body

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

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


class MethodNotAllowed(LiveError):
    status = 405
    code = "method_not_allowed"
    error_type = "invalid_request_error"


class RouteNotFound(LiveError):
    status = 404
    code = "not_found"
    error_type = "invalid_request_error"


class Forbidden(LiveError):
    status = 403
    code = "forbidden"
    error_type = "permission_error"


class UnsupportedMediaType(LiveError):
    status = 415
    code = "unsupported_media_type"
    error_type = "invalid_request_error"


def _host_name(host: str) -> str:
    """The name part of a Host header or URL authority ('[::1]:80' -> '::1', 'a:1' -> 'a')."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


_LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _local_or_own_host(host: str, bind: str) -> bool:
    name = _host_name(host)
    if not name:
        return False
    if name in _LOCAL_NAMES or name == _host_name(bind):
        return True
    # Bound to all interfaces: an IP literal is a direct connection, a name could be a rebinding.
    if bind in ("0.0.0.0", "::"):
        import ipaddress

        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False
    return False


def _same_origin(origin: str, host: str) -> bool:
    authority = origin.split("://", 1)[-1].rstrip("/")
    return authority.lower() == host.strip().lower()


class BodyTimeout(LiveError):
    status = 408
    code = "request_body_timeout"
    error_type = "invalid_request_error"


class InternalError(LiveError):
    status = 500
    code = "internal_error"
    error_type = "server_error"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Built once: `json.loads`/`json.dumps` with options construct a new decoder/encoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _loads(raw: bytes) -> Any:
    """Parse a body strictly: UTF-8 JSON, no NaN/Infinity, no absurd nesting; 400 otherwise."""
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"the request body is not valid UTF-8 (byte {exc.start}); send UTF-8 encoded JSON"
        ) from None
    try:
        body = _DECODER.decode(text)
        if _SURROGATE_ESCAPE.search(raw):
            _check_unicode(body)  # only bodies with a \uD800-\uDFFF escape pay for the walk
        return body
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None


# A JSON escape of a UTF-16 surrogate: paired ones are fine, a lone one cannot be sent upstream.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _check_unicode(value: Any, path: str = "body") -> None:
    """400 for a string holding a lone surrogate (it has no UTF-8 form, so no backend could take it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(
                f"{path} holds a lone UTF-16 surrogate ({value[exc.start]!r} at character {exc.start}); "
                "send valid Unicode text",
                param=path.split("[")[0].split(".")[-1] if path != "body" else None,
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, path)
            _check_unicode(v, f"{path}.{k}" if path != "body" else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_unicode(v, f"{path}[{i}]")


def _dumps(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode("utf-8")


def _error_body(exc: LiveError) -> bytes:
    return _dumps(exc.to_dict())


# -- body validation beyond what the scheduler needs ---------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    # Ints are compared as ints: math.isfinite(10**400) raises OverflowError.
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))


def _check_number(body: Mapping[str, Any], key: str, low: float, high: float) -> None:
    if key in body and body[key] is not None:
        value = body[key]
        if not _is_number(value) or not low <= value <= high:
            raise InvalidRequest(
                f"'{key}' must be a number between {low:g} and {high:g}, got {_short(value)}", param=key
            )


def _check_int(body: Mapping[str, Any], key: str, low: int, high: int | None = None) -> None:
    if key in body and body[key] is not None:
        value = body[key]
        if not _is_int(value) or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise InvalidRequest(f"'{key}' must be an integer {bound}, got {_short(value)}", param=key)


def _check_bool(body: Mapping[str, Any], key: str) -> None:
    if key in body and body[key] is not None and not isinstance(body[key], bool):
        raise InvalidRequest(f"'{key}' must be true or false, got {body[key]!r}", param=key)


MAX_TOKENS_LIMIT = 2**31 - 1
"""Largest max_tokens accepted (no model has a longer context; bigger ints overflow float maths)."""


def validate_body(endpoint: str, body: Any, max_batch_inputs: int) -> None:
    """Reject malformed OpenAI fields with 400 naming the field (413 for too many inputs).

    Unknown fields are allowed (passed to the backend); known ones must have the documented types,
    so a typo'd type is answered here rather than by an opaque backend error.
    """
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, not a JSON {type(body).__name__}")
    if "model" not in body:
        raise InvalidRequest("'model' is required; GET /v1/models lists the served models", param="model")
    if not isinstance(body["model"], str) or not body["model"].strip():
        raise InvalidRequest("'model' must be a non-empty string naming a served model", param="model")
    if endpoint == "embeddings":
        inputs = body.get("input")
        if isinstance(inputs, list) and len(inputs) > max_batch_inputs and not all(_is_int(t) for t in inputs):
            raise PayloadTooLarge(
                f"'input' has {len(inputs)} items; at most {max_batch_inputs} per request (split the batch)",
                param="input",
            )
        if isinstance(inputs, str) and not inputs:
            raise InvalidRequest("'input' must not be an empty string", param="input")
        if isinstance(inputs, list) and any(isinstance(i, str) and not i for i in inputs):
            raise InvalidRequest("'input' must not contain empty strings", param="input")
        fmt = body.get("encoding_format")
        if fmt is not None and fmt not in ("float", "base64"):
            raise InvalidRequest(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
        _check_int(body, "dimensions", 1)
        if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
            raise InvalidRequest("'user' must be a string", param="user")
        return
    _check_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest(
                "'stream_options' must be an object like {\"include_usage\": true}", param="stream_options"
            )
        if not body.get("stream"):
            raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        _check_bool(options, "include_usage")
    _check_int(body, "n", 1, 128)
    _check_int(body, "max_tokens", 0, MAX_TOKENS_LIMIT)
    _check_int(body, "max_completion_tokens", 0, MAX_TOKENS_LIMIT)
    _check_number(body, "temperature", 0.0, 2.0)
    _check_number(body, "top_p", 0.0, 1.0)
    _check_number(body, "presence_penalty", -2.0, 2.0)
    _check_number(body, "frequency_penalty", -2.0, 2.0)
    _check_int(body, "seed", -(2**63), 2**64 - 1)
    stop = body.get("stop")
    if (
        stop is not None
        and not isinstance(stop, str)
        and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop))
    ):
        raise InvalidRequest("'stop' must be a string or a list of strings", param="stop")
    if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
        raise InvalidRequest("'user' must be a string", param="user")
    if endpoint == "chat":
        _check_bool(body, "logprobs")
        _check_int(body, "top_logprobs", 0, 20)
        messages = body.get("messages")
        if isinstance(messages, list):
            for i, message in enumerate(messages):
                if isinstance(message, dict) and "content" in message:
                    content = message["content"]
                    if content is not None and not isinstance(content, str | list):
                        raise InvalidRequest(
                            f"messages[{i}].content must be a string or a list of parts", param="messages"
                        )
    else:
        _check_bool(body, "echo")
        _check_int(body, "logprobs", 0, 20)
        _check_int(body, "best_of", 1, 128)
        if "suffix" in body and body["suffix"] is not None and not isinstance(body["suffix"], str):
            raise InvalidRequest("'suffix' must be a string", param="suffix")


# -- the Responses API, as a chat completion ---------------------------------------------------------


def responses_to_chat(body: Any) -> dict[str, Any]:
    """The chat body a /v1/responses body asks for; InvalidRequest naming the field otherwise."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if body.get("stream"):
        raise InvalidRequest(
            "streaming is not offered on /v1/responses here; use /v1/chat/completions with stream=true",
            param="stream",
        )
    if "model" not in body:
        raise InvalidRequest("'model' is required; GET /v1/models lists the served models", param="model")
    given = body.get("input")
    if isinstance(given, str) and given:
        messages: list[dict[str, Any]] = [{"role": "user", "content": given}]
    elif isinstance(given, list) and given:
        messages = []
        for i, item in enumerate(given):
            if not isinstance(item, dict) or not isinstance(item.get("role"), str):
                raise InvalidRequest(f"input[{i}] must be an object with 'role' and 'content'", param="input")
            content = item.get("content")
            if isinstance(content, list):  # [{"type": "input_text", "text": ...}, ...]
                texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
                content = "".join(texts)
            if not isinstance(content, str):
                raise InvalidRequest(f"input[{i}].content must be text", param="input")
            messages.append({"role": item["role"], "content": content})
    else:
        raise InvalidRequest("'input' must be a non-empty string or a list of messages", param="input")
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("'instructions' must be a string", param="instructions")
        messages.insert(0, {"role": "system", "content": instructions})
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for key in ("temperature", "top_p", "user", "priority", "deadline_ms", "slo_ttft_ms", "slo_tpot_ms"):
        if body.get(key) is not None:
            chat[key] = body[key]
    return chat


def chat_to_response(data: Any, model: str, request_id: str) -> dict[str, Any]:
    """A chat completion answer in the Responses API's shape."""
    try:
        text = data["choices"][0]["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        from sagesched.live.errors import UpstreamError

        raise UpstreamError(f"the backend's chat answer has no message: {str(data)[:200]}") from None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {
        "id": f"resp_{request_id}",
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": "completed",
        "output": [
            {
                "type": "message",
                "id": f"msg_{request_id}",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion},
    }


# -- the gateway -------------------------------------------------------------------------------------


@dataclass
class _Counters:
    """Cheap plain counters for /admin/metrics (Prometheus has the full picture)."""

    accepted: int = 0
    completed: int = 0
    errors: int = 0
    disconnected: int = 0


class Gateway:
    """Per-app state and the request handlers; one per `create_app` call (one per process)."""

    def __init__(self, config: GatewayConfig, executor: Any | None = None) -> None:
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
    def executor(self) -> Any:
        if self._executor is None:
            raise RuntimeError("the gateway's executor is not started (the app's lifespan did not run)")
        return self._executor

    def build_executor(self) -> Any:
        from sagesched.live.executor import ExecutorConfig, LiveExecutor

        cfg = self.config
        fields = set(getattr(ExecutorConfig, "__dataclass_fields__", {}))
        wanted = {
            "max_queue": cfg.max_queue,
            "request_timeout_s": cfg.request_timeout_s,
            "health_interval_s": cfg.health_interval_s,
            "drain_timeout_s": cfg.drain_timeout_s,
        }
        kwargs = {k: v for k, v in wanted.items() if k in fields}
        kwargs.update(cfg.executor)
        return LiveExecutor(cfg.make_policy(), cfg.backend_configs(), ExecutorConfig(**kwargs))

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
        abort = getattr(executor, "abort_all", None)
        if callable(abort):
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
        clock = getattr(self._executor, "now", None)
        return clock() if callable(clock) else time.monotonic()

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
        pending = getattr(self._executor, "_pending", None)
        if pending is not None and given in pending:
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
                raw_json = getattr(response, "raw", None)
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
                    chunks = getattr(response, "stream", None)
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
            exc = UpstreamTimeout(
                f"the request did not finish within {self.config.request_timeout_s:g} s (request_timeout_s)"
            )
            await self._fail(send, exc, endpoint, started, counted=False)
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
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await self._read_body_unbounded(scope, receive)
        except TimeoutError:
            raise BodyTimeout(
                f"the request body did not arrive within {self.body_timeout_s:g} s; send the whole body promptly"
            ) from None

    async def _read_body_unbounded(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.config.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise InvalidRequest("the Content-Length header is not a number") from None
                if declared > limit:
                    raise PayloadTooLarge(f"the body has {declared} bytes; the limit is {limit} (max_body_bytes)")
                break
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        body = message.get("body", b"")
        if not message.get("more_body"):
            if len(body) > limit:
                raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes (max_body_bytes)")
            return body
        chunks = [body]
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

    # -- observability & admin -------------------------------------------------------------------------
    def _collect(self) -> dict[str, Any]:
        snapshot = self.executor.snapshot() if self._executor is not None else {}
        executor = self._executor
        total = getattr(executor, "records_total", 0)
        new_count = total - self._records_seen
        if new_count > 0:
            window = executor.records  # a bounded deque, newest last
            available = min(new_count, len(window))
            # Only the records finished since the last scrape, walked from the new end of the window.
            new = list(itertools.islice(reversed(window), available))
            new.reverse()
            self.metrics.observe_records(new)
            if available < new_count:  # more finished between two scrapes than the window holds
                self.metrics.records_missed.inc(new_count - available)
            self._records_seen = total
        self.metrics.update_gauges(snapshot)
        self.metrics.http_inflight.set(self.inflight)
        return snapshot

    async def metrics_route(self, request: HttpRequest) -> Response:
        if not self._may_see_internals(request):
            return _error_response(
                AuthenticationError("/metrics needs 'Authorization: Bearer <key>' when keys are configured")
            )
        self._collect()
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def health(self, request: HttpRequest) -> Response:
        status = "draining" if self.draining else "ok"
        body = {"status": status, "uptime_s": round(time.time() - self.started_at, 3), "pid": os.getpid()}
        return JSONResponse(body, 503 if self.draining else 200)

    def _backend_health(self) -> list[dict[str, Any]]:
        snapshot = self.executor.snapshot()
        backends = snapshot.get("backends") or snapshot.get("instances") or []
        if isinstance(backends, Mapping):
            backends = [{"id": key, **value} for key, value in backends.items()]
        # No URLs: /ready is unauthenticated, and backend addresses are the operator's business.
        keep = ("id", "kind", "models", "healthy", "inflight")
        return [{k: b.get(k) for k in keep if k in b} for b in backends if isinstance(b, Mapping)]

    async def responses(self, request: HttpRequest) -> Response:
        """POST /v1/responses (OpenAI's Responses API), text in and out, served as a chat completion.

        Supported: `input` (a string, or a list of {role, content} messages), `instructions`,
        `max_output_tokens`, `temperature`, `top_p`, `user`; `stream` is refused with a 400 naming
        /v1/chat/completions. The scheduling headers work as on the other routes.
        """
        if self._api_keys and not self._authorized(request.scope, self._api_keys):
            return _error_response(
                AuthenticationError("missing or invalid API key; send 'Authorization: Bearer <key>'")
            )
        if self.draining:
            from sagesched.live.errors import ServiceStopping

            return _error_response(ServiceStopping("the gateway is shutting down; retry on another instance"))
        try:
            raw = await self._read_body(request.scope, request.receive)
            body = _loads(raw)
            chat = responses_to_chat(body)
            validate_body("chat", chat, self.config.max_batch_inputs)
            headers = {k: v for k, v in request.headers.items() if k.startswith("x-")}
            request_id = self._request_id(headers.get("x-request-id"))
            req = request_from_body("chat", chat, headers, self._now(), request_id=request_id)
            self.counters.accepted += 1
            response = await self.executor.submit(req, chat, "chat")
            data = response.json if response.json is not None else json.loads(response.raw or b"{}")
            out = chat_to_response(data, chat["model"], request_id)
        except LiveError as exc:
            self.counters.errors += 1
            return _error_response(exc)
        self.counters.completed += 1
        return JSONResponse(out, headers={"x-request-id": request_id})

    def _may_see_internals(self, request: HttpRequest) -> bool:
        """With keys configured, backend details (/ready's list, /metrics) need a user or admin key."""
        if not self._api_keys and self._admin_key is None:
            return True
        keys = set(self._api_keys)
        if self._admin_key is not None:
            keys.add(self._admin_key)
        return self._authorized(request.scope, keys)

    async def ready(self, request: HttpRequest) -> Response:
        backends = self._backend_health()
        healthy = [b for b in backends if b.get("healthy")]
        ok = bool(healthy) and not self.draining
        body: dict[str, Any] = {
            "status": "ready" if ok else ("draining" if self.draining else "no healthy backend"),
            "healthy_backends": len(healthy),
            "backends_total": len(backends),
        }
        if self._may_see_internals(request):
            body["backends"] = backends
            body["models"] = self._models()
        return JSONResponse(body, 200 if ok else 503)

    def _models(self) -> list[str]:
        """Served models, LLMs first: tools (guidellm, inference-perf) take the first listed model."""
        executor = self.executor
        llm = set(executor.models("chat")) | set(executor.models("completions"))
        embedding = set(executor.models("embeddings")) - llm
        return sorted(llm) + sorted(embedding)

    async def model(self, request: HttpRequest) -> Response:
        """GET /v1/models/{id}: one model, or 404 naming the served ones."""
        if self._api_keys and not self._authorized(request.scope, self._api_keys):
            return _error_response(
                AuthenticationError("missing or invalid API key; send 'Authorization: Bearer <key>'")
            )
        name = request.path_params["model"]
        served = self._models()
        if name not in served:
            from sagesched.live.errors import ModelNotFound

            return _error_response(
                ModelNotFound(f"model {name!r} is not served; available: {', '.join(served)}", param="model")
            )
        return JSONResponse({"id": name, "object": "model", "created": int(self.started_at), "owned_by": "sagesched"})

    async def models(self, request: HttpRequest) -> Response:
        if self._api_keys and not self._authorized(request.scope, self._api_keys):
            return _error_response(
                AuthenticationError("missing or invalid API key; send 'Authorization: Bearer <key>'")
            )
        created = int(self.started_at)
        data = [{"id": m, "object": "model", "created": created, "owned_by": "sagesched"} for m in self._models()]
        return JSONResponse({"object": "list", "data": data})

    def _admin_denied(self, request: HttpRequest) -> Response | None:
        """None when the admin request may go on, else the error response.

        Checks, in order: the Host is the gateway's own (a DNS-rebinding page cannot reach us under
        another name); a browser's cross-site Origin is refused; state-changing calls must say
        ``Content-Type: application/json`` (a plain HTML form cannot); then the key: the admin key
        when one is set, and with `api_keys` but no admin key the routes are closed.
        """
        headers = request.headers
        host = headers.get("host", "")
        if not _local_or_own_host(host, self.config.host):
            return _error_response(
                Forbidden(f"admin routes answer only to this gateway's own host name, not {host!r}", param="Host")
            )
        origin = headers.get("origin")
        if origin is not None and not _same_origin(origin, host):
            return _error_response(Forbidden(f"cross-origin admin requests are refused (Origin {origin!r})"))
        if request.method in ("POST", "PUT"):
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return _error_response(
                    UnsupportedMediaType(
                        f"admin calls that change state need 'Content-Type: application/json', not {ctype or 'none'!r}"
                    )
                )
        if self._admin_key is None:
            if self._api_keys:
                return _error_response(
                    Forbidden("admin routes are closed: api_keys are set but no admin_key; set admin_key in the config")
                )
            return None
        if self._authorized(request.scope, {self._admin_key}):
            return None
        return _error_response(AuthenticationError("admin routes need 'Authorization: Bearer <admin_key>'"))

    def _policy_description(self) -> dict[str, Any]:
        policy = getattr(self._executor, "policy", None)
        if policy is not None and hasattr(policy, "describe"):
            described = policy.describe()
            return {"name": described.pop("name", self.policy_name), "config": described}
        return {"name": self.policy_name, "config": self.policy_config}

    async def get_policy(self, request: HttpRequest) -> Response:
        if (denied := self._admin_denied(request)) is not None:
            return denied
        from sagesched.policies import available_policies

        return JSONResponse({**self._policy_description(), "available": available_policies()})

    async def put_policy(self, request: HttpRequest) -> Response:
        """Switch the policy at run time: {"name": "hybrid", "config": {...}} (or "policy" for "name")."""
        if (denied := self._admin_denied(request)) is not None:
            return denied
        try:
            body = _loads(await request.body())
            if not isinstance(body, dict):
                raise InvalidRequest('send a JSON object like {"name": "fifo", "config": {}}')
            name = body.get("name", body.get("policy", body.get("policy_name")))
            if not isinstance(name, str) or not name:
                raise InvalidRequest("'name' (the policy to switch to) is required", param="name")
            config = body.get("config", {})
            if config is None:
                config = {}
            if not isinstance(config, dict):
                raise InvalidRequest("'config' must be an object of the policy's config fields", param="config")
            from sagesched.policies import make_policy

            try:
                policy = make_policy(name, **config)
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="name" if "unknown policy" in str(exc) else "config") from None
        except LiveError as exc:
            return _error_response(exc)
        previous = self.policy_name
        self.executor.set_policy(policy)
        self.policy_name, self.policy_config = name, dict(config)
        self.metrics.set_policy(name)
        log.info("policy switched from %s to %s %s", previous, name, config)
        return JSONResponse({**self._policy_description(), "previous": previous})

    async def admin_metrics(self, request: HttpRequest) -> Response:
        if (denied := self._admin_denied(request)) is not None:
            return denied
        snapshot = self._collect()
        body: dict[str, Any] = {
            "policy": self._policy_description(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "http_inflight": self.inflight,
            "accepted": self.counters.accepted,
            "completed": self.counters.completed,
            "errors": self.counters.errors,
            "client_disconnects": self.counters.disconnected,
            "executor": _jsonable(snapshot),
        }
        summary = await self._summary()
        if summary is not None:
            body["summary"] = summary
            body["summary_over_last"] = self._summary_cache[2]
        return JSONResponse(body)

    async def _summary(self) -> dict[str, Any] | None:
        """Latency summary over the executor's record window, computed in a worker thread.

        Summarising thousands of records takes tens of milliseconds of pandas; on the event loop
        that stalled every request behind an /admin/metrics poll (p50 0.9 ms -> 926 ms under load).
        The copy of the window is O(window) but cheap; the result is cached for `_SUMMARY_TTL_S` so
        a tight polling loop costs one computation per interval.
        """
        executor = self._executor
        records = getattr(executor, "records", None)
        if not records:
            return None
        now = time.monotonic()
        cached_at, cached, _ = self._summary_cache
        if cached is not None and now - cached_at < _SUMMARY_TTL_S:
            return cached
        async with self._summary_lock:
            cached_at, cached, _ = self._summary_cache
            if cached is not None and time.monotonic() - cached_at < _SUMMARY_TTL_S:
                return cached
            snapshot = list(records)

            def compute() -> dict[str, Any] | None:
                from sagesched.metrics import records_frame, summarize

                try:
                    return _jsonable(summarize(records_frame(snapshot)))
                except Exception:
                    log.exception("summarising %d records failed", len(snapshot))
                    return None

            result = await asyncio.to_thread(compute)
            self._summary_cache = (time.monotonic(), result, len(snapshot))
            return result


BODY_TIMEOUT_S = 30.0
"""Seconds a client may take to send a request body (408 after that)."""

_SUMMARY_TTL_S = 2.0
"""How long /admin/metrics reuses its latency summary (it is recomputed in a thread after that)."""


def _jsonable(value: Any) -> Any:
    """Make a snapshot JSON-safe (enums, sets, dataclasses, NaN) without knowing its exact shape."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str | int | bool) or value is None:
        return value
    if hasattr(value, "value") and isinstance(value.value, str | int):
        return value.value
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable({k: getattr(value, k) for k in value.__dataclass_fields__})
    if hasattr(value, "item"):
        with contextlib.suppress(Exception):
            return _jsonable(value.item())
    return str(value)


async def _aclose(iterator: Any) -> None:
    """Close a chunk iterator so that the executor releases (or aborts) the upstream stream."""
    closer = getattr(iterator, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


def _error_response(exc: LiveError) -> Response:
    return Response(_error_body(exc), status_code=exc.status, headers=exc.headers(), media_type="application/json")


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


# -- the app -----------------------------------------------------------------------------------------


def create_app(config: GatewayConfig, executor: Any | None = None) -> Starlette:
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
        self, config: GatewayConfig, *, host: str | None = None, port: int | None = None, executor: Any | None = None
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
