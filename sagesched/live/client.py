"""`UnifiedInferenceClient`: one client for chat, text generation and embeddings.

Three modes, one API:

- **simple**: straight to one OpenAI-compatible LLM endpoint and one embedding endpoint;
- **gateway**: to a `UnifiedAPIServer` (one URL serves everything, scheduled by the gateway);
- **control plane**: a `LiveExecutor` runs inside the client, scheduling over a list of instances
  with a registered policy (`create_with_control_plane`).

Every operation has ONE async implementation (`_achat_completion`, ...). The sync methods and the
async twins both run it on the client's private event-loop thread: the sync ones wait for it, the
async ones await it from the caller's loop. One loop owns the HTTP connection pool and the
executor, so the two styles can be mixed freely on one client.

Errors are `sagesched.live.errors.LiveError` subclasses, whichever mode raised them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from sagesched.live.backends import SSEStream
from sagesched.live.client_inputs import as_messages, as_prompt, as_texts
from sagesched.live.discovery import (
    DEFAULT_PROBE_PORTS,
    ENV_CHAT_MODEL,
    ENV_CHAT_URL,
    ENV_EMBEDDING_MODEL,
    ENV_EMBEDDING_URL,
    ENV_UNIFIED_URL,
    _looks_like_embedding,
    create_auto,
    probe_local,
)
from sagesched.live.errors import (
    InvalidRequest,
    LiveError,
    ModelNotFound,
    UpstreamError,
    UpstreamTimeout,
    error_from_response,
)
from sagesched.live.loop_thread import LoopThread
from sagesched.live.openai_schema import check_body
from sagesched.live.vectors import openai_vectors

logger = logging.getLogger(__name__)

T = TypeVar("T")


MODES = ("simple", "gateway", "control_plane")


def _root(url: str) -> str:
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI-compatible server the client talks to: base URL (no /v1), model, key."""

    url: str
    model: str | None = None
    api_key: str | None = None


