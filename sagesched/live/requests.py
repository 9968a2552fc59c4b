"""Turn an OpenAI-style HTTP body (plus headers) into the driver-neutral `Request` a policy sees.

A policy plans with token counts, priorities and SLOs; an HTTP body has text, headers and optional
fields. This module is the one place that translates, so the gateway and the in-process client
classify requests identically. Token counts of text are estimated (about four characters per
token, the usual rule of thumb for English with BPE tokenizers); token arrays are counted exactly.

Scheduling controls are read from headers first, then from the body:

==================  ==============================  ===========================
what                header                          body field
==================  ==============================  ===========================
priority            X-Request-Priority              ``priority`` (name or 0-4)
end-to-end SLO      X-SLO-Deadline-Ms               ``deadline_ms``
TTFT SLO            X-SLO-TTFT-Ms                   ``slo_ttft_ms``
TPOT SLO            X-SLO-TPOT-Ms                   ``slo_tpot_ms``
tenant              X-Tenant                        ``user``
request id          X-Request-Id                    (generated)
workload class      X-Workload-Class                (none)
==================  ==============================  ===========================

The body fields that only the scheduler reads (`SCHEDULING_FIELDS`) are removed by `backend_body`
before the body goes upstream: vLLM, for example, refuses ``priority`` unless it runs with priority
scheduling.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any

from sagesched.core import SLO, Priority, Request, RequestType
from sagesched.live.errors import InvalidRequest
from sagesched.live.openai_schema import MAX_N, MAX_TOKENS_LIMIT

ENDPOINTS: dict[str, RequestType] = {
    "chat": RequestType.LLM_CHAT,
    "completions": RequestType.LLM_GENERATE,
    "embeddings": RequestType.EMBEDDING,
}
"""The executor's endpoint names and the request type each carries."""

CHARS_PER_TOKEN = 4.0
"""Characters per token for estimates from text (BPE tokenizers on English average ~4)."""

DEFAULT_MAX_TOKENS = 256
"""Output cap assumed for planning when a body gives neither max_tokens nor max_completion_tokens."""

SCHEDULING_FIELDS: frozenset[str] = frozenset({"priority", "deadline_ms", "slo_ttft_ms", "slo_tpot_ms"})
"""Body fields read by the scheduler and not forwarded to backends."""

MAX_SLO_MS = 1e12
"""Largest SLO in milliseconds (~31 years); anything larger is a typo, and huge values overflow."""


