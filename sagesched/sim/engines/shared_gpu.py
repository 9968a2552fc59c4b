"""Interference between the two engines of an `llm_embedding` instance (one GPU, two engines).

Model: weighted time-sharing with partial overlap, work-conserving. While only one engine has work
on the GPU it runs at full speed. While both have a step (vLLM) or a batch (TEI) in flight, each
progresses at the share

    share_X = min(1, (1 + overlap) * w_X / (w_llm + w_emb))

of its full speed, i.e. its work takes 1 / share_X as long. The rate follows the partner's state:
when the other engine starts or stops work, the rest of the step or batch in flight is re-timed at
the new rate (`retimed_end`), so the work done in any interval depends only on which engines were
busy then, never on which one started first. A vLLM decode run (the jump mode's one event for many
steps) is cut after the step in progress at each such change and that step re-timed, exactly as the
step-by-step simulation re-times its step. `overlap` = 0 is pure time-slicing (the shares sum to 1:
the GPU does the same total work either way); `overlap` = 1 is no interference at all.

What it predicts (docs/simulator.md has the numbers): `PRESETS` are a roofline of the two
engines' demands (A100 datasheet, our engine profiles) between the two deployments one can run,
separate processes time-sliced by the driver and overlapping kernels under MPS
(`colocated_stretch`). The defaults (`SharedGpuConfig`) are the ``mps`` preset: equal weights and
overlap 1/3, so work that overlaps the other engine's runs 1.5x slower; an idle partner costs
nothing. The policy benchmark's mixed-versus-siloed study runs all three presets
(experiments/policy_benchmark/conf/benchmark/mvs_*.yaml). (Before these were anchored, the
defaults were weights 0.7 / 0.3 and overlap 0.2: 1.19x for LLM work, 2.78x for embedding work.)
The embedding engine is TEI, or a vLLM pooling engine serving the encoder (`embedding_backend:
vllm`, `sagesched.sim.engines.tei.embedding_engine_config`); both share the GPU the same way.
Not modelled: a share that depends on what each step does (a prefill-heavy step contends for
compute, a decode step for bandwidth: the presets price one typical pair); the few microseconds a
real GPU takes to switch between the two processes' kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sagesched.sim.config import SharedGpuConfig

if TYPE_CHECKING:
    import simpy


@dataclass(frozen=True)
class ResourceDemand:
    """What one engine's step uses while it runs alone: fractions of the GPU's peak compute
    (tensor-core FLOP/s) and of its peak memory bandwidth, each in [0, 1]."""

    compute: float
    memory: float


# Demands on an A100 80GB SXM (datasheet: 312 TFLOP/s dense BF16, 2,039 GB/s HBM2e), computed from
# the roofline the performance profiles use (sagesched/data/profiles/hardware/a100.yaml):
# - a Llama-2-7B decode step at batch 32 with ~1k-token contexts streams 13.5 GB of weights plus
#   ~17 GB of KV cache (at the profile's decode_attention_efficiency 0.6) in ~21.6 ms with 1 ms of
#   step overhead, and does 2 x 6.74e9 x 32 = 4.3e11 FLOPs: memory 0.69, compute 0.064;
# - a full TEI batch of bge-base (16k tokens) runs at the profile's flops_efficiency 0.5 of peak
#   (anchored to TensorRT BERT-base FP16 at 0.61) and re-reads 0.22 GB of weights plus ~3 GB of
#   activations in ~21 ms: compute 0.5, memory 0.07.
DECODE_LLAMA2_7B_A100 = ResourceDemand(compute=0.064, memory=0.69)
TEI_BGE_BASE_A100 = ResourceDemand(compute=0.5, memory=0.07)


def colocated_stretch(llm: ResourceDemand, embedding: ResourceDemand, efficiency: float) -> float:
    """How much longer each engine's step takes while the other one runs too.

    Two engines in separate processes on one GPU without MPS are time-sliced: NVIDIA's MPS
    documentation states that kernels of different processes do not run concurrently then, so each
    engine gets about half the GPU while both are busy (stretch 2; ``efficiency`` 0). With MPS (or a
    single process running both, as ORTHRUS does) kernels overlap, and the ideal is roofline
    sharing: both fit at full speed while the summed demand on each resource stays within 1, and
    slow down in proportion beyond it (``efficiency`` 1). Co-location studies (Orion, EuroSys 2024;
    Elvinger et al., SoCC 2025) measure real overlap between the two: cache and SM contention make
    a compute-bound and a memory-bound kernel slow each other even when the roofline says they fit.
    ``efficiency`` interpolates between the two ends; it is the one number here not derived from
    datasheets or our profiles, so the benchmark reports results at 0, 0.5 and 1.
    """
    if not 0.0 <= efficiency <= 1.0:
        raise ValueError(f"efficiency must be within [0, 1] (0: time slicing, 1: ideal overlap), got {efficiency!r}")
    demand = max(llm.compute + embedding.compute, llm.memory + embedding.memory)
    ideal = max(1.0, demand)
    return 2.0 - efficiency * (2.0 - ideal)


def preset(
    efficiency: float, llm: ResourceDemand = DECODE_LLAMA2_7B_A100, embedding: ResourceDemand = TEI_BGE_BASE_A100
) -> dict[str, float]:
    """`SharedGpuConfig` fields for `colocated_stretch`: equal weights, overlap = 2 / stretch - 1, so
    that both engines' steps take ``stretch`` times as long while the other is busy."""
    stretch = colocated_stretch(llm, embedding, efficiency)
    return {"llm_weight": 0.5, "embedding_weight": 0.5, "overlap": round(2.0 / stretch - 1.0, 6)}


PRESETS: dict[str, dict[str, float]] = {
    "time_slice": preset(0.0),  # separate processes, no MPS: stretch 2 for both
    "mps": preset(0.5),  # half of the ideal overlap: stretch 1.5 for both
    "ideal": preset(1.0),  # roofline sharing: the two demands fit (0.56 compute, 0.76 memory): stretch 1
}


class SharedGpu:
    """The two engines' shares of one GPU, and the timing of the step/batch each has in flight.

    The driver (`sagesched.sim.segments`) records here the stretch factor and the end time of each
    engine's segment in flight, and calls `retime_*` whenever the other engine starts or stops work:
    the rest of the segment is then re-timed at the new share. Only `llm_embedding` instances hold
    one, so an LLM-only instance pays nothing for it.
    """

    __slots__ = (
        "config",
        "embedding_factor",
        "llm_busy",
        "llm_end",
        "llm_factor",
        "llm_now",
        "tei_end",
        "tei_event",
        "tei_now",
    )

    def __init__(self, config: SharedGpuConfig) -> None:
        self.config = config
        total = config.llm_weight + config.embedding_weight
        gain = 1.0 + config.overlap
        self.llm_factor = 1.0 / min(1.0, gain * config.llm_weight / total)
        self.embedding_factor = 1.0 / min(1.0, gain * config.embedding_weight / total)
        #: Whether the LLM engine has a step or decode run in flight (as the TEI engine sees it).
        self.llm_busy = False
        #: Stretch factor and absolute end time of the LLM step in flight (a decode run keeps its
        #: own times: `DecodeRun.cum_time`), and of the embedding batch in flight.
        self.llm_now = 1.0
        self.llm_end = 0.0
        self.tei_now = 1.0
        self.tei_end = 0.0
        #: The end event of the embedding batch in flight (its callbacks are dropped when re-timed).
        self.tei_event: simpy.Event | None = None

    def llm_stretch(self, embedding_busy: bool) -> float:
        """Duration multiplier of LLM work while the embedding engine is (not) busy."""
        return self.llm_factor if embedding_busy else 1.0

    def embedding_stretch(self, llm_busy: bool) -> float:
        """Duration multiplier of embedding work while the LLM engine is (not) busy."""
        return self.embedding_factor if llm_busy else 1.0


def retimed_end(now: float, end: float, old_factor: float, new_factor: float) -> float:
    """When a segment due at `end` under `old_factor` ends if its rate changes at `now`.

    Work is conserved: what is left, (end - now) / old_factor seconds of work at full speed, runs
    at the new rate. A segment already due (end <= now) keeps its end.
    """
    if end <= now or old_factor == new_factor:
        return end
    return now + (end - now) * (new_factor / old_factor)
