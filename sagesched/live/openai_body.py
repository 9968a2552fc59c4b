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
import sys
import time
from typing import Any

from sagesched.live.errors import (
    InvalidRequest,
    LiveError,
    PayloadTooLarge,
)
from sagesched.live.openai_schema import check_body

log = logging.getLogger(__name__)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """A JSON number as a float; 400 for one beyond the float range (1e400 would go upstream as `Infinity`)."""
    value = float(text)
    if math.isinf(value):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise InvalidRequest(
            f"the number {shown} in the request body is out of range (beyond ±1.8e308); send a smaller number"
        )
    return value


# Built once: `json.loads`/`json.dumps` with options construct a new decoder/encoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
# Python's ValueError for an integer longer than `sys.get_int_max_str_digits()` (4300 digits by default).
_INT_DIGITS_ERROR = "integer string conversion"
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
        # A body cut short (a Content-Length counting characters, not bytes) fails at its very end.
        cut = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        hint = "; the body ends before the JSON document does: check that Content-Length counts bytes" if cut else ""
        raise InvalidRequest(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}{hint}"
        ) from None
    except ValueError as exc:
        if _INT_DIGITS_ERROR in str(exc):  # the message would tell the caller to change Python's settings
            raise InvalidRequest(
                f"a number in the request body has more than {sys.get_int_max_str_digits()} digits; "
                "send numbers of ordinary size"
            ) from None
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


# -- body validation: the shared pydantic rules, plus the gateway's own limit --------------------------


def validate_body(endpoint: str, body: Any, max_batch_inputs: int) -> None:
    """Reject a malformed body with 400 naming the field (413 for too many embedding inputs).

    The rules are `sagesched.live.openai_schema.check_body`, which the client applies too. Unknown
    fields are allowed (passed to the backend); known ones must have the documented types and
    ranges. `max_batch_inputs` is the gateway's own cap on inputs per embeddings request.
    """
    check_body(endpoint, body)
    if endpoint == "embeddings":
        inputs = body.get("input")
        if isinstance(inputs, list) and len(inputs) > max_batch_inputs and not isinstance(inputs[0], int):
            raise PayloadTooLarge(
                f"'input' has {len(inputs)} items; at most {max_batch_inputs} per request (max_batch_inputs)",
                param="input",
            )


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
                texts = [str(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
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
