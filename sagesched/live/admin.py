"""The gateway's observability and admin routes: /health, /ready, /metrics, /v1/models, /v1/responses, /admin/*.

These are off the request hot path (plain Starlette handlers). Admin routes are guarded against a
browser on the operator's machine (Host, Origin and Content-Type checks) as well as by key; the
latency summary of /admin/metrics is computed in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope

from sagesched.live.errors import (
    AuthenticationError,
    Forbidden,
    InvalidRequest,
    LiveError,
    UnsupportedMediaType,
)
from sagesched.live.gateway_config import GatewayConfig
from sagesched.live.openai_body import _error_body, _loads, chat_to_response, responses_to_chat, validate_body
from sagesched.live.prometheus import CONTENT_TYPE_LATEST, GatewayMetrics
from sagesched.live.requests import request_from_body

if TYPE_CHECKING:
    from sagesched.live.executor import LiveExecutor

log = logging.getLogger(__name__)


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


_SUMMARY_TTL_S = 2.0
"""How long /admin/metrics reuses its latency summary (it is recomputed in a thread after that)."""


class GatewayRoutes(ABC):
    """The non-hot-path routes of `sagesched.live.gateway.Gateway` (which inherits them)."""

    config: GatewayConfig
    metrics: GatewayMetrics
    _executor: LiveExecutor | None
    _api_keys: set[bytes]
    _admin_key: bytes | None
    counters: Any
    draining: bool
    inflight: int
    started_at: float
    policy_name: str
    policy_config: dict[str, Any]
    _records_seen: int
    _summary_cache: tuple[float, dict[str, Any] | None, int]
    _summary_lock: asyncio.Lock

    @property
    @abstractmethod
    def executor(self) -> LiveExecutor:
        """Provided by `Gateway`."""

    @abstractmethod
    def _authorized(self, scope: Scope, keys: set[bytes] | None) -> bool:
        """Provided by `Gateway`."""

    @abstractmethod
    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """Provided by `Gateway`."""

    @abstractmethod
    def _request_id(self, given: str | None) -> str:
        """Provided by `Gateway`."""

    @abstractmethod
    def _now(self) -> float:
        """Provided by `Gateway`."""

    def _collect(self) -> dict[str, Any]:
        snapshot = self.executor.snapshot() if self._executor is not None else {}
        executor = self._executor
        if executor is None:
            return {}
        total = executor.records_total
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
        policy = self._executor.policy if self._executor is not None else None
        if policy is not None:
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
        records = executor.records if executor is not None else None
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


def _error_response(exc: LiveError) -> Response:
    return Response(_error_body(exc), status_code=exc.status, headers=exc.headers(), media_type="application/json")
