"""Typed configuration of simulated engines, instances, clusters and of the simulation itself.

Every knob is a field with the default the real software uses (vLLM v1 on an A100, TEI's CLI
defaults). `from_dict` builds a config from plain YAML/OmegaConf data through the typed config layer
(`sagesched.typed_config`): an unknown key, a wrong type or a bad value is a `ConfigFieldError` (a
ValueError) that names the field by its path from the config group (``sim.mode``,
``cluster.instances[0].vllm.max_num_seqs``), so a typo in a Hydra override is an error that says
which override to fix, not a silently ignored setting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sagesched.core import InstanceKind
from sagesched.typed_config import ConfigFieldError, Path, from_mapping, parse_with, plain


@dataclass(frozen=True)
class VllmEngineConfig:
    """vLLM v1 engine knobs (defaults: vLLM's for an A100-class GPU).

    max_num_batched_tokens: token budget of one engine step (prefill chunks + one token per decode).
    max_num_seqs: at most this many sequences run in one step.
    block_size: tokens per paged-KV block.
    gpu_memory_utilization: share of GPU memory vLLM may use; KV capacity is that minus the weights.
    num_gpu_blocks: KV capacity in blocks; None derives it from the performance model
        (`kv_capacity_tokens(gpu_memory_utilization) // block_size`), an int overrides it.
    enable_prefix_caching: reuse computed KV blocks of identical prompt prefixes (by block hash).
    prefix_hash_block_tokens: tokens covered by one entry of `Request.prefix_hashes` (Mooncake: 512);
        must be a multiple of `block_size`.
    scheduling_policy: "fcfs" (preempt the most recently admitted request) or "priority" (waiting
        queue ordered by (priority, arrival); preempt the lowest-priority, latest request).
    max_model_len: longest prompt + output a request may ask for; past it the engine answers 400 as
        vLLM's OpenAI server does. None: unchecked. (vLLM's own default is the model's
        max_position_embeddings; it is opt-in here because the shipped Azure traces hold ~8% requests
        longer than Llama-2's 4096 that the workloads and bounds still count as served.)
    async_scheduling: vLLM's --async-scheduling: the CPU part of a step (scheduling, per-sequence input
        preparation) overlaps the GPU part, so a step takes max(GPU, CPU) rather than their sum.
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks: int | None = None
    enable_prefix_caching: bool = True
    prefix_hash_block_tokens: int = 512
    scheduling_policy: str = "fcfs"
    max_model_len: int | None = None
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigFieldError(("max_model_len",), "must be >= 1 (or None: unchecked)")
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigFieldError((name,), f"must be >= 1, got {getattr(self, name)}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ConfigFieldError(("scheduling_policy",), f"{self.scheduling_policy!r}: use 'fcfs' or 'priority'")
        if self.prefix_hash_block_tokens % self.block_size:
            raise ConfigFieldError(
                ("prefix_hash_block_tokens",),
                f"{self.prefix_hash_block_tokens} must be a multiple of block_size={self.block_size}",
            )
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ConfigFieldError(("num_gpu_blocks",), "must be >= 1 (or None to derive it from GPU memory)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigFieldError(("gpu_memory_utilization",), f"must be in (0, 1], got {self.gpu_memory_utilization}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, root: Path = ("vllm",)) -> VllmEngineConfig:
        """Build from a mapping (None: all defaults); errors name the field under `root`."""
        return from_mapping(cls, {} if data is None else data, root=root)


@dataclass(frozen=True)
class TeiEngineConfig:
    """text-embeddings-inference router knobs (defaults: TEI's CLI defaults).

    max_batch_tokens: a batch is packed from the queue head while its total tokens stay within this.
    max_batch_requests: optional cap on inputs per batch (None: no cap).
    max_concurrent_requests: more inputs than this in flight -> the call is refused with 429.
    max_client_batch_size: a call with more inputs than this is refused with 413.
    max_input_length: inputs longer than this are truncated to it (TEI's `truncate`); None: the
        encoder's max_position_embeddings when the performance model knows it, else no limit.
    prefetch: pack the next batch while the current one runs, as TEI's batching task does.
    """

    max_batch_tokens: int = 16384
    max_batch_requests: int | None = None
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 32
    max_input_length: int | None = None
    prefetch: bool = True

    def __post_init__(self) -> None:
        for name in ("max_input_length", "max_batch_requests"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigFieldError((name,), f"must be >= 1 or None, got {getattr(self, name)}")
        for name in ("max_batch_tokens", "max_concurrent_requests", "max_client_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigFieldError((name,), f"must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, root: Path = ("tei",)) -> TeiEngineConfig:
        """Build from a mapping (None: all defaults); errors name the field under `root`."""
        return from_mapping(cls, {} if data is None else data, root=root)


@dataclass(frozen=True)
class SharedGpuConfig:
    """How the two engines of an `llm_embedding` instance share one GPU (see docs/simulator.md).

    embedding_backend: the engine serving the encoder next to vLLM's generate engine: "tei" (a
        text-embeddings-inference server, knobs in the instance's `tei`) or "vllm" (a second vLLM
        server running the encoder as a pooling model, `--runner pooling` / `--task embed`; see
        `sagesched.sim.engines.tei.embedding_engine_config`). Either is priced by the encoder's
        performance model and shares the GPU as below.
    pooling_max_num_batched_tokens, pooling_max_num_seqs: the vLLM pooling engine's
        `--max-num-batched-tokens` and `--max-num-seqs`; None: vLLM's defaults for the encoder on
        this GPU (`engines.tei.embedding_engine_config`). Only with embedding_backend "vllm".
    llm_weight, embedding_weight: time-sharing weights; while both engines have a step/batch on the
        GPU, each gets the share weight / (llm_weight + embedding_weight) of it.
    overlap: extra throughput from running both at once (0 = pure time-slicing; 1 = each engine runs
        as if alone); a share is (1 + overlap) x weight share, capped at 1.

    The defaults are the anchored ``mps`` preset (`sagesched.sim.engines.shared_gpu.PRESETS`): the
    two servers under MPS with half of the ideal roofline overlap, so each engine's step takes 1.5x
    its solo time while the other is busy. `PRESETS` also has ``time_slice`` (no MPS: 2x) and
    ``ideal`` (1x) for the bounds either side.
    """

    embedding_backend: str = "tei"
    llm_weight: float = 0.5
    embedding_weight: float = 0.5
    overlap: float = 0.333333
    pooling_max_num_batched_tokens: int | None = None
    pooling_max_num_seqs: int | None = None

    def __post_init__(self) -> None:
        if self.embedding_backend not in ("tei", "vllm"):
            raise ConfigFieldError(
                ("embedding_backend",), f"{self.embedding_backend!r}: use 'tei' or 'vllm' (a vLLM pooling engine)"
            )
        for name in ("llm_weight", "embedding_weight"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):  # inf: 0 of the GPU for the other engine (inf / inf)
                raise ConfigFieldError(
                    (name,), f"must be a finite number > 0 (a relative share of the GPU), got {value}"
                )
        if not 0.0 <= self.overlap <= 1.0:
            raise ConfigFieldError(("overlap",), f"must be in [0, 1], got {self.overlap}")
        for name in ("pooling_max_num_batched_tokens", "pooling_max_num_seqs"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.embedding_backend != "vllm":
                raise ConfigFieldError(
                    (name,), f"applies to embedding_backend: vllm only (this one is {self.embedding_backend!r})"
                )
            if value < 1:
                raise ConfigFieldError((name,), f"must be >= 1 (or None: vLLM's default), got {value}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, root: Path = ("shared",)) -> SharedGpuConfig:
        """Build from a mapping (None: all defaults); errors name the field under `root`."""
        return from_mapping(cls, {} if data is None else data, root=root)


@dataclass(frozen=True)
class LlamaCppInstanceConfig:
    """llama-server knobs of an instance with `engine: llamacpp` (see `sim/engines/llamacpp.py`).

    calibration: the probe calibration that times its steps (`sagesched calibrate llamacpp`): a path
        or the name of a shipped file (`sagesched/data/profiles/calibration/llamacpp/`, without .yaml).
    n_parallel: slots (`-np`); n_ctx: total context (`-c`, split evenly over the slots; None: 2048 per
        slot, as `sagesched.live.real_backends` starts servers); n_batch / n_ubatch: `-b` / `-ub`
        (None: llama-server's 2048 / 512 for a chat server; an embedding server as real_backends
        starts it uses n_ctx for both, so that one input fits one physical batch).
    checkpoint_tail_tokens: None takes the calibration's (4 for Gemma 3's sliding-window attention).
    The rest as `LlamaCppConfig`: prompt cache, 503 when every slot is busy (`reject_when_busy`; the
    real server's default is to queue), `--slot-prompt-similarity`, `--kv-unified`, KV padding, and
    `prefix_block_tokens`, the tokens per entry of a request's `prefix_hashes` (a property of the
    workload, not the server: None is the traces' 512, as vllm.prefix_hash_block_tokens).
    host / host_cpus: servers that name the same `host` share its `host_cpus` cores: while k of them
        run a step, each runs at 1 / max(1, k / host_cpus) of its calibrated speed (one-thread servers
        under a fair CPU scheduler; steps in flight are re-timed when k changes, work conserved).
        None: the server has its CPU to itself, as when it was calibrated.
    """

    calibration: str | None = None
    n_parallel: int = 4
    n_ctx: int | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    cache_prompt: bool = True
    reject_when_busy: bool = False
    slot_prompt_similarity: float = 0.1
    kv_unified: bool = False
    checkpoint_tail_tokens: int | None = None
    kv_pad: int = 256
    prefix_block_tokens: int | None = None
    host: str | None = None
    host_cpus: int = 1

    def __post_init__(self) -> None:
        for name in ("n_parallel", "n_ctx", "n_batch", "n_ubatch", "kv_pad", "prefix_block_tokens", "host_cpus"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigFieldError((name,), f"must be >= 1, got {value}")
        if self.n_ctx is not None and self.n_ctx < self.n_parallel:
            raise ConfigFieldError(("n_ctx",), f"{self.n_ctx} gives each of {self.n_parallel} slots no context")
        if self.checkpoint_tail_tokens is not None and self.checkpoint_tail_tokens < 0:
            raise ConfigFieldError(("checkpoint_tail_tokens",), f"must be >= 0, got {self.checkpoint_tail_tokens}")
        if self.host is not None and not self.host:
            raise ConfigFieldError(("host",), "must be a non-empty name (or null: the server has its own core)")
        if self.host is None and self.host_cpus != 1:
            raise ConfigFieldError(("host_cpus",), "is the cores of a shared `host`; set `host` too")
        if not 0.0 <= self.slot_prompt_similarity <= 1.0:
            raise ConfigFieldError(("slot_prompt_similarity",), f"must be in [0, 1], got {self.slot_prompt_similarity}")


@dataclass(frozen=True)
class InstanceConfig:
    """One serving instance.

    id: unique name (appears in records and timelines).
    kind: "llm" (vLLM), "embedding" (TEI) or "llm_embedding" (both on one GPU).
    model: the LLM served (llm, llm_embedding), e.g. "llama-2-7b".
    embedding_model: the encoder served (embedding, llm_embedding), e.g. "bge-base".
    hardware: GPU type ("a100", "h100"); tensor_parallel: GPUs per vLLM engine.
    max_inflight: requests the driver lets be outstanding at the instance (InstanceView.max_inflight).
    calibration: optional calibration file for the performance model.
    vllm / tei / shared: engine knobs (see their classes). With `shared.embedding_backend: vllm` the
        `tei` block does not apply (the pooling engine's knobs are `shared.pooling_*`).
    engine: the LLM engine model, "vllm" (default) or "llamacpp" (llama-server, CPU step model from a
        probe calibration; an `embedding` instance with it is llama-server `--embeddings`); its knobs
        in `llamacpp` (which needs `calibration`).
    """

    id: str
    kind: InstanceKind = field(default=InstanceKind.LLM, metadata=parse_with(InstanceKind.parse))
    model: str | None = "llama-2-7b"
    embedding_model: str | None = None
    hardware: str = "a100"
    tensor_parallel: int = 1
    max_inflight: int = 256
    calibration: str | None = None
    vllm: VllmEngineConfig = field(default_factory=VllmEngineConfig)
    tei: TeiEngineConfig = field(default_factory=TeiEngineConfig)
    shared: SharedGpuConfig = field(default_factory=SharedGpuConfig)
    engine: str = "vllm"
    llamacpp: LlamaCppInstanceConfig = field(default_factory=LlamaCppInstanceConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", InstanceKind.parse(self.kind))
        self._check_engine()
        if not self.id:
            raise ConfigFieldError(("id",), "an instance needs a non-empty id")
        if self.kind is not InstanceKind.EMBEDDING and not self.model:
            raise ConfigFieldError(("model",), f"instance {self.id}: kind {self.kind.value} needs `model` (an LLM)")
        if self.kind is not InstanceKind.LLM and not self.embedding_model:
            raise ConfigFieldError(
                ("embedding_model",),
                f"instance {self.id}: kind {self.kind.value} needs `embedding_model` (e.g. 'bge-base'), the "
                "encoder its embedding engine serves (TEI, or vLLM's pooling engine with embedding_backend: vllm)",
            )
        if self.tensor_parallel < 1:
            raise ConfigFieldError(
                ("tensor_parallel",),
                f"instance {self.id}: must be >= 1 (GPUs per vLLM engine), got {self.tensor_parallel}",
            )
        if self.max_inflight < 1:
            raise ConfigFieldError(("max_inflight",), f"instance {self.id}: must be >= 1, got {self.max_inflight}")
        vllm_pooling = self.shared.embedding_backend == "vllm"
        if vllm_pooling and self.kind is not InstanceKind.LLM_EMBEDDING:
            raise ConfigFieldError(
                ("shared", "embedding_backend"),
                f"instance {self.id}: applies to kind llm_embedding only (this one is {self.kind.value})",
            )
        if vllm_pooling and self.tei != TeiEngineConfig():
            # TEI's knobs would be silently ignored: the encoder runs on vLLM's pooling engine.
            raise ConfigFieldError(
                ("tei",),
                f"instance {self.id}: with shared.embedding_backend: vllm the encoder runs on vLLM's pooling "
                "engine; drop the `tei` block and set shared.pooling_max_num_batched_tokens / pooling_max_num_seqs",
            )

    def _check_engine(self) -> None:
        if self.engine not in ("vllm", "llamacpp"):
            raise ConfigFieldError(("engine",), f"instance {self.id}: {self.engine!r}: use 'vllm' or 'llamacpp'")
        if self.engine != "llamacpp":
            if self.llamacpp != LlamaCppInstanceConfig():
                raise ConfigFieldError(
                    ("llamacpp",),
                    f"instance {self.id}: llama.cpp knobs on a vLLM instance; add `engine: llamacpp` to use them",
                )
            return
        if self.calibration is not None:
            raise ConfigFieldError(
                ("calibration",),
                f"instance {self.id}: engine llamacpp reads `llamacpp.calibration`, not `calibration` (a GPU "
                "profile calibration); move it there",
            )
        if self.kind is InstanceKind.LLM_EMBEDDING:
            raise ConfigFieldError(
                ("engine",),
                f"instance {self.id}: a llama-server serves either chat (kind llm) or embeddings (kind "
                "embedding, `--embeddings`), not both; split it into two instances",
            )
        if not self.llamacpp.calibration:
            raise ConfigFieldError(
                ("llamacpp", "calibration"),
                f"instance {self.id}: engine llamacpp needs `llamacpp.calibration` (a file written by "
                "`sagesched calibrate llamacpp`, or a shipped name such as gemma-3-270m-q4km-xeon-2cpu-t1)",
            )

    @property
    def models(self) -> frozenset[str]:
        """Model names the instance answers for."""
        names: set[str] = set()
        if self.kind is not InstanceKind.EMBEDDING and self.model:
            names.add(self.model)
        if self.kind is not InstanceKind.LLM and self.embedding_model:
            names.add(self.embedding_model)
        return frozenset(names)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | InstanceConfig, root: Path = ("instance",)) -> InstanceConfig:
        """Build from a mapping; vLLM step budgets the entry leaves out come from its hardware profile."""
        d = plain(data)
        if isinstance(d, Mapping) and (d.get("vllm") is None or isinstance(plain(d["vllm"]), Mapping)):
            hardware = d.get("hardware", "a100")
            defaults = vllm_defaults_for(hardware) if isinstance(hardware, str) else {}
            d = {**d, "vllm": {**defaults, **(plain(d.get("vllm")) or {})}}
        return from_mapping(cls, d, root=root)


def vllm_defaults_for(hardware: str) -> dict[str, int]:
    """vLLM's default step budgets on this GPU type (from its hardware profile; {} if it names none).

    vLLM's OpenAI server picks larger defaults on H100-class GPUs (>= 70 GiB, not A100): 8192 batched
    tokens and 1024 sequences, against 2048 / 256 elsewhere. Configs that set the keys keep theirs.
    """
    from sagesched.sim.perf.profiles import available_hardware, load_hardware

    if hardware not in available_hardware():
        return {}
    hw = load_hardware(hardware)
    out = {}
    if hw.vllm_max_num_batched_tokens:
        out["max_num_batched_tokens"] = int(hw.vllm_max_num_batched_tokens)
    if hw.vllm_max_num_seqs:
        out["max_num_seqs"] = int(hw.vllm_max_num_seqs)
    return out


@dataclass(frozen=True)
class ClusterConfig:
    """The instances of a simulated cluster.

    `from_dict({"instances": [...]})`; an instance entry may carry `count: N` to expand into N
    identical instances named `<id>-0 .. <id>-(N-1)`.
    """

    instances: tuple[InstanceConfig, ...] = field(default=(), metadata=parse_with(lambda value: _instances(value)))

    def __post_init__(self) -> None:
        if not self.instances:
            raise ConfigFieldError(("instances",), "a cluster needs at least one instance")
        ids = [i.id for i in self.instances]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ConfigFieldError(("instances",), f"duplicate instance ids: {dupes}; give each entry its own id")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], root: Path = ("cluster",)) -> ClusterConfig:
        """Build from ``{"instances": [...]}``; errors name the entry (``cluster.instances[1].kind``)."""
        return from_mapping(cls, data, root=root)

    @classmethod
    def uniform(
        cls, n: int, kind: str | InstanceKind = InstanceKind.LLM, prefix: str = "llm", **kwargs: Any
    ) -> ClusterConfig:
        """`n` identical instances `<prefix>-0..`; a convenience for tests and benchmarks."""
        parsed = InstanceKind.parse(kind)
        return cls(tuple(InstanceConfig(id=f"{prefix}-{k}", kind=parsed, **kwargs) for k in range(n)))


def _instances(value: Any) -> tuple[InstanceConfig, ...]:
    """The `instances` list; an entry's `count: N` expands it into N instances `<id>-0 .. <id>-(N-1)`."""
    value = plain(value)
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f"must be a list of instance mappings (id, kind, model, ...), got {value!r}")
    out: list[InstanceConfig] = []
    for i, entry in enumerate(value):
        entry = plain(entry)
        if isinstance(entry, InstanceConfig) or not isinstance(entry, Mapping) or "count" not in entry:
            out.append(InstanceConfig.from_dict(entry, root=(i,)))
            continue
        e = dict(entry)
        count = e.pop("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigFieldError((i, "count"), f"must be a whole number >= 1, got {count!r}")
        out.extend(
            InstanceConfig.from_dict({**e, "id": f"{e.get('id', 'instance')}-{k}"}, root=(i,)) for k in range(count)
        )
    return tuple(out)


@dataclass(frozen=True)
class SimConfig:
    """How to run a simulation.

    mode: "jump" (default) advances runs of pure-decode steps in one event; "step" spends one event
        per engine step (the reference: it must give the same per-request latencies).
    seed: reserved for stochastic elements; the simulator itself is deterministic.
    progress: show a tqdm progress bar over arrivals.
    timeline_interval_s: sample each instance's state at most this often (0 disables the timeline).
    max_time_s: stop the clock here; requests still unfinished become `failed` records.
    view_rates: the throughput figures the policy's views carry. "nominal" (default): each engine
        model's fixed figures (prefill rate, one decode step at a nominal context). "learned": those
        as a start, then moved by every finished request exactly as the live executor moves its
        backends' estimates (`sagesched.core.rates.ThroughputEstimate`), so that a policy sees what
        it would see live; use it to predict a live run (`docs/replay.md`).
    rate_smoothing: with "learned", the weight of each new observation (the live executor's
        `rate_smoothing`, same default).
    """

    mode: str = "jump"
    seed: int = 0
    progress: bool = False
    timeline_interval_s: float = 1.0
    max_time_s: float | None = None
    view_rates: str = "nominal"
    rate_smoothing: float = 0.2

    def __post_init__(self) -> None:
        if self.mode not in ("jump", "step"):
            raise ConfigFieldError(("mode",), f"{self.mode!r}: use 'jump' (fast) or 'step' (reference)")
        if self.timeline_interval_s < 0:
            raise ConfigFieldError(("timeline_interval_s",), f"must be >= 0, got {self.timeline_interval_s}")
        if self.max_time_s is not None and not self.max_time_s > 0:  # `not >`: NaN too
            raise ConfigFieldError(
                ("max_time_s",),
                f"must be > 0 (seconds of simulated time), got {self.max_time_s}; set a positive time, or null to "
                "run until every request ends",
            )
        if self.view_rates not in ("nominal", "learned"):
            raise ConfigFieldError(
                ("view_rates",),
                f"{self.view_rates!r}: use 'nominal' (the engine models' figures) or 'learned' (as live)",
            )
        if not 0.0 < self.rate_smoothing <= 1.0:
            raise ConfigFieldError(("rate_smoothing",), f"must be in (0, 1], got {self.rate_smoothing}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, root: Path = ("sim",)) -> SimConfig:
        """Build from a mapping (None: all defaults); errors name the field under `root`."""
        return from_mapping(cls, {} if data is None else data, root=root)
