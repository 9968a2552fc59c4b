"""Deterministic stand-ins for a tokenizer, a sampler and an encoder.

An emulator has no model weights, but callers still need plausible, reproducible bodies: token
counts that track the prompt's length, output text whose token count is exactly what the engine
model emitted, prefix-block hashes so shared prompt prefixes hit the emulated prefix cache, and
embedding vectors that are stable per input text (so a merged batch can be checked against single
calls) and unit-normalised like a real sentence encoder's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

# Characters per token for English text with a BPE tokenizer: the usual rule of thumb.
CHARS_PER_TOKEN = 4

# A fixed vocabulary for emitted tokens; each emitted token is one word with a leading space.
WORDS: tuple[str, ...] = (
    "the", "model", "schedules", "tokens", "across", "a", "shared", "pool", "of", "accelerators",
    "while", "embedding", "batches", "wait", "briefly", "for", "company", "and", "every", "request",
    "keeps", "its", "place", "in", "line", "until", "an", "instance", "has", "room", "to", "serve", "it",
)  # fmt: skip


def count_text_tokens(text: str) -> int:
    """Emulated token count of `text`: ceil(len / 4), at least 1 for non-empty text."""
    if not text:
        return 0
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


def prompt_units(prompt: Any) -> list[str] | list[int]:
    """Normalise an OpenAI `prompt`/`input` (str, token list, or one-element list) to text or ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) == 1:
        return prompt_units(prompt[0])
    raise ValueError("prompt must be a string, a list of token ids, or a one-element list of either")


def count_prompt_tokens(prompt: Any) -> int:
    """Token count of a completions prompt: the ids' length, or the text estimate."""
    units = prompt_units(prompt)
    if units and isinstance(units[0], int):
        return len(units)
    return count_text_tokens(str(units[0]) if units else "")


def chat_to_text(messages: Sequence[dict[str, Any]]) -> str:
    """Flatten chat messages into one prompt string, role markers included (a chat template's role)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError("each message needs a 'role' and a 'content'")
        content = message.get("content") or ""
        if isinstance(content, list):  # content parts: keep the text ones
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(f"<|{message['role']}|>\n{content}\n")
    return "".join(parts) + "<|assistant|>\n"


def prefix_hashes(prompt: Any, block_tokens: int) -> tuple[int, ...]:
    """Chained hashes of the prompt's full KV blocks, as vLLM's prefix cache keys them.

    Block i's hash covers every token up to the end of block i, so two prompts share hash i only
    if they share the whole prefix through that block.
    """
    units = prompt_units(prompt) if not isinstance(prompt, str) else [prompt]
    if units and isinstance(units[0], int):
        chunks = [repr(units[i : i + block_tokens]) for i in range(0, len(units) - block_tokens + 1, block_tokens)]
    else:
        text = str(units[0]) if units else ""
        width = block_tokens * CHARS_PER_TOKEN
        chunks = [text[i : i + width] for i in range(0, len(text) - width + 1, width)]
    hashes: list[int] = []
    running = hashlib.blake2b(digest_size=8)
    for chunk in chunks:
        running.update(chunk.encode())
        hashes.append(int.from_bytes(running.copy().digest(), "big") >> 1)
    return tuple(hashes)


def token_text(seed: int, index: int) -> str:
    """The `index`-th emitted token of a request whose text seed is `seed`: one word, leading space."""
    return " " + WORDS[(seed + index * 7) % len(WORDS)]


def text_seed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


def embed_text(text: str, dim: int) -> list[float]:
    """A unit-length vector determined by `text` alone (same text, same vector, in any batch)."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    vector = np.random.default_rng(seed).standard_normal(dim)
    vector /= np.linalg.norm(vector)
    return [float(x) for x in vector]


def embedding_inputs(value: Any) -> list[tuple[str, int]]:
    """Normalise an OpenAI `input` or TEI `inputs` to (key, tokens) pairs, one per input.

    Accepts a string, a list of strings, a token-id list, or a list of token-id lists. The key is the
    text itself, or a stable rendering of the ids, so every input's vector is deterministic.
    """
    if isinstance(value, str):
        return [(value, count_text_tokens(value))]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return [(repr(value), len(value))]
        if all(isinstance(v, str) for v in value):
            return [(v, count_text_tokens(v)) for v in value]
        if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
            return [(repr(v), len(v)) for v in value]
    raise ValueError("input must be a string, a non-empty list of strings, or token ids")
