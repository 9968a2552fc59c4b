"""A small async client for timing llama-server: streamed completions and embeddings with token-id inputs.

Why its own client (rather than `sagesched.replay.endpoint`): calibration and the live sweep need exact
prompt lengths without a tokenizer, so prompts are arrays of token ids (random ids, distinct per request,
so that no slot prompt cache helps), and they need every token's arrival time, not only TTFT and E2E.
`id_slot` pins a probe to a llama-server slot, which lets a probe choose how llama.cpp cuts its batch.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

import httpx


class ServerAnswerError(RuntimeError):
    """The server answered a request with an error status or a malformed stream."""


@dataclass
class Timed:
    """One request's client-side timing (seconds on `time.monotonic`'s clock)."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    done: float = 0.0
    completion_tokens: int | None = None
    status: int = 200
    error: str = ""

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def e2e_s(self) -> float | None:
        return self.done - self.sent if self.done else None


def token_ids(rng: random.Random, n: int) -> list[int]:
    """`n` random ordinary token ids (Gemma's vocabulary has 262k entries; 100-30000 avoids special ones)."""
    return [rng.randrange(100, 30000) for _ in range(n)]


def new_client(timeout_s: float = 600.0) -> httpx.AsyncClient:
    # A fresh connection per request: llama-server closes a connection after a stream ends, and a
    # pooled connection reused after that fails with "server disconnected".
    return httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_keepalive_connections=0, max_connections=256))


async def stream_completion(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    ids: list[int],
    max_tokens: int,
    slot: int | None = None,
    raise_on_error: bool = True,
    into: Timed | None = None,
) -> Timed:
    """One streamed `/v1/completions` call with `ignore_eos`; every chunk carrying a token is time-stamped.

    `into`: a `Timed` to fill as chunks arrive (so a caller can watch a stream in progress).
    """
    body: dict = {
        "model": model,
        "prompt": ids,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0.0,
    }
    if slot is not None:
        body["id_slot"] = slot
    t = into if into is not None else Timed(sent=0.0)
    t.sent = time.monotonic()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                t.status = resp.status_code
                t.error = (await resp.aread()).decode(errors="replace")[:300]
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.monotonic()
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage")
                    if usage:
                        t.completion_tokens = int(usage.get("completion_tokens", 0))
                    choices = chunk.get("choices") or []
                    # A token's chunk has finish_reason null; the closing chunk (finish_reason set,
                    # empty text, usage) comes with the same step as the last token.
                    if choices and choices[0].get("finish_reason") is None:
                        t.token_times.append(now)
                t.done = time.monotonic()
    except httpx.HTTPError as exc:
        t.status, t.error = 0, f"{type(exc).__name__}: {exc}"
    if raise_on_error and t.status != 200:
        raise ServerAnswerError(f"{url}/v1/completions answered {t.status}: {t.error}")
    return t


async def embed(
    client: httpx.AsyncClient, url: str, model: str, inputs: list[list[int]], raise_on_error: bool = True
) -> Timed:
    """One `/v1/embeddings` call with token-id inputs; `done` is when the whole answer arrived."""
    t = Timed(sent=time.monotonic())
    try:
        resp = await client.post(f"{url}/v1/embeddings", json={"model": model, "input": inputs})
        t.done = time.monotonic()
        t.status = resp.status_code
        if resp.status_code == 200:
            n = len(resp.json().get("data") or [])
            if n != len(inputs):
                t.status, t.error = 0, f"{n} vectors for {len(inputs)} inputs"
        else:
            t.error = resp.text[:300]
    except httpx.HTTPError as exc:
        t.status, t.error = 0, f"{type(exc).__name__}: {exc}"
    if raise_on_error and t.status != 200:
        raise ServerAnswerError(f"{url}/v1/embeddings answered {t.status}: {t.error}")
    return t
