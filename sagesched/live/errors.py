"""The errors live mode returns to callers, each with its HTTP status and OpenAI error shape.

Every failure a caller can see is a `LiveError`: the executor raises them, the gateway turns them
into ``{"error": {"message", "type", "param", "code"}}`` bodies with `status`, and the client
re-raises them from such bodies. One class per status keeps the mapping in one place, so an
upstream 4xx never becomes a 500 and a timeout is never reported as a generic failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class LiveError(Exception):
    """Base of every caller-visible live-mode error.

    `status` is the HTTP status, `code` a stable machine-readable code, `param` the request field at
    fault (or None), and `message` says what to change.
    """

    status: int = 500
    code: str = "internal_error"
    # Empty: derived from the status (4xx invalid_request_error, else server_error).
    error_type: ClassVar[str] = ""

    def __init__(
        self,
        *args: Any,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        message: str | None = None,
    ) -> None:
        # Two call shapes: ``InvalidRequest("msg", param="x")`` (usual) and the positional
        # ``LiveError(status, code, message, param)`` that docs/internals.md lists.
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            padded = [*args, None, None, None][:4]
            status, code, message, param = padded[0], padded[1] or code, padded[2] or message, padded[3] or param
        elif args:
            message = str(args[0])
        message = message or self.code
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = http_status(status)
        if code is not None:
            self.code = code
        self.param = param

    @property
    def type(self) -> str:
        """The OpenAI error `type`: invalid_request_error for 4xx, server_error for 5xx, unless set."""
        if self.error_type:
            return self.error_type
        return "invalid_request_error" if 400 <= self.status < 500 else "server_error"

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    # Seconds a caller should wait before retrying (sent as Retry-After on 429 and 503), if known.
    retry_after_s: float | None = None

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers the response should carry: Retry-After for 429 (always) and 503 (when known)."""
        if self.status == 429:
            return {"Retry-After": str(max(1, round(self.retry_after_s or 1.0)))}
        if self.status == 503 and self.retry_after_s is not None:
            return {"Retry-After": str(max(1, round(self.retry_after_s)))}
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, message={self.message!r})"


class InvalidRequest(LiveError):
    """400: the body or a header is malformed; `param` names the field."""

    status = 400
    code = "invalid_request"
    error_type = "invalid_request_error"


class AuthenticationError(LiveError):
    """401: a missing or wrong API key."""

    status = 401
    code = "invalid_api_key"
    error_type = "authentication_error"


class ModelNotFound(LiveError):
    """404: no backend serves the requested model; the message lists the models there are."""

    status = 404
    code = "model_not_found"
    error_type = "invalid_request_error"


class PayloadTooLarge(LiveError):
    """413: the body or the batch exceeds a configured limit."""

    status = 413
    code = "payload_too_large"
    error_type = "invalid_request_error"


