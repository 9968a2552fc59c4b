"""The vLLM emulator: timing from the performance model, OpenAI wire format, batching, KV limits, metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from typing import Any

import httpx
import pytest
from metrics_scrape import scrape, until

from sagesched.live.emulators import text as tx
from sagesched.sim.perf_model import BatchShape, LLMPerfModel


def _stream_lines(
    url: str, path: str, body: dict[str, Any], client: httpx.Client | None = None
) -> tuple[list[str], list[float]]:
    lines: list[str] = []
    stamps: list[float] = []
    with (client or httpx.Client()).stream("POST", f"{url}{path}", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line:
                lines.append(line)
                stamps.append(time.monotonic())
    return lines, stamps


def test_lone_request_timing_matches_perf_model(emulator) -> None:  # type: ignore[no-untyped-def]
    scale = 1.0
    emu = emulator("vllm", model="llama-2-7b", hardware="a100", time_scale=scale)
    prompt_tokens, max_tokens = 1500, 40
    perf = LLMPerfModel.load("llama-2-7b", "a100")
    # vLLM alone: one prefill step (the whole prompt fits the 2048-token budget) yields token 1,
    # then one decode step per further token, each reading the KV cache built so far.
    ttft = perf.step_time_s(
        BatchShape(prefill_tokens=prompt_tokens, prefill_context_tokens=prompt_tokens, num_prefills=1)
    )
    decode = sum(
        perf.step_time_s(BatchShape(decode_tokens=1, decode_context_tokens=prompt_tokens + i))
        for i in range(1, max_tokens)
    )
    body = {"model": emu.model, "prompt": [7] * prompt_tokens, "max_tokens": max_tokens, "stream": True}
    client = httpx.Client()
    # Warm the connection and the server's first-request paths (a different prompt: no cache hits).
    client.post(f"{emu.url}/v1/completions", json={"model": emu.model, "prompt": "warm", "max_tokens": 1})
    loop = emu.emulator.loop
    steps0, busy0 = loop.stats.steps, loop.stats.busy_engine_s
    start = time.monotonic()
    lines, stamps = _stream_lines(emu.url, "/v1/completions", body, client)
    chunks = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    first = next(i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["text"])
    measured_ttft = (stamps[first] - start) / scale
    measured_total = (stamps[-1] - start) / scale
    # Wall-clock tolerance: HTTP and event-loop overhead of a few ms on a busy 2-core machine.
    assert measured_ttft == pytest.approx(ttft, rel=0.10, abs=0.03)
    assert measured_total == pytest.approx(ttft + decode, rel=0.10, abs=0.04)
    # And the engine's own clock agrees exactly with the sum of the model's step times.
    assert loop.stats.steps - steps0 == max_tokens
    assert loop.stats.busy_engine_s - busy0 == pytest.approx(ttft + decode, rel=1e-9)


def test_chat_stream_format_and_usage(emulator) -> None:  # type: ignore[no-untyped-def]
    emu = emulator("vllm", time_scale=0.05)
    body = {
        "model": emu.model,
        "messages": [{"role": "user", "content": "Tell me about scheduling."}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    lines, _ = _stream_lines(emu.url, "/v1/chat/completions", body)
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0] for c in chunks[1:] if c["choices"]]
    assert len(content) == 6 and all(len(c["delta"]["content"].split()) == 1 for c in content)
    assert [c["finish_reason"] for c in content] == [None] * 5 + ["length"]
    usage = chunks[-1]
    assert usage["choices"] == []
    prompt_tokens = tx.count_text_tokens(tx.chat_to_text(body["messages"]))
    assert usage["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 6, "total_tokens": prompt_tokens + 6}


def test_completion_stream_without_usage_has_no_usage_chunk(emulator) -> None:  # type: ignore[no-untyped-def]
    emu = emulator("vllm", time_scale=0)
    lines, _ = _stream_lines(
        emu.url, "/v1/completions", {"model": emu.model, "prompt": "hi", "max_tokens": 3, "stream": True}
    )
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]"
    assert all("usage" not in c and c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks).count(" ") == 3


@pytest.mark.parametrize("max_tokens", [1, 7, 64])
def test_max_tokens_honoured(emulator, max_tokens: int) -> None:  # type: ignore[no-untyped-def]
    emu = emulator("vllm", time_scale=0)
    body = {"model": emu.model, "prompt": "Count for me", "max_tokens": max_tokens, "ignore_eos": True}
    data = httpx.post(f"{emu.url}/v1/completions", json=body, timeout=30).json()
    choice = data["choices"][0]
    assert data["usage"]["completion_tokens"] == max_tokens
    assert len(choice["text"].split()) == max_tokens
    assert choice["finish_reason"] == "length"
    chat = {"model": emu.model, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": max_tokens}
    data = httpx.post(f"{emu.url}/v1/chat/completions", json=chat, timeout=30).json()
    assert data["object"] == "chat.completion"
    assert len(data["choices"][0]["message"]["content"].split()) == max_tokens == data["usage"]["completion_tokens"]


def test_output_is_deterministic_and_stop_strings_end_it(emulator) -> None:  # type: ignore[no-untyped-def]
    emu = emulator("vllm", time_scale=0)
    body = {"model": emu.model, "prompt": "same prompt", "max_tokens": 10}
    first = httpx.post(f"{emu.url}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
    again = httpx.post(f"{emu.url}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
    assert first == again
    words = first.split()
    data = httpx.post(f"{emu.url}/v1/completions", json={**body, "stop": [words[4]]}, timeout=30).json()
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["choices"][0]["text"].split() == words[:4]
    assert data["usage"]["completion_tokens"] == 4


def test_two_concurrent_requests_share_steps(emulator) -> None:  # type: ignore[no-untyped-def]
    # ~10 ms steps: the two concurrent requests may reach the engine up to ~10 steps (~0.1 s) apart
    # on a loaded machine and still be seen sharing their decode steps.
    emu = emulator("vllm", time_scale=1.0)
    body = {"model": emu.model, "prompt": "batch me please", "max_tokens": 20}

    async def run(n: int) -> float:
        async with httpx.AsyncClient(timeout=30) as client:
            started = time.monotonic()
            responses = await asyncio.gather(*(client.post(f"{emu.url}/v1/completions", json=body) for _ in range(n)))
            assert all(r.json()["usage"]["completion_tokens"] == 20 for r in responses)
            return time.monotonic() - started

    before = scrape(emu.url)["sagesched_emulator_steps_total"]
    asyncio.run(run(1))
    asyncio.run(run(1))
    serial = scrape(emu.url)["sagesched_emulator_steps_total"] - before
    before += serial
    asyncio.run(run(2))
    together = scrape(emu.url)["sagesched_emulator_steps_total"] - before
    assert serial == 40
    # Both decode in the same steps: one after the other would take 40; together they overlap for
    # at least half their steps (exactly 21 or 22 when they arrive a step or two apart).
    assert together <= 30


def test_metrics_present_and_moving_under_load(emulator) -> None:  # type: ignore[no-untyped-def]
    # A 40-token request takes ~0.45 s at time_scale=1; 1.5 leaves ~0.7 s for all five to arrive
    # while the first two still run.
    emu = emulator("vllm", time_scale=1.5, max_num_seqs=2)
    names = scrape(emu.url)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_sum",
    ):
        assert name in names, name
    prompt = "shared system prompt " * 40  # 200 tokens: several KV blocks to share

    async def load() -> dict[str, float]:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": emu.model, "prompt": prompt, "max_tokens": 40}
            tasks = [asyncio.create_task(client.post(f"{emu.url}/v1/completions", json=body)) for _ in range(5)]
            during = await until(
                client, emu.url, lambda m: m["vllm:num_requests_waiting"] == 3, "the five requests never all queued"
            )
            await asyncio.gather(*tasks)
            return during

    during = asyncio.run(load())
    assert during["vllm:num_requests_running"] == 2  # max_num_seqs
    assert during["vllm:num_requests_waiting"] == 3
    assert 0 < during["vllm:kv_cache_usage_perc"] < 1
    after = scrape(emu.url)
    assert after["vllm:num_requests_running"] == after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
    assert after["vllm:generation_tokens_total"] == 200
    assert after["vllm:time_to_first_token_seconds_count"] == 5
    assert after["vllm:inter_token_latency_seconds_count"] == 5 * 39
    assert after["vllm:request_success_total"] == 5
    # Later requests found the shared prompt's blocks in the prefix cache.
    assert 0 < after["vllm:prefix_cache_hits_total"] <= after["vllm:prefix_cache_queries_total"]


def test_kv_limit_preempts_and_still_completes(emulator) -> None:  # type: ignore[no-untyped-def]
    # 24 blocks x 16 tokens = 384 tokens of KV: four requests of 64 + 60 tokens cannot all fit.
    # They must be in the engine together for that to matter. At time_scale=0 a request finishes
    # in a few milliseconds, before a slow client has sent the next one; at time_scale=2 a step
    # takes ~20 ms, so the four may arrive up to ~40 steps (~0.8 s) apart and still collide.
    emu = emulator("vllm", time_scale=2.0, num_gpu_blocks=24, enable_prefix_caching=False)

    async def load() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=30) as client:
            bodies = [{"model": emu.model, "prompt": [i] * 64, "max_tokens": 60} for i in range(4)]
            return [
                r.json()
                for r in await asyncio.gather(*(client.post(f"{emu.url}/v1/completions", json=b) for b in bodies))
            ]

    results = asyncio.run(load())
    assert [r["usage"]["completion_tokens"] for r in results] == [60] * 4
    assert scrape(emu.url)["vllm:num_preemptions_total"] > 0
    too_big = {"model": emu.model, "prompt": [1] * 300, "max_tokens": 200}
    response = httpx.post(f"{emu.url}/v1/completions", json=too_big, timeout=30)
    assert response.status_code == 400 and "KV cache" in response.json()["error"]["message"]


def test_errors_are_openai_shaped(emulator) -> None:  # type: ignore[no-untyped-def]
    emu = emulator("vllm", time_scale=0, max_model_len=256)
    wrong = httpx.post(f"{emu.url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=10)
    assert wrong.status_code == 404
    assert wrong.json()["error"]["code"] == 404 and "nope" in wrong.json()["error"]["message"]
    long = httpx.post(
        f"{emu.url}/v1/completions", json={"model": emu.model, "prompt": "x", "max_tokens": 300}, timeout=10
    )
    assert long.status_code == 400 and "maximum context length is 256" in long.json()["error"]["message"]
    bad = httpx.post(f"{emu.url}/v1/chat/completions", json={"model": emu.model, "messages": []}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    garbage = httpx.post(
        f"{emu.url}/v1/completions", content=b"{", headers={"content-type": "application/json"}, timeout=10
    )
    assert garbage.status_code == 400
    models = httpx.get(f"{emu.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [emu.model]


def test_embeddings_pooling_route(emulator) -> None:  # type: ignore[no-untyped-def]
    emu = emulator("vllm", time_scale=0.1)
    texts = ["alpha beta", "gamma delta epsilon", "alpha beta"]
    data = httpx.post(f"{emu.url}/v1/embeddings", json={"model": emu.model, "input": texts}, timeout=30).json()
    vectors = [d["embedding"] for d in sorted(data["data"], key=lambda d: d["index"])]
    assert len(vectors) == 3 and len(vectors[0]) == 4096  # llama-2-7b hidden size
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    single = httpx.post(f"{emu.url}/v1/embeddings", json={"model": emu.model, "input": texts[1]}, timeout=30).json()
    assert single["data"][0]["embedding"] == vectors[1]  # batch-independent, like a real encoder
    packed = httpx.post(
        f"{emu.url}/v1/embeddings",
        json={"model": emu.model, "input": texts[1], "encoding_format": "base64", "dimensions": 8},
        timeout=30,
    ).json()
    decoded = struct.unpack("<8f", base64.b64decode(packed["data"][0]["embedding"]))
    assert sum(v * v for v in decoded) == pytest.approx(1.0, rel=1e-5)
    assert data["usage"]["prompt_tokens"] == sum(tx.count_text_tokens(t) for t in texts)
    assert emu.emulator.loop.stats.generation_tokens == 0  # pooling generates nothing


def test_zero_time_scale_is_fast(emulator) -> None:  # type: ignore[no-untyped-def]
    emu = emulator("vllm", time_scale=0)
    start = time.monotonic()
    data = httpx.post(
        f"{emu.url}/v1/completions",
        json={"model": emu.model, "prompt": "go", "max_tokens": 200, "ignore_eos": True},
        timeout=30,
    ).json()
    assert data["usage"]["completion_tokens"] == 200
    assert time.monotonic() - start < 1.0  # the model predicts ~3 s of A100 time for this


def test_client_disconnect_aborts_request(emulator) -> None:  # type: ignore[no-untyped-def]
    emu = emulator("vllm", time_scale=1.0)
    body = {"model": emu.model, "prompt": "long one", "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{emu.url}/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and scrape(emu.url)["vllm:num_requests_running"]:
        time.sleep(0.05)
    assert scrape(emu.url)["vllm:num_requests_running"] == 0
    assert scrape(emu.url)["vllm:kv_cache_usage_perc"] == 0
