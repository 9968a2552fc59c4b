"""A text-embeddings-inference look-alike whose batching and timing come from the simulator's TEI model.

Routes: `POST /embed` (TEI's native body `{"inputs": str | [str], "normalize", "truncate",
"dimensions"}` answered with a list of vectors), `POST /v1/embeddings` (OpenAI shape), `GET /info`,
`GET /health` and `GET /metrics` under TEI's `te_*` names. Admission is the engine core's: a call
past `max_concurrent_requests` gets 429 and one carrying more than `max_client_batch_size` inputs
gets 413, with TEI's error bodies (`{"error", "error_type"}` natively, `{"message", "code",
"type"}` on the OpenAI route). Batches are packed by the core up to `max_batch_tokens` and run one
at a time, each lasting the performance model's `batch_time_s` (times `time_scale`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from sagesched.live.emulators import text as tx
from sagesched.live.emulators.http import new_id
from sagesched.live.emulators.pacer import Pacer
from sagesched.live.emulators.promtext import Registry
from sagesched.sim.config import TeiEngineConfig
from sagesched.sim.engines import EngineRejected, EngineRequest, TeiBatch, TeiEngineCore
from sagesched.sim.perf_model import EmbeddingPerfModel

logger = logging.getLogger(__name__)

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class TeiError(Exception):
    """An error TEI would return: status plus its `error_type` (Validation, Overloaded, Empty, ...)."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type


@dataclass(frozen=True)
class TeiEmulatorConfig:
    """What `sagesched emulate tei` serves.

    model / hardware: embedding performance-model keys (`bge-base`, `bge-m3`, `all-minilm-l6-v2`; `a100`, `h100`).
    served_model_name: the model id clients see (defaults to `model`).
    embedding_dim: vector length; None = the model profile's.
    max_input_length: tokens per input; longer inputs are truncated if `truncate`, else 413; None = the model's.
    time_scale: wall seconds per engine second; 0 answers at once.
    calibration: passed to `EmbeddingPerfModel.load`.
    """

    model: str = "bge-base"
    hardware: str = "a100"
    served_model_name: str | None = None
    embedding_dim: int | None = None
    max_input_length: int | None = None
    time_scale: float = 1.0
    calibration: str | None = None

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


@dataclass
class _Pending:
    future: asyncio.Future[None]
    submitted_wall: float = field(default_factory=time.monotonic)
    started_wall: float | None = None


class TeiEngineLoop:
    """Runs a `TeiEngineCore` in wall-clock time: one batch at a time, as TEI's backend does."""

    def __init__(self, core: TeiEngineCore, time_scale: float = 1.0) -> None:
        self.core = core
        self.pacer = Pacer(time_scale)
        self._pending: dict[str, _Pending] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.current_batch_size = 0
        self.current_batch_tokens = 0
        self.on_batch: list = []  # hooks(size, tokens, engine_seconds)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tei-engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(TeiError(503, "the emulator is shutting down", "Backend"))

    @property
    def queue_size(self) -> int:
        """Inputs waiting for a batch (TEI queues inputs, not calls)."""
        return int(self.core.queue_size)

    def submit(self, request_id: str, inputs: list[tuple[str, int]]) -> _Pending:
        """Admit one call (all its inputs) or raise TeiError 429/413 as the core decides."""
        if not self._pending:
            self.pacer.sync_after_idle()
        tokens = tuple(t for _, t in inputs)
        engine_request = EngineRequest(id=request_id, prompt_tokens=sum(tokens), input_tokens=tokens)
        try:
            self.core.submit(engine_request)
        except EngineRejected as exc:
            kind = "Overloaded" if exc.status == 429 else "Validation"
            raise TeiError(exc.status, str(exc.reason), kind) from None
        pending = _Pending(asyncio.get_running_loop().create_future())
        self._pending[request_id] = pending
        self._wakeup.set()
        return pending

    def _start(self, batch: TeiBatch) -> None:
        self.current_batch_size = batch.num_inputs
        self.current_batch_tokens = batch.total_tokens
        wall = time.monotonic()
        for call, _ in batch.entries:
            pending = self._pending.get(call.id)
            if pending is not None and pending.started_wall is None:
                pending.started_wall = wall

    async def _run(self) -> None:
        while True:
            batch = self.core.next_batch()
            if not batch:
                self.current_batch_size = self.current_batch_tokens = 0
                self._wakeup.clear()
                await self._wakeup.wait()
                self.pacer.sync_after_idle()
                continue
            self._start(batch)
            duration = float(self.core.batch_time_s(batch))
            await self.pacer.advance(duration)
            finished = self.core.finish_batch(batch)
            self.batches += 1
            for hook in self.on_batch:
                hook(batch.num_inputs, batch.total_tokens, duration)
            for request_id in finished:
                pending = self._pending.pop(request_id, None)
                if pending is not None and not pending.future.done():
                    pending.future.set_result(None)


