"""Carrying out placements: one backend call per LLM request, one per embedding group.

An LLM answer is relayed as it comes (a stream's chunks pass through as they arrive, with TTFT and
tokens counted); an embedding group is ONE logical call whose inputs go out in chunks of the
backend's `max_client_batch_size` and whose vectors are split back to each caller in order.
`Dispatcher` is a mixin of `LiveExecutor`; the outcome methods it calls (`_complete`, `_fail`,
`_requeue`, `_mark_unhealthy`) live there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from typing import Any

from sagesched.live.backend_state import BackendState, PendingRequest
from sagesched.live.backends import SSEStream
from sagesched.live.errors import (
    BackendUnavailable,
    LiveError,
    UpstreamError,
    UpstreamTimeout,
)
from sagesched.live.executor_config import ExecutorConfig, LiveResponse
from sagesched.live.requests import backend_body, embedding_inputs
from sagesched.live.vectors import encode_base64

logger = logging.getLogger(__name__)

LLM_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# Embedding body fields that do not split a merged batch (they are per caller or rewritten).
_PER_CALLER_EMBEDDING_FIELDS = frozenset({"input", "encoding_format", "user", "model"})


def _has_content(chunk: Mapping[str, Any]) -> bool:
    """A chunk carries generated content: non-empty delta content / reasoning / tool call, or text."""
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (
            delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")
        ):
            return True
    return False


class Dispatcher(ABC):
    """The dispatch half of `LiveExecutor` (see the module docstring)."""

    config: ExecutorConfig

    @abstractmethod
    def now(self) -> float:
        """Provided by `LiveExecutor`."""

    @abstractmethod
    def _complete(self, p: PendingRequest, response: LiveResponse | None) -> None:
        """Provided by `LiveExecutor`."""

    @abstractmethod
    def _fail(self, p: PendingRequest, error: LiveError) -> None:
        """Provided by `LiveExecutor`."""

    @abstractmethod
    def _requeue(self, backend: BackendState, members: list[PendingRequest], exc: LiveError) -> None:
        """Provided by `LiveExecutor`."""

    @abstractmethod
    def _mark_unhealthy(self, backend: BackendState, exc: LiveError) -> None:
        """Provided by `LiveExecutor`."""

    @abstractmethod
    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        """Provided by `LiveExecutor`."""

    # -- dispatch: LLM ---------------------------------------------------------------------------------
    async def _run_llm(self, backend: BackendState, p: PendingRequest) -> None:
        attempt, progress = p.dispatched(), p.progress
        body = backend_body(p.body)
        body["model"] = p.request.model
        path = LLM_PATHS[p.call.endpoint]
        try:
            if not p.call.stream:
                data, raw = await backend.client.post_json_raw(path, body)
                if not isinstance(data, dict):
                    raise UpstreamError(f"backend {backend.id} answered with {type(data).__name__}, not an object")
                usage = data.get("usage") or {}
                tokens = usage.get("completion_tokens")
                if isinstance(tokens, int):
                    progress.tokens_seen = tokens
                progress.first_token = True
                p.record.first_token_s = self._first_token_from_timings(data)
                self._complete(p, LiveResponse(p.request.id, backend.id, json=data, raw=raw))
                return
            options = dict(body.get("stream_options") or {})
            want_usage = bool(options.get("include_usage"))
            body["stream_options"] = {**options, "include_usage": True}
            sse = await backend.client.open_stream(path, body)
            attempt.sse = sse
            first = await sse.next_event()
            if p.done:
                await sse.aclose()
                return
            response = LiveResponse(p.request.id, backend.id, stream=self._relay(backend, p, sse, first, want_usage))
            if not p.future.done():
                p.future.set_result(response)
        except asyncio.CancelledError:
            if attempt.sse is not None:
                with contextlib.suppress(Exception):
                    await attempt.sse.aclose()
            raise
        except BackendUnavailable as exc:
            if attempt.sse is not None:
                with contextlib.suppress(Exception):
                    await attempt.sse.aclose()
                attempt.sse = None
            self._requeue(backend, [p], exc)
        except LiveError as exc:
            if attempt.sse is not None:
                with contextlib.suppress(Exception):
                    await attempt.sse.aclose()
            self._fail(p, exc)
        except Exception as exc:
            logger.exception("dispatch of %s to %s failed", p.request.id, backend.id)
            self._fail(p, UpstreamError(f"backend {backend.id}: {type(exc).__name__}: {exc}"))

    def _first_token_from_timings(self, data: Mapping[str, Any]) -> float | None:
        """First-token time of a non-streamed answer, where the server reports its decode time.

        llama-server's ``timings.predicted_ms`` is the time spent generating after the prompt, so
        the first token came that long before now. Other servers do not say: TTFT stays unknown
        (None) rather than being reported as the end-to-end time.
        """
        timings = data.get("timings")
        if isinstance(timings, dict) and isinstance(timings.get("predicted_ms"), (int, float)):
            n = timings.get("predicted_n")
            per_token = timings["predicted_ms"] / n if isinstance(n, (int, float)) and n > 0 else 0.0
            return max(0.0, self.now() - max(0.0, timings["predicted_ms"] - per_token) / 1000.0)
        return None

    async def _relay(
        self, backend: BackendState, p: PendingRequest, sse: SSEStream, first: dict[str, Any] | None, want_usage: bool
    ) -> AsyncIterator[dict[str, Any]]:
        """Pass the backend's chunks through as they arrive, measuring TTFT and counting tokens."""
        progress = p.progress
        event = first
        try:
            while event is not None:
                if p.done:
                    raise p.error or UpstreamTimeout("the request ended")
                usage = event.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    progress.tokens_seen = max(progress.tokens_seen, usage["completion_tokens"])
                    p.record.output_tokens = progress.tokens_seen
                if _has_content(event):
                    if not progress.first_token:
                        progress.first_token = True
                        p.record.first_token_s = self.now()
                    if not isinstance(usage, dict):
                        progress.tokens_seen += 1
                backend.refresh(p)
                if want_usage or not usage:
                    yield event
                elif event.get("choices"):
                    yield {k: v for k, v in event.items() if k != "usage"}
                try:
                    event = await sse.next_event()
                except LiveError as exc:
                    if p.done:
                        raise (p.error or exc) from None
                    if isinstance(exc, UpstreamTimeout):
                        raise
                    if exc.code == "stream_broken":
                        self._mark_unhealthy(backend, exc)
                    raise UpstreamError(
                        f"backend {backend.id} failed after the stream started (not retried): {exc.message}",
                        status=exc.status,
                        code=exc.code,
                    ) from exc
                except Exception as exc:
                    if p.done:
                        raise (p.error or UpstreamTimeout("the request ended")) from None
                    raise UpstreamError(f"backend {backend.id} stream failed: {type(exc).__name__}: {exc}") from exc
            if p.done:
                raise p.error or UpstreamTimeout("the request ended")
            self._complete(p, None)
        except LiveError as exc:
            self._fail(p, exc)
            raise
        except (GeneratorExit, asyncio.CancelledError):
            self._fail(p, LiveError("the caller closed the stream", status=499, code="cancelled"))
            raise
        finally:
            with contextlib.suppress(Exception):
                await sse.aclose()

    # -- dispatch: embeddings --------------------------------------------------------------------------
    async def _run_embedding(self, backend: BackendState, group: list[PendingRequest]) -> None:
        """ONE backend call for the whole group; vectors split back to each caller in order."""
        inputs: list[Any] = []
        counts: list[int] = []
        for p in group:
            items = embedding_inputs(p.body.get("input"))
            inputs.extend(items)
            counts.append(len(items))
        extra = {k: v for k, v in group[0].body.items() if k not in _PER_CALLER_EMBEDDING_FIELDS}
        try:
            vectors, usage_tokens = await self._embed_chunked(backend, group[0].request.model, inputs, extra)
        except BackendUnavailable as exc:
            self._requeue(backend, [p for p in group if not p.done], exc)
            return
        except UpstreamError as exc:
            live = [p for p in group if not p.done]
            if len(live) > 1 and 400 <= exc.status < 500:
                # One caller's input may be at fault: serve the callers one by one so only it fails.
                # Each caller gets its own task, so failing one cancels only its own call (the
                # group's task is this one; cancelling it would strand the others).
                solos = []
                for p in live:
                    attempt = p.dispatched()
                    attempt.group = [p]
                    attempt.task = self._spawn(self._run_embedding(backend, [p]), p.request.id)
                    solos.append(attempt.task)
                await asyncio.gather(*solos, return_exceptions=True)
                return
            for p in live:
                self._fail(p, exc)
            return
        except LiveError as exc:
            for p in group:
                self._fail(p, exc)
            return
        except Exception as exc:
            logger.exception("embedding batch to %s failed", backend.id)
            for p in group:
                self._fail(p, UpstreamError(f"backend {backend.id}: {type(exc).__name__}: {exc}"))
            return
        total_est = sum(p.request.embedding_tokens for p in group) or 1
        offset = 0
        for p, count in zip(group, counts, strict=True):
            mine = vectors[offset : offset + count]
            offset += count
            if p.done:
                continue
            want_b64 = p.body.get("encoding_format") == "base64"
            tokens = (
                round(usage_tokens * p.request.embedding_tokens / total_est)
                if usage_tokens is not None
                else p.request.embedding_tokens
            )
            payload = {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": encode_base64(vec) if want_b64 else vec}
                    for i, vec in enumerate(mine)
                ],
                "model": p.request.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            p.progress.first_token = True
            p.record.first_token_s = self.now()
            self._complete(p, LiveResponse(p.request.id, backend.id, json=payload))

    @staticmethod
    async def _embed_chunked(
        backend: BackendState, model: str, inputs: list[Any], extra: dict[str, Any]
    ) -> tuple[list[list[float]], int | None]:
        """Embed `inputs` in as few backend calls as its `max_client_batch_size` allows, in order.

        A caller may send far more inputs than one backend call takes (LangChain chunks 1,000,
        TEI takes 32): the chunks go out concurrently and the vectors come back in input order.
        """
        size = max(1, backend.config.max_client_batch_size)
        if len(inputs) <= size:
            return await backend.client.embed(model, inputs, extra)
        parts = await asyncio.gather(
            *(backend.client.embed(model, inputs[i : i + size], extra) for i in range(0, len(inputs), size))
        )
        vectors = [vec for part, _ in parts for vec in part]
        counts = [tokens for _, tokens in parts]
        return vectors, (sum(c for c in counts if c is not None) if all(c is not None for c in counts) else None)


__all__ = ["LLM_PATHS", "Dispatcher"]