def _short(value: Any) -> str:
    """repr of `value`, cut to 60 characters (a 400-digit integer does not belong in an error message)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Chat messages carry a few tokens of role/template framing each.
_MESSAGE_OVERHEAD_TOKENS = 4


def estimate_text_tokens(text: str) -> int:
    """Tokens in `text` by the characters-per-token heuristic; at least 1 for non-empty text."""
    if not text:
        return 0
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def _header_map(headers: Mapping[str, str] | None) -> dict[str, str]:
    if not headers:
        return {}
    return {str(k).lower(): str(v) for k, v in headers.items()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_array(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_is_int(t) for t in value)


def _message_tokens(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list of {role, content} objects", param="messages")
    total = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = message.get("content")
        if content is None or isinstance(content, str):
            total += estimate_text_tokens(content or "")
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += estimate_text_tokens(part["text"])
                elif isinstance(part, str):
                    total += estimate_text_tokens(part)
        else:
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of parts", param="messages")
        total += _MESSAGE_OVERHEAD_TOKENS
    return total


def _prompt_tokens(prompt: Any) -> tuple[int, int]:
    """(total tokens, number of prompts) of a completions `prompt`."""
    if isinstance(prompt, str):
        return estimate_text_tokens(prompt), 1
    if _is_token_array(prompt):
        return len(prompt), 1
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return sum(estimate_text_tokens(p) for p in prompt), len(prompt)
        if all(_is_token_array(p) for p in prompt):
            return sum(len(p) for p in prompt), len(prompt)
    raise InvalidRequest(
        "'prompt' must be a string, a list of strings, a token array or a list of token arrays", param="prompt"
    )


def embedding_inputs(value: Any) -> list[str] | list[list[int]]:
    """The inputs of an embeddings body as a list (one entry per vector to return).

    Accepts a string, a non-empty list of strings, a token array, or a list of token arrays.
    """
    if isinstance(value, str):
        return [value]
    if _is_token_array(value):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(_is_token_array(v) for v in value):
            return [list(v) for v in value]
    raise InvalidRequest(
        "'input' must be a string, a non-empty list of strings, a token array or a list of token arrays",
        param="input",
    )


def _input_tokens(item: str | list[int]) -> int:
    return len(item) if isinstance(item, list) else max(1, estimate_text_tokens(item))


def _positive_ms(value: Any, field: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(
            f"{field} must be a positive number of milliseconds, got {_short(value)}", param=field
        ) from None
    if isinstance(value, bool) or not math.isfinite(number) or not 0 < number <= MAX_SLO_MS:
        raise InvalidRequest(
            f"{field} must be a positive number of milliseconds up to {MAX_SLO_MS:g}, got {_short(value)}", param=field
        )
    return number


def _max_tokens(body: Mapping[str, Any], default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not _is_int(value) or not 0 <= value <= MAX_TOKENS_LIMIT:
            raise InvalidRequest(
                f"'{key}' must be an integer between 0 and {MAX_TOKENS_LIMIT}, got {_short(value)}", param=key
            )
        return value
    return default


def _pick(headers: dict[str, str], header: str, body: Mapping[str, Any], field: str) -> tuple[Any, str]:
    if header.lower() in headers:
        return headers[header.lower()], header
    return body.get(field), field


def request_from_body(
    endpoint: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    now: float = 0.0,
    *,
    default_model: str | None = None,
    request_id: str | None = None,
) -> Request:
    """Build the `Request` for one API call, validating what the scheduler needs.

    `endpoint` is ``"chat"``, ``"completions"`` or ``"embeddings"``; `now` becomes `arrival_s`.
    `default_model` fills a missing ``model`` (the client's simple mode knows its backend's model).
    Raises `InvalidRequest` naming the field for anything malformed.
    """
    try:
        rtype = ENDPOINTS[endpoint]
    except KeyError:
        raise ValueError(f"unknown endpoint {endpoint!r}; use one of {', '.join(ENDPOINTS)}") from None
    if not isinstance(body, Mapping):
        raise InvalidRequest("the request body must be a JSON object", param=None)
    hdrs = _header_map(headers)

    model = body.get("model", default_model)
    if model is None:
        model = default_model
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' must be a non-empty string naming a served model", param="model")

    prompt_tokens = 0
    max_tokens = 0
    n_inputs = 0
    if rtype is RequestType.EMBEDDING:
        if "input" not in body:
            raise InvalidRequest("'input' is required for embeddings", param="input")
        inputs = embedding_inputs(body["input"])
        n_inputs = len(inputs)
        prompt_tokens = sum(_input_tokens(item) for item in inputs)
        dims = body.get("dimensions")
        if dims is not None and (not _is_int(dims) or dims < 1):
            raise InvalidRequest(f"'dimensions' must be a positive integer, got {dims!r}", param="dimensions")
        fmt = body.get("encoding_format", "float")
        if fmt not in (None, "float", "base64"):
            raise InvalidRequest(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    else:
        n = body.get("n", 1)
        if n is None:
            n = 1
        if not _is_int(n) or not 1 <= n <= MAX_N:
            raise InvalidRequest(f"'n' must be an integer between 1 and {MAX_N}, got {_short(n)}", param="n")
        if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
            raise InvalidRequest("'stream' must be true or false", param="stream")
        if rtype is RequestType.LLM_CHAT:
            if "messages" not in body:
                raise InvalidRequest("'messages' is required for chat completions", param="messages")
            prompt_tokens = _message_tokens(body["messages"])
            prompts = 1
        else:
            if "prompt" not in body:
                raise InvalidRequest("'prompt' is required for completions", param="prompt")
            prompt_tokens, prompts = _prompt_tokens(body["prompt"])
        max_tokens = _max_tokens(body, DEFAULT_MAX_TOKENS) * n * prompts

    raw_priority, priority_field = _pick(hdrs, "X-Request-Priority", body, "priority")
    if raw_priority is None or raw_priority == "":
        priority = Priority.NORMAL
    else:
        if isinstance(raw_priority, bool) or (isinstance(raw_priority, float) and not raw_priority.is_integer()):
            raise InvalidRequest(
                f"{priority_field} must be critical, high, normal, low, background or 0-4, got {raw_priority!r}",
                param=priority_field,
            )
        try:
            priority = Priority.parse(int(raw_priority) if isinstance(raw_priority, float) else raw_priority)
        except (ValueError, TypeError):
            raise InvalidRequest(
                f"{priority_field} must be critical, high, normal, low, background or 0-4, got {_short(raw_priority)}",
                param=priority_field,
            ) from None

    value, field = _pick(hdrs, "X-SLO-Deadline-Ms", body, "deadline_ms")
    e2e_ms = _positive_ms(value, field)
    value, field = _pick(hdrs, "X-SLO-TTFT-Ms", body, "slo_ttft_ms")
    ttft_ms = _positive_ms(value, field)
    value, field = _pick(hdrs, "X-SLO-TPOT-Ms", body, "slo_tpot_ms")
    tpot_ms = _positive_ms(value, field)

    tenant, field = _pick(hdrs, "X-Tenant", body, "user")
    if tenant is None or tenant == "":
        tenant = "default"
    elif not isinstance(tenant, str):
        raise InvalidRequest(f"{field} must be a string", param=field)

    rid = request_id or hdrs.get("x-request-id") or uuid.uuid4().hex
    tags = {"endpoint": endpoint}
    if hdrs.get("x-workload-class"):
        tags["class"] = hdrs["x-workload-class"]

    return Request(
        id=str(rid),
        type=rtype,
        model=model,
        arrival_s=float(now),
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        embedding_inputs=n_inputs,
        embedding_tokens=prompt_tokens if rtype is RequestType.EMBEDDING else 0,
        priority=priority,
        tenant=tenant,
        slo=SLO(ttft_ms=ttft_ms, tpot_ms=tpot_ms, e2e_ms=e2e_ms),
        tags=tags,
    )


def backend_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `body` without the scheduler-only fields, ready to forward to a backend."""
    return {k: v for k, v in body.items() if k not in SCHEDULING_FIELDS}


__all__ = [
    "CHARS_PER_TOKEN",
    "DEFAULT_MAX_TOKENS",
    "ENDPOINTS",
    "SCHEDULING_FIELDS",
    "backend_body",
    "embedding_inputs",
    "estimate_text_tokens",
    "request_from_body",
]