class TeiEmulator:
    """The app's state and handlers."""

    def __init__(self, config: TeiEmulatorConfig, loop: TeiEngineLoop, limits: dict[str, int]) -> None:
        if config.embedding_dim is None or config.max_input_length is None:
            raise ValueError("resolve embedding_dim and max_input_length first (build_tei_app does)")
        self.config = config
        self.embedding_dim: int = config.embedding_dim
        self.max_input_length: int = config.max_input_length
        self.loop = loop
        self.limits = limits
        self.metrics = Registry()
        m = self.metrics
        self.request_count = m.counter("te_request_count", "Embedding requests received.")
        self.request_success = m.counter("te_request_success", "Embedding requests served.")
        self.request_failure = m.counter("te_request_failure", "Embedding requests refused or failed.")
        self.embed_count = m.counter("te_embed_count", "Inputs embedded.")
        m.gauge("te_queue_size", "Inputs queued for a batch.", lambda: loop.queue_size)
        m.gauge("te_batch_current_size", "Inputs in the batch now running.", lambda: loop.current_batch_size)
        m.gauge("te_batch_current_max_tokens", "Tokens in the batch now running.", lambda: loop.current_batch_tokens)
        m.counter("te_batch_count", "Batches executed.", lambda: loop.batches)
        self.request_duration = m.histogram("te_request_duration", "Request duration (s).", DURATION_BUCKETS)
        self.queue_duration = m.histogram("te_request_queue_duration", "Time queued (s).", DURATION_BUCKETS)
        self.inference_duration = m.histogram("te_request_inference_duration", "Inference time (s).", DURATION_BUCKETS)
        self.input_length = m.histogram("te_request_input_length", "Tokens per input.", TOKEN_BUCKETS)
        self.batch_size = m.histogram("te_batch_next_size", "Inputs per batch.", SIZE_BUCKETS)
        self.batch_tokens = m.histogram("te_batch_next_tokens", "Tokens per batch.", TOKEN_BUCKETS)
        self.batch_duration = m.histogram("te_batch_inference_duration", "Batch inference time (s).", DURATION_BUCKETS)
        loop.on_batch.append(self._observe_batch)

    def _observe_batch(self, size: int, tokens: int, engine_s: float) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(tokens)
        self.batch_duration.observe(engine_s * self.loop.pacer.time_scale)

    async def _embed(self, raw_inputs: Any, *, truncate: bool, method: str) -> list[list[float]]:
        self.request_count.inc(method=method)
        try:
            try:
                inputs = tx.embedding_inputs(raw_inputs)
            except ValueError as exc:
                raise TeiError(422, str(exc), "Tokenizer") from None
            if any(tokens == 0 for _, tokens in inputs):
                raise TeiError(400, "`inputs` cannot be empty", "Empty")
            limit = self.max_input_length
            if any(tokens > limit for _, tokens in inputs):
                if not truncate:
                    longest = max(tokens for _, tokens in inputs)
                    raise TeiError(
                        413,
                        f"Input validation error: `inputs` must have less than {limit} tokens. Given: {longest}",
                        "Validation",
                    )
                inputs = [(key, min(tokens, limit)) for key, tokens in inputs]
            pending = self.loop.submit(new_id("embed"), inputs)
            await pending.future
        except TeiError as exc:
            self.request_failure.inc(err={429: "overloaded", 413: "validation"}.get(exc.status, exc.error_type.lower()))
            raise
        end = time.monotonic()
        started = pending.started_wall or end
        self.request_success.inc(method=method)
        self.embed_count.inc(len(inputs))
        self.request_duration.observe(end - pending.submitted_wall)
        self.queue_duration.observe(started - pending.submitted_wall)
        self.inference_duration.observe(end - started)
        for _, tokens in inputs:
            self.input_length.observe(tokens)
        return [tx.embed_text(key, self.embedding_dim) for key, _ in inputs]

    @staticmethod
    def _resize(vector: list[float], dimensions: int | None, normalize: bool) -> list[float]:
        if dimensions is not None:
            vector = vector[:dimensions]
        if normalize and dimensions is not None:
            norm = sum(v * v for v in vector) ** 0.5
            vector = [v / norm for v in vector]
        if not normalize:  # TEI's unnormalised output: the raw pooled vector (here scaled off unit length)
            vector = [v * 10.0 for v in vector]
        return vector

    def _dimensions(self, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.embedding_dim:
            raise TeiError(400, f"dimensions must be an integer in 1..{self.embedding_dim}", "Validation")
        return value

    async def embed(self, request: Request) -> Response:
        try:
            body = await _json(request)
            inputs = body.get("inputs")
            method = "batch" if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else "single"
            dimensions = self._dimensions(body.get("dimensions"))
            vectors = await self._embed(inputs, truncate=bool(body.get("truncate", False)), method=method)
            normalize = bool(body.get("normalize", True))
            return JSONResponse([self._resize(v, dimensions, normalize) for v in vectors])
        except TeiError as exc:
            return JSONResponse({"error": exc.message, "error_type": exc.error_type}, status_code=exc.status)

    async def openai_embeddings(self, request: Request) -> Response:
        try:
            body = await _json(request)
            model = body.get("model")
            if model not in (None, "", self.config.name):
                raise TeiError(404, f"model `{model}` is not served here; use `{self.config.name}`", "Validation")
            encoding = body.get("encoding_format", "float")
            if encoding not in ("float", "base64"):
                raise TeiError(422, f"encoding_format {encoding!r} is not one of 'float', 'base64'", "Validation")
            dimensions = self._dimensions(body.get("dimensions"))
            raw = body.get("input")
            inputs = tx.embedding_inputs(raw) if raw is not None else []
            vectors = await self._embed(raw, truncate=False, method="batch" if len(inputs) > 1 else "single")
            data = []
            for index, vector in enumerate(vectors):
                vector = self._resize(vector, dimensions, True)
                value: Any = vector
                if encoding == "base64":
                    value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                data.append({"object": "embedding", "embedding": value, "index": index})
            total = sum(t for _, t in inputs)
            return JSONResponse(
                {
                    "object": "list",
                    "data": data,
                    "model": self.config.name,
                    "usage": {"prompt_tokens": total, "total_tokens": total},
                }
            )
        except ValueError as exc:
            return JSONResponse({"message": str(exc), "code": 422, "type": "Tokenizer"}, status_code=422)
        except TeiError as exc:
            return JSONResponse(
                {"message": exc.message, "code": exc.status, "type": exc.error_type}, status_code=exc.status
            )

    async def info(self, request: Request) -> Response:
        return JSONResponse(
            {
                "model_id": self.config.name,
                "model_sha": None,
                "model_dtype": "float16",
                "model_type": {"embedding": {"pooling": "cls"}},
                "max_input_length": self.max_input_length,
                "tokenization_workers": 1,
                "version": "sagesched-emulator",
                "auto_truncate": False,
                **self.limits,
            }
        )

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def metrics_route(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type=Registry.content_type)


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise TeiError(422, "request body is not valid JSON", "Validation") from None
    if not isinstance(body, dict):
        raise TeiError(422, "request body must be a JSON object", "Validation")
    return body


def build_tei_app(config: TeiEmulatorConfig, **engine_config: Any) -> Starlette:
    """A Starlette app emulating TEI; `engine_config` goes to `TeiEngineConfig`
    (max_batch_tokens, max_concurrent_requests, max_client_batch_size, ...)."""
    perf = EmbeddingPerfModel.load(config.model, config.hardware, config.calibration)
    profile = perf.model
    config = replace(
        config,
        embedding_dim=config.embedding_dim or int(profile.embedding_dim or profile.hidden_size),
        max_input_length=config.max_input_length or int(profile.max_position_embeddings),
    )
    core_config = TeiEngineConfig.from_dict(engine_config)
    loop = TeiEngineLoop(TeiEngineCore(core_config, perf), time_scale=config.time_scale)
    limits = {
        name: int(getattr(core_config, name))
        for name in ("max_concurrent_requests", "max_batch_tokens", "max_client_batch_size", "max_batch_requests")
        if getattr(core_config, name, None) is not None
    }
    emulator = TeiEmulator(config, loop, limits)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await loop.start()
        try:
            yield
        finally:
            await loop.stop()

    routes = [
        Route("/embed", emulator.embed, methods=["POST"]),
        Route("/v1/embeddings", emulator.openai_embeddings, methods=["POST"]),
        Route("/info", emulator.info, methods=["GET"]),
        Route("/health", emulator.health, methods=["GET"]),
        Route("/metrics", emulator.metrics_route, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.emulator = emulator
    return app
