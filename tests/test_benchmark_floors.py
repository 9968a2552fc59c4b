"""The policy benchmark's interactive-TTFT floors (experiments/policy_benchmark/loaded_floor.py).

The report's tail analysis rests on them, so they are checked on hand-built runs whose answer is
known: prompts that collide queue behind one another only when no other GPU is free, and a shared
GPU whose embedding engine is busy prefills at the interference stretch.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sagesched.sim.perf_model import LLMPerfModel


@pytest.fixture(scope="module")
def floors(load_script):
    return load_script("experiments/policy_benchmark/loaded_floor.py")


@pytest.fixture(scope="module")
def model() -> LLMPerfModel:
    return LLMPerfModel.load("llama-2-7b", "a100")


def _chat(rid: str, gpu: str, arrival: float, prompt: int = 2048) -> dict:
    return {
        "request_id": rid,
        "type": "llm_chat",
        "workload_class": "interactive",
        "instance_id": gpu,
        "arrival_s": arrival,
        "dispatch_s": arrival,
        "first_token_s": arrival + 0.2,
        "finish_s": arrival + 5.0,
        "prompt_tokens": prompt,
        "output_tokens": 100,
        "ttft_ms": 200.0,
    }


def _run(tmp_path: Path, rows: list[dict]) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    pd.DataFrame(rows).to_parquet(out / "requests.parquet")
    return out


def test_colliding_prompts_spread_over_free_gpus_and_queue_on_one(tmp_path, floors, model):
    alone = floors.prefill_alone_ms(model, 2048, 0, 2048 + 50)
    # Two GPUs, two prompts at once (the second GPU has a finished request, so it exists in the run).
    two = _run(tmp_path, [_chat("a", "g0", 10.0), _chat("b", "g0", 10.0), _chat("old", "g1", 0.0, 16)])
    spread = floors.collision_floor(two, model)
    assert spread == pytest.approx(alone, rel=0.05)  # each on its own GPU, nothing decoding there at 10 s
    one = tmp_path / "one"
    one.mkdir()
    pd.DataFrame([_chat("a", "g0", 10.0), _chat("b", "g0", 10.0)]).to_parquet(one / "requests.parquet")
    queued = floors.collision_floor(one, model)
    assert queued > 1.8 * alone  # the second waits for the first: its TTFT is about two prefills


def test_a_shared_gpu_busy_with_embeddings_prefills_at_the_stretch(tmp_path, floors, model):
    embedding = {
        "request_id": "e",
        "type": "embedding",
        "workload_class": "ingest",
        "instance_id": "g0",
        "arrival_s": 9.0,
        "dispatch_s": 9.0,
        "first_token_s": 11.0,
        "finish_s": 11.0,
        "prompt_tokens": 512,
        "output_tokens": 0,
        "ttft_ms": 2000.0,
    }
    run = _run(tmp_path, [_chat("a", "g0", 10.0), embedding])
    alone = floors.prefill_alone_ms(model, 2048, 0, 2048 + 50)
    assert floors.collision_floor(run, model) == pytest.approx(1.5 * alone, rel=0.05)
    assert floors.collision_floor(run, model, stretch=1.0) == pytest.approx(alone, rel=0.05)
