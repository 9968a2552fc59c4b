"""The vLLM emulator samples an end of sequence, serves n > 1 and several prompts, as vLLM does."""

from __future__ import annotations

import httpx


def test_chat_without_max_tokens_ends_at_a_sampled_eos(emulator) -> None:
    emu = emulator("vllm", time_scale=0)
    lengths = []
    for i in range(12):
        body = {"model": emu.model, "messages": [{"role": "user", "content": f"question {i}"}]}
        data = httpx.post(f"{emu.url}/v1/chat/completions", json=body, timeout=30).json()
        choice = data["choices"][0]
        assert choice["finish_reason"] == "stop"
        lengths.append(data["usage"]["completion_tokens"])
        assert len(choice["message"]["content"].split()) == lengths[-1]
    assert max(lengths) < 2000 and len(set(lengths)) > 1  # sampled, far from the context limit
    # Deterministic in the prompt.
    again = httpx.post(
        f"{emu.url}/v1/chat/completions",
        json={"model": emu.model, "messages": [{"role": "user", "content": "question 0"}]},
        timeout=30,
    ).json()
    assert again["usage"]["completion_tokens"] == lengths[0]
    # A cap below the sampled length ends with "length"; ignore_eos runs to the cap.
    capped = {"model": emu.model, "prompt": "go", "max_tokens": 3000, "ignore_eos": True}
    data = httpx.post(f"{emu.url}/v1/completions", json=capped, timeout=60).json()
    assert data["usage"]["completion_tokens"] == 3000 and data["choices"][0]["finish_reason"] == "length"


def test_n_choices_and_several_prompts(emulator) -> None:
    emu = emulator("vllm", time_scale=0)
    body = {"model": emu.model, "prompt": ["first", "second", "third"], "max_tokens": 4, "n": 2, "ignore_eos": True}
    data = httpx.post(f"{emu.url}/v1/completions", json=body, timeout=30).json()
    assert [c["index"] for c in data["choices"]] == list(range(6))
    assert all(len(c["text"].split()) == 4 for c in data["choices"])
    assert data["usage"]["completion_tokens"] == 24
    chat = {"model": emu.model, "messages": [{"role": "user", "content": "x"}], "n": 3, "max_tokens": 3, "stream": True}
    indices: dict[int, int] = {}
    with httpx.stream("POST", f"{emu.url}/v1/chat/completions", json=chat, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    import json

    for line in lines[:-1]:
        for c in json.loads(line[6:])["choices"]:
            indices[c["index"]] = indices.get(c["index"], 0) + len((c["delta"].get("content") or "").split())
    assert indices == {0: 3, 1: 3, 2: 3}
