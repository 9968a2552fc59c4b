"""The SimPy simulator: vLLM v1 and TEI engine models, shared GPUs, a cluster driver.

`simulate(requests, cluster, policy, sim)` -> `SimResult`. The performance model lives in
`sagesched.sim.perf_model`, workloads in `sagesched.sim.workloads`.
"""

from sagesched.sim.cluster import simulate
from sagesched.sim.config import (
    ClusterConfig,
    InstanceConfig,
    SharedGpuConfig,
    SimConfig,
    TeiEngineConfig,
    VllmEngineConfig,
)
from sagesched.sim.results import SimResult

__all__ = [
    "ClusterConfig",
    "InstanceConfig",
    "SharedGpuConfig",
    "SimConfig",
    "SimResult",
    "TeiEngineConfig",
    "VllmEngineConfig",
    "simulate",
]
