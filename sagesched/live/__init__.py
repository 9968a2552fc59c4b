"""Live mode: the executor over real HTTP backends, the unified client, and the gateway.

Imports are lazy: `import sagesched.live` costs nothing until a name is used, so the simulator and
the CLI do not pay for httpx and friends.

- `LiveExecutor`, `ExecutorConfig`, `LiveResponse` (`sagesched.live.executor`)
- `BackendConfig` (`sagesched.live.backends`)
- `UnifiedInferenceClient` (`sagesched.live.client`)
- `IntelligentLLMClient`, `IntelligentEmbeddingClient` (`sagesched.live.compat`), for code written
  against the original system
- `errors` (`sagesched.live.errors`): every caller-visible error with its HTTP status
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, str | None]] = {
    "UnifiedInferenceClient": ("sagesched.live.client", "UnifiedInferenceClient"),
    "LiveExecutor": ("sagesched.live.executor", "LiveExecutor"),
    "ExecutorConfig": ("sagesched.live.executor", "ExecutorConfig"),
    "LiveResponse": ("sagesched.live.executor", "LiveResponse"),
    "BackendConfig": ("sagesched.live.backends", "BackendConfig"),
    "IntelligentLLMClient": ("sagesched.live.compat", "IntelligentLLMClient"),
    "IntelligentEmbeddingClient": ("sagesched.live.compat", "IntelligentEmbeddingClient"),
    "LiveError": ("sagesched.live.errors", "LiveError"),
    "request_from_body": ("sagesched.live.requests", "request_from_body"),
    "errors": ("sagesched.live.errors", None),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'sagesched.live' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
