"""One async HTTP adapter per backend: OpenAI routes, TEI's /embed, health and /metrics scraping.

The executor talks to vLLM, TEI, llama.cpp's llama-server and any OpenAI-compatible server through
`BackendClient`. Each holds one `transport.ConnectionPool` (keep-alive connections, bounded pool,
connect/read timeouts; a lean HTTP/1.1 client, since every gateway request pays its cost) and maps
transport failures onto the live errors: a failure before the backend sent any byte is
`BackendUnavailable` (safe to retry elsewhere; a 503 is `BackendOverloaded`), an HTTP error status
keeps its status, and a stream that breaks later is an `UpstreamError`.

Also here: `BackendConfig` (one backend as the executor sees it) and `SSEStream` (the event reader
of streamed answers). Reading load gauges from ``/metrics`` pages is `backend_metrics`; checking and
encoding embedding vectors is `vectors`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httpx

from sagesched.core import InstanceKind
from sagesched.live.backend_metrics import BackendMetrics, metrics_from_text
from sagesched.live.errors import (
    BackendOverloaded,
    BackendUnavailable,
    LiveError,
    UpstreamError,
    UpstreamTimeout,
    error_from_response,
)
from sagesched.live.transport import (
    ConnectFailed,
    ConnectionPool,
    ReadTimeout,
    Response,
    TransportError,
)
from sagesched.live.vectors import checked_vector, openai_vectors

logger = logging.getLogger(__name__)

APIS = ("openai", "tei")


@dataclass(frozen=True)
class BackendConfig:
    """One backend server the executor may dispatch to.

    url: base URL, e.g. ``http://127.0.0.1:8001`` (a trailing ``/v1`` is accepted and removed).
    kind: ``llm``, ``embedding`` or ``llm_embedding``: which request types it may receive.
    models: model names it serves; requests for other models never go to it.
    id: stable name for records, metrics and policies (default: ``host:port`` of the URL).
    api_key: bearer token sent to the backend, if it needs one.
    max_inflight: requests the executor lets be outstanding at it (the policy sees free slots).
    api: ``openai`` (OpenAI routes, ``/v1/embeddings``) or ``tei`` (TEI's native ``/embed``).
    max_num_seqs: sequences the engine runs concurrently (llama-server's ``-np``, vLLM's
        ``--max-num-seqs``); policies use it to predict queueing inside the backend.
    max_batch_tokens: token budget of one engine step / embedding batch.
    max_client_batch_size: most embedding inputs one backend call may carry (TEI's limit is 32).
    max_concurrent_inputs: embedding inputs the backend admits at once (TEI's
        ``--max-concurrent-requests``, 512 by default; beyond it TEI answers 429); 0 = no cap.
        Policies keep a backend's in-flight inputs within it.
    prefill_tokens_per_s, decode_step_s, embedding_tokens_per_s: initial throughput estimates;
        the executor refines them from observed latencies.
    scrape_metrics: scrape ``/metrics`` for load gauges (servers without it are detected and
        skipped after the first 404).
    """

    url: str
    kind: InstanceKind | str
    models: tuple[str, ...] | list[str] | str
    id: str | None = None
    api_key: str | None = None
    max_inflight: int = 64
    api: str = "openai"
    max_num_seqs: int = 256
    max_batch_tokens: int = 2048
    max_client_batch_size: int = 32
    max_concurrent_inputs: int = 0
    prefill_tokens_per_s: float = 10_000.0
    decode_step_s: float = 0.02
    embedding_tokens_per_s: float = 50_000.0
    scrape_metrics: bool = True

    # Typed views of the fields __post_init__ normalises (a str kind becomes an InstanceKind, a
    # missing id becomes host:port, models a tuple), so callers need no casts.
    @property
    def instance_kind(self) -> InstanceKind:
        return cast(InstanceKind, self.kind)

    @property
    def backend_id(self) -> str:
        return cast(str, self.id)

    @property
    def model_names(self) -> tuple[str, ...]:
        return cast(tuple[str, ...], self.models)

    def __post_init__(self) -> None:
        url = str(self.url).strip().rstrip("/")
        if url.endswith("/v1"):
            url = url[: -len("/v1")]
        parts = urlsplit(url)
        if problem := base_url_problem(url):
            raise ValueError(f"backend url: {problem}; it must look like http://127.0.0.1:8001")
        object.__setattr__(self, "url", url)
        object.__setattr__(self, "kind", InstanceKind.parse(self.kind))
        models = (self.models,) if isinstance(self.models, str) else tuple(str(m) for m in self.models)
        if not models or not all(m.strip() for m in models):
            raise ValueError(f"backend {url}: 'models' must list at least one model name")
        object.__setattr__(self, "models", models)
        if self.api not in APIS:
            raise ValueError(f"backend {url}: unknown api {self.api!r}; use one of {', '.join(APIS)}")
        if self.id is None:
            object.__setattr__(self, "id", f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}")
        for name in ("max_inflight", "max_num_seqs", "max_batch_tokens", "max_client_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"backend {self.id}: {name} must be a positive integer, got {value!r}")
        cap = self.max_concurrent_inputs
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
            raise ValueError(
                f"backend {self.id}: max_concurrent_inputs must be an integer >= 0 (0 = no cap), got {cap!r}"
            )
        for name in ("prefill_tokens_per_s", "decode_step_s", "embedding_tokens_per_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"backend {self.id}: {name} must be a positive number, got {value!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackendConfig:
        """Build from a mapping through the typed config layer: unknown keys and wrong types named."""
        from sagesched.typed_config import from_mapping

        return from_mapping(cls, data, "backend")


# -- server-sent events ------------------------------------------------------------------------------


class SSEStream:
    """Reads OpenAI-style server-sent events (``data: {json}`` ... ``data: [DONE]``) from a response.

    `response` is a streamed `httpx.Response` (the user-facing client) or a `transport.Response`
    (the executor's backend calls); both offer ``aiter_lines()`` and ``aclose()``.
    `next_event()` returns the next JSON chunk, or None at the end. Errors sent inside the stream
    (an ``error`` object, or llama-server's ``error:`` lines) raise `UpstreamError`; a broken
    connection raises `BackendUnavailable` if no event was read yet, else `UpstreamError`; so does
    a body that ends after events but with neither ``[DONE]`` nor a ``finish_reason`` (cut short).
    """

    def __init__(self, response: httpx.Response | Response, backend_id: str = "") -> None:
        self.response = response
        self.backend_id = backend_id
        self.events_read = 0
        self._lines: AsyncIterator[str] = response.aiter_lines()
        self._done = False
        self._junk = ""  # start of the lines that were not SSE fields (for the error message)
        self._finished = False  # an event carried a finish_reason (the answer is complete without [DONE])

    async def next_event(self) -> dict[str, Any] | None:
        if self._done:
            return None
        data: list[str] = []
        while True:
            try:
                line = await self._lines.__anext__()
            except StopAsyncIteration:
                self._done = True
                event = self._decode("\n".join(data)) if data else None
                if self.events_read == 0:
                    # No event and no [DONE]: plain JSON, garbage or an empty body is not a stream.
                    raise UpstreamError(
                        f"backend {self.backend_id} ended the stream without sending one event "
                        f"(ignored lines: {self._junk[:200]!r})"
                    ) from None
                if not self._finished:
                    # Neither [DONE] nor a finish_reason: the body ended mid-answer (a close-delimited
                    # stream whose server died looks exactly like this), not a complete answer.
                    raise UpstreamError(
                        f"backend {self.backend_id} ended the stream after {self.events_read} events "
                        "without [DONE] or a finish_reason (the answer is cut short)",
                        code="stream_broken",
                    ) from None
                return event
            except (httpx.TimeoutException, ReadTimeout) as exc:
                raise UpstreamTimeout(f"backend {self.backend_id} stalled mid-stream: {exc!r}") from exc
            except (httpx.TransportError, httpx.StreamError, TransportError) as exc:
                message = f"backend {self.backend_id} broke the stream: {type(exc).__name__}: {exc}"
                if self.events_read == 0:
                    raise BackendUnavailable(message) from exc
                raise UpstreamError(message, code="stream_broken") from exc
            if not line.strip():
                if data:
                    return self._decode("\n".join(data))
                continue
            if line.startswith(":"):
                continue
            field_, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field_ == "data":
                if value.strip() == "[DONE]":
                    self._done = True
                    return None
                data.append(value)
            elif field_ == "error":
                self._done = True
                raise self._error(value)
            elif field_ not in ("event", "id", "retry") and len(self._junk) < 200:
                self._junk += line[:200]

    def _decode(self, payload: str) -> dict[str, Any]:
        try:
            event = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise UpstreamError(f"backend {self.backend_id} sent a malformed stream event: {payload[:200]!r}") from exc
        if not isinstance(event, dict):
            raise UpstreamError(f"backend {self.backend_id} sent a non-object stream event: {payload[:200]!r}")
        if "error" in event and "choices" not in event:
            self._done = True
            raise self._error(payload)
        self.events_read += 1
        choices = event.get("choices")
        if not self._finished and isinstance(choices, list):
            self._finished = any(isinstance(c, dict) and c.get("finish_reason") for c in choices)
        return event

    def _error(self, payload: str) -> LiveError:
        try:
            body: Any = json.loads(payload)
        except json.JSONDecodeError:
            body = payload
        err = body.get("error", body) if isinstance(body, dict) else body
        code = err.get("code") if isinstance(err, dict) else None
        status = code if isinstance(code, int) and not isinstance(code, bool) else 502
        # `error_from_response` keeps only an HTTP error status (a stream's `code: 101` or 999 is 502).
        error = error_from_response(status, body)
        if not isinstance(error, UpstreamError) or error.status in (401, 403):
            upstream = UpstreamError(
                f"backend {self.backend_id}: {error.message}",
                status=502 if error.status in (401, 403) else error.status,
                code=error.code,
                param=error.param,
            )
            upstream.retry_after_s = error.retry_after_s
            error = upstream
        return error

    async def aclose(self) -> None:
        self._done = True
        await self.response.aclose()


# -- the adapter --------------------------------------------------------------------------------------


def base_url_problem(url: str) -> str | None:
    """Why `url` is not a server's base URL (``http(s)://HOST[:PORT][/v1]``, port 1-65535, no query or
    fragment), or None. The gateway config, the replay's endpoint and `calibrate llamacpp` check with it,
    each adding its own example of the fix."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) URL"
    try:
        port = parts.port
    except ValueError:  # ':99999', ':abc'
        port = 0
    if port == 0 or any(c.isspace() for c in parts.hostname):
        return f"{url!r} has no valid host:port (port 1-65535)"
    if parts.query or parts.fragment:
        return f"{url!r}: a server's base URL, without ?query or #fragment"
    return None


_JSON_HEADERS = {"Content-Type": "application/json"}
_SSE_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # built once, not per call


def _encode(body: Mapping[str, Any]) -> bytes:
    return _ENCODER.encode(body).encode("utf-8")


class BackendClient:
    """The HTTP side of one backend: pooled connections, timeouts, error mapping.

    `connect_timeout_s` bounds connection setup (a dead backend is found fast); `read_timeout_s`
    bounds each wait for the backend's next bytes (the executor enforces the per-request deadline
    on top). The pool holds `max_inflight` connections plus a few for health and metrics probes.
    """

    def __init__(
        self,
        config: BackendConfig,
        *,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 600.0,
        probe_timeout_s: float = 2.0,
    ) -> None:
        self.config = config
        self.probe_timeout_s = probe_timeout_s
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._pool = ConnectionPool(
            config.url,
            max_connections=config.max_inflight + 4,  # in-flight requests plus health and metrics probes
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            headers=headers,
        )
        self._health_path = "/health"
        self._metrics_enabled = config.scrape_metrics

    @property
    def id(self) -> str:
        return str(self.config.id)

    async def aclose(self) -> None:
        await self._pool.aclose()

    # -- requests -----------------------------------------------------------------------------------
    def _transport_error(self, exc: TransportError) -> LiveError:
        if isinstance(exc, ConnectFailed):
            return BackendUnavailable(f"backend {self.id} unreachable: {type(exc).__name__}: {exc}")
        if isinstance(exc, ReadTimeout):
            return UpstreamTimeout(f"backend {self.id} timed out: {type(exc).__name__}")
        # ConnectionDropped / ProtocolError before any response byte reached the caller: as safe
        # to retry as a refused connection.
        return BackendUnavailable(f"backend {self.id} dropped the connection: {type(exc).__name__}: {exc}")

    async def _error_from(self, response: Response) -> LiveError:
        raw = await response.read()
        try:
            body: Any = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = raw.decode(errors="replace")
        error = error_from_response(response.status, body, response.headers)
        if response.status == 503:
            # Loading, overloaded or draining: nothing was served, another backend may serve it.
            return BackendOverloaded(
                f"backend {self.id} answered 503: {error.message}", retry_after_s=error.retry_after_s
            )
        if response.status in (401, 403):
            # The backend refused the GATEWAY's credentials; the caller's key was fine. Passing the
            # status through would tell the caller their key is wrong.
            return UpstreamError(
                f"backend {self.id} refused the gateway's credentials (HTTP {response.status}: {error.message}); "
                "the operator must fix the backend's api_key in the gateway config",
                status=502,
                code="backend_auth_failed",
            )
        if not isinstance(error, UpstreamError):
            upstream = UpstreamError(
                f"backend {self.id}: {error.message}", status=error.status, code=error.code, param=error.param
            )
            upstream.retry_after_s = error.retry_after_s
            error = upstream
        return error

    async def post_json(self, path: str, body: Mapping[str, Any]) -> Any:
        """POST `body` and return the decoded JSON answer; errors as described in the class."""
        return (await self.post_json_raw(path, body))[0]

    async def post_json_raw(self, path: str, body: Mapping[str, Any]) -> tuple[Any, bytes]:
        """Like `post_json`, also returning the body's bytes as received (for relaying them as-is)."""
        try:
            response = await self._pool.request("POST", path, _encode(body), headers=_JSON_HEADERS)
            if response.status >= 400:
                raise await self._error_from(response)
            raw = await response.read()
        except TransportError as exc:
            raise self._transport_error(exc) from exc
        try:
            return json.loads(raw), raw
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UpstreamError(f"backend {self.id} sent invalid JSON: {raw[:200]!r}") from exc

    async def open_stream(self, path: str, body: Mapping[str, Any]) -> SSEStream:
        """POST a streaming request; returns the event reader once the response status is in."""
        try:
            response = await self._pool.request("POST", path, _encode(body), headers=_SSE_HEADERS)
            if response.status >= 400:
                try:
                    raise await self._error_from(response)
                finally:
                    await response.aclose()
            ctype = next((v for k, v in response.headers.items() if k.lower() == "content-type"), "")
            if ctype and "text/event-stream" not in ctype.lower():
                raw = await response.read()
                raise UpstreamError(
                    f"backend {self.id} answered a stream=true request with {ctype!r}, not an event stream: "
                    f"{raw[:200]!r}"
                )
        except TransportError as exc:
            raise self._transport_error(exc) from exc
        return SSEStream(response, self.id)

    async def embed(
        self, model: str, inputs: Sequence[str | list[int]], extra: Mapping[str, Any] | None = None
    ) -> tuple[list[list[float]], int | None]:
        """Embed `inputs` in ONE call; returns (vectors in input order, prompt tokens if reported).

        OpenAI API: ``/v1/embeddings`` asking for floats (callers wanting base64 are encoded by the
        executor, per caller). TEI API: the native ``/embed`` route. `extra` carries further body
        fields (``dimensions``, ``truncate``, ...), passed through.
        """
        extra = dict(extra or {})
        if self.config.api == "tei":
            body: dict[str, Any] = {"inputs": list(inputs), **extra}
            data = await self.post_json("/embed", body)
            if not isinstance(data, list) or len(data) != len(inputs):
                raise UpstreamError(
                    f"backend {self.id}: /embed returned {type(data).__name__}, not {len(inputs)} vectors"
                )
            return [checked_vector(vec, f"backend {self.id}") for vec in data], None
        body = {**extra, "model": model, "input": list(inputs), "encoding_format": "float"}
        data = await self.post_json("/v1/embeddings", body)
        vectors = openai_vectors(data, len(inputs), f"backend {self.id}")
        usage = data.get("usage") or {}
        tokens = usage.get("prompt_tokens")
        return vectors, int(tokens) if isinstance(tokens, (int, float)) else None

    # -- probes ---------------------------------------------------------------------------------------
    async def _get(self, path: str) -> tuple[int, bytes]:
        # The whole probe within probe_timeout_s: the read timeout bounds only each wait for bytes,
        # and a server trickling its answer would hold start-up and every backend's health probes.
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                response = await self._pool.request("GET", path, timeout=self.probe_timeout_s)
                return response.status, await response.read()
        except TimeoutError:
            raise ReadTimeout(f"GET {path} did not complete within {self.probe_timeout_s:g}s") from None

    async def health(self) -> bool:
        """True when the server answers its health route with 2xx (``/v1/models`` where there is none)."""
        try:
            status, _ = await self._get(self._health_path)
            if status in (404, 405) and self._health_path == "/health":
                self._health_path = "/v1/models"
                status, _ = await self._get(self._health_path)
        except TransportError as exc:
            logger.debug("health probe of %s failed: %r", self.id, exc)
            return False
        return 200 <= status < 300

    async def scrape(self) -> BackendMetrics | None:
        """Load gauges from ``/metrics``, or None (no metrics route, or the scrape failed)."""
        if not self._metrics_enabled:
            return None
        try:
            status, raw = await self._get("/metrics")
        except TransportError as exc:
            logger.debug("metrics scrape of %s failed: %r", self.id, exc)
            return None
        if status in (404, 405, 501):
            logger.info("backend %s has no /metrics (HTTP %s); using in-flight accounting only", self.id, status)
            self._metrics_enabled = False
            return None
        if status != 200:
            return None
        return metrics_from_text(raw.decode("utf-8", "replace"))


__all__ = [
    "APIS",
    "BackendClient",
    "BackendConfig",
    "SSEStream",
    "base_url_problem",
]
