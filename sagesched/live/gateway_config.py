"""The gateway's YAML configuration file: policy, backends and server knobs, validated with line numbers.

An operator edits this file by hand, so every mistake is reported with the line it is on and what to
write instead (``gateway.yaml line 7: backends[1].kind: unknown kind 'gpu'; use one of llm, embedding,
llm_embedding``). Line numbers come from the YAML node marks, not from guessing in the text.

At its simplest::

    policy: hybrid            # or {name: hybrid, embedding_batch_size: 16, ...}
    backends:
      - {url: "http://127.0.0.1:8001", kind: llm, models: [llama-2-7b]}
      - {url: "http://127.0.0.1:8090", kind: embedding, models: [bge-base]}
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sagesched.core import InstanceKind
from sagesched.typed_config import INTERNAL, ConfigFieldError, field_path, from_mapping, parse_with

if TYPE_CHECKING:
    from sagesched.live.backends import BackendConfig

DEFAULT_POLICY = "hybrid"


class GatewayConfigError(ValueError):
    """An invalid gateway configuration; the message names the file, the line and the fix."""


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
APIS = ("openai", "tei")


# -- forms the annotations do not spell (each runs through the typed config layer's `parse`) ----------


def _expand_env(value: Any) -> Any:
    """`${NAME}` takes a secret from the environment, so keys need not be written into the file."""
    if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        name = value[2:-1]
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set; export it or write the key itself")
        if not os.environ[name].strip():
            # An empty key would match an empty or missing bearer token: authentication silently off.
            raise ValueError(f"environment variable {name} is empty; export a non-empty key")
        return os.environ[name]
    return value


def _non_empty(value: Any) -> Any:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError("must be a non-empty string (or leave it out)")
    return value


def _secret(value: Any) -> Any:
    return _expand_env(_non_empty(value))


def _api_keys(value: Any) -> tuple[str, ...]:
    keys = [value] if isinstance(value, str) else value
    if not isinstance(keys, list | tuple) or not all(isinstance(k, str) and k for k in keys):
        raise ValueError("must be a list of non-empty strings, e.g. [sk-local-1]")
    return tuple(_expand_env(k) for k in keys)


def _host(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise ValueError("must be an interface address such as 127.0.0.1 (or 0.0.0.0 to expose it)")
    if value != "localhost":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address; write e.g. 127.0.0.1") from None
    return value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _kind_name(value: Any) -> str:
    return InstanceKind.parse(value).value


def _model_list(value: Any) -> Any:
    models = [value] if isinstance(value, str) else value
    if not isinstance(models, list | tuple) or not models or not all(isinstance(m, str) and m for m in models):
        raise ValueError("must be a non-empty list of model names, e.g. [llama-2-7b]")
    return tuple(models)


def _url(value: Any) -> Any:
    from sagesched.live.backends import base_url_problem

    problem = base_url_problem(value) if isinstance(value, str) else f"{value!r} is not an http(s) URL"
    if problem:
        raise ValueError(f"{problem}; write e.g. http://127.0.0.1:8001")
    return value.rstrip("/")


def _executor_knobs(value: Any) -> dict[str, Any]:
    """The `executor:` section judged by `ExecutorConfig` itself: unknown keys, types and values."""
    from sagesched.live.executor_config import ExecutorConfig

    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping of ExecutorConfig fields")
    from_mapping(ExecutorConfig, value, "executor")
    return dict(value)


@dataclass(frozen=True)
class BackendEntry:
    """One backend as written in the file (converted to the executor's `BackendConfig` at start).

    url: base URL of an OpenAI-compatible server (vLLM, TEI, llama-server, an emulator), no `/v1`.
    kind: `llm`, `embedding` or `llm_embedding`: which request types it may receive.
    models: the model names it serves; requests for other models never go to it.
    id: a stable name for metrics and records (default: derived by the executor from the URL).
    api_key: bearer key the gateway sends to this backend, if it needs one (`${VAR}`: from the environment).
    max_inflight: requests the gateway lets be outstanding at it; None keeps the executor default.
    api: `openai` (OpenAI routes) or `tei` (TEI's native `/embed` for embeddings).
    extra: further `BackendConfig` fields (written beside the others in the file), passed through.
    """

    url: str = field(metadata=parse_with(_url))
    kind: str = field(metadata=parse_with(_kind_name))
    models: tuple[str, ...] = field(metadata=parse_with(_model_list))
    id: str | None = field(default=None, metadata=parse_with(_non_empty))
    api_key: str | None = field(default=None, metadata=parse_with(_secret))
    max_inflight: int | None = None
    api: str = field(default="openai", metadata=parse_with(_lower))
    extra: Mapping[str, Any] = field(default_factory=dict, metadata={INTERNAL: True})

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ConfigFieldError(("api",), f"unknown api {self.api!r}; use openai or tei")
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ConfigFieldError(("max_inflight",), f"{self.max_inflight} is out of range; use a number >= 1")

    @classmethod
    def read(cls, item: Any) -> BackendEntry:
        """An entry of `backends:`; keys beyond the entry's own are `BackendConfig` fields, checked by it."""
        if not isinstance(item, Mapping):
            raise ValueError(
                f"each backend is a mapping like {{url: http://127.0.0.1:8001, kind: llm, models: [m]}}, not {_kind(item)}"
            )
        own = {k: v for k, v in item.items() if k in _BACKEND_KEYS}
        extra = {k: v for k, v in item.items() if k not in _BACKEND_KEYS}
        from sagesched.live.backends import BackendConfig

        entry = from_mapping(cls, own, "backend", fixed={"extra": extra})
        from_mapping(BackendConfig, entry.backend_fields(), "backend")  # its types and values, at the field
        return entry

    def backend_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"url": self.url, "kind": self.kind, "models": list(self.models), "api": self.api}
        for key in ("id", "api_key", "max_inflight"):
            if getattr(self, key) is not None:
                fields[key] = getattr(self, key)
        fields.update(self.extra)
        return fields

    def to_backend_config(self) -> BackendConfig:
        """Build the executor's `BackendConfig` (imported here: the config file loads without it)."""
        from sagesched.live.backends import BackendConfig

        return BackendConfig(**self.backend_fields())


_BACKEND_KEYS = ("url", "kind", "models", "id", "api_key", "max_inflight", "api")


def _backend_list(value: Any) -> tuple[BackendEntry, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of {url, kind, models} mappings")
    entries: list[BackendEntry] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        try:
            entry = BackendEntry.read(item)
        except ConfigFieldError as exc:
            raise ConfigFieldError(
                (i, *exc.path), exc.message if exc.path else f"invalid backend: {exc.message}"
            ) from None
        except ValueError as exc:
            raise ConfigFieldError((i,), str(exc)) from None
        # The executor's id: the `id:` given, else host:port from the url (`http://127.0.0.1:8001` and
        # `HTTP://127.0.0.1:8001/` are one backend, and so is an `id: 127.0.0.1:8001` elsewhere).
        key = str(entry.to_backend_config().id)  # (set by BackendConfig when not given)
        if key in seen:
            label = entry.id or entry.url
            derived = "" if label == key else f", both id {key!r}"
            raise ConfigFieldError(
                (i,),
                f"duplicate backend {label!r} (also backends[{seen[key]}]{derived}); give each a distinct url or id",
            )
        seen[key] = i
        entries.append(entry)
    return tuple(entries)


@dataclass(frozen=True)
class GatewayConfig:
    """Everything `UnifiedAPIServer` needs; every field has a safe default except the backends.

    policy / policy_config: the scheduling policy by registry name and its config fields.
    backends: the pool (at least one).
    host: interface to bind; 127.0.0.1 so that nothing is exposed unless the operator says so.
    port: TCP port (the CLI's --port overrides it); 0 takes any free port.
    workers: gateway processes sharing the port through SO_REUSEPORT, each with its own executor.
    api_keys: bearer keys clients must send on /v1 routes; empty means no authentication.
    admin_key: bearer key for /admin routes. Without it the admin routes are open only when
        `api_keys` is empty too (a local, unauthenticated setup); with `api_keys` set and no
        admin_key they are closed (403), since a user key must never switch the policy.
    max_queue: requests waiting in the gateway queue beyond which new ones get 429 + Retry-After.
    max_body_bytes: largest request body accepted (413 beyond).
    max_batch_inputs: most inputs one embeddings request may carry (413 beyond; OpenAI allows 2048).
    request_timeout_s: per-request deadline from arrival to the last byte (504 when it passes).
    drain_timeout_s: on shutdown, how long in-flight requests may take to finish.
    health_interval_s: seconds between backend health probes.
    log_level: uvicorn/gateway log level.
    executor: further `ExecutorConfig` fields, passed through unchanged.
    """

    backends: tuple[BackendEntry, ...] = field(metadata=parse_with(_backend_list))
    policy: str = DEFAULT_POLICY
    policy_config: Mapping[str, Any] = field(default_factory=dict, metadata={INTERNAL: True})
    host: str = field(default="127.0.0.1", metadata=parse_with(_host))
    port: int = 8000
    workers: int = 1
    api_keys: tuple[str, ...] = field(default=(), metadata=parse_with(_api_keys))
    admin_key: str | None = field(default=None, metadata=parse_with(_secret))
    max_queue: int = 1024
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_inputs: int = 2048
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    health_interval_s: float = 5.0
    log_level: str = field(default="info", metadata=parse_with(_lower))
    executor: Mapping[str, Any] = field(default_factory=dict, metadata=parse_with(_executor_knobs))
    source: str = field(default="<config>", metadata={INTERNAL: True})

    def __post_init__(self) -> None:
        if not self.backends:
            raise GatewayConfigError(f"{self.source}: no backends; add at least one under `backends:`")
        ranges = {"port": (0, 65535), "workers": (1, 256), "max_queue": (1, None), "max_body_bytes": (1024, None)}
        ranges["max_batch_inputs"] = (1, None)
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                bound = f"between {low} and {high}" if high is not None else f">= {low}"
                raise ConfigFieldError((name,), f"{value} is out of range; use a number {bound}")
        for name in ("request_timeout_s", "drain_timeout_s", "health_interval_s"):
            if not getattr(self, name) > 0:
                raise ConfigFieldError((name,), f"must be a positive number of seconds, not {getattr(self, name)!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigFieldError(("log_level",), f"{self.log_level!r}: use one of {', '.join(LOG_LEVELS)}")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def with_overrides(self, **changes: Any) -> GatewayConfig:
        """A copy with some fields replaced (None values are ignored: "not given on the command line")."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def make_policy(self) -> Any:
        from sagesched.policies import make_policy

        return make_policy(self.policy, **dict(self.policy_config))

    def backend_configs(self) -> list[BackendConfig]:
        return [entry.to_backend_config() for entry in self.backends]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<config>") -> GatewayConfig:
        """Validate a plain mapping (no line numbers; used by tests and programmatic callers)."""
        return _Parser(source, {}).parse(data)


def load_gateway_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate a YAML file; raise GatewayConfigError naming the line and the fix."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GatewayConfigError(f"config file {str(p)!r} not found; pass an existing file with --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GatewayConfigError(f"cannot read config file {str(p)!r}: {exc}") from None
    return parse_gateway_config(text, source=str(p))


def parse_gateway_config(text: str, source: str = "<config>") -> GatewayConfig:
    """Validate YAML text; see `load_gateway_config`."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise GatewayConfigError(f"{source}{line}: invalid YAML: {exc.problem or exc}; fix the syntax there") from None
    except yaml.YAMLError as exc:
        raise GatewayConfigError(f"{source}: invalid YAML: {exc}") from None
    if data is None:
        raise GatewayConfigError(f"{source}: the file is empty; it needs at least a `backends:` list")
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _collect_lines(node, (), lines)
        duplicate = _duplicate_key(node, ())
        if duplicate is not None:  # YAML keeps the last silently: one of the two settings would be ignored
            path, at, first = duplicate
            raise GatewayConfigError(
                f"{source} line {at}: {field_path(path)}: duplicate key (also on line {first}); keep one of them"
            )
    return _Parser(source, lines).parse(data)


def _duplicate_key(node: yaml.Node, path: tuple[Any, ...]) -> tuple[tuple[Any, ...], int, int] | None:
    """The first key written twice in one mapping: (its path, its line, the first one's line)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                return (*path, key), key_node.start_mark.line + 1, seen[key]
            if key is not None:
                seen[key] = key_node.start_mark.line + 1
            found = _duplicate_key(value_node, (*path, key))
            if found is not None:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found = _duplicate_key(item, (*path, index))
            if found is not None:
                return found
    return None


def _collect_lines(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    """Map each value's path (keys and list indices) to its 1-based line in the file."""
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            out[(*path, key)] = key_node.start_mark.line + 1
            _collect_lines(value_node, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _collect_lines(item, (*path, index), out)


class _Parser:
    """Turns the constructed YAML into a GatewayConfig, reporting errors at the right line."""

    def __init__(self, source: str, lines: dict[tuple[Any, ...], int]) -> None:
        self.source = source
        self.lines = lines

    def fail(self, path: tuple[Any, ...], message: str) -> GatewayConfigError:
        where = path
        while where and where not in self.lines:
            where = where[:-1]
        line = self.lines.get(where)
        name = field_path(path)
        prefix = f"{self.source} line {line}" if line is not None else self.source
        return GatewayConfigError(f"{prefix}: {name + ': ' if name else ''}{message}")

    def parse(self, data: Any) -> GatewayConfig:
        if not isinstance(data, Mapping):
            raise self.fail((), f"the top level must be a mapping with `policy:` and `backends:`, not {_kind(data)}")
        if "backends" not in data or data["backends"] is None:
            raise self.fail(("backends",), "missing; add `backends:` with at least one {url, kind, models} entry")
        name, config = self.policy(data.get("policy", DEFAULT_POLICY))
        fields = {**data, "policy": name}
        fixed = {"source": self.source, "policy_config": config}
        try:
            return from_mapping(GatewayConfig, fields, fixed=fixed)
        except ConfigFieldError as exc:
            raise self.fail(exc.path, exc.message) from None

    def policy(self, value: Any) -> tuple[str, dict[str, Any]]:
        """The policy by name, or a mapping with `name:` and its config fields, judged by the policy's Config."""
        if isinstance(value, str):
            path: tuple[str, ...]
            name, config, path = value, {}, ("policy",)
        elif isinstance(value, Mapping):
            if "name" not in value or not isinstance(value["name"], str):
                raise self.fail(("policy",), "a policy mapping needs `name:` (e.g. {name: hybrid, ...})")
            name, config, path = value["name"], {k: v for k, v in value.items() if k != "name"}, ("policy", "name")
        else:
            raise self.fail(
                ("policy",), f"write a policy name (e.g. `policy: hybrid`) or a mapping, not {_kind(value)}"
            )
        from sagesched.policies import make_policy
        from sagesched.typed_config import ConfigFieldError

        try:
            make_policy(name, **config)
        except ConfigFieldError as exc:
            raise self.fail(("policy", *exc.path) if exc.path else path, exc.message) from None
        except ValueError as exc:  # an unknown policy name
            raise self.fail(path, str(exc)) from None
        return name, config


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )
