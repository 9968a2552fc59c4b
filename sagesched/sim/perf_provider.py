"""Which performance models a simulated instance gets: the fitted profiles, loaded once per process.

The cluster driver asks a `PerfProvider` per instance; `default_perf_provider` is the one every
run uses unless a test hands in stand-ins (`simulate(..., perf_provider=...)`).

A name the profiles do not have, a TP degree the model cannot split over or a calibration file that
cannot be used is a ValueError naming the instance, the field and the choices (the shipped clusters
take model, embedding_model, hardware and calibration from the `model` group: ``model.hardware=h100``).
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

#: The `model` group's key the shipped clusters read each instance field from.
_MODEL_GROUP_KEY = {
    "model": "llm",
    "embedding_model": "embedding",
    "hardware": "hardware",
    "calibration": "calibration",
}


@lru_cache(maxsize=64)
def _load_llm(model: str, hardware: str, tp: int, calibration: str | None):
    from sagesched.sim.perf_model import LLMPerfModel

    return LLMPerfModel.load(model, hardware, tensor_parallel=tp, calibration=calibration)


@lru_cache(maxsize=64)
def _load_embedding(model: str, hardware: str, calibration: str | None):
    from sagesched.sim.perf_model import EmbeddingPerfModel

    return EmbeddingPerfModel.load(model, hardware, calibration=calibration)


def _instance_error(cfg: InstanceConfig, name: str, problem: str) -> ValueError:
    group = _MODEL_GROUP_KEY.get(name)
    via = f" (model.{group}=... for the shipped clusters)" if group else ""
    return ValueError(
        f"cluster instance {cfg.id!r}, {name} {getattr(cfg, name)!r}: {problem}; fix the instance's `{name}:` "
        f"in the cluster config{via}"
    )


@lru_cache(maxsize=1)
def _profile_names() -> tuple[list[str], list[str], list[str]]:
    """The shipped hardware, LLM and embedding profile names (read once: a fleet has thousands of
    instances, and each lookup globs the profile folders)."""
    from sagesched.sim.perf.profiles import available_hardware
    from sagesched.sim.perf_model import available_embedding_models, available_llm_models

    return available_hardware(), available_llm_models(), available_embedding_models()


def _check_names(cfg: InstanceConfig) -> None:
    hardware, llm_models, embedding_models = _profile_names()
    if cfg.hardware not in hardware:
        raise _instance_error(cfg, "hardware", f"no such hardware profile; use one of {', '.join(hardware)}")
    if (
        cfg.kind is not InstanceKind.EMBEDDING
        and cfg.model is not None
        and not cfg.model.endswith(".json")  # a Hugging Face config.json: the roofline model
        and cfg.model not in llm_models
    ):
        raise _instance_error(cfg, "model", f"no such LLM profile; use one of {', '.join(llm_models)}")
    if (
        cfg.kind is not InstanceKind.LLM
        and cfg.embedding_model is not None
        and cfg.embedding_model not in embedding_models
    ):
        valid = ", ".join(embedding_models)
        raise _instance_error(cfg, "embedding_model", f"no such embedding model profile; use one of {valid}")


def _checked(cfg: InstanceConfig, model_field: str, load: Callable[..., Any], *args: Any) -> Any:
    """`load(*args)`, its ValueError (a TP degree, a calibration file, a model's config.json) located at
    the instance's field."""
    try:
        return load(*args)
    except ValueError as exc:  # (UnicodeDecodeError too: a binary calibration file)
        message = str(exc)
        if message.startswith("tensor_parallel"):
            name = "tensor_parallel"
        elif cfg.calibration and (cfg.calibration in message or isinstance(exc, UnicodeDecodeError)):
            name = "calibration"
        else:
            name = model_field
        raise _instance_error(cfg, name, message.removeprefix(f"{cfg.calibration}: ")) from None


def default_perf_provider(cfg: InstanceConfig) -> tuple[Any, Any]:
    """Load (and cache) the fitted performance models an instance needs."""
    if cfg.engine == "llamacpp":  # llama-server: its probe calibration, chat or --embeddings
        return load_llamacpp_perf(cfg), None
    _check_names(cfg)
    llm = emb = None
    if cfg.kind is not InstanceKind.EMBEDDING:
        llm = _checked(cfg, "model", _load_llm, cfg.model, cfg.hardware, cfg.tensor_parallel, cfg.calibration)
    if cfg.kind is not InstanceKind.LLM and cfg.embedding_model:  # TEI, or vLLM's pooling engine: the encoder's model
        emb = _checked(cfg, "embedding_model", _load_embedding, cfg.embedding_model, cfg.hardware, cfg.calibration)
    return llm, emb
