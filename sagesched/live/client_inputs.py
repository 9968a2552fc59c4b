"""What the client accepts as messages, prompts and texts: one precise error instead of a TypeError.

The client's methods take friendly shapes (a user string for `messages`, one text for `embed`);
these turn them into OpenAI body values, or raise `InvalidRequest` naming the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from sagesched.live.errors import InvalidRequest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def as_messages(messages: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A user string or a list of {role, content} mappings; anything else is InvalidRequest, not TypeError."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if (
        isinstance(messages, Sequence)
        and not isinstance(messages, bytes | bytearray)
        and messages
        and all(isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in messages)
    ):
        return [dict(cast(Mapping[str, Any], m)) for m in messages]
    raise InvalidRequest(
        "messages must be a string or a non-empty list of {'role': ..., 'content': ...} dicts, "
        f"not {_describe(messages)}",
        param="messages",
    )


def as_prompt(prompt: Any) -> str | list[Any]:
    """A completions prompt: a string, a list of strings, a token list or a list of token lists."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt) or all(_is_int(t) for t in prompt):
            return prompt
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return prompt
    raise InvalidRequest(
        f"prompt must be a string, a list of strings or a list of token ids, not {_describe(prompt)}",
        param="prompt",
    )


def as_texts(texts: Any) -> list[str]:
    """Embedding inputs: one string or a list/tuple of strings (a dict's keys are not texts)."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, list | tuple) and all(isinstance(t, str) for t in texts):
        return list(texts)
    raise InvalidRequest(
        f"texts must be a string or a list of strings, not {_describe(texts)}",
        param="input",
    )


__all__ = ["as_messages", "as_prompt", "as_texts"]
