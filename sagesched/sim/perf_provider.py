"""Which performance models a simulated instance gets: the fitted profiles, loaded once per process.

The cluster driver asks a `PerfProvider` per instance; `default_perf_provider` is the one every
run uses unless a test hands in stand-ins (`simulate(..., perf_provider=...)`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from sagesched.core import InstanceKind
from sagesched.sim.config import InstanceConfig
from sagesched.sim.engines.llamacpp_instance import load_llamacpp_perf

PerfProvider = Callable[[InstanceConfig], tuple[Any, Any]]
"""(instance config) -> (LLM perf model or None, embedding perf model or None)."""


@lru_cache(maxsize=64)
def _load_llm(model: str, hardware: str, tp: int, calibration: str | None):
    from sagesched.sim.perf_model import LLMPerfModel

    return LLMPerfModel.load(model, hardware, tensor_parallel=tp, calibration=calibration)


@lru_cache(maxsize=64)
def _load_embedding(model: str, hardware: str, calibration: str | None):
    from sagesched.sim.perf_model import EmbeddingPerfModel

    return EmbeddingPerfModel.load(model, hardware, calibration=calibration)


def default_perf_provider(cfg: InstanceConfig) -> tuple[Any, Any]:
    """Load (and cache) the fitted performance models an instance needs."""
    if cfg.engine == "llamacpp":  # llama-server: its probe calibration, chat or --embeddings
        return load_llamacpp_perf(cfg), None
    llm = emb = None
    if cfg.kind is not InstanceKind.EMBEDDING:
        llm = _load_llm(cfg.model, cfg.hardware, cfg.tensor_parallel, cfg.calibration)
    if cfg.kind is not InstanceKind.LLM and cfg.embedding_model:  # TEI, or vLLM's pooling engine: the encoder's model
        emb = _load_embedding(cfg.embedding_model, cfg.hardware, cfg.calibration)
    return llm, emb
