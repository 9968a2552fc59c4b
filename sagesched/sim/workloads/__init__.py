"""Workloads for the simulator: trace replay, synthetic arrivals, request mixes, RAG, classes and SLOs.

`build_workload(config, seed)` is the one entry point the simulator and the experiment runner
call; `WorkloadConfig` (with `from_dict`) describes a workload; the shipped traces live in
`sagesched/data/traces` with their licences (see its ATTRIBUTION.md). docs/workloads.md is the guide.
"""

from sagesched.sim.workloads.builder import build_workload
from sagesched.sim.workloads.config import (
    ArrivalConfig,
    ClassConfig,
    EmbeddingConfig,
    LengthConfig,
    MixConfig,
    RagConfig,
    WorkloadConfig,
)
from sagesched.sim.workloads.errors import TraceFormatError
from sagesched.sim.workloads.servegen import ServeGenTrace, load_servegen
from sagesched.sim.workloads.traces import (
    TRACE_DIR,
    RequestTrace,
    available_traces,
    clear_trace_cache,
    load_trace,
)

__all__ = [
    "TRACE_DIR",
    "ArrivalConfig",
    "ClassConfig",
    "EmbeddingConfig",
    "LengthConfig",
    "MixConfig",
    "RagConfig",
    "RequestTrace",
    "ServeGenTrace",
    "TraceFormatError",
    "WorkloadConfig",
    "available_traces",
    "build_workload",
    "clear_trace_cache",
    "load_servegen",
    "load_trace",
]
