"""One typed layer for the live configs: a mapping (a YAML section, a dict) checked against a dataclass.

`ExecutorConfig`, `BackendConfig` and the gateway file's `executor:` and backend sections all come
through `from_mapping`, so a wrong key or a wrong type gets the same kind of message everywhere,
with the path of the field (the gateway file turns that path into a line number). Types come from
the dataclass's annotations, checked by a pydantic model built from them once per class (strict: a
string is not a number, a bool is not an int); value rules stay in each dataclass's `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

T = TypeVar("T")


class ConfigFieldError(ValueError):
    """A config field is unknown or has the wrong type or value; `path` locates it in the mapping."""

    def __init__(self, path: tuple[Any, ...], message: str) -> None:
        super().__init__(f"{_path_name(path)}: {message}" if path else message)
        self.path = path
        self.message = message


def _path_name(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@cache
def _schema(cls: type) -> type[BaseModel]:
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        fields[f.name] = (hints[f.name], None)  # presence and defaults are the dataclass's business
    return create_model(  # type: ignore[call-overload, no-any-return]
        f"{cls.__name__}Schema",
        __config__=ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True),
        **fields,
    )


def from_mapping(cls: type[T], data: Mapping[str, Any], what: str = "") -> T:
    """Build dataclass `cls` from `data`; ConfigFieldError naming the field and the fix otherwise.

    `what` names the section in messages ("executor", "backend"); unknown keys list the valid ones.
    """
    if not isinstance(data, Mapping):
        raise ConfigFieldError((), f"must be a mapping of {cls.__name__} fields, not {type(data).__name__}")
    valid = sorted(f.name for f in dataclasses.fields(cls) if f.init)  # type: ignore[arg-type]
    label = f"{what} " if what else ""
    for key in data:
        if key not in valid:
            raise ConfigFieldError((key,), f"unknown {label}key {key!r}; valid keys: {', '.join(valid)}")
    try:
        _schema(cls).model_validate(dict(data))  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = tuple(first.get("loc", ()))
        field = loc[:1]
        expected = typing.get_type_hints(cls).get(str(loc[0]), "?") if loc else "?"
        shown = getattr(expected, "__name__", None) or str(expected).replace("typing.", "")
        raise ConfigFieldError(
            field, f"must be {shown}: {first.get('msg', 'invalid value')}, got {data.get(str(loc[0]))!r}"
        ) from None
    missing = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init
        and f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigFieldError((missing[0],), f"missing; {cls.__name__} needs {', '.join(missing)}")
    try:
        return cls(**dict(data))
    except (TypeError, ValueError) as exc:
        # `__post_init__` messages start with the field they judge ("max_queue must be >= 1"):
        # locate it, so the gateway file can name the line.
        message = str(exc)
        head = message.split(" ", 1)[0].strip(":'\"")
        raise ConfigFieldError((head,) if head in valid and head in data else (), message) from None


__all__ = ["ConfigFieldError", "from_mapping"]
