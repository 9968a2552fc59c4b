"""One typed layer for every config: a mapping (YAML, a Hydra/OmegaConf node, a dict) checked against
a frozen dataclass.

The simulator's configs (`sim.config`), the workload (`sim.workloads.config`), the experiment's
driver (`replay.config`), the executor's and backends' knobs and the gateway file all come through
`from_mapping`, so a wrong key, a wrong type or a bad value gets the same kind of message everywhere:
a `ConfigFieldError` whose `path` locates the field from the config's root (``workload.arrival.
rate_rps``, ``cluster.instances[0].vllm.max_num_seqs``: the Hydra override to fix). The gateway file
turns that path into a line number.

How a dataclass is read:

- Keys are its init fields; unknown keys are refused with the valid ones listed. Fields whose
  metadata says ``internal`` are not keys (the caller passes them through `fixed`).
- Nested dataclass fields (``X``, ``X | None``, ``tuple[X, ...]``) take a mapping (or a list of
  them) and are read recursively, so their errors carry the full path.
- The other fields are type-checked by a pydantic model built once per class from the annotations,
  strictly (a string is not a number, a bool is not an int), with two conveniences YAML and Hydra
  need: a list where a tuple is declared, and a whole float (``1e3``, ``100.0``) where an int is.
- A field's metadata may name a ``parse`` function, ``parse(value) -> value``, for forms the
  annotation does not spell (a count or a list of names for a mapping, an enum by name, ``${VAR}``
  secrets); a ValueError it raises is reported at the field.
- Value rules stay in the dataclass's `__post_init__`. A rule that knows its field raises
  ``ConfigFieldError((field,), message)``; a plain ValueError whose message starts with a field
  name (``max_queue must be >= 1``) is located at that field, else at the dataclass itself.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

T = TypeVar("T")

Path = tuple[str | int, ...]

PARSE = "parse"
INTERNAL = "internal"


class ConfigFieldError(ValueError):
    """A config field is unknown, missing, or has the wrong type or value; `path` locates it."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{field_path(path)}: {message}" if path else message)
        self.path = tuple(path)
        self.message = message


