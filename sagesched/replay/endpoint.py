"""The third mode: send the workload to one external endpoint, no policy of ours in between.

Whatever serves at the URL (our gateway started elsewhere, LiteLLM, a bare vLLM or llama-server)
gets the same bodies the policy mode sends, plus the gateway's scheduling headers
(`X-Request-Priority`, `X-SLO-*-Ms`, `X-Tenant`, `X-Workload-Class`, `X-Request-Id`), which a
server that does not know them ignores. Timing is this client's: TTFT at the first streamed chunk
that carries content (an empty role-only first chunk does not count), end-to-end at the last byte.
Each request ends in one `RequestRecord`: completed, rejected (HTTP 429, or a refusal code of our
gateway) or failed (any other error, with the status and message as its reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from typing import Any

from sagesched.core import Outcome, Request, RequestRecord

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}
REJECT_CODES = frozenset({"queue_full", "too_large", "no_compatible_instance", "slo_unattainable", "rejected"})


def scheduling_headers(request: Request) -> dict[str, str]:
    """The gateway's headers for a request's id, priority, SLOs, tenant and class (docs/gateway.md)."""
    headers = {"X-Request-Id": request.id, "X-Request-Priority": str(int(request.priority)), "X-Tenant": request.tenant}
    slo = request.slo
    for name, value in (
        ("X-SLO-TTFT-Ms", slo.ttft_ms),
        ("X-SLO-TPOT-Ms", slo.tpot_ms),
        ("X-SLO-Deadline-Ms", slo.e2e_ms),
    ):
        if value is not None:
            headers[name] = f"{value:g}"
    cls = request.tags.get("class")
    if cls:
        headers["X-Workload-Class"] = cls
    return headers


def has_content(chunk: Mapping[str, Any]) -> bool:
    """A streamed chunk that carries generated text (role-only and usage-only chunks do not)."""
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict):
            if choice.get("text"):
                return True
            delta = choice.get("delta")
            if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")):
                return True
    return False


def _error_reason(status: int, text: str) -> tuple[str, str]:
    """(outcome, reason) for an HTTP error answer."""
    code, message = f"http_{status}", text[:300]
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            code = str(err.get("code") or code)
            message = str(err.get("message") or message)
    except (ValueError, AttributeError):
        pass
    rejected = status == 429 or code in REJECT_CODES
    return (Outcome.REJECTED.value if rejected else Outcome.FAILED.value), f"{code}: {message}"


class EndpointClient:
    """Sends replayed requests to `url` and measures them on `clock` (seconds, the replay's clock).

    Uses the executor's own lean HTTP/1.1 client (`sagesched.live.transport`) and SSE reader:
    httpx's per-chunk cost made the generator's own event loop the bottleneck at 50 req/s of
    streamed answers (benchmarks/replay_lateness.py).
    """

    def __init__(self, url: str, *, timeout_s: float, max_connections: int = 4096, api_key: str | None = None) -> None:
        from sagesched.live.transport import ConnectionPool

        self.url = url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.pool = ConnectionPool(
            self.url, max_connections=max_connections, connect_timeout_s=10.0, read_timeout_s=timeout_s, headers=headers
        )
        self.timeout_s = timeout_s
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def send(
        self, request: Request, body: dict[str, Any], endpoint: str, record: RequestRecord
    ) -> dict[str, Any]:
        """Send one request, fill `record` (dispatch, first token, finish, outcome); return its usage.

        Unfinished `timeout_s` after its arrival (`request.arrival_s` on `now`), it fails with
        `upstream_timeout`, as the executor's requests do: a server that trickles bytes forever
        never trips the per-read timeout alone.
        """
        timeout = asyncio.timeout(max(0.0, request.arrival_s + self.timeout_s - self.now()))
        try:
            async with timeout:
                return await self._send(request, body, endpoint, record)
        except TimeoutError:
            if not timeout.expired():
                raise
            record.outcome = Outcome.FAILED.value
            record.reason = (
                f"upstream_timeout: did not finish within {self.timeout_s:g}s of its arrival (driver.request_timeout_s)"
            )
            return {}

    async def _send(
        self, request: Request, body: dict[str, Any], endpoint: str, record: RequestRecord
    ) -> dict[str, Any]:
        from sagesched.live.backends import SSEStream
        from sagesched.live.errors import LiveError
        from sagesched.live.transport import TransportError

        record.dispatch_s = self.now()
        record.instance_id = "endpoint"
        record.outcome, record.reason = Outcome.FAILED.value, "no_answer: the request ended without one"
        usage: dict[str, Any] = {}
        stream = bool(body.get("stream"))
        headers = {"Content-Type": "application/json", **scheduling_headers(request)}
        if stream:
            headers["Accept"] = "text/event-stream"
        response = None
        try:
            response = await self.pool.request("POST", PATHS[endpoint], json.dumps(body).encode(), headers=headers)
            if response.status != 200:
                text = (await response.read()).decode("utf-8", "replace")
                record.outcome, record.reason = _error_reason(response.status, text)
                return usage
            if stream:
                sse = SSEStream(response, "endpoint")
                chunks = 0
                while (event := await sse.next_event()) is not None:
                    if isinstance(event.get("usage"), dict):
                        usage = event["usage"]
                    if has_content(event):
                        chunks += 1
                        if record.first_token_s is None:
                            record.first_token_s = self.now()
                record.output_tokens = int(usage.get("completion_tokens", chunks))
            else:
                data = json.loads(await response.read())
                usage = data.get("usage") or {}
                record.output_tokens = int(usage.get("completion_tokens", 0)) if endpoint != "embeddings" else 0
                if endpoint == "embeddings":
                    record.first_token_s = self.now()
            record.outcome, record.reason = Outcome.COMPLETED.value, ""
            return usage
        except asyncio.CancelledError:
            record.outcome = Outcome.FAILED.value
            record.reason = "interrupted: the replay stopped before the answer ended"
            raise
        except LiveError as exc:
            record.outcome = Outcome.FAILED.value
            record.reason = f"{exc.code}: {exc.message}"
            return usage
        except (TransportError, OSError) as exc:
            record.outcome = Outcome.FAILED.value
            record.reason = f"transport: {type(exc).__name__}: {exc}"
            return usage
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            record.outcome = Outcome.FAILED.value
            record.reason = f"bad_response: {type(exc).__name__}: {exc}"
            return usage
        finally:
            record.finish_s = self.now()
            if record.outcome != Outcome.COMPLETED.value and record.first_token_s is None:
                record.output_tokens = 0
            if response is not None:
                with contextlib.suppress(Exception):
                    await response.aclose()
