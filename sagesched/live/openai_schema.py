"""The OpenAI request bodies the gateway and the client accept, as pydantic models: one set of rules.

The gateway validates every body with `check_body` before it builds a `Request`; the client runs the
same check before it sends, so a malformed call fails in the caller's process with the same message
the gateway would give. Fields the models do not name pass through unchanged (``extra="allow"``):
backends accept many vendor fields (``ignore_eos``, ``top_k``, ...). Named fields are strict: no
string for a number, no bool for an int, no NaN, and integers bounded, so nothing downstream ever
converts a 400-digit integer to a float (OverflowError) or forwards a value no server takes.

Cost (measured with ``python -m sagesched.live.openai_schema``, see `_bench`): ~10 us for a typical
chat body on the gateway's machine, against a per-request budget of ~1 ms.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sagesched.live.errors import InvalidRequest

MAX_TOKENS_LIMIT = 2**31 - 1
"""Largest max_tokens accepted (no model has a longer context; bigger ints overflow float maths)."""

MAX_N = 128
"""Most choices per request (`n`), at the gateway and in the client alike."""

_Text = Annotated[str, Field(min_length=1)]
_Tokens = Annotated[list[int], Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=False)

    model: str = Field(min_length=1)
    user: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    include_usage: bool | None = None


class _Generation(_Body):
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[dict[str, Any] | str] | None = None


class ChatBody(_Generation):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionBody(_Generation):
    """POST /v1/completions: a prompt is text, texts, token ids, or lists of token ids."""

    prompt: str | Annotated[list[str], Field(min_length=1)] | _Tokens | Annotated[list[_Tokens], Field(min_length=1)]
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None


class EmbeddingBody(_Body):
    """POST /v1/embeddings: one text, texts, token ids, or lists of token ids."""

    input: _Text | Annotated[list[_Text], Field(min_length=1)] | _Tokens | Annotated[list[_Tokens], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1, le=1 << 20)


BODY_MODELS: dict[str, type[_Body]] = {"chat": ChatBody, "completions": CompletionBody, "embeddings": EmbeddingBody}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list"})

# Fields that take one of several shapes: one sentence beats pydantic's report per shape.
_UNION_HELP = {
    ("chat", "messages"): "'messages' must be a non-empty list of {role, content} objects "
    "(content: a string or a list of parts)",
    ("completions", "prompt"): "'prompt' must be a string, a non-empty list of strings, a token array "
    "or a list of token arrays",
    ("embeddings", "input"): "'input' must be a non-empty string, a non-empty list of non-empty strings, "
    "a token array or a list of token arrays",
}


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or "constrained" in part or part in _TYPE_TAGS):
            continue  # pydantic's name for a union member, not a field
        else:
            out += f".{part}" if out else str(part)
    return out


def check_body(endpoint: str, body: Any) -> None:
    """Raise `InvalidRequest` naming the field for a body that breaks the rules of `endpoint`.

    `endpoint` is ``chat``, ``completions`` or ``embeddings``. Only the first problem is reported
    (the one a caller fixes first); the message says what the field must be and what was sent.
    """
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, not a JSON {type(body).__name__}")
    if "model" not in body:
        raise InvalidRequest("'model' is required; GET /v1/models lists the served models", param="model")
    try:
        BODY_MODELS[endpoint].model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # For a union (prompt, input, content) pydantic reports every member; the first is enough.
        first = errors[0]
        loc = tuple(first.get("loc", ()))
        field = str(loc[0]) if loc else None
        if first.get("type") == "missing":
            message = f"'{_where(loc)}' is required for {endpoint}"
        elif field is not None and (endpoint, field) in _UNION_HELP:
            message = f"{_UNION_HELP[endpoint, field]}; got {_short(body.get(field))}"
        else:
            message = f"'{_where(loc)}': {first.get('msg', 'invalid value')}, got {_short(first.get('input'))}"
        raise InvalidRequest(message, param=field) from None
    if endpoint != "embeddings" and body.get("stream_options") is not None and not body.get("stream"):
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")


def _bench(repeat: int = 20_000) -> None:  # pragma: no cover - a measurement, run by hand
    import time

    body = {
        "model": "m",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello " * 40}],
        "max_tokens": 64,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for label, fn in (("pydantic check_body", lambda: check_body("chat", body)),):
        fn()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        print(f"{label}: {(time.perf_counter() - t0) / repeat * 1e6:.1f} us per chat body")


if __name__ == "__main__":  # pragma: no cover
    _bench()


__all__ = [
    "BODY_MODELS",
    "MAX_N",
    "MAX_TOKENS_LIMIT",
    "ChatBody",
    "CompletionBody",
    "EmbeddingBody",
    "check_body",
]
