"""YAML hardware and model profiles shipped in `sagesched/data/profiles/`.

Why YAML files rather than constants: adding a GPU or a model is a data change a user can make (and
review against the cited datasheet or config.json) without touching the model code.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PROFILES_DIR: Path = Path(str(resources.files("sagesched"))) / "data" / "profiles"


@dataclass(frozen=True)
class EmbeddingRoofline:
    """Hardware constants of the encoder (TEI) cost model.

    Attributes: `flops_efficiency` achieved fraction of peak bf16 FLOPs on encoder GEMMs;
    `bandwidth_efficiency` achieved fraction of HBM bandwidth; `batch_overhead_s` fixed cost of one
    batch (tokenised input copy, kernel launches, pooling, response); `per_input_overhead_s` per input in
    the batch (pooling, normalisation, serialisation).
    """

    flops_efficiency: float
    bandwidth_efficiency: float
    batch_overhead_s: float
    per_input_overhead_s: float


@dataclass(frozen=True)
class HardwareProfile:
    """One GPU type: datasheet figures plus engine/runtime constants (see docs/performance_model.md).

    Attributes: `memory_bytes` device memory as the driver reports it; `hbm_bandwidth_bytes_per_s`;
    `peak_bf16_flops` dense tensor-core peak; `nvlink_bandwidth_bytes_per_s` per direction;
    `step_overhead_s` fixed CPU/scheduling cost per engine step; `layer_overhead_s` per layer per step
    (kernel-launch gaps without CUDA graphs); `allreduce_latency_s` per all-reduce call;
    `allreduce_efficiency` achieved fraction of NVLink bandwidth; `prefill_attention_efficiency` fraction of
    peak FLOPs achieved by prefill attention; `decode_attention_efficiency` fraction of HBM bandwidth when
    decode attention streams the KV cache; `lm_head_*_efficiency` for the logits GEMM; `embedding` the
    encoder model's constants; `seq_overhead_s` CPU cost per sequence in a step; `frontend_request_s`
    and `frontend_prompt_token_s` the OpenAI server's cost per request and per prompt token (HTTP,
    tokenisation, hand-off, first chunk), `frontend_seq_s` its cost per running sequence (stream
    output processing), added to client-side TTFT and E2E; `vllm_max_num_batched_tokens` /
    `vllm_max_num_seqs` vLLM's default step budgets on this GPU (0: the engine config's defaults);
    `roofline_reference` a GPU of the same silicon whose fitted roofline efficiencies this one reuses
    when it has no Vidur profile of its own; `roofline_operator_scale` multiplies roofline operator
    times on this GPU (fitted to real servers: the Vidur-fitted roofline vs what vLLM achieves).
    """

    name: str
    description: str
    memory_bytes: int
    hbm_bandwidth_bytes_per_s: float
    peak_bf16_flops: float
    nvlink_bandwidth_bytes_per_s: float
    step_overhead_s: float
    layer_overhead_s: float
    allreduce_latency_s: float
    allreduce_efficiency: float
    prefill_attention_efficiency: float
    decode_attention_efficiency: float
    lm_head_bandwidth_efficiency: float
    lm_head_flops_efficiency: float
    embedding: EmbeddingRoofline
    seq_overhead_s: float = 0.0
    frontend_request_s: float = 0.0
    frontend_prompt_token_s: float = 0.0
    frontend_seq_s: float = 0.0
    vllm_max_num_batched_tokens: float = 0.0
    vllm_max_num_seqs: float = 0.0
    roofline_reference: str = ""
    roofline_operator_scale: float = 1.0


@dataclass(frozen=True)
class ModelProfile:
    """A transformer's shape (from its config.json) and where its measured profiles are.

    Attributes: `kind` "llm" (decoder, served by vLLM) or "embedding" (encoder, served by TEI);
    `num_params` total parameters (weights bytes = num_params * dtype_bytes); `kv_bytes_per_token` K and V
    across all layers for one token (0 for encoders); `vidur` hardware name -> Vidur CSV file name.
    """

    name: str
    kind: str
    hf_id: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool
    num_params: int
    dtype_bytes: int
    max_position_embeddings: int
    kv_bytes_per_token: int = 0
    embedding_dim: int = 0
    vidur: dict[str, str] = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights at the profile's dtype."""
        return self.num_params * self.dtype_bytes

    @property
    def embedding_params(self) -> int:
        """Parameters of the token-embedding table (gathered per token, not multiplied)."""
        return self.vocab_size * self.hidden_size

    def computed_kv_bytes_per_token(self) -> int:
        """2 (K and V) x layers x KV heads x head dim x dtype bytes: what `kv_bytes_per_token` must equal."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


def _names(sub: str) -> list[str]:
    return sorted(p.stem for p in (PROFILES_DIR / sub).glob("*.yaml"))


def available_hardware() -> list[str]:
    """Names of the shipped hardware profiles."""
    return _names("hardware")


def available_model_profiles(kind: str | None = None) -> list[str]:
    """Names of the shipped model profiles, optionally only those of one kind ("llm" or "embedding")."""
    names = _names("models")
    if kind is None:
        return names
    return [n for n in names if load_model(n).kind == kind]


def _read_yaml(path: Path) -> dict[str, Any]:
    with path.open() as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def _check_keys(path: Path, data: dict[str, Any], cls: type) -> None:
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; valid keys: {sorted(valid)}")


def _number(path: Path, key: str, value: Any, kind: type) -> Any:
    # PyYAML (YAML 1.1) reads "2.039e12" as a string; accept it as the number it plainly is.
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {key} must be a number, got {value!r}") from None
    return int(number) if kind is int else number


@functools.cache
def load_hardware(name: str) -> HardwareProfile:
    """The hardware profile `name`; ValueError listing the valid names if there is none."""
    valid = available_hardware()
    if name not in valid:
        raise ValueError(f"unknown hardware {name!r}; valid: {valid}")
    path = PROFILES_DIR / "hardware" / f"{name}.yaml"
    data = _read_yaml(path)
    _check_keys(path, data, HardwareProfile)
    emb = data.pop("embedding")
    _check_keys(path, emb, EmbeddingRoofline)
    try:
        numbers = {
            k: _number(path, k, v, int if k == "memory_bytes" else float)
            for k, v in data.items()
            if k not in ("name", "description", "roofline_reference")
        }
        embedding = EmbeddingRoofline(**{k: _number(path, k, v, float) for k, v in emb.items()})
        return HardwareProfile(
            embedding=embedding,
            name=data["name"],
            description=data["description"],
            roofline_reference=str(data.get("roofline_reference") or ""),
            **numbers,
        )
    except (TypeError, KeyError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


#: torch_dtype -> bytes per parameter.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "int8": 1}


def model_from_hf_config(path: str | Path, name: str | None = None) -> ModelProfile:
    """A dense decoder's profile from its Hugging Face `config.json` (Llama/Mistral/Qwen-style keys).

    Why: a new model then needs no profile file; its step time comes from the roofline operators with
    the GPU's fitted efficiencies (`sagesched.sim.perf.operators`). Parameters are counted from the
    shapes: embeddings, per layer q/k/v/o projections, gated (or plain) MLP and two norms, the final
    norm, and an untied LM head. ValueError naming the missing key or an MoE config (not modelled).
    """
    p = Path(path)
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p}: not a readable config.json ({exc})") from exc
    if any(k in cfg for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise ValueError(f"{p}: mixture-of-experts models are not modelled (dense decoders only)")

    def need(key: str) -> Any:
        if key not in cfg:
            raise ValueError(f"{p}: config.json lacks {key!r} (a dense decoder's config needs it)")
        return cfg[key]

    layers, hidden = int(need("num_hidden_layers")), int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    inter, vocab = int(need("intermediate_size")), int(need("vocab_size"))
    gated = cfg.get("hidden_act", "silu") in ("silu", "swiglu", "gelu_pytorch_tanh") or "llama" in str(
        cfg.get("model_type", "")
    )
    dtype = str(cfg.get("torch_dtype") or "bfloat16")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{p}: torch_dtype {dtype!r} not supported; one of {sorted(DTYPE_BYTES)}")
    b = DTYPE_BYTES[dtype]
    attn = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    mlp = (3 if gated else 2) * hidden * inter
    per_layer = attn + mlp + 2 * hidden
    params = vocab * hidden + layers * per_layer + hidden
    if not cfg.get("tie_word_embeddings", False):
        params += vocab * hidden
    return ModelProfile(
        name=name or p.stem.replace(".config", ""),
        kind="llm",
        hf_id=str(cfg.get("_name_or_path") or p.stem),
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        gated_mlp=gated,
        num_params=params,
        dtype_bytes=b,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * b,
    )


@functools.cache
def load_model(name: str) -> ModelProfile:
    """The model profile `name`, or one built from a Hugging Face config.json when `name` is a path to one;
    ValueError listing the valid names if there is neither."""
    if name.endswith(".json"):
        return model_from_hf_config(name, name)
    valid = _names("models")
    if name not in valid:
        raise ValueError(f"unknown model {name!r}; valid: {valid}")
    path = PROFILES_DIR / "models" / f"{name}.yaml"
    data = _read_yaml(path)
    _check_keys(path, data, ModelProfile)
    try:
        profile = ModelProfile(**{**data, "vidur": dict(data.get("vidur") or {})})
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if profile.kind not in ("llm", "embedding"):
        raise ValueError(f"{path}: kind must be 'llm' or 'embedding', got {profile.kind!r}")
    if profile.kind == "llm" and profile.kv_bytes_per_token != profile.computed_kv_bytes_per_token():
        raise ValueError(
            f"{path}: kv_bytes_per_token {profile.kv_bytes_per_token} != 2*layers*kv_heads*head_dim*dtype_bytes "
            f"= {profile.computed_kv_bytes_per_token()}; fix the profile"
        )
    return profile
