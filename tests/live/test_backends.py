"""The backend adapter: config validation, metrics parsing, and calls against real servers."""

from __future__ import annotations

import asyncio
import math

import pytest

from sagesched.core import InstanceKind
from sagesched.live.backend_metrics import metrics_from_text, parse_prometheus_text
from sagesched.live.backends import BackendClient, BackendConfig
from sagesched.live.errors import BackendUnavailable
from sagesched.live.real_backends import free_port
from sagesched.live.vectors import decode_base64, encode_base64

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


VLLM_CURRENT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama-2-7b"} 3.0
vllm:num_requests_waiting{engine="0",model_name="llama-2-7b"} 5.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama-2-7b"} 0.42
vllm:prompt_tokens_total{model_name="llama-2-7b"} 1234.0
"""
VLLM_OLD = """\
vllm:num_requests_running{model_name="m"} 1
vllm:num_requests_waiting{model_name="m"} 0
vllm:gpu_cache_usage_perc{model_name="m"} 0.25
"""
TEI = """\
te_queue_size 7
te_batch_current_size 4
te_request_count{method="single"} 10
"""
LLAMACPP = """\
llamacpp:requests_processing 2
llamacpp:requests_deferred 1
llamacpp:kv_cache_usage_ratio 0.1
"""


def test_backend_config_normalises_and_validates() -> None:
    cfg = BackendConfig("http://127.0.0.1:8001/v1/", "LLM", "m")
    assert cfg.url == "http://127.0.0.1:8001"
    assert cfg.kind is InstanceKind.LLM
    assert cfg.models == ("m",)
    assert cfg.id == "127.0.0.1:8001"
    with pytest.raises(ValueError, match="unknown instance kind"):
        BackendConfig("http://127.0.0.1:1", "gpu", ["m"])
    with pytest.raises(ValueError, match="use one of openai, tei"):
        BackendConfig("http://127.0.0.1:1", "embedding", ["m"], api="grpc")
    with pytest.raises(ValueError, match="must look like"):
        BackendConfig("127.0.0.1:1", "llm", ["m"])
    with pytest.raises(ValueError, match="at least one model"):
        BackendConfig("http://127.0.0.1:1", "llm", [])
    with pytest.raises(ValueError, match="max_inflight"):
        BackendConfig("http://127.0.0.1:1", "llm", ["m"], max_inflight=0)
    with pytest.raises(ValueError, match="valid keys"):
        BackendConfig.from_dict({"url": "http://127.0.0.1:1", "kind": "llm", "models": ["m"], "weight": 2})


@pytest.mark.parametrize(
    ("text", "running", "waiting", "kv"),
    [(VLLM_CURRENT, 3, 5, 0.42), (VLLM_OLD, 1, 0, 0.25), (TEI, 4, 7, None), (LLAMACPP, 2, 1, 0.1)],
    ids=["vllm-current", "vllm-old", "tei", "llamacpp"],
)
def test_metrics_names_of_every_server(text: str, running: float, waiting: float, kv: float | None) -> None:
    metrics = metrics_from_text(text, taken_at=100.0)
    assert metrics.running == running
    assert metrics.waiting == waiting
    assert metrics.kv_usage == (None if kv is None else pytest.approx(kv))
    assert metrics.age_s(now=102.5) == pytest.approx(2.5)


def test_prometheus_parser_sums_label_sets_and_skips_garbage() -> None:
    raw = parse_prometheus_text('a{x="1"} 1\na{x="2"} 2\nb 3 1700000000\nnot a sample\nc NaN\n# c 9\n')
    assert raw == {"a": 3.0, "b": 3.0}


def test_base64_roundtrip_is_float32_little_endian() -> None:
    vec = [0.5, -1.25, 3.0]
    assert decode_base64(encode_base64(vec)) == vec
    assert encode_base64([1.0]) == "AACAPw=="  # 1.0f little-endian


async def test_unreachable_backend_is_retryable_and_unhealthy() -> None:
    client = BackendClient(BackendConfig(f"http://127.0.0.1:{free_port()}", "llm", ["m"]), connect_timeout_s=0.5)
    try:
        assert await client.health() is False
        with pytest.raises(BackendUnavailable, match="unreachable"):
            await client.post_json("/v1/completions", {"model": "m", "prompt": "x"})
        with pytest.raises(BackendUnavailable):
            await client.open_stream("/v1/completions", {"model": "m", "prompt": "x", "stream": True})
    finally:
        await client.aclose()


async def test_real_llama_server_health_metrics_stream(llm_server) -> None:
    client = BackendClient(BackendConfig(llm_server.url, "llm", [llm_server.model]))
    try:
        assert await client.health() is True
        metrics = await client.scrape()
        assert metrics is not None
        assert metrics.running is not None and metrics.waiting is not None  # llamacpp:* gauges
        assert "llamacpp:requests_processing" in metrics.raw
        body = {"model": llm_server.model, "prompt": "One, two,", "max_tokens": 3, "stream": True, "temperature": 0}
        sse = await client.open_stream("/v1/completions", body)
        events = []
        while (event := await sse.next_event()) is not None:
            events.append(event)
        await sse.aclose()
        text = "".join(c["choices"][0].get("text", "") for c in events if c.get("choices"))
        assert text.strip(), events
    finally:
        await client.aclose()


async def test_real_embeddings_one_call_in_order(embedding_server) -> None:
    client = BackendClient(BackendConfig(embedding_server.url, "embedding", [embedding_server.model]))
    try:
        texts = ["alpha", "a much longer second sentence about trains", "gamma"]
        vectors, tokens = await client.embed(embedding_server.model, texts)
        assert len(vectors) == 3 and len({len(v) for v in vectors}) == 1
        single, _ = await client.embed(embedding_server.model, [texts[1]])
        assert vectors[1] == pytest.approx(single[0], abs=1e-4)
        assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)
        assert tokens is None or tokens > 0
    finally:
        await client.aclose()


async def test_tei_native_embed_and_te_metrics(emulator) -> None:
    tei = emulator("tei")
    client = BackendClient(BackendConfig(tei.url, "embedding", [tei.model], api="tei"))
    try:
        assert await client.health()
        vectors, _ = await client.embed(tei.model, ["x", "y z"])
        assert len(vectors) == 2 and all(math.isfinite(x) for x in vectors[0])
        metrics = await client.scrape()
        assert metrics is not None and metrics.waiting is not None and "te_queue_size" in metrics.raw
    finally:
        await client.aclose()


async def test_vllm_emulator_metrics_current_names(emulator) -> None:
    vllm = emulator("vllm")
    client = BackendClient(BackendConfig(vllm.url, "llm", [vllm.model]))
    try:
        task = asyncio.create_task(
            client.post_json(
                "/v1/completions", {"model": vllm.model, "prompt": "hi", "max_tokens": 64, "ignore_eos": True}
            )
        )
        await asyncio.sleep(0.05)
        metrics = await client.scrape()
        assert metrics is not None and metrics.running is not None and metrics.kv_usage is not None
        await task
    finally:
        await client.aclose()
