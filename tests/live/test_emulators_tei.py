"""The TEI emulator: admission limits (429/413), token-budget batching, timing, te_* metrics; and the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest
from metrics_scrape import scrape, until

from sagesched.live.emulators import text as tx
from sagesched.sim.perf_model import EmbeddingPerfModel


def _metric(url: str, name: str) -> float:
    return scrape(url).get(name, 0.0)


def test_embed_native_and_openai_routes_agree(emulator) -> None:  # type: ignore[no-untyped-def]
    emu = emulator("tei", model="bge-base", time_scale=0)
    texts = ["first passage", "second passage"]
    native = httpx.post(f"{emu.url}/embed", json={"inputs": texts}, timeout=10)
    assert native.status_code == 200
    vectors = native.json()
    assert len(vectors) == 2 and len(vectors[0]) == 768  # bge-base
    assert sum(v * v for v in vectors[0]) == pytest.approx(1.0)
    single = httpx.post(f"{emu.url}/embed", json={"inputs": texts[1]}, timeout=10).json()
    assert single == [vectors[1]]
    openai = httpx.post(f"{emu.url}/v1/embeddings", json={"model": emu.model, "input": texts}, timeout=10).json()
    assert [d["embedding"] for d in openai["data"]] == vectors
    assert openai["usage"]["prompt_tokens"] == sum(tx.count_text_tokens(t) for t in texts)
    info = httpx.get(f"{emu.url}/info", timeout=10).json()
    assert info["model_id"] == "bge-base" and info["max_client_batch_size"] == 32 and info["max_batch_tokens"] == 16384


def test_413_past_max_client_batch_size_and_too_long_input(emulator) -> None:  # type: ignore[no-untyped-def]
    emu = emulator("tei", time_scale=0, max_client_batch_size=4, max_input_length=64)
    too_many = httpx.post(f"{emu.url}/embed", json={"inputs": ["x"] * 5}, timeout=10)
    assert too_many.status_code == 413
    assert too_many.json()["error_type"] == "Validation" and "max_client_batch_size" in too_many.json()["error"]
    openai = httpx.post(f"{emu.url}/v1/embeddings", json={"input": ["x"] * 5}, timeout=10)
    assert openai.status_code == 413 and openai.json()["code"] == 413
    long_text = "word " * 100  # 125 tokens > 64
    assert httpx.post(f"{emu.url}/embed", json={"inputs": long_text}, timeout=10).status_code == 413
    assert httpx.post(f"{emu.url}/embed", json={"inputs": long_text, "truncate": True}, timeout=10).status_code == 200
    assert httpx.post(f"{emu.url}/embed", json={"inputs": ["x"] * 4}, timeout=10).status_code == 200
    assert _metric(emu.url, "te_request_failure") == 3


def test_429_past_max_concurrent_requests(emulator) -> None:  # type: ignore[no-untyped-def]
    perf = EmbeddingPerfModel.load("bge-base", "a100")
    # Slow the clock so that a 3-input call (30 tokens each) stays in flight for ~0.6 s.
    scale = 0.6 / perf.batch_time_s(3, 3 * 30, 30)
    emu = emulator("tei", time_scale=scale, max_concurrent_requests=4)
    inputs = ["token " * 24] * 3

    async def flood() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            first = asyncio.create_task(client.post(f"{emu.url}/embed", json={"inputs": inputs}))
            await until(client, emu.url, lambda m: m.get("te_batch_current_size") == 3, "the first call never ran")
            second = await client.post(f"{emu.url}/embed", json={"inputs": inputs})
            one_more = await client.post(f"{emu.url}/embed", json={"inputs": "fits"})
            return [
                (await first).status_code,
                second.status_code,
                one_more.status_code,
                second.json()["error_type"] == "Overloaded",
            ]

    first, second, one_more, overloaded = asyncio.run(flood())
    assert (first, second, one_more, overloaded) == (200, 429, 200, True)


def test_lone_call_timing_and_batching_of_queued_calls(emulator) -> None:  # type: ignore[no-untyped-def]
    perf = EmbeddingPerfModel.load("bge-base", "a100")
    text = "token " * 40  # 60 emulated tokens
    tokens = tx.count_text_tokens(text)
    lone = perf.batch_time_s(4, 4 * tokens, tokens)
    scale = 0.5 / lone  # a lone 4-input call takes 0.5 s of wall time
    emu = emulator("tei", time_scale=scale)
    client = httpx.Client(timeout=30)
    client.get(f"{emu.url}/health")
    start = time.monotonic()
    assert client.post(f"{emu.url}/embed", json={"inputs": [text] * 4}).status_code == 200
    assert time.monotonic() - start == pytest.approx(0.5, rel=0.1, abs=0.02)
    batches0 = _metric(emu.url, "te_batch_count")

    async def burst() -> None:
        async with httpx.AsyncClient(timeout=30) as ac:
            first = asyncio.create_task(ac.post(f"{emu.url}/embed", json={"inputs": [text] * 4}))
            await until(ac, emu.url, lambda m: m.get("te_batch_current_size") == 4, "the first batch never ran")
            # The first batch is running (0.5 s); the next five calls queue behind it.
            rest = [asyncio.create_task(ac.post(f"{emu.url}/embed", json={"inputs": [text] * 4})) for _ in range(5)]
            # One scrape: both gauges at the same instant.
            during = await until(ac, emu.url, lambda m: m.get("te_queue_size") == 20, "the five calls never queued")
            assert during["te_batch_current_size"] == 4
            assert all(r.status_code == 200 for r in await asyncio.gather(first, *rest))

    asyncio.run(burst())
    # TEI packs the next batch while one runs (issue 11): the first queued call went alone, the other four as one.
    assert _metric(emu.url, "te_batch_count") - batches0 == 3
    assert _metric(emu.url, "te_embed_count") == 28
    assert _metric(emu.url, "te_request_success") == 7
    assert _metric(emu.url, "te_request_duration_count") == 7
    assert _metric(emu.url, "te_queue_size") == 0


def test_cli_runs_emulator_process_and_kill_drops_it(emulator) -> None:  # type: ignore[no-untyped-def]
    emu = emulator("vllm", subprocess=True, time_scale=0, max_num_seqs=8)
    response = httpx.post(
        f"{emu.url}/v1/completions", json={"model": "llama-2-7b", "prompt": "hi", "max_tokens": 5}, timeout=10
    )
    assert response.json()["usage"]["completion_tokens"] == 5
    emu.kill()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{emu.url}/health", timeout=2)


def test_cli_rejects_unknown_model_with_valid_names() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sagesched.live.emulators.cli", "vllm", "--model", "gpt-9", "--port", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "gpt-9" in result.stderr and "llama-2-7b" in result.stderr


def test_cli_refuses_non_loopback_host() -> None:
    from sagesched.live.emulators.cli import main

    with pytest.raises(SystemExit, match="loopback"):
        main(["tei", "--port", "1", "--host", "0.0.0.0"])