class QueueFull(LiveError):
    """429: the gateway queue is at `max_queue`; retry after `retry_after_s` seconds."""

    status = 429
    code = "queue_full"
    error_type = "rate_limit_error"

    def __init__(self, *args: Any, retry_after_s: float = 1.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.retry_after_s = float(retry_after_s)


class RequestRejected(LiveError):
    """The scheduling policy refused the request; `code` is the policy's `RejectCode`.

    The status follows the code: 429 for a full queue, 413 for too large, 404 when no instance
    serves the model, 503 otherwise (the pool cannot serve it now).
    """

    status = 503
    code = "rejected"

    _STATUS_BY_CODE: ClassVar[dict[str, int]] = {
        "queue_full": 429,
        "too_large": 413,
        "no_compatible_instance": 404,
        "slo_unattainable": 503,
        "backend_rejected": 503,
    }

    def __init__(self, *args: Any, code: str = "rejected", rule: str = "", **kw: Any) -> None:
        if kw.get("status") is None:
            kw["status"] = self._STATUS_BY_CODE.get(code, 503)
        super().__init__(*args, code=code, **kw)
        self.rule = rule

    @property
    def type(self) -> str:
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"


class NoBackendAvailable(LiveError):
    """503: no healthy backend can serve the request now."""

    status = 503
    code = "no_backend_available"
    error_type = "server_error"


class UpstreamTimeout(LiveError):
    """504: the request did not finish within its timeout."""

    status = 504
    code = "upstream_timeout"
    error_type = "server_error"


class UpstreamError(LiveError):
    """A backend answered with an error (status passed through) or broke the connection (502)."""

    status = 502
    code = "upstream_error"


class BackendUnavailable(UpstreamError):
    """502: the backend could not be reached, or dropped the connection before sending any byte.

    Nothing reached the caller yet, so the executor may safely retry the request elsewhere; it
    reaches a caller only when every retry failed.
    """

    code = "backend_unavailable"


class BackendOverloaded(BackendUnavailable):
    """503: the backend answered 503 (overloaded, loading or draining) before sending any answer.

    Retried elsewhere like any `BackendUnavailable`. Unlike a dead backend, an overloaded one asks to
    be tried again later, so when its 503 is still the last failure after every retry the caller gets
    a 503 with Retry-After (`retry_after_s`: the backend's own, else the executor's), not a 502.
    """

    status = 503
    code = "backend_overloaded"

    def __init__(self, *args: Any, retry_after_s: float | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.retry_after_s = retry_after_s


def gave_up(last: LiveError, attempts: int, retry_after_s: float) -> LiveError:
    """What the caller hears when every attempt failed before a byte: the last failure decides.

    A backend's own 503 becomes `BackendOverloaded` with a Retry-After (the backend's, else
    `retry_after_s`), so clients back off and come back; a refused or dropped connection stays a 502
    `BackendUnavailable`, since waiting is not known to help.
    """
    if isinstance(last, BackendOverloaded):
        wait = last.retry_after_s if last.retry_after_s is not None else retry_after_s
        return BackendOverloaded(
            f"every backend tried refused the request as overloaded (gave up after {attempts} attempts; "
            f"last: {last.message}); retry after {max(1, round(wait))}s",
            retry_after_s=wait,
        )
    return BackendUnavailable(f"{last.message} (gave up after {attempts} attempts)")


class ServiceStopping(LiveError):
    """503: the executor is shutting down and accepts no new requests."""

    status = 503
    code = "service_stopping"
    error_type = "server_error"


# -- errors the gateway itself answers -----------------------------------------------------------


class MethodNotAllowed(LiveError):
    status = 405
    code = "method_not_allowed"
    error_type = "invalid_request_error"


class RouteNotFound(LiveError):
    status = 404
    code = "not_found"
    error_type = "invalid_request_error"


class Forbidden(LiveError):
    status = 403
    code = "forbidden"
    error_type = "permission_error"


class UnsupportedMediaType(LiveError):
    status = 415
    code = "unsupported_media_type"
    error_type = "invalid_request_error"


class BodyTimeout(LiveError):
    status = 408
    code = "request_body_timeout"
    error_type = "invalid_request_error"


class InternalError(LiveError):
    status = 500
    code = "internal_error"
    error_type = "server_error"


_BY_STATUS: dict[int, type[LiveError]] = {
    400: InvalidRequest,
    401: AuthenticationError,
    404: ModelNotFound,
    413: PayloadTooLarge,
    429: QueueFull,
    503: NoBackendAvailable,
    504: UpstreamTimeout,
}


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form); None when absent or unreadable."""
    if not headers:
        return None
    for name, value in headers.items():
        if name.lower() == "retry-after":
            try:
                seconds = float(value)
            except (TypeError, ValueError):
                return None
            return seconds if 0 <= seconds < 86_400 else None
    return None


def http_status(status: Any) -> int:
    """`status` if it is an HTTP error status (400-599), else 502: a backend never picks a 1xx/2xx/3xx/999."""
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599:
        return status
    return 502


def error_from_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> LiveError:
    """Rebuild a `LiveError` from an HTTP status and (OpenAI-shaped or not) error body.

    Used by the client and the backend adapter so that what a server said reaches the caller intact:
    the status (only an error status 400-599; anything else becomes 502 with the original in the
    message), the message, a 429's Retry-After (from `headers`, else 1 s) and a 503's (when sent).
    """
    message = ""
    code: str | None = None
    param: str | None = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("detail") or "")
            raw_code = err.get("code")
            code = str(raw_code) if raw_code is not None else None
            param = err.get("param") if isinstance(err.get("param"), str) else None
        elif isinstance(err, str):
            message = err
    elif isinstance(body, (str, bytes)):
        message = body.decode(errors="replace") if isinstance(body, bytes) else body
    message = message.strip()[:2000] or f"HTTP {status}"
    safe = http_status(status)
    if safe != status:
        message = f"{message} (the server gave status {status!r}, which is not an HTTP error status)"
        code = "upstream_error"
    cls = _BY_STATUS.get(safe, UpstreamError)
    if cls is QueueFull:
        retry = _retry_after(headers)
        return QueueFull(message, status=safe, code=code, param=param, retry_after_s=1.0 if retry is None else retry)
    error = cls(message, status=safe, code=code, param=param)
    if safe == 503:
        error.retry_after_s = _retry_after(headers)
    return error


__all__ = [
    "AuthenticationError",
    "BackendOverloaded",
    "BackendUnavailable",
    "BodyTimeout",
    "Forbidden",
    "InternalError",
    "InvalidRequest",
    "LiveError",
    "MethodNotAllowed",
    "ModelNotFound",
    "NoBackendAvailable",
    "PayloadTooLarge",
    "QueueFull",
    "RequestRejected",
    "RouteNotFound",
    "ServiceStopping",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamTimeout",
    "error_from_response",
    "gave_up",
    "http_status",
]
