"""An OpenAI-compatible vLLM look-alike whose timing comes from the simulator's engine model.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (streaming SSE ending in
`data: [DONE]`, or one JSON body; `stream_options.include_usage` adds a usage chunk),
`POST /v1/embeddings` (a pooling pass: prefill only), `GET /v1/models`, `GET /health`,
`GET /version` and `GET /metrics` under vLLM's metric names. Output is deterministic filler text
(see `text.py`). Its length is sampled, as a model samples its end-of-sequence token: geometric
with mean `mean_output_tokens`, seeded by the prompt (and the choice index), capped by `max_tokens`
(`finish_reason="length"`) and otherwise ending with `finish_reason="stop"`; ``ignore_eos=true``
runs to `max_tokens`, as on a real server. A `stop` string that the filler happens to produce ends
the output early too. `n > 1` and a list of prompts give one choice per (prompt, n), indexed
prompt-major as OpenAI does, each its own engine request.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import random
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from sagesched.live.emulators import text as tx
from sagesched.live.emulators.http import HttpError, error_response, int_field, json_body, new_id, sse
from sagesched.live.emulators.promtext import Registry
from sagesched.live.emulators.vllm_loop import RequestHandle, VllmEngineLoop
from sagesched.sim.engines import EngineRejected
from sagesched.sim.perf_model import LLMPerfModel

logger = logging.getLogger(__name__)

# vLLM's own bucket bounds for its latency histograms (seconds).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


@dataclass(frozen=True)
class VllmEmulatorConfig:
    """What `sagesched emulate vllm` serves.

    model / hardware: performance-model keys (`sagesched.sim.perf_model.available_models()`).
    served_model_name: the name clients send in `model` (defaults to `model`).
    max_model_len: longest prompt + output accepted (vLLM returns 400 past it); None = the model's.
    time_scale: wall seconds per engine second; 0 answers at once (a zero-latency backend).
    embedding_dim: vector length returned by `/v1/embeddings`; None = the model's hidden size.
    tensor_parallel / calibration: passed to `LLMPerfModel.load`.
    legacy_metrics: also export pre-v1 metric names (`vllm:gpu_cache_usage_perc`, ...).
    default_max_tokens: completions' `max_tokens` when absent (OpenAI's default is 16).
    mean_output_tokens: mean of the sampled output length (end of sequence); 0 never samples one
        (every output runs to max_tokens, as with ignore_eos).
    """

    model: str = "llama-2-7b"
    hardware: str = "a100"
    served_model_name: str | None = None
    max_model_len: int | None = None
    time_scale: float = 1.0
    embedding_dim: int | None = None
    legacy_metrics: bool = True
    default_max_tokens: int = 16
    tensor_parallel: int = 1
    calibration: str | None = None
    mean_output_tokens: float = 200.0

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


class VllmEmulator:
    """The app's state: the engine loop, the metrics registry and the request handlers."""

    def __init__(self, config: VllmEmulatorConfig, loop: VllmEngineLoop) -> None:
        if config.max_model_len is None or config.embedding_dim is None:
            raise ValueError("resolve max_model_len and embedding_dim first (build_vllm_app does)")
        self.config = config
        self.loop = loop
        self.max_model_len: int = config.max_model_len
        self.embedding_dim: int = config.embedding_dim
        # Prompts are hashed in blocks of the size the core's prefix cache keys on.
        self.hash_block_tokens = int(loop.core.config.prefix_hash_block_tokens)
        self.started = int(time.time())
        self.metrics = Registry({"model_name": config.name, "engine": "0"})
        self._register_metrics()

    # -- metrics -----------------------------------------------------------------------------------
    def _register_metrics(self) -> None:
        m, loop = self.metrics, self.loop
        m.gauge("vllm:num_requests_running", "Requests in model execution batches.", lambda: loop.num_running)
        m.gauge("vllm:num_requests_waiting", "Requests waiting to be processed.", lambda: loop.num_waiting)
        m.gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", lambda: loop.kv_usage)
        m.counter(
            "vllm:prefix_cache_queries_total",
            "Prefix-cache queries, in tokens.",
            lambda: loop.prefix_cache_queries_tokens,
        )
        m.counter(
            "vllm:prefix_cache_hits_total", "Prefix-cache hits, in tokens.", lambda: loop.prefix_cache_hits_tokens
        )
        m.counter("vllm:num_preemptions_total", "Cumulative preemptions.", lambda: loop.preemptions)
        m.counter("vllm:prompt_tokens_total", "Prefill tokens processed.", lambda: loop.stats.prompt_tokens)
        m.counter("vllm:generation_tokens_total", "Generation tokens processed.", lambda: loop.stats.generation_tokens)
        m.counter("vllm:request_success_total", "Successfully processed requests.")
        if self.config.legacy_metrics:
            m.gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (pre-v1 name).", lambda: loop.kv_usage)
            m.counter(
                "vllm:gpu_prefix_cache_queries_total",
                "Prefix-cache queries (pre-v1 name).",
                lambda: loop.prefix_cache_queries_tokens,
            )
            m.counter(
                "vllm:gpu_prefix_cache_hits_total",
                "Prefix-cache hits (pre-v1 name).",
                lambda: loop.prefix_cache_hits_tokens,
            )
        self.ttft = m.histogram("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = m.histogram("vllm:inter_token_latency_seconds", "Inter-token latency.", ITL_BUCKETS)
        self.tpot = m.histogram("vllm:time_per_output_token_seconds", "Time per output token.", ITL_BUCKETS)
        self.e2e = m.histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS)
        m.counter("sagesched_emulator_steps_total", "Engine steps the emulator has executed.", lambda: loop.stats.steps)
        m.counter(
            "sagesched_emulator_busy_seconds_total",
            "Engine-time seconds spent in steps.",
            lambda: loop.stats.busy_engine_s,
        )
        loop.on_first_token.append(lambda h: self.ttft.observe(h.first_token_wall - h.submitted_wall))
        loop.on_tokens.append(self._observe_itl)
        loop.on_finish.append(self._observe_finish)

    def _observe_itl(self, handle: RequestHandle, count: int, wall: float) -> None:
        if handle.last_token_wall is not None and count:
            gap = (wall - handle.last_token_wall) / count
            for _ in range(count):
                self.itl.observe(gap)

    def _observe_finish(self, handle: RequestHandle, reason: str | None) -> None:
        self.e2e.observe(time.monotonic() - handle.submitted_wall)
        if reason in ("length", "stop"):
            self.metrics["vllm:request_success_total"].inc(finished_reason=reason)  # type: ignore[union-attr]

    # -- shared request plumbing -------------------------------------------------------------------
    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model", self.config.name)
        if model != self.config.name:
            raise HttpError(404, f"The model `{model}` does not exist.", param="model")

    def _limits(self, body: dict[str, Any], prompt_tokens: int, default_max: int | None) -> int:
        max_tokens = int_field(body, "max_completion_tokens", None, minimum=1)
        if max_tokens is None:
            max_tokens = int_field(body, "max_tokens", default_max, minimum=1)
        if max_tokens is None:  # chat default: whatever room the context leaves
            max_tokens = max(1, self.max_model_len - prompt_tokens)
        if prompt_tokens + max_tokens > self.max_model_len:
            raise HttpError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="max_tokens",
            )
        return max_tokens

    @staticmethod
    def _n(body: dict[str, Any]) -> int:
        n = body.get("n", 1)
        n = 1 if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128:
            raise HttpError(400, "n must be an integer between 1 and 128", param="n")
        return n

    def _output_len(self, body: dict[str, Any], seed: int, max_tokens: int) -> int | None:
        """The sampled end of sequence (None: run to max_tokens)."""
        mean = self.config.mean_output_tokens
        if body.get("ignore_eos") is True or mean <= 0:
            return None
        rng = random.Random(seed)
        # Geometric on 1, 2, ...: P(stop after each token) = 1 / mean.
        p = min(1.0, 1.0 / mean)
        u = rng.random()
        length = 1 if p >= 1.0 else 1 + int(math.log(1.0 - u) / math.log(1.0 - p))
        return length if length < max_tokens else None

    @staticmethod
    def _stops(body: dict[str, Any]) -> set[str]:
        stop = body.get("stop")
        if stop is None:
            return set()
        values = [stop] if isinstance(stop, str) else list(stop)
        return {s.strip() for s in values if isinstance(s, str) and s.strip()}

    async def _tokens(self, handle: RequestHandle, seed: int, stops: set[str]) -> AsyncIterator[tuple[str, str | None]]:
        """Yield (text, finish_reason) per engine delivery; aborts the request if the caller leaves."""
        index = 0
        try:
            while True:
                event = await handle.queue.get()
                pieces: list[str] = []
                reason = event.finish_reason
                for _ in range(event.count):
                    word = tx.token_text(seed, index)
                    index += 1
                    if word.strip() in stops:
                        reason = "stop"
                        break
                    pieces.append(word)
                if reason == "stop":
                    self.loop.abort(handle.id)
                    self.metrics["vllm:request_success_total"].inc(finished_reason="stop")  # type: ignore[union-attr]
                    yield "".join(pieces), "stop"
                    return
                if event.finished and reason == "abort":
                    raise HttpError(503, "the engine stopped before the request finished")
                yield "".join(pieces), reason if event.finished else None
                if event.finished:
                    return
        finally:
            if not handle.done:
                self.loop.abort(handle.id)

    def _submit(
        self, body: dict[str, Any], prompt: Any, prompt_tokens: int, max_tokens: int, output_tokens: int | None = None
    ) -> RequestHandle:
        priority = body.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise HttpError(400, "priority must be an integer (smaller is served first)", param="priority")
        try:
            return self.loop.submit(
                new_id("req"),
                prompt_tokens,
                max_tokens,
                prefix_hashes=tx.prefix_hashes(prompt, self.hash_block_tokens),
                priority=priority,
                output_tokens=output_tokens,
            )
        except EngineRejected as exc:
            raise HttpError(exc.status, exc.reason) from None

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    # -- routes ------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        body = await json_body(request)
        self._check_model(body)
        if "prompt" not in body:
            raise HttpError(400, "prompt is required", param="prompt")
        raw = body["prompt"]
        # A list of prompts (strings, or token arrays) gives one choice set per prompt.
        many = isinstance(raw, list) and len(raw) > 1 and all(isinstance(p, str | list) for p in raw)
        prompts = list(raw) if many else [raw]
        try:
            counts = [tx.count_prompt_tokens(p) for p in prompts]
        except ValueError as exc:
            raise HttpError(400, str(exc), param="prompt") from None
        max_tokens = min(self._limits(body, c, self.config.default_max_tokens) for c in counts)
        return await self._generate(body, list(zip(prompts, counts, strict=True)), max_tokens, chat=False)

    async def chat(self, request: Request) -> Response:
        body = await json_body(request)
        self._check_model(body)
        try:
            prompt = tx.chat_to_text(body.get("messages"))  # type: ignore[arg-type]
        except ValueError as exc:
            raise HttpError(400, str(exc), param="messages") from None
        prompt_tokens = tx.count_text_tokens(prompt)
        max_tokens = self._limits(body, prompt_tokens, None)
        return await self._generate(body, [(prompt, prompt_tokens)], max_tokens, chat=True)

    async def _generate(
        self, body: dict[str, Any], prompts: list[tuple[Any, int]], max_tokens: int, *, chat: bool
    ) -> Response:
        """One engine request per (prompt, choice); choice index = prompt index * n + j, as OpenAI orders them."""
        stops = self._stops(body)
        n = self._n(body)
        runs: list[tuple[RequestHandle, int]] = []
        try:
            for prompt, prompt_tokens in prompts:
                base = tx.text_seed(repr(prompt))
                for j in range(n):
                    seed = base if j == 0 else tx.text_seed(f"{base}/{j}")
                    output = self._output_len(body, seed, max_tokens)
                    runs.append((self._submit(body, prompt, prompt_tokens, max_tokens, output), seed))
        except BaseException:
            for handle, _ in runs:
                self.loop.abort(handle.id)
            raise
        prompt_total = sum(c for _, c in prompts) * n
        rid = new_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
            stream = self._stream(runs, stops, rid, created, chat, include_usage, prompt_total)
            return StreamingResponse(stream, media_type="text/event-stream")

        async def collect(handle: RequestHandle, seed: int) -> tuple[str, str | None]:
            parts: list[str] = []
            reason: str | None = None
            async for piece, finish in self._tokens(handle, seed, stops):
                parts.append(piece)
                reason = finish or reason
            return "".join(parts), reason

        results = await asyncio.gather(*(collect(h, seed) for h, seed in runs))
        choices = []
        completion_tokens = 0
        for index, (text, reason) in enumerate(results):
            completion_tokens += len(text.split())  # one filler word per token
            choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": reason, "stop_reason": None}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            choices.append(choice)
        payload = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": self.config.name,
            "choices": choices,
            "usage": self._usage(prompt_total, completion_tokens),
        }
        return JSONResponse(payload)

    async def _stream(
        self,
        runs: list[tuple[RequestHandle, int]],
        stops: set[str],
        rid: str,
        created: int,
        chat: bool,
        include_usage: bool,
        prompt_tokens: int,
    ) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            payload: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": self.config.name}
            payload["choices"] = choices
            if usage is not None:
                payload["usage"] = usage
            return sse(payload)

        if chat:  # vLLM opens a chat stream with an empty role delta per choice
            for index in range(len(runs)):
                yield chunk(
                    [
                        {
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
        # Choices advance together (one engine each): their deliveries are merged as they come.
        merged: asyncio.Queue[tuple[int, str, str | None] | HttpError | None] = asyncio.Queue()

        async def pump(index: int, handle: RequestHandle, seed: int) -> None:
            try:
                async for piece, finish in self._tokens(handle, seed, stops):
                    merged.put_nowait((index, piece, finish))
            except HttpError as exc:
                merged.put_nowait(exc)
            finally:
                merged.put_nowait(None)

        tasks = [asyncio.ensure_future(pump(i, h, seed)) for i, (h, seed) in enumerate(runs)]
        completion_tokens = 0
        open_runs = len(runs)
        try:
            while open_runs:
                item = await merged.get()
                if item is None:
                    open_runs -= 1
                    continue
                if isinstance(item, HttpError):
                    yield sse(
                        {"error": {"message": item.message, "type": "ServerError", "param": None, "code": item.status}}
                    )
                    return
                index, piece, finish = item
                completion_tokens += len(piece.split())
                if piece or finish:
                    content = {"delta": {"content": piece}} if chat else {"text": piece}
                    yield chunk([{"index": index, **content, "logprobs": None, "finish_reason": finish}])
        finally:
            for task in tasks:
                task.cancel()
        if include_usage:
            yield chunk([], self._usage(prompt_tokens, completion_tokens))
        yield sse("[DONE]")

    async def embeddings(self, request: Request) -> Response:
        body = await json_body(request)
        self._check_model(body)
        try:
            inputs = tx.embedding_inputs(body.get("input"))
        except ValueError as exc:
            raise HttpError(400, str(exc), param="input") from None
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise HttpError(
                400, f"encoding_format {encoding!r} is not one of 'float', 'base64'", param="encoding_format"
            )
        dim = int_field(body, "dimensions", self.embedding_dim, minimum=1) or self.embedding_dim
        if dim > self.embedding_dim:
            raise HttpError(400, f"dimensions must be <= {self.embedding_dim}", param="dimensions")
        for _, tokens in inputs:
            if tokens > self.max_model_len:
                raise HttpError(400, f"an input has {tokens} tokens; the limit is {self.max_model_len}", param="input")
        # A pooling pass is a prefill: one engine request per input, finished at its first token.
        handles: list[RequestHandle] = []
        try:
            for _, tokens in inputs:
                handles.append(self.loop.submit(new_id("embd"), max(1, tokens), 0, pooling=True))
            await asyncio.gather(*(self._drain(h) for h in handles))
        except EngineRejected as exc:
            raise HttpError(exc.status, exc.reason) from None
        finally:
            for h in handles:
                if not h.done:
                    self.loop.abort(h.id)
        data = []
        for index, (key, _) in enumerate(inputs):
            vector = tx.embed_text(key, self.embedding_dim)[:dim]
            if dim < self.embedding_dim:  # Matryoshka-style truncation is renormalised
                norm = sum(v * v for v in vector) ** 0.5
                vector = [v / norm for v in vector]
            value: Any = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode() if encoding == "base64" else vector
            data.append({"object": "embedding", "index": index, "embedding": value})
        total = sum(t for _, t in inputs)
        return JSONResponse(
            {
                "id": new_id("embd"),
                "object": "list",
                "created": int(time.time()),
                "model": self.config.name,
                "data": data,
                "usage": {"prompt_tokens": total, "total_tokens": total, "completion_tokens": 0},
            }
        )

    @staticmethod
    async def _drain(handle: RequestHandle) -> None:
        while True:
            event = await handle.queue.get()
            if event.finished:
                if event.finish_reason == "abort":
                    raise HttpError(503, "the engine stopped before the request finished")
                return

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.config.name,
            "object": "model",
            "created": self.started,
            "owned_by": "sagesched-emulator",
            "root": self.config.model,
            "parent": None,
            "max_model_len": self.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": "sagesched-emulator", "engine": "vllm-v1"})

    async def metrics_route(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type=Registry.content_type)


def _wrap(handler):  # type: ignore[no-untyped-def]
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except HttpError as exc:
            return error_response(exc.status, exc.message, exc.param)

    return endpoint


def build_vllm_app(config: VllmEmulatorConfig, **engine_config: Any) -> Starlette:
    """A Starlette app emulating vLLM; the engine loop starts and stops with the app's lifespan.

    `engine_config` holds `VllmEngineConfig` fields (max_num_seqs, max_num_batched_tokens,
    num_gpu_blocks, scheduling_policy, ...). Prefix hashes default to one per KV block
    (`prefix_hash_block_tokens = block_size`), so prefix caching works at vLLM's granularity.
    """
    perf = LLMPerfModel.load(config.model, config.hardware, config.tensor_parallel, config.calibration)
    profile = perf.model
    config = replace(
        config,
        max_model_len=config.max_model_len or int(profile.max_position_embeddings),
        embedding_dim=config.embedding_dim or int(profile.hidden_size),
    )
    engine_config.setdefault("prefix_hash_block_tokens", engine_config.get("block_size", 16))
    loop = VllmEngineLoop.build(perf, time_scale=config.time_scale, **engine_config)
    emulator = VllmEmulator(config, loop)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await loop.start()
        try:
            yield
        finally:
            await loop.stop()

    routes = [
        Route("/v1/completions", _wrap(emulator.completions), methods=["POST"]),
        Route("/v1/chat/completions", _wrap(emulator.chat), methods=["POST"]),
        Route("/v1/embeddings", _wrap(emulator.embeddings), methods=["POST"]),
        Route("/v1/models", _wrap(emulator.models), methods=["GET"]),
        Route("/health", emulator.health, methods=["GET"]),
        Route("/version", emulator.version, methods=["GET"]),
        Route("/metrics", emulator.metrics_route, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.emulator = emulator
    return app
