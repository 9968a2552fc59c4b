"""Prompts of the requested size, prefix hashes as shared text, forced output lengths."""

from __future__ import annotations

import httpx
import pytest

from sagesched.core import Request, RequestType
from sagesched.live.emulators.runner import free_port
from sagesched.replay.config import DriverConfig
from sagesched.replay.live import request_body
from sagesched.replay.prompts import Calibration, PromptBuilder, PromptCalibrationError, calibrate


def _chat(rid: str, prompt: int, hashes: tuple[int, ...] = (), output: int = 5) -> Request:
    return Request(rid, RequestType.LLM_CHAT, "llama-2-7b", 0.0, prompt_tokens=prompt, max_tokens=output,
                   output_tokens=output, prefix_hashes=hashes)  # fmt: skip


@pytest.mark.parametrize("prompt_tokens", [1, 7, 100, 1000, 3000])
def test_calibrated_prompts_cost_the_server_exactly_the_requested_tokens(emulators, prompt_tokens):
    llm, _ = emulators
    cal = calibrate(llm.url, llm.model, ("chat", "completions"))
    assert cal.method == "probe"  # the emulator has no /tokenize
    builder = PromptBuilder(cal, block_tokens=16)
    for rtype, path in ((RequestType.LLM_CHAT, "/v1/chat/completions"), (RequestType.LLM_GENERATE, "/v1/completions")):
        request = Request("r", rtype, llm.model, 0.0, prompt_tokens=prompt_tokens, max_tokens=3, output_tokens=3)
        endpoint, body = request_body(request, builder, DriverConfig(name="live", stream=False))
        usage = httpx.post(llm.url + path, json=body, timeout=30).json()["usage"]
        # The chat template alone costs more than one token: a 1-token chat prompt cannot be exact.
        floor = cal.overhead[endpoint] + cal.per_unit[endpoint]
        assert usage["prompt_tokens"] == max(prompt_tokens, round(floor))
        assert usage["completion_tokens"] == 3


def test_prefix_hashes_become_shared_text_blocks():
    builder = PromptBuilder(block_tokens=8)
    a = builder.text(_chat("a", 40, (11, 12, 13)), "chat").split()
    b = builder.text(_chat("b", 40, (11, 12, 99)), "chat").split()
    c = builder.text(_chat("c", 40), "chat").split()
    assert len(a) == len(b) == len(c) == 40
    assert a[:16] == b[:16] and a[16:24] != b[16:24]  # two shared blocks, then they differ
    assert a[:8] != c[:8]
    # Same inputs, same text (replays are reproducible); a hash too long for the prompt is cut.
    assert builder.text(_chat("a", 40, (11, 12, 13)), "chat").split() == a
    assert builder.text(_chat("d", 12, (11, 12, 13)), "chat").split() == a[:12]


def test_output_length_is_forced_and_embeddings_carry_their_inputs():
    builder = PromptBuilder()
    _, body = request_body(_chat("a", 10, output=42), builder, DriverConfig(name="live", min_tokens=True))
    assert body["max_tokens"] == 42 and body["ignore_eos"] is True and body["min_tokens"] == 42
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    emb = Request(
        "e", RequestType.EMBEDDING, "bge-base", 0.0, prompt_tokens=10, embedding_inputs=3, embedding_tokens=10
    )
    endpoint, body = request_body(emb, builder, DriverConfig(name="live"))
    assert endpoint == "embeddings" and [len(t.split()) for t in body["input"]] == [4, 3, 3]


def test_calibration_against_a_dead_server_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PromptCalibrationError, match=url):
        calibrate(url, "m", ("chat",), timeout_s=2)


def test_calibration_arithmetic():
    cal = Calibration(per_unit={"chat": 1.0}, overhead={"chat": 6.0})
    assert cal.units_for("chat", 100) == 94 and cal.units_for("chat", 3) == 1
