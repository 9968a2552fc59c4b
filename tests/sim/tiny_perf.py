"""Stand-in performance models for simulator tests: affine closed forms a test can sum by hand.

They have the `LLMPerfModel` / `EmbeddingPerfModel` interface, so engine and driver behaviour is
tested apart from the fitted profiles (which tests/sim/test_perf_model.py covers).
"""

from __future__ import annotations


class TinyLLMPerf:
    """Step time affine in every batch term; KV capacity given (in tokens, at 0.9 utilisation)."""

    prefill_tokens_per_s = 10_000.0
    decode_step_s = 0.01

    def __init__(self, kv_tokens: int = 180_000) -> None:
        self.kv_tokens = kv_tokens

    def step_time_s(self, b) -> float:
        if b.prefill_tokens + b.decode_tokens == 0:
            return 0.0
        return 0.004 + 1e-5 * b.prefill_tokens + 1e-4 * b.decode_tokens + 1e-7 * b.decode_context_tokens

    def kv_capacity_tokens(self, gpu_memory_utilization: float = 0.9) -> int:
        return round(self.kv_tokens * gpu_memory_utilization / 0.9)

    def frontend_s(self, prompt_tokens: int, running: int) -> float:
        """No serving-frontend cost: the stand-in prices engine steps only."""
        return 0.0


class TinyEmbPerf:
    """Batch time affine in its tokens."""

    tokens_per_s = 100_000.0

    def batch_time_s(self, num_inputs: int, total_tokens: int, max_input_tokens: int) -> float:
        return 0.002 + 1e-5 * total_tokens


def make_provider(kv_tokens: int):
    """A `perf_provider` for `simulate`: the stand-ins for whichever engines an instance runs."""

    def provider(cfg):
        llm = TinyLLMPerf(kv_tokens) if cfg.kind.value != "embedding" else None
        emb = TinyEmbPerf() if cfg.kind.value != "llm" else None
        return llm, emb

    return provider
