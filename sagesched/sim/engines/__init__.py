"""Engine cores: pure state machines shared by the SimPy simulator and the wall-clock emulators."""

from sagesched.sim.engines.kv_cache import KvCache
from sagesched.sim.engines.shared_gpu import SharedGpu
from sagesched.sim.engines.tei import TeiBatch, TeiEngineCore
from sagesched.sim.engines.types import EngineRejected, EngineRequest, StepOutcome
from sagesched.sim.engines.vllm import DecodeRun, StepPlan, VllmEngineCore

__all__ = [
    "DecodeRun",
    "EngineRejected",
    "EngineRequest",
    "KvCache",
    "SharedGpu",
    "StepOutcome",
    "StepPlan",
    "TeiBatch",
    "TeiEngineCore",
    "VllmEngineCore",
]
