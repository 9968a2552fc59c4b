"""benchmarks/gpu_colocation.py turns measured stretches into `SharedGpuConfig` fields: the engine
model must then stretch each engine's work by exactly what was measured (the script itself needs
PyTorch and a GPU; its arithmetic does not)."""

from __future__ import annotations

import pytest

from sagesched.sim.config import SharedGpuConfig
from sagesched.sim.engines.shared_gpu import PRESETS, SharedGpu


@pytest.fixture(scope="module")
def colocation(load_script):
    return load_script("benchmarks/gpu_colocation.py")


@pytest.mark.parametrize(("s_llm", "s_emb"), [(2.0, 2.0), (1.5, 1.5), (1.0, 1.0), (1.2, 1.9), (1.05, 3.0), (1.0, 1.6)])
def test_fitted_config_reproduces_the_measured_stretches(colocation, s_llm: float, s_emb: float) -> None:
    gpu = SharedGpu(SharedGpuConfig(**colocation.shared_gpu_config(s_llm, s_emb)))
    assert gpu.llm_stretch(embedding_busy=True) == pytest.approx(s_llm, rel=1e-5)
    assert gpu.embedding_stretch(llm_busy=True) == pytest.approx(s_emb, rel=1e-5)
    assert gpu.llm_stretch(embedding_busy=False) == 1.0


def test_symmetric_stretches_give_the_presets(colocation) -> None:
    assert colocation.shared_gpu_config(2.0, 2.0) == pytest.approx(PRESETS["time_slice"])
    assert colocation.shared_gpu_config(1.5, 1.5) == pytest.approx(PRESETS["mps"], abs=1e-5)
    assert colocation.shared_gpu_config(1.0, 1.0) == pytest.approx(PRESETS["ideal"])


def test_noise_and_worse_than_time_slicing(colocation) -> None:
    # A stretch under 1 is noise: it counts as no slowdown.
    assert colocation.shared_gpu_config(0.97, 1.0)["overlap"] == 1.0
    # Both slower than time slicing: overlap 0, the measured ratio kept in the weights.
    fields = colocation.shared_gpu_config(3.0, 2.5)
    assert fields["overlap"] == 0.0
    assert fields["llm_weight"] == pytest.approx((1 / 3.0) / (1 / 3.0 + 1 / 2.5), rel=1e-5)
    with pytest.raises(ValueError, match="positive"):
        colocation.shared_gpu_config(0.0, 1.5)


def test_median_leaves_out_the_edges(colocation) -> None:
    times = [9.0] + [1.0] * 8 + [9.0]
    assert colocation.summarise(times) == 1.0
    with pytest.raises(ValueError, match="--seconds"):
        colocation.summarise([])
