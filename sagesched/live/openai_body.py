"""OpenAI request bodies at the gateway: strict JSON decoding, field validation, Responses API mapping.

One place decides what a well-formed body is, so a malformed one is a 400 naming the field (never a
5xx, never an opaque backend error): UTF-8 JSON without NaN or lone surrogates, and the documented
types and ranges of the OpenAI fields the gateway knows. Unknown fields pass through to backends.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from sagesched.live.errors import (
    InvalidRequest,
    LiveError,
    PayloadTooLarge,
)
from sagesched.live.requests import _short

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Built once: `json.loads`/`json.dumps` with options construct a new decoder/encoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _loads(raw: bytes) -> Any:
    """Parse a body strictly: UTF-8 JSON, no NaN/Infinity, no absurd nesting; 400 otherwise."""
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"the request body is not valid UTF-8 (byte {exc.start}); send UTF-8 encoded JSON"
        ) from None
    try:
        body = _DECODER.decode(text)
        if _SURROGATE_ESCAPE.search(raw):
            _check_unicode(body)  # only bodies with a \uD800-\uDFFF escape pay for the walk
        return body
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None


# A JSON escape of a UTF-16 surrogate: paired ones are fine, a lone one cannot be sent upstream.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _check_unicode(value: Any, path: str = "body") -> None:
    """400 for a string holding a lone surrogate (it has no UTF-8 form, so no backend could take it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(
                f"{path} holds a lone UTF-16 surrogate ({value[exc.start]!r} at character {exc.start}); "
                "send valid Unicode text",
                param=path.split("[")[0].split(".")[-1] if path != "body" else None,
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, path)
            _check_unicode(v, f"{path}.{k}" if path != "body" else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_unicode(v, f"{path}[{i}]")


def _dumps(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode("utf-8")


def _error_body(exc: LiveError) -> bytes:
    return _dumps(exc.to_dict())


# -- body validation beyond what the scheduler needs ---------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    # Ints are compared as ints: math.isfinite(10**400) raises OverflowError.
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))


def _check_number(body: Mapping[str, Any], key: str, low: float, high: float) -> None:
    if key in body and body[key] is not None:
        value = body[key]
        if not _is_number(value) or not low <= value <= high:
            raise InvalidRequest(
                f"'{key}' must be a number between {low:g} and {high:g}, got {_short(value)}", param=key
            )


def _check_int(body: Mapping[str, Any], key: str, low: int, high: int | None = None) -> None:
    if key in body and body[key] is not None:
        value = body[key]
        if not _is_int(value) or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise InvalidRequest(f"'{key}' must be an integer {bound}, got {_short(value)}", param=key)


def _check_bool(body: Mapping[str, Any], key: str) -> None:
    if key in body and body[key] is not None and not isinstance(body[key], bool):
        raise InvalidRequest(f"'{key}' must be true or false, got {body[key]!r}", param=key)


MAX_TOKENS_LIMIT = 2**31 - 1
"""Largest max_tokens accepted (no model has a longer context; bigger ints overflow float maths)."""


def validate_body(endpoint: str, body: Any, max_batch_inputs: int) -> None:
    """Reject malformed OpenAI fields with 400 naming the field (413 for too many inputs).

    Unknown fields are allowed (passed to the backend); known ones must have the documented types,
    so a typo'd type is answered here rather than by an opaque backend error.
    """
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, not a JSON {type(body).__name__}")
    if "model" not in body:
        raise InvalidRequest("'model' is required; GET /v1/models lists the served models", param="model")
    if not isinstance(body["model"], str) or not body["model"].strip():
        raise InvalidRequest("'model' must be a non-empty string naming a served model", param="model")
    if endpoint == "embeddings":
        inputs = body.get("input")
        if isinstance(inputs, list) and len(inputs) > max_batch_inputs and not all(_is_int(t) for t in inputs):
            raise PayloadTooLarge(
                f"'input' has {len(inputs)} items; at most {max_batch_inputs} per request (split the batch)",
                param="input",
            )
        if isinstance(inputs, str) and not inputs:
            raise InvalidRequest("'input' must not be an empty string", param="input")
        if isinstance(inputs, list) and any(isinstance(i, str) and not i for i in inputs):
            raise InvalidRequest("'input' must not contain empty strings", param="input")
        fmt = body.get("encoding_format")
        if fmt is not None and fmt not in ("float", "base64"):
            raise InvalidRequest(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
        _check_int(body, "dimensions", 1)
        if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
            raise InvalidRequest("'user' must be a string", param="user")
        return
    _check_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest(
                "'stream_options' must be an object like {\"include_usage\": true}", param="stream_options"
            )
        if not body.get("stream"):
            raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        _check_bool(options, "include_usage")
    _check_int(body, "n", 1, 128)
    _check_int(body, "max_tokens", 0, MAX_TOKENS_LIMIT)
    _check_int(body, "max_completion_tokens", 0, MAX_TOKENS_LIMIT)
    _check_number(body, "temperature", 0.0, 2.0)
    _check_number(body, "top_p", 0.0, 1.0)
    _check_number(body, "presence_penalty", -2.0, 2.0)
    _check_number(body, "frequency_penalty", -2.0, 2.0)
    _check_int(body, "seed", -(2**63), 2**64 - 1)
    stop = body.get("stop")
    if (
        stop is not None
        and not isinstance(stop, str)
        and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop))
    ):
        raise InvalidRequest("'stop' must be a string or a list of strings", param="stop")
    if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
        raise InvalidRequest("'user' must be a string", param="user")
    if endpoint == "chat":
        _check_bool(body, "logprobs")
        _check_int(body, "top_logprobs", 0, 20)
        messages = body.get("messages")
        if isinstance(messages, list):
            for i, message in enumerate(messages):
                if isinstance(message, dict) and "content" in message:
                    content = message["content"]
                    if content is not None and not isinstance(content, str | list):
                        raise InvalidRequest(
                            f"messages[{i}].content must be a string or a list of parts", param="messages"
                        )
    else:
        _check_bool(body, "echo")
        _check_int(body, "logprobs", 0, 20)
        _check_int(body, "best_of", 1, 128)
        if "suffix" in body and body["suffix"] is not None and not isinstance(body["suffix"], str):
            raise InvalidRequest("'suffix' must be a string", param="suffix")