def field_path(path: Path) -> str:
    """``("cluster", "instances", 0, "vllm")`` -> ``cluster.instances[0].vllm``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_with(parse: Callable[[Any], Any], **metadata: Any) -> dict[str, Any]:
    """Field metadata naming a `parse` function: ``field(default=..., metadata=parse_with(fn))``."""
    return {PARSE: parse, **metadata}


def plain(data: Any) -> Any:
    """OmegaConf containers to plain Python (resolving interpolations); anything else unchanged."""
    if type(data).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(data, resolve=True)
    return data


# -- what a dataclass's fields are ------------------------------------------------------------------


@dataclass(frozen=True)
class _Nested:
    cls: type
    many: bool  # tuple[cls, ...]
    optional: bool


@dataclass(frozen=True)
class _Spec:
    keys: tuple[str, ...]  # accepted keys, in declaration order
    hints: dict[str, Any]
    nested: dict[str, _Nested]
    parsers: dict[str, Callable[[Any], Any]]
    required: tuple[str, ...]
    leaves: type[BaseModel]


def _nested_of(hint: Any) -> _Nested | None:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _Nested(hint, many=False, optional=False)
    if origin in (types.UnionType, typing.Union) and len(args) == 1:
        inner = _nested_of(args[0])
        return dataclasses.replace(inner, optional=True) if inner is not None else None
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        arg = args[0]
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return _Nested(arg, many=True, optional=False)
    return None


@cache
def _spec(cls: type) -> _Spec:
    hints = typing.get_type_hints(cls)
    keys, nested, parsers, required, leaves = [], {}, {}, [], {}
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get(INTERNAL):
            continue
        keys.append(f.name)
        if PARSE in f.metadata:
            parsers[f.name] = f.metadata[PARSE]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        inner = _nested_of(hints[f.name])
        if inner is not None:
            nested[f.name] = inner
        else:
            leaves[f.name] = (hints[f.name], None)  # presence and defaults are the dataclass's business
    model = create_model(  # type: ignore[call-overload]
        f"{cls.__name__}Fields",
        __config__=ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True),
        **leaves,
    )
    return _Spec(tuple(keys), hints, nested, parsers, tuple(required), model)


# -- reading -----------------------------------------------------------------------------------------


def from_mapping(
    cls: type[T],
    data: Any,
    what: str = "",
    *,
    root: Path = (),
    fixed: Mapping[str, Any] | None = None,
) -> T:
    """Build dataclass `cls` from `data`; a ConfigFieldError naming the field and the fix otherwise.

    `what` names the section in the unknown-key message ("executor", "backend"); `root` is the
    path of `data` itself, prefixed to every error's path; `fixed` passes internal fields through.
    An instance of `cls` is returned as is.
    """
    data = plain(data)
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigFieldError(root, f"must be a mapping of {cls.__name__} fields, not {_kind(data)} {data!r}")
    klass: type = cls  # (a plain type for the cache's key)
    spec = _spec(klass)
    unknown = [str(k) for k in data if k not in spec.keys]
    if unknown:
        label = f"{what} " if what else ""
        names = ", ".join(map(repr, unknown))
        raise ConfigFieldError(
            (*root, unknown[0]),
            f"unknown {label}key{'s' if len(unknown) > 1 else ''} {names}; "
            f"valid keys: {', '.join(sorted(spec.keys)) or '(none)'}",
        )
    kwargs: dict[str, Any] = {}
    leaves: dict[str, Any] = {}
    for key, value in data.items():
        path = (*root, key)
        parse = spec.parsers.get(key)
        if parse is not None:
            value = _located(path, parse, value)
        inner = spec.nested.get(key)
        if inner is not None:
            kwargs[key] = _read_nested(inner, value, path)
        else:
            leaves[key] = _normalise(spec.hints[key], value)
    if leaves:
        try:
            checked = spec.leaves.model_validate(leaves)
        except ValidationError as exc:
            loc = exc.errors(include_url=False)[0].get("loc", ())
            key = str(loc[0]) if loc else next(iter(leaves))
            message = f"must be {describe(spec.hints[key])}, got {leaves[key]!r}{_quoted_number_hint(spec.hints[key], leaves[key])}"
            raise ConfigFieldError((*root, key), message) from None
        kwargs.update((key, getattr(checked, key)) for key in leaves)
    missing = [name for name in spec.required if name not in kwargs and not (fixed and name in fixed)]
    if missing:
        raise ConfigFieldError((*root, missing[0]), f"missing; {cls.__name__} needs {', '.join(missing)}")
    if fixed:
        kwargs.update(fixed)
    try:
        return cls(**kwargs)
    except ConfigFieldError as exc:
        raise ConfigFieldError((*root, *exc.path), exc.message) from None
    except (TypeError, ValueError) as exc:
        message = str(exc)
        head = message.split(" ", 1)[0].strip(":'\",").rsplit(".", 1)[-1]
        raise ConfigFieldError((*root, head) if head in data else root, message) from None


def _located(path: Path, parse: Callable[[Any], Any], value: Any) -> Any:
    try:
        return parse(value)
    except ConfigFieldError as exc:
        raise ConfigFieldError((*path, *exc.path), exc.message) from None
    except (TypeError, ValueError) as exc:
        raise ConfigFieldError(path, str(exc)) from None


def _read_nested(inner: _Nested, value: Any, path: Path) -> Any:
    value = plain(value)
    if value is None and inner.optional:
        return None
    if not inner.many:
        return from_mapping(inner.cls, value, root=path)
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigFieldError(path, f"must be a list of {inner.cls.__name__} mappings, not {_kind(value)} {value!r}")
    return tuple(from_mapping(inner.cls, item, root=(*path, i)) for i, item in enumerate(value))


def _normalise(hint: Any, value: Any) -> Any:
    """The two conveniences over strict types: list -> tuple, whole float -> int."""
    if isinstance(value, list) and _accepts(hint, tuple) and not _accepts(hint, list):
        return tuple(value)
    if isinstance(value, float) and value.is_integer() and _accepts(hint, int) and not _accepts(hint, float):
        return int(value)
    return value


def _accepts(hint: Any, kind: type) -> bool:
    if hint is kind or typing.get_origin(hint) is kind:
        return True
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_accepts(arg, kind) for arg in typing.get_args(hint))
    return False


# -- messages ----------------------------------------------------------------------------------------

_NAMES: dict[Any, tuple[str, str]] = {
    int: ("a whole number", "whole numbers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "booleans"),
    str: ("a string", "strings"),
    type(None): ("null", "nulls"),
    Any: ("any value", "values"),
}


def describe(hint: Any, plural: bool = False) -> str:
    """A type annotation in words: ``int | None`` -> "a whole number or null"."""
    if hint in _NAMES:
        return _NAMES[hint][plural]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(describe(arg, plural) for arg in args)
    if origin in (tuple, list, set, frozenset, Sequence):
        return f"{'lists' if plural else 'a list'} of {describe(args[0], True) if args else 'values'}"
    if origin in (dict, Mapping):
        key, val = (describe(a, True) for a in args) if args else ("keys", "values")
        return f"{'mappings' if plural else 'a mapping'} of {key} to {val}"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in hint)
    return getattr(hint, "__name__", str(hint))


def _quoted_number_hint(hint: Any, value: Any) -> str:
    """Why a number arrived as text: quotes, or YAML 1.1's exponent form (`1e-3` is a string to PyYAML)."""
    if not isinstance(value, str) or not (_accepts(hint, int) or _accepts(hint, float)):
        return ""
    try:
        if not math.isfinite(float(value)):
            return ""
    except ValueError:
        return ""
    if "e" in value.lower() and "." not in value.lower().split("e")[0]:
        return f" (text: YAML reads exponent notation without a decimal point as a string; write {_with_point(value)})"
    return " (text: write the number without quotes)"


def _with_point(value: str) -> str:
    mantissa, _, exponent = value.lower().partition("e")
    return f"{mantissa}.0e{exponent}"


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", tuple: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


__all__ = ["ConfigFieldError", "describe", "field_path", "from_mapping", "parse_with", "plain"]
