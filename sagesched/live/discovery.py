"""Finding local OpenAI-compatible servers (`UnifiedInferenceClient.create_auto`'s last step)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import httpx

from sagesched.live.errors import LiveError

logger = logging.getLogger(__name__)

ENV_UNIFIED_URL = "SAGE_UNIFIED_BASE_URL"
ENV_CHAT_URL = "SAGE_CHAT_BASE_URL"
ENV_EMBEDDING_URL = "SAGE_EMBEDDING_BASE_URL"
ENV_CHAT_MODEL = "SAGE_CHAT_MODEL"
ENV_EMBEDDING_MODEL = "SAGE_EMBEDDING_MODEL"
ENV_CHAT_KEY = "SAGE_CHAT_API_KEY"
ENV_EMBEDDING_KEY = "SAGE_EMBEDDING_API_KEY"
ENV_API_KEY = "SAGE_API_KEY"

DEFAULT_PROBE_PORTS: tuple[int, ...] = (8000, 8001, 8002, 8080, 8081, 8090, 8888)
"""Local ports `create_auto` probes (gateway, vLLM, TEI and llama-server defaults)."""

_EMBEDDING_NAME_HINTS = ("embed", "bge", "minilm", "e5-", "gte", "nomic", "mpnet", "sentence")


def _looks_like_embedding(model: str) -> bool:
    name = model.lower()
    return any(hint in name for hint in _EMBEDDING_NAME_HINTS)


def probe_local(ports: Sequence[int], timeout_s: float = 0.3) -> list[tuple[str, list[str]]]:
    """OpenAI-compatible servers on 127.0.0.1 `ports`: (base URL, model ids) for each that answers.

    Asks ``/v1/models`` (a server that answers only ``/health`` is listed with no models).
    """
    found: list[tuple[str, list[str]]] = []
    with httpx.Client(timeout=timeout_s) as client:
        for port in ports:
            url = f"http://127.0.0.1:{int(port)}"
            try:
                response = client.get(f"{url}/v1/models")
            except httpx.HTTPError:
                continue
            if response.status_code != 200:
                continue
            try:
                ids = [m["id"] for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]
            except (ValueError, AttributeError):
                continue
            if ids:
                found.append((url, ids))
    return found


def create_auto(cls: Any, *, ports: Sequence[int], probe_timeout_s: float, timeout_s: float) -> Any:
    """`UnifiedInferenceClient.create_auto`: environment first, then probing 127.0.0.1 (its docstring)."""

    env = os.environ
    chat_model = env.get(ENV_CHAT_MODEL) or None
    embedding_model = env.get(ENV_EMBEDDING_MODEL) or None
    shared_key = env.get(ENV_API_KEY) or None
    unified = env.get(ENV_UNIFIED_URL)
    if unified:
        logger.info("create_auto: gateway mode via %s=%s", ENV_UNIFIED_URL, unified)
        return cls.create_gateway(
            unified, llm_model=chat_model, embedding_model=embedding_model, api_key=shared_key, timeout_s=timeout_s
        )
    chat_url = env.get(ENV_CHAT_URL) or None
    embedding_url = env.get(ENV_EMBEDDING_URL) or None
    if chat_url or embedding_url:
        logger.info(
            "create_auto: simple mode via %s=%s, %s=%s", ENV_CHAT_URL, chat_url, ENV_EMBEDDING_URL, embedding_url
        )
        return cls(
            chat_url,
            chat_model,
            embedding_url,
            embedding_model,
            llm_api_key=env.get(ENV_CHAT_KEY) or shared_key,
            embedding_api_key=env.get(ENV_EMBEDDING_KEY) or shared_key,
            timeout_s=timeout_s,
        )
    found = probe_local(ports, probe_timeout_s)
    llm = next(((url, m) for url, models in found for m in models if not _looks_like_embedding(m)), None)
    emb = next(((url, m) for url, models in found for m in models if _looks_like_embedding(m)), None)
    if llm is None and emb is None:
        raise LiveError(
            "no inference endpoint found: set "
            f"{ENV_UNIFIED_URL} (a sagesched gateway), or {ENV_CHAT_URL} and/or {ENV_EMBEDDING_URL} "
            f"(with {ENV_CHAT_MODEL}, {ENV_EMBEDDING_MODEL}, {ENV_API_KEY}); probed 127.0.0.1 ports "
            f"{', '.join(map(str, ports))} and found no OpenAI-compatible server",
            status=503,
            code="no_endpoint",
        )
    if llm is not None and emb is not None and llm[0] == emb[0]:
        logger.info("create_auto: found a unified server at %s", llm[0])
        return cls.create_gateway(
            llm[0],
            llm_model=chat_model or llm[1],
            embedding_model=embedding_model or emb[1],
            api_key=shared_key,
            timeout_s=timeout_s,
        )
    logger.info("create_auto: probed local servers: llm=%s embedding=%s", llm, emb)
    return cls(
        llm[0] if llm else None,
        chat_model or (llm[1] if llm else None),
        emb[0] if emb else None,
        embedding_model or (emb[1] if emb else None),
        api_key=shared_key,
        timeout_s=timeout_s,
    )


__all__ = ["DEFAULT_PROBE_PORTS", "create_auto", "probe_local"]