# -- the Responses API, as a chat completion ---------------------------------------------------------


def responses_to_chat(body: Any) -> dict[str, Any]:
    """The chat body a /v1/responses body asks for; InvalidRequest naming the field otherwise."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if body.get("stream"):
        raise InvalidRequest(
            "streaming is not offered on /v1/responses here; use /v1/chat/completions with stream=true",
            param="stream",
        )
    if "model" not in body:
        raise InvalidRequest("'model' is required; GET /v1/models lists the served models", param="model")
    given = body.get("input")
    if isinstance(given, str) and given:
        messages: list[dict[str, Any]] = [{"role": "user", "content": given}]
    elif isinstance(given, list) and given:
        messages = []
        for i, item in enumerate(given):
            if not isinstance(item, dict) or not isinstance(item.get("role"), str):
                raise InvalidRequest(f"input[{i}] must be an object with 'role' and 'content'", param="input")
            content = item.get("content")
            if isinstance(content, list):  # [{"type": "input_text", "text": ...}, ...]
                texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
                content = "".join(texts)
            if not isinstance(content, str):
                raise InvalidRequest(f"input[{i}].content must be text", param="input")
            messages.append({"role": item["role"], "content": content})
    else:
        raise InvalidRequest("'input' must be a non-empty string or a list of messages", param="input")
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("'instructions' must be a string", param="instructions")
        messages.insert(0, {"role": "system", "content": instructions})
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for key in ("temperature", "top_p", "user", "priority", "deadline_ms", "slo_ttft_ms", "slo_tpot_ms"):
        if body.get(key) is not None:
            chat[key] = body[key]
    return chat


def chat_to_response(data: Any, model: str, request_id: str) -> dict[str, Any]:
    """A chat completion answer in the Responses API's shape."""
    try:
        text = data["choices"][0]["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        from sagesched.live.errors import UpstreamError

        raise UpstreamError(f"the backend's chat answer has no message: {str(data)[:200]}") from None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {
        "id": f"resp_{request_id}",
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": "completed",
        "output": [
            {
                "type": "message",
                "id": f"msg_{request_id}",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion},
    }
