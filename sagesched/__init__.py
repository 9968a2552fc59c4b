"""sagesched: schedule LLM and embedding inference on a shared GPU pool, in simulation and live.

The policy contract lives in `sagesched.policies`, the driver-neutral model in `sagesched.core`,
the simulator in `sagesched.sim` and live mode in `sagesched.live`.
"""

from __future__ import annotations

from typing import Any

from sagesched.core import (
    SLO,
    Assignment,
    InstanceKind,
    InstanceView,
    Priority,
    Rejection,
    Request,
    RequestRecord,
    RequestType,
)
from sagesched.policies import Policy, available_policies, make_policy

__version__ = "0.1.0"

__all__ = [
    "SLO",
    "Assignment",
    "InstanceKind",
    "InstanceView",
    "Policy",
    "Priority",
    "Rejection",
    "Request",
    "RequestRecord",
    "RequestType",
    "UnifiedInferenceClient",
    "__version__",
    "available_policies",
    "make_policy",
]


def __getattr__(name: str) -> Any:
    # The client pulls in live-mode dependencies; import it only when asked for.
    if name == "UnifiedInferenceClient":
        from sagesched.live import UnifiedInferenceClient

        return UnifiedInferenceClient
    raise AttributeError(f"module 'sagesched' has no attribute {name!r}")