class UnifiedInferenceClient:
    """Chat, generation and embeddings through one client; see the module docstring for modes.

    Direct construction gives simple mode; use `create_gateway`, `create_with_control_plane` or
    `create_auto` for the others. `timeout_s` bounds each call. Close with `close()` or `with`.
    """

    def __init__(
        self,
        llm_base_url: str | None = None,
        llm_model: str | None = None,
        embedding_base_url: str | None = None,
        embedding_model: str | None = None,
        *,
        api_key: str | None = None,
        llm_api_key: str | None = None,
        embedding_api_key: str | None = None,
        timeout_s: float = 120.0,
        mode: str = "simple",
        _executor: Any = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if mode != "control_plane" and not llm_base_url and not embedding_base_url:
            raise ValueError(
                "give llm_base_url and/or embedding_base_url (or use create_auto / create_gateway / "
                "create_with_control_plane)"
            )
        self.mode = mode
        self.timeout_s = float(timeout_s)
        self.llm = Endpoint(_root(llm_base_url), llm_model, llm_api_key or api_key) if llm_base_url else None
        self.embedding = (
            Endpoint(_root(embedding_base_url), embedding_model, embedding_api_key or api_key)
            if embedding_base_url
            else None
        )
        self.llm_model = llm_model
        self.embedding_model = embedding_model
        self._executor = _executor
        self._runner = LoopThread()
        self._http: httpx.AsyncClient | None = None
        self._closed = False
        # A client dropped without close() must not leave its loop thread behind. The runner holds
        # no reference to the client, so the client can be collected and this stops the thread.
        self._finalizer = weakref.finalize(self, LoopThread.close, self._runner)

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def create_gateway(
        cls,
        base_url: str,
        *,
        llm_model: str | None = None,
        embedding_model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
    ) -> UnifiedInferenceClient:
        """Gateway mode: every request goes to one `UnifiedAPIServer` (or any unified endpoint)."""
        return cls(
            base_url,
            llm_model,
            base_url,
            embedding_model,
            api_key=api_key,
            timeout_s=timeout_s,
            mode="gateway",
        )

    @classmethod
    def create_with_control_plane(
        cls,
        instances: Sequence[Mapping[str, Any]],
        scheduling_policy: str = "hybrid",
        policy_config: Mapping[str, Any] | None = None,
        *,
        executor_config: Any = None,
        llm_model: str | None = None,
        embedding_model: str | None = None,
        timeout_s: float = 120.0,
    ) -> UnifiedInferenceClient:
        """Control-plane mode: run a `LiveExecutor` with a registered policy inside the client.

        `instances`: ``{"host", "port", "model_name", "instance_type"}`` each, instance_type
        ``llm``, ``embedding`` or ``llm_embedding``; optional keys ``id``, ``api_key``, ``api``
        (``openai``/``tei``), ``max_inflight``, ``max_num_seqs``, ``max_client_batch_size``,
        ``scheme``. `scheduling_policy` is a registry name (`available_policies()`), with
        `policy_config` its config fields. `executor_config`: an `ExecutorConfig` or a dict.
        """
        from sagesched.live.backends import BackendConfig
        from sagesched.live.executor import ExecutorConfig, LiveExecutor
        from sagesched.policies import make_policy

        if not instances:
            raise ValueError("create_with_control_plane needs at least one instance")
        backends = []
        optional = ("id", "api_key", "api", "max_inflight", "max_num_seqs", "max_client_batch_size", "max_batch_tokens")
        for i, inst in enumerate(instances):
            missing = [k for k in ("host", "port", "model_name", "instance_type") if k not in inst]
            if missing:
                raise ValueError(
                    f"instances[{i}] lacks {', '.join(missing)}; each instance needs host, port, model_name, instance_type"
                )
            models = inst["model_name"]
            models = [models] if isinstance(models, str) else list(models)
            extra = {k: inst[k] for k in optional if k in inst}
            url = f"{inst.get('scheme', 'http')}://{inst['host']}:{int(inst['port'])}"
            backends.append(BackendConfig(url=url, kind=inst["instance_type"], models=models, **extra))
        policy = make_policy(scheduling_policy, **dict(policy_config or {}))
        if executor_config is None:
            config = ExecutorConfig(request_timeout_s=timeout_s)
        elif isinstance(executor_config, Mapping):
            config = ExecutorConfig.from_dict({"request_timeout_s": timeout_s, **executor_config})
        else:
            config = executor_config
        executor = LiveExecutor(policy, backends, config)
        if llm_model is None:
            llm_model = next((b.models[0] for b in backends if b.instance_kind.value != "embedding"), None)
        if embedding_model is None:
            embedding_model = next((b.models[0] for b in backends if b.instance_kind.value != "llm"), None)
        client = cls(
            None, llm_model, None, embedding_model, timeout_s=timeout_s, mode="control_plane", _executor=executor
        )
        try:
            client._runner.run(executor.start())
        except BaseException:
            client._runner.close()
            raise
        return client

    @classmethod
    def create_auto(
        cls, *, ports: Sequence[int] = DEFAULT_PROBE_PORTS, probe_timeout_s: float = 0.3, timeout_s: float = 120.0
    ) -> UnifiedInferenceClient:
        """Find the endpoints: SAGE_UNIFIED_BASE_URL, then SAGE_CHAT_BASE_URL / SAGE_EMBEDDING_BASE_URL,
        then OpenAI-compatible servers on the usual local ports of 127.0.0.1.

        Models come from SAGE_CHAT_MODEL / SAGE_EMBEDDING_MODEL (else the server's `/v1/models`);
        keys from SAGE_CHAT_API_KEY / SAGE_EMBEDDING_API_KEY, falling back to SAGE_API_KEY.
        """
        return create_auto(cls, ports=ports, probe_timeout_s=probe_timeout_s, timeout_s=timeout_s)

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def _aclose_core(self) -> None:
        if self._executor is not None:
            await self._executor.stop(drain_timeout_s=0)
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def close(self) -> None:
        """Stop the in-process executor (control plane), close connections and the loop thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._runner.run(self._aclose_core())
        finally:
            self._finalizer()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._runner.arun(self._aclose_core())
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self._finalizer)

    def __enter__(self) -> UnifiedInferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> UnifiedInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        where = (
            "in-process executor"
            if self.mode == "control_plane"
            else f"llm={self.llm.url if self.llm else None}, embedding={self.embedding.url if self.embedding else None}"
        )
        return f"UnifiedInferenceClient(mode={self.mode}, {where})"

    @property
    def executor(self) -> Any:
        """The in-process `LiveExecutor` (control-plane mode), else None."""
        return self._executor

    def snapshot(self) -> dict[str, Any]:
        """The in-process executor's snapshot (control-plane mode only)."""
        if self._executor is None:
            raise RuntimeError("snapshot() is available in control-plane mode only")

        async def take() -> dict[str, Any]:
            return self._executor.snapshot()

        return self._runner.run(take())

    # -- request building (shared by every mode) ---------------------------------------------------------
    @staticmethod
    def _sampling(body: dict[str, Any], kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Move keyword arguments into the body; None means "not given" (so temperature=0 is sent)."""
        headers: dict[str, str] = {}
        for key, header in (
            ("priority", "X-Request-Priority"),
            ("deadline_ms", "X-SLO-Deadline-Ms"),
            ("slo_ttft_ms", "X-SLO-TTFT-Ms"),
            ("slo_tpot_ms", "X-SLO-TPOT-Ms"),
            ("tenant", "X-Tenant"),
        ):
            value = kw.pop(key, None)
            if value is not None:
                headers[header] = str(value.name.lower() if hasattr(value, "name") else value)
        extra_headers = kw.pop("headers", None) or {}
        headers.update({str(k): str(v) for k, v in dict(extra_headers).items()})
        for key, value in kw.items():
            if value is not None:
                body[key] = value
        return body, headers

    def _model_for(self, kind: str, model: str | None) -> str | None:
        if model is not None:
            return model
        return self.llm_model if kind == "llm" else self.embedding_model

    def _endpoint(self, kind: str) -> Endpoint:
        endpoint = self.llm if kind == "llm" else self.embedding
        if endpoint is None:
            variable = ENV_CHAT_URL if kind == "llm" else ENV_EMBEDDING_URL
            what = "an LLM" if kind == "llm" else "an embedding"
            raise LiveError(
                f"this client has no {what} endpoint; pass {'llm_base_url' if kind == 'llm' else 'embedding_base_url'} "
                f"or set {variable} (or {ENV_UNIFIED_URL} for a gateway)",
                status=400,
                code="no_endpoint",
            )
        return endpoint

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s, connect=min(5.0, self.timeout_s)),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            )
        return self._http

    async def _resolve_model(self, kind: str, model: str | None) -> str:
        """The model to ask for: given, configured, or the first the server lists."""
        chosen = self._model_for(kind, model)
        if chosen is not None:
            return chosen
        if self._executor is not None:
            served = self._executor.models("chat" if kind == "llm" else "embeddings")
            if not served:
                raise ModelNotFound(f"no instance serves {kind} requests", param="model")
            chosen = served[0]
        else:
            endpoint = self._endpoint(kind)
            try:
                response = await self._client().get(f"{endpoint.url}/v1/models", headers=self._auth(endpoint))
                ids = [m["id"] for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                raise LiveError(
                    f"no {kind} model configured and {endpoint.url}/v1/models failed ({exc!r}); pass model= "
                    f"or set {ENV_CHAT_MODEL if kind == 'llm' else ENV_EMBEDDING_MODEL}",
                    status=400,
                    code="model_not_configured",
                ) from exc
            if len(ids) > 1:
                matching = [m for m in ids if _looks_like_embedding(m) == (kind == "embedding")]
                ids = matching or ids
            if not ids:
                raise ModelNotFound(f"{endpoint.url} lists no models", param="model")
            if len(ids) > 1:
                # Guessing would send requests to whichever model happens to be listed first.
                name = "llm_model" if kind == "llm" else "embedding_model"
                raise InvalidRequest(
                    f"{endpoint.url} serves several {kind} models ({', '.join(ids)}); pass {name}= to the client "
                    f"(or model= to the call), or set {ENV_CHAT_MODEL if kind == 'llm' else ENV_EMBEDDING_MODEL}",
                    param="model",
                )
            chosen = ids[0]
        if kind == "llm":
            self.llm_model = chosen
        else:
            self.embedding_model = chosen
        return chosen

    @staticmethod
    def _auth(endpoint: Endpoint) -> dict[str, str]:
        return {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}

    # -- transport: one JSON call, one stream ----------------------------------------------------------
    async def _call(self, endpoint_name: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        kind = "embedding" if endpoint_name == "embeddings" else "llm"
        check_body(endpoint_name, body)  # the gateway's own rules, so a bad call fails here alike
        if self._executor is not None:
            response = await self._executor.submit(None, body, endpoint_name, headers)
            return response.json or {}
        endpoint = self._endpoint(kind)
        path = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}
        try:
            response = await self._client().post(
                f"{endpoint.url}{path[endpoint_name]}", json=body, headers={**self._auth(endpoint), **headers}
            )
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{endpoint.url} did not answer within {self.timeout_s:g}s") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"cannot reach {endpoint.url}: {type(exc).__name__}: {exc}", code="connection_error"
            ) from exc
        try:
            data: Any = response.json()
        except ValueError:  # not JSON, or not UTF-8
            data = response.text
        if response.status_code >= 400:
            raise error_from_response(response.status_code, data)
        if not isinstance(data, dict):
            raise UpstreamError(
                f"{endpoint.url} answered HTTP {response.status_code} with {str(data)[:200]!r}, not a JSON object"
            )
        return data

    async def _stream(
        self, endpoint_name: str, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[dict[str, Any]]:
        body = {**body, "stream": True}
        check_body(endpoint_name, body)
        if self._executor is not None:
            response = await self._executor.submit(None, body, endpoint_name, headers)
            stream = response.stream
            if stream is None:  # defensive: a backend that ignored stream=True
                if response.json:
                    yield response.json
                return
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            return
        endpoint = self._endpoint("llm")
        path = "/v1/chat/completions" if endpoint_name == "chat" else "/v1/completions"
        client = self._client()
        request = client.build_request(
            "POST", f"{endpoint.url}{path}", json=body, headers={**self._auth(endpoint), **headers}
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{endpoint.url} did not answer within {self.timeout_s:g}s") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"cannot reach {endpoint.url}: {type(exc).__name__}: {exc}", code="connection_error"
            ) from exc
        sse = SSEStream(response, endpoint.url)
        try:
            if response.status_code >= 400:
                raw = await response.aread()
                try:
                    payload: Any = json.loads(raw)
                except ValueError:
                    payload = raw.decode(errors="replace")
                raise error_from_response(response.status_code, payload)
            while (event := await sse.next_event()) is not None:
                yield event
        finally:
            await sse.aclose()

    # -- the one implementation per operation ------------------------------------------------------------
    async def _achat_completion(self, messages: Any, kw: dict[str, Any]) -> dict[str, Any]:
        model = await self._resolve_model("llm", kw.pop("model", None))
        body, headers = self._sampling({"model": model, "messages": as_messages(messages)}, kw)
        return await self._call("chat", body, headers)

    async def _acompletion(self, prompt: Any, kw: dict[str, Any]) -> dict[str, Any]:
        model = await self._resolve_model("llm", kw.pop("model", None))
        body, headers = self._sampling({"model": model, "prompt": as_prompt(prompt)}, kw)
        return await self._call("completions", body, headers)

    async def _aembed(self, texts: str | Sequence[str], kw: dict[str, Any]) -> list[list[float]]:
        texts = as_texts(texts)
        if not texts:
            return []
        model = await self._resolve_model("embedding", kw.pop("model", None))
        body, headers = self._sampling({"model": model, "input": texts}, kw)
        return openai_vectors(await self._call("embeddings", body, headers), len(texts), "the embedding server")

    async def _astream_text(self, endpoint_name: str, payload: Any, kw: dict[str, Any]) -> AsyncIterator[str]:
        model = await self._resolve_model("llm", kw.pop("model", None))
        key = "messages" if endpoint_name == "chat" else "prompt"
        value = as_messages(payload) if endpoint_name == "chat" else as_prompt(payload)
        body, headers = self._sampling({"model": model, key: value}, kw)
        async for chunk in self._stream(endpoint_name, body, headers):
            for choice in chunk.get("choices") or ():
                text = (
                    choice.get("text") if endpoint_name == "completions" else (choice.get("delta") or {}).get("content")
                )
                if text:
                    yield text

    @staticmethod
    def _chat_text(data: Mapping[str, Any]) -> str:
        try:
            return data["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise UpstreamError(f"unexpected chat response shape: {str(data)[:200]}") from None

    @staticmethod
    def _completion_text(data: Mapping[str, Any]) -> str:
        try:
            return data["choices"][0].get("text") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise UpstreamError(f"unexpected completion response shape: {str(data)[:200]}") from None

    # -- sync API -----------------------------------------------------------------------------------------
    def chat(self, messages: str | Sequence[Mapping[str, Any]], **kw: Any) -> str:
        """The assistant's reply text. `messages`: a list of {role, content} (or one user string).

        Keywords go into the body (model, max_tokens, temperature, ...); `priority`, `deadline_ms`,
        `slo_ttft_ms`, `slo_tpot_ms`, `tenant` and `headers` become scheduling headers.
        """
        return self._chat_text(self.chat_completion(messages, **kw))

    async def _bounded(self, coro: Awaitable[T]) -> T:
        """`coro` within `timeout_s` in all: a backend that trickles bytes cannot stretch a call."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await coro
        except TimeoutError:
            raise UpstreamTimeout(f"the call did not finish within timeout_s={self.timeout_s:g}s") from None

    def chat_completion(self, messages: str | Sequence[Mapping[str, Any]], **kw: Any) -> dict[str, Any]:
        """The full OpenAI chat completion body."""
        return self._runner.run(self._bounded(self._achat_completion(messages, kw)))

    def generate(self, prompt: str, **kw: Any) -> str:
        """The generated text for `prompt` (text completions)."""
        return self._completion_text(self.completion(prompt, **kw))

    def completion(self, prompt: str | list[str], **kw: Any) -> dict[str, Any]:
        """The full OpenAI text completion body."""
        return self._runner.run(self._bounded(self._acompletion(prompt, kw)))

    def embed(self, texts: str | Sequence[str], **kw: Any) -> list[list[float]]:
        """One vector per text, in order (`dimensions=` and `model=` pass through)."""
        return self._runner.run(self._bounded(self._aembed(texts, kw)))

    def stream_chat(self, messages: str | Sequence[Mapping[str, Any]], **kw: Any) -> Iterator[str]:
        """The reply as text deltas, as they arrive."""
        return self._sync_iter(self._astream_text("chat", messages, kw))

    def stream_generate(self, prompt: str, **kw: Any) -> Iterator[str]:
        return self._sync_iter(self._astream_text("completions", prompt, kw))

    async def _next_before(self, agen: AsyncIterator[str], deadline: float) -> str:
        """The stream's next item, or UpstreamTimeout once the whole stream has taken `timeout_s`."""
        try:
            async with asyncio.timeout_at(deadline):
                return await agen.__anext__()
        except TimeoutError:
            raise UpstreamTimeout(f"the stream did not finish within timeout_s={self.timeout_s:g}s") from None

    def _deadline(self) -> float:
        return self._runner.loop.time() + self.timeout_s

    def _sync_iter(self, agen: AsyncIterator[str]) -> Iterator[str]:
        deadline = self._deadline()
        try:
            while True:
                try:
                    item = self._runner.run(self._next_before(agen, deadline))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if not self._runner.loop.is_closed():
                self._runner.run(agen.aclose())  # type: ignore[attr-defined]

    # -- async twins ----------------------------------------------------------------------------------------
    async def achat(self, messages: str | Sequence[Mapping[str, Any]], **kw: Any) -> str:
        return self._chat_text(await self.achat_completion(messages, **kw))

    async def achat_completion(self, messages: str | Sequence[Mapping[str, Any]], **kw: Any) -> dict[str, Any]:
        return await self._runner.arun(self._bounded(self._achat_completion(messages, kw)))

    async def agenerate(self, prompt: str, **kw: Any) -> str:
        return self._completion_text(await self.acompletion(prompt, **kw))

    async def acompletion(self, prompt: str | list[str], **kw: Any) -> dict[str, Any]:
        return await self._runner.arun(self._bounded(self._acompletion(prompt, kw)))

    async def aembed(self, texts: str | Sequence[str], **kw: Any) -> list[list[float]]:
        return await self._runner.arun(self._bounded(self._aembed(texts, kw)))

    async def astream_chat(self, messages: str | Sequence[Mapping[str, Any]], **kw: Any) -> AsyncIterator[str]:
        async for item in self._async_iter(self._astream_text("chat", messages, kw)):
            yield item

    async def astream_generate(self, prompt: str, **kw: Any) -> AsyncIterator[str]:
        async for item in self._async_iter(self._astream_text("completions", prompt, kw)):
            yield item

    async def _async_iter(self, agen: AsyncIterator[str]) -> AsyncIterator[str]:
        deadline = self._deadline()
        try:
            while True:
                try:
                    item = await self._runner.arun(self._next_before(agen, deadline))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if not self._runner.loop.is_closed():
                await self._runner.arun(agen.aclose())  # type: ignore[attr-defined]


__all__ = ["DEFAULT_PROBE_PORTS", "MODES", "Endpoint", "UnifiedInferenceClient", "probe_local"]
