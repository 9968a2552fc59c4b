"""The original system's two client names, as thin facades over `UnifiedInferenceClient`.

Code written for the original `IntelligentLLMClient` / `IntelligentEmbeddingClient` keeps working:
each facade holds a `UnifiedInferenceClient` and forwards to it, so all three names share one
implementation (and, when built from one unified client with `from_unified`, one scheduled pool).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sagesched.live.client import UnifiedInferenceClient


class _Facade:
    def __init__(self, client: UnifiedInferenceClient, *, owns_client: bool = True) -> None:
        self.client = client
        self._owns = owns_client

    @classmethod
    def from_unified(cls, client: UnifiedInferenceClient) -> Any:
        """Share an existing unified client (closing the facade leaves it open)."""
        return cls(client, owns_client=False)

    @classmethod
    def create_auto(cls, **kw: Any) -> Any:
        """Same discovery as `UnifiedInferenceClient.create_auto` (SAGE_* variables, then local ports)."""
        return cls(UnifiedInferenceClient.create_auto(**kw))

    def close(self) -> None:
        if self._owns:
            self.client.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IntelligentLLMClient(_Facade):
    """Chat and generation, as the original LLM client offered them.

    `IntelligentLLMClient(model_name=..., base_url=..., api_key=...)` talks to one endpoint;
    `create_auto()` discovers one.
    """

    def __init__(
        self,
        client: UnifiedInferenceClient | None = None,
        *,
        model_name: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        owns_client: bool = True,
    ) -> None:
        if client is None:
            if base_url is None:
                raise ValueError("give base_url (and model_name), an existing client, or use create_auto()")
            client = UnifiedInferenceClient(base_url, model_name, api_key=api_key, timeout_s=timeout_s)
        super().__init__(client, owns_client=owns_client)

    @property
    def model_name(self) -> str | None:
        return self.client.llm_model

    def chat(self, messages: str | Sequence[Mapping[str, Any]], **kw: Any) -> str:
        return self.client.chat(messages, **kw)

    def generate(self, prompt: str, **kw: Any) -> str:
        return self.client.generate(prompt, **kw)

    def stream_chat(self, messages: str | Sequence[Mapping[str, Any]], **kw: Any) -> Iterator[str]:
        return self.client.stream_chat(messages, **kw)

    async def achat(self, messages: str | Sequence[Mapping[str, Any]], **kw: Any) -> str:
        return await self.client.achat(messages, **kw)

    async def agenerate(self, prompt: str, **kw: Any) -> str:
        return await self.client.agenerate(prompt, **kw)


class IntelligentEmbeddingClient(_Facade):
    """Embeddings, as the original embedding client offered them."""

    def __init__(
        self,
        client: UnifiedInferenceClient | None = None,
        *,
        model_name: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        owns_client: bool = True,
    ) -> None:
        if client is None:
            if base_url is None:
                raise ValueError("give base_url (and model_name), an existing client, or use create_auto()")
            client = UnifiedInferenceClient(None, None, base_url, model_name, api_key=api_key, timeout_s=timeout_s)
        super().__init__(client, owns_client=owns_client)

    @property
    def model_name(self) -> str | None:
        return self.client.embedding_model

    def embed(self, texts: str | Sequence[str], **kw: Any) -> list[list[float]]:
        return self.client.embed(texts, **kw)

    def embed_query(self, text: str, **kw: Any) -> list[float]:
        """One vector for one text (the common retrieval call)."""
        return self.client.embed([text], **kw)[0]

    async def aembed(self, texts: str | Sequence[str], **kw: Any) -> list[list[float]]:
        return await self.client.aembed(texts, **kw)


__all__ = ["IntelligentEmbeddingClient", "IntelligentLLMClient"]
