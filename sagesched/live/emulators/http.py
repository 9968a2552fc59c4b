"""HTTP helpers shared by the emulators: OpenAI-shaped errors, JSON bodies, SSE framing."""

from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "PayloadTooLarge", 429: "TooManyRequests"}


class HttpError(Exception):
    """An error a caller caused; rendered as `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """vLLM's error body (the OpenAI shape: message, type, param, code)."""
    body = {
        "error": {"message": message, "type": _ERROR_TYPES.get(status, "ServerError"), "param": param, "code": status}
    }
    return JSONResponse(body, status_code=status)


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HttpError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HttpError(400, "request body must be a JSON object")
    return body


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event line pair, as OpenAI-compatible servers frame stream chunks."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def int_field(body: dict[str, Any], name: str, default: int | None, minimum: int = 0) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HttpError(400, f"{name} must be an integer >= {minimum}", param=name)
    return value
