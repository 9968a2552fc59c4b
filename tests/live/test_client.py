"""UnifiedInferenceClient in every mode against real llama-server backends, create_auto, facades."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from sagesched.live import IntelligentEmbeddingClient, IntelligentLLMClient, UnifiedInferenceClient
from sagesched.live.errors import LiveError, ModelNotFound
from sagesched.live.real_backends import free_port

SHORT = {"max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def gateway(llm_server, embedding_server) -> Iterator[str]:
    from sagesched.live.gateway_config import GatewayConfig
    from sagesched.live.server import UnifiedAPIServer

    config = GatewayConfig.from_dict(
        {
            "policy": "fifo",
            "backends": [
                {"url": llm_server.url, "kind": "llm", "models": [llm_server.model]},
                {"url": embedding_server.url, "kind": "embedding", "models": [embedding_server.model]},
            ],
        }
    )
    server = UnifiedAPIServer(config, port=0).start()
    yield server.url
    server.stop()


def _client(mode: str, llm_server, embedding_server, gateway_url: str | None) -> UnifiedInferenceClient:
    if mode == "simple":
        return UnifiedInferenceClient(
            llm_server.url, llm_server.model, embedding_server.url + "/v1", embedding_server.model
        )
    if mode == "gateway":
        return UnifiedInferenceClient.create_gateway(
            gateway_url, llm_model=llm_server.model, embedding_model=embedding_server.model
        )
    instances = [
        {"host": "127.0.0.1", "port": llm_server.port, "model_name": llm_server.model, "instance_type": "llm"},
        {
            "host": "127.0.0.1",
            "port": embedding_server.port,
            "model_name": embedding_server.model,
            "instance_type": "embedding",
        },
    ]
    return UnifiedInferenceClient.create_with_control_plane(
        instances, scheduling_policy="hybrid", policy_config={"max_embedding_wait_ms": 1.0}
    )


@pytest.mark.parametrize("mode", ["simple", "gateway", "control_plane"])
def test_every_operation_in_every_mode(mode: str, llm_server, embedding_server, request) -> None:
    gateway_url = request.getfixturevalue("gateway") if mode == "gateway" else None
    with _client(mode, llm_server, embedding_server, gateway_url) as client:
        assert client.mode == mode
        reply = client.chat([{"role": "user", "content": "Say hi"}], **SHORT)
        assert isinstance(reply, str) and reply
        text = client.generate("The capital of France is", **SHORT)
        assert isinstance(text, str) and text
        deltas = list(client.stream_generate("One, two, three,", max_tokens=3, temperature=0))
        assert deltas and all(isinstance(d, str) and d for d in deltas)
        chat_deltas = list(client.stream_chat("Hello", max_tokens=2))
        assert chat_deltas
        vectors = client.embed(["first text", "second text"])
        assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 8
        # The same texts embedded one by one give the same vectors (order kept, no mix-up).
        single = client.embed("second text")
        assert np.allclose(vectors[1], single[0], atol=1e-3)
        # temperature=0 is sent as 0: greedy decoding repeats itself.
        assert client.generate("Once upon a time", max_tokens=2, temperature=0) == client.generate(
            "Once upon a time", max_tokens=2, temperature=0
        )
        if mode == "control_plane":
            snap = client.snapshot()
            assert snap["policy"]["name"] == "hybrid" and snap["outcomes"]["completed"] >= 8


def test_async_twins_share_the_implementation(llm_server, embedding_server) -> None:
    client = UnifiedInferenceClient(llm_server.url, llm_server.model, embedding_server.url, embedding_server.model)

    async def main() -> None:
        reply, text, vectors = await asyncio.gather(
            client.achat("Hi", **SHORT), client.agenerate("Hello,", **SHORT), client.aembed(["a", "b", "c"])
        )
        assert reply and text and len(vectors) == 3
        deltas = [d async for d in client.astream_generate("A B C", max_tokens=2)]
        assert deltas
        deltas = [d async for d in client.astream_chat("Hi", max_tokens=2)]
        assert deltas
        # Sync and async on one client, same result for the same greedy request.
        assert await client.agenerate("The sea is", max_tokens=3, temperature=0) == client.generate(
            "The sea is", max_tokens=3, temperature=0
        )
        await client.aclose()

    asyncio.run(main())


def test_errors_are_live_errors(llm_server) -> None:
    with UnifiedInferenceClient(f"http://127.0.0.1:{free_port()}", "m", timeout_s=2) as client:
        with pytest.raises(LiveError, match="cannot reach"):
            client.generate("x")
        with pytest.raises(LiveError, match="SAGE_EMBEDDING_BASE_URL"):
            client.embed("x")
    instances = [{"host": "127.0.0.1", "port": llm_server.port, "model_name": llm_server.model, "instance_type": "llm"}]
    with (
        UnifiedInferenceClient.create_with_control_plane(instances, scheduling_policy="fifo") as client,
        pytest.raises(ModelNotFound, match=llm_server.model),
    ):
        client.generate("x", model="other-model")
    with pytest.raises(ValueError, match="unknown policy"):
        UnifiedInferenceClient.create_with_control_plane(instances, scheduling_policy="hybird")
    with pytest.raises(ValueError, match="host, port, model_name, instance_type"):
        UnifiedInferenceClient.create_with_control_plane([{"host": "127.0.0.1"}])


AUTO_VARS = (
    "SAGE_UNIFIED_BASE_URL",
    "SAGE_CHAT_BASE_URL",
    "SAGE_EMBEDDING_BASE_URL",
    "SAGE_CHAT_MODEL",
    "SAGE_EMBEDDING_MODEL",
    "SAGE_API_KEY",
    "SAGE_CHAT_API_KEY",
    "SAGE_EMBEDDING_API_KEY",
)


def test_create_auto_precedence(monkeypatch, llm_server, embedding_server) -> None:
    for var in AUTO_VARS:
        monkeypatch.delenv(var, raising=False)
    no_ports = (free_port(),)
    with pytest.raises(LiveError, match=r"SAGE_UNIFIED_BASE_URL.*SAGE_CHAT_BASE_URL.*SAGE_EMBEDDING_BASE_URL"):
        UnifiedInferenceClient.create_auto(ports=no_ports)

    # Probing: servers found on local ports, classified by their model names.
    with UnifiedInferenceClient.create_auto(ports=(free_port(), llm_server.port, embedding_server.port)) as client:
        assert client.mode == "simple"
        assert client.llm.url == llm_server.url and client.embedding.url == embedding_server.url
        assert client.generate("Hi", **SHORT)

    # Per-service variables beat probing; keys fall back to SAGE_API_KEY.
    monkeypatch.setenv("SAGE_CHAT_BASE_URL", llm_server.url + "/v1")
    monkeypatch.setenv("SAGE_CHAT_MODEL", "chat-model")
    monkeypatch.setenv("SAGE_API_KEY", "shared")
    monkeypatch.setenv("SAGE_EMBEDDING_API_KEY", "emb-key")
    monkeypatch.setenv("SAGE_EMBEDDING_BASE_URL", embedding_server.url)
    with UnifiedInferenceClient.create_auto(ports=no_ports) as client:
        assert client.mode == "simple" and client.llm.url == llm_server.url
        assert client.llm.model == "chat-model" and client.llm.api_key == "shared"
        assert client.embedding.api_key == "emb-key"

    # The unified URL beats everything.
    monkeypatch.setenv("SAGE_UNIFIED_BASE_URL", "http://127.0.0.1:9/v1")
    with UnifiedInferenceClient.create_auto(ports=no_ports) as client:
        assert client.mode == "gateway" and client.llm.url == client.embedding.url == "http://127.0.0.1:9"


def test_legacy_facades(llm_server, embedding_server) -> None:
    with IntelligentLLMClient(base_url=llm_server.url, model_name=llm_server.model) as llm:
        assert llm.generate("Hello", **SHORT) and llm.chat("Hi", **SHORT)
        assert llm.model_name == llm_server.model
    with IntelligentEmbeddingClient(base_url=embedding_server.url, model_name=embedding_server.model) as emb:
        vec = emb.embed_query("hello")
        assert vec == pytest.approx(emb.embed(["hello"])[0], abs=1e-4)
    shared = UnifiedInferenceClient(llm_server.url, llm_server.model, embedding_server.url, embedding_server.model)
    with IntelligentLLMClient.from_unified(shared) as llm:
        assert llm.client is shared
    assert shared.generate("Hi", **SHORT)  # the facade left the shared client open
    shared.close()
