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
from typing import Any
from urllib.parse import urlsplit

import yaml

from sagesched.core import InstanceKind

DEFAULT_POLICY = "hybrid"


class GatewayConfigError(ValueError):
    """An invalid gateway configuration; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class BackendEntry:
    """One backend as written in the file (converted to the executor's `BackendConfig` at start).

    url: base URL of an OpenAI-compatible server (vLLM, TEI, llama-server, an emulator), no `/v1`.
    kind: `llm`, `embedding` or `llm_embedding`: which request types it may receive.
    models: the model names it serves; requests for other models never go to it.
    id: a stable name for metrics and records (default: derived by the executor from the URL).
    api_key: bearer key the gateway sends to this backend, if it needs one.
    max_inflight: requests the gateway lets be outstanding at it; None keeps the executor default.
    api: `openai` (OpenAI routes) or `tei` (TEI's native `/embed` for embeddings).
    extra: further `BackendConfig` fields, passed through unchanged.
    """

    url: str
    kind: str
    models: tuple[str, ...]
    id: str | None = None
    api_key: str | None = None
    max_inflight: int | None = None
    api: str = "openai"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_backend_config(self) -> Any:
        """Build the executor's `BackendConfig` (imported here: the config file loads without it)."""
        from sagesched.live.backends import BackendConfig

        kwargs: dict[str, Any] = {"url": self.url, "kind": self.kind, "models": list(self.models), "api": self.api}
        if self.id is not None:
            kwargs["id"] = self.id
        if self.api_key is not None:
            kwargs["api_key"] = self.api_key
        if self.max_inflight is not None:
            kwargs["max_inflight"] = self.max_inflight
        kwargs.update(self.extra)
        return BackendConfig(**kwargs)


@dataclass(frozen=True)
class GatewayConfig:
    """Everything `UnifiedAPIServer` needs; every field has a safe default except the backends.

    policy / policy_config: the scheduling policy by registry name and its config fields.
    backends: the pool (at least one).
    host: interface to bind; 127.0.0.1 so that nothing is exposed unless the operator says so.
    port: TCP port (the CLI's --port overrides it).
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

    backends: tuple[BackendEntry, ...]
    policy: str = DEFAULT_POLICY
    policy_config: Mapping[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    max_queue: int = 1024
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_inputs: int = 2048
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    health_interval_s: float = 5.0
    log_level: str = "info"
    executor: Mapping[str, Any] = field(default_factory=dict)
    source: str = "<config>"

    def __post_init__(self) -> None:
        if not self.backends:
            raise GatewayConfigError(f"{self.source}: no backends; add at least one under `backends:`")

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

    def backend_configs(self) -> list[Any]:
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
    return _Parser(source, lines).parse(data)


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


_TOP_KEYS = {f.name for f in dataclasses.fields(GatewayConfig)} - {"backends", "policy_config", "source"} | {"backends"}
_BACKEND_KEYS = ("url", "kind", "models", "id", "api_key", "max_inflight", "api")


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
        name = _path_name(path)
        prefix = f"{self.source} line {line}" if line is not None else self.source
        return GatewayConfigError(f"{prefix}: {name + ': ' if name else ''}{message}")

    def parse(self, data: Any) -> GatewayConfig:
        if not isinstance(data, Mapping):
            raise self.fail((), f"the top level must be a mapping with `policy:` and `backends:`, not {_kind(data)}")
        unknown = sorted(str(k) for k in data if k not in _TOP_KEYS)
        if unknown:
            raise self.fail((unknown[0],), f"unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(_TOP_KEYS))}")
        values: dict[str, Any] = {"source": self.source}
        values["policy"], values["policy_config"] = self.policy(data.get("policy", DEFAULT_POLICY))
        values["backends"] = self.backends(data.get("backends"))
        if "host" in data:
            values["host"] = self.host(data["host"])
        ints = {"port": (1, 65535), "workers": (1, 256), "max_queue": (1, None), "max_body_bytes": (1024, None)}
        ints["max_batch_inputs"] = (1, None)
        for key, (low, high) in ints.items():
            if key in data:
                values[key] = self.integer((key,), data[key], low, high)
        for key in ("request_timeout_s", "drain_timeout_s", "health_interval_s"):
            if key in data:
                values[key] = self.positive((key,), data[key])
        if "api_keys" in data:
            keys = data["api_keys"]
            if isinstance(keys, str):
                keys = [keys]
            if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
                raise self.fail(("api_keys",), "must be a list of non-empty strings, e.g. [sk-local-1]")
            values["api_keys"] = tuple(_expand_env(k, self, ("api_keys",)) for k in keys)
        if "admin_key" in data and data["admin_key"] is not None:
            if not isinstance(data["admin_key"], str) or not data["admin_key"]:
                raise self.fail(("admin_key",), "must be a non-empty string (or leave it out)")
            values["admin_key"] = _expand_env(data["admin_key"], self, ("admin_key",))
        if "log_level" in data:
            level = str(data["log_level"]).lower()
            if level not in {"critical", "error", "warning", "info", "debug", "trace"}:
                raise self.fail(("log_level",), "use one of critical, error, warning, info, debug, trace")
            values["log_level"] = level
        if "executor" in data:
            if not isinstance(data["executor"], Mapping):
                raise self.fail(("executor",), "must be a mapping of ExecutorConfig fields")
            values["executor"] = dict(data["executor"])
            self.check_executor(values["executor"])
        return GatewayConfig(**values)

    # -- sections ----------------------------------------------------------------------------------
    def policy(self, value: Any) -> tuple[str, dict[str, Any]]:
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

        try:
            make_policy(name, **config)
        except ValueError as exc:
            bad = next((k for k in config if f"'{k}'" in str(exc)), None)
            raise self.fail(("policy", bad) if bad else path, str(exc)) from None
        return name, config

    def backends(self, value: Any) -> tuple[BackendEntry, ...]:
        if value is None:
            raise self.fail(("backends",), "missing; add `backends:` with at least one {url, kind, models} entry")
        if not isinstance(value, list) or not value:
            raise self.fail(("backends",), "must be a non-empty list of {url, kind, models} mappings")
        entries = [self.backend(i, item) for i, item in enumerate(value)]
        seen: dict[str, int] = {}
        for i, entry in enumerate(entries):
            key = entry.id or entry.url
            if key in seen:
                raise self.fail(
                    ("backends", i),
                    f"duplicate backend {key!r} (also backends[{seen[key]}]); give each a distinct url or id",
                )
            seen[key] = i
        return tuple(entries)

    def backend(self, index: int, item: Any) -> BackendEntry:
        path: tuple[Any, ...] = ("backends", index)
        if not isinstance(item, Mapping):
            raise self.fail(
                path,
                f"each backend is a mapping like {{url: http://127.0.0.1:8001, kind: llm, models: [m]}}, not {_kind(item)}",
            )
        for key in ("url", "kind", "models"):
            if key not in item:
                raise self.fail(path, f"missing `{key}`")
        url = item["url"]
        if not isinstance(url, str) or urlsplit(url).scheme not in {"http", "https"} or not urlsplit(url).hostname:
            raise self.fail((*path, "url"), f"{url!r} is not an http(s) URL; write e.g. http://127.0.0.1:8001")
        try:
            kind = InstanceKind.parse(item["kind"]).value
        except ValueError as exc:
            raise self.fail((*path, "kind"), str(exc)) from None
        models = item["models"]
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise self.fail((*path, "models"), "must be a non-empty list of model names, e.g. [llama-2-7b]")
        api = str(item.get("api", "openai")).lower()
        if api not in {"openai", "tei"}:
            raise self.fail((*path, "api"), f"unknown api {item['api']!r}; use openai or tei")
        max_inflight = item.get("max_inflight")
        if max_inflight is not None:
            max_inflight = self.integer((*path, "max_inflight"), max_inflight, 1, None)
        for key in ("id", "api_key"):
            if key in item and item[key] is not None and (not isinstance(item[key], str) or not item[key]):
                raise self.fail((*path, key), "must be a non-empty string")
        extra = {k: v for k, v in item.items() if k not in _BACKEND_KEYS}
        entry = BackendEntry(
            url=url.rstrip("/"),
            kind=kind,
            models=tuple(models),
            id=item.get("id"),
            api_key=_expand_env(item["api_key"], self, (*path, "api_key")) if item.get("api_key") else None,
            max_inflight=max_inflight,
            api=api,
            extra=extra,
        )
        self.check_backend(path, entry)
        return entry

    def check_backend(self, path: tuple[Any, ...], entry: BackendEntry) -> None:
        """Let the executor's own BackendConfig judge the entry (types and values), at the field's line."""
        from sagesched.live.backends import BackendConfig
        from sagesched.live.typed_config import ConfigFieldError, from_mapping

        fields: dict[str, Any] = {"url": entry.url, "kind": entry.kind, "models": list(entry.models), "api": entry.api}
        for key in ("id", "api_key", "max_inflight"):
            if getattr(entry, key) is not None:
                fields[key] = getattr(entry, key)
        fields.update(entry.extra)
        try:
            from_mapping(BackendConfig, fields, "backend")
        except ConfigFieldError as exc:
            raise self.fail(
                (*path, *exc.path), exc.message if exc.path else f"invalid backend: {exc.message}"
            ) from None

    def check_executor(self, values: dict[str, Any]) -> None:
        """The `executor:` section through the typed config layer: unknown keys, types and values, by line."""
        from sagesched.live.executor_config import ExecutorConfig
        from sagesched.live.typed_config import ConfigFieldError, from_mapping

        try:
            from_mapping(ExecutorConfig, values, "executor")
        except ConfigFieldError as exc:
            raise self.fail(("executor", *exc.path), exc.message) from None

    # -- scalars -----------------------------------------------------------------------------------
    def host(self, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(("host",), "must be an interface address such as 127.0.0.1 (or 0.0.0.0 to expose it)")
        if value != "localhost":
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise self.fail(("host",), f"{value!r} is not an IP address; write e.g. 127.0.0.1") from None
        return value

    def integer(self, path: tuple[Any, ...], value: Any, low: int, high: int | None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be a whole number, not {_kind(value)} {value!r}")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise self.fail(path, f"{value} is out of range; use a number {bound}")
        return value

    def positive(self, path: tuple[Any, ...], value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise self.fail(path, f"must be a positive number of seconds, not {value!r}")
        return float(value)


def _expand_env(value: str, parser: _Parser, path: tuple[Any, ...]) -> str:
    """`${NAME}` takes a secret from the environment, so keys need not be written into the file."""
    if value.startswith("${") and value.endswith("}"):
        name = value[2:-1]
        if name not in os.environ:
            raise parser.fail(path, f"environment variable {name} is not set; export it or write the key itself")
        if not os.environ[name].strip():
            # An empty key would match an empty or missing bearer token: authentication silently off.
            raise parser.fail(path, f"environment variable {name} is empty; export a non-empty key")
        return os.environ[name]
    return value


def _path_name(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )
