"""Interference between the two engines of an `llm_embedding` instance (one GPU, two engines).

Model: weighted time-sharing with partial overlap. While only one engine has work on the GPU it runs
at full speed. When one engine starts a step (vLLM) or a batch (TEI) while the other engine is busy,
that step/batch gets the share

    share_X = min(1, (1 + overlap) * w_X / (w_llm + w_emb))

of the GPU and its duration is stretched by 1 / share_X. The factor is fixed when the step or batch
starts (kernels already launched are not re-timed); a vLLM jump over many decode steps is cut at
every change of the embedding engine's state, so each step sees the partner state at its start,
exactly as step-by-step simulation would. `overlap` = 0 is pure time-slicing (the shares sum to 1:
the GPU does the same total work either way); `overlap` = 1 is no interference at all.

What it predicts (docs/simulator.md has the numbers): with the defaults (w 0.7 / 0.3, overlap 0.2)
an LLM step that overlaps an embedding batch is 1/0.84 = 1.19x slower and an embedding batch that
overlaps LLM work 1/0.36 = 2.78x slower; an idle partner costs nothing.
"""

from __future__ import annotations

from sagesched.sim.config import SharedGpuConfig


class SharedGpu:
    """The stretch factors of the two engines sharing one GPU."""

    __slots__ = ("config", "embedding_factor", "llm_factor")

    def __init__(self, config: SharedGpuConfig) -> None:
        self.config = config
        total = config.llm_weight + config.embedding_weight
        gain = 1.0 + config.overlap
        self.llm_factor = 1.0 / min(1.0, gain * config.llm_weight / total)
        self.embedding_factor = 1.0 / min(1.0, gain * config.embedding_weight / total)

    def llm_stretch(self, embedding_busy: bool) -> float:
        """Duration multiplier for a vLLM step starting now."""
        return self.llm_factor if embedding_busy else 1.0

    def embedding_stretch(self, llm_busy: bool) -> float:
        """Duration multiplier for an embedding batch starting now."""
        return self.embedding_factor if llm_busy else 1.0
