"""The official `openai` SDK against the gateway in front of real llama-server backends."""

from __future__ import annotations

import base64
import struct

import httpx
import openai
import pytest

pytestmark = pytest.mark.backends


@pytest.fixture
def gateway(start_gateway, llm_server, embedding_server):
    return start_gateway(
        [
            {"url": llm_server.url, "kind": "llm", "models": [llm_server.model]},
            {"url": embedding_server.url, "kind": "embedding", "models": [embedding_server.model]},
        ],
        policy="hybrid",
    )


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_union_of_backends(client, llm_server, embedding_server):
    ids = {m.id for m in client.models.list()}
    assert ids == {llm_server.model, embedding_server.model}


def test_completion_and_chat(client, llm_server):
    completion = client.completions.create(
        model=llm_server.model, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert completion.choices[0].text
    assert completion.usage.completion_tokens == 4
    chat = client.chat.completions.create(
        model=llm_server.model,
        messages=[{"role": "user", "content": "Count: one, two,"}],
        max_completion_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},  # an unknown field goes to the backend untouched
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 3


def test_streaming_with_usage_ends_with_an_empty_choices_usage_chunk(client, llm_server):
    stream = client.chat.completions.create(
        model=llm_server.model,
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1] if c.choices)
    assert text
    # Without include_usage no chunk carries usage (the executor asks for it upstream, then strips it).
    plain = list(
        client.completions.create(
            model=llm_server.model, prompt="Hello", max_tokens=3, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert plain and all(c.usage is None for c in plain)


def test_raw_sse_framing(gateway, llm_server):
    body = {"model": llm_server.model, "prompt": "Hi", "max_tokens": 2, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_embeddings_sdk_default_base64_and_float(client, embedding_server):
    texts = ["a red apple", "the stock market fell"]
    default = client.embeddings.create(model=embedding_server.model, input=texts)  # the SDK asks for base64
    floats = client.embeddings.create(model=embedding_server.model, input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1]
    for a, b in zip(default.data, floats.data, strict=True):
        assert len(a.embedding) == len(b.embedding) > 100
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    assert default.data[0].embedding != pytest.approx(default.data[1].embedding, abs=1e-3)
    single = client.embeddings.create(model=embedding_server.model, input="a red apple", encoding_format="float")
    assert single.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-5)


def test_embeddings_raw_base64_is_little_endian_float32(gateway, embedding_server):
    body = {"model": embedding_server.model, "input": "hello", "encoding_format": "base64"}
    data = httpx.post(f"{gateway.url}/v1/embeddings", json=body, timeout=60).json()
    raw = base64.b64decode(data["data"][0]["embedding"])
    floats = httpx.post(f"{gateway.url}/v1/embeddings", json={**body, "encoding_format": "float"}, timeout=60).json()
    vector = floats["data"][0]["embedding"]
    assert struct.unpack(f"<{len(vector)}f", raw) == pytest.approx(vector, abs=1e-6)


def test_unknown_model_is_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    error = info.value.body
    assert error["code"] == "model_not_found" and "available" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_stop_sequence_is_honoured(client, llm_server):
    completion = client.completions.create(
        model=llm_server.model, prompt="1, 2, 3, 4, 5, 6,", max_tokens=20, temperature=0, stop=[","]
    )
    assert "," not in completion.choices[0].text
    assert completion.choices[0].finish_reason == "stop"
