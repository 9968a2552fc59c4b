"""Policies by name. An unknown name or config key is an error that lists the valid ones."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from sagesched.policies.base import Policy

_REGISTRY: dict[str, type[Policy]] = {}

P = TypeVar("P", bound=type[Policy])


def register(cls: P) -> P:
    """Class decorator: make `cls` available to `make_policy(cls.name)`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"policy name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[Policy]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def config_fields(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(policy_class(name).Config)]


def make_policy(name: str, **config: Any) -> Policy:
    """Build a policy by name; its config goes through the typed config layer like every other config.

    An unknown key, a wrong type (``embedding_batch_size='lots'``) or a bad value is a
    `ConfigFieldError` (a ValueError) whose `path` names the field, for the experiment's Hydra
    override and the gateway file's line; the message names the policy and lists the valid keys.
    """
    from sagesched.typed_config import ConfigFieldError, from_mapping

    cls = policy_class(name)
    try:
        return cls(from_mapping(cls.Config, config, "config"))
    except ConfigFieldError as exc:
        raise ConfigFieldError(exc.path, f"invalid config for policy {name!r}: {exc.message}") from None


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators.
    from sagesched.policies import adaptive, baselines, fair_share, fifo, hybrid, priority, slo_aware  # noqa: F401
