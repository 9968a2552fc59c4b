"""Prompts with requested token counts, and prefix hashes turned into shared text blocks.

A replayed request must cost the real server what the simulator charged: `prompt_tokens` tokens of
prompt, and the same prefix sharing (a workload's `prefix_hashes`, Mooncake's `hash_ids`, name
fixed-size blocks that identical prompts share). So the text is built from *units*: short common
English words that a BPE tokenizer encodes as exactly one token each when preceded by a space
(" the", " and", ...), which the emulators' four-characters-per-token rule also counts as one
token (four characters each). A prompt is then

    [block for hash 1][block for hash 2]...[request-unique tail]

where each block is `block_tokens` units drawn from a generator seeded by the hash (the same hash
gives the same text in every request, so a real prefix cache hits exactly where the simulator's
does), and the tail is seeded by the request id (so no two prompts share more than their blocks).

The chat template adds tokens the prompt text does not show. `calibrate` measures, on the real
server, the token count of a few probe prompts (`usage.prompt_tokens` with `max_tokens: 1`) and
fits `tokens = per_unit * units + overhead` per endpoint; where the server has `/tokenize`
(llama-server, vLLM) it first keeps only the units that really are single tokens there. The
requested count and the server's count are both recorded per request, so a mismatch is visible,
never silent.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from sagesched.core import Request, RequestType

log = logging.getLogger(__name__)

# Three-letter words: one token each in common BPE vocabularies when preceded by a space, and
# exactly four characters (= one token) for the emulators' characters-per-token rule.
UNITS: tuple[str, ...] = (
    "the", "and", "for", "are", "but", "not", "you", "all", "any", "can", "had", "her", "was", "one",
    "our", "out", "day", "get", "has", "him", "his", "how", "man", "new", "now", "old", "see", "two",
    "way", "who", "did", "its", "let", "put", "say", "she", "too", "use", "big", "end", "far", "few",
    "got", "may", "off", "own", "run", "set", "top", "yes", "yet", "why", "ask", "men", "ran", "red",
)  # fmt: skip

PROBE_ID_PREFIX = "sagesched-calibration-"
"""Request id prefix of the calibration probes (a gateway in between records them too)."""

PROBE_UNITS = (16, 96)
"""Unit counts of the two calibration probes per endpoint (a line through two points)."""


class PromptCalibrationError(ValueError):
    """The server could not be probed for its token counts; the message names the URL and the fix."""


@dataclass
class Calibration:
    """How many server tokens `n` units cost on each endpoint: `per_unit * n + overhead[endpoint]`.

    method: how it was obtained ("tokenize+probe", "probe", or "assumed" when nothing was probed).
    """

    units: tuple[str, ...] = UNITS
    per_unit: dict[str, float] = field(default_factory=lambda: {"chat": 1.0, "completions": 1.0, "embeddings": 1.0})
    overhead: dict[str, float] = field(default_factory=lambda: {"chat": 0.0, "completions": 0.0, "embeddings": 0.0})
    method: str = "assumed"

    def units_for(self, endpoint: str, tokens: int) -> int:
        """Units whose text costs `tokens` server tokens on `endpoint` (at least one)."""
        per = self.per_unit.get(endpoint, 1.0) or 1.0
        return max(1, round((tokens - self.overhead.get(endpoint, 0.0)) / per))

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "units": len(self.units),
            "per_unit": dict(self.per_unit),
            "overhead": dict(self.overhead),
        }


def _seeded_units(units: Sequence[str], seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return rng.choices(units, k=n)


def _seed_of(text: str) -> int:
    return zlib.crc32(text.encode())


class PromptBuilder:
    """Builds the text of every request of a workload; deterministic given the calibration."""

    def __init__(self, calibration: Calibration | None = None, *, block_tokens: int = 512, seed: int = 0) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.calibration = calibration or Calibration()
        self.block_tokens = int(block_tokens)
        self.seed = int(seed)
        self._blocks: dict[int, list[str]] = {}

    def _block(self, prefix_hash: int) -> list[str]:
        block = self._blocks.get(prefix_hash)
        if block is None:
            block = _seeded_units(
                self.calibration.units, _seed_of(f"block:{self.seed}:{prefix_hash}"), self.block_tokens
            )
            self._blocks[prefix_hash] = block
        return block

    def text(self, request: Request, endpoint: str) -> str:
        """The prompt text for an LLM request: shared blocks for its prefix hashes, then a unique tail."""
        n = self.calibration.units_for(endpoint, request.prompt_tokens)
        words: list[str] = []
        for h in request.prefix_hashes:
            if len(words) >= n:
                break
            words.extend(self._block(int(h)))
        del words[n:]
        if len(words) < n:
            words.extend(
                _seeded_units(self.calibration.units, _seed_of(f"tail:{self.seed}:{request.id}"), n - len(words))
            )
        return " " + " ".join(words)

    def embedding_inputs(self, request: Request) -> list[str]:
        """`embedding_inputs` texts splitting `embedding_tokens` between them (per-input overhead,
        such as a BOS token, calibrated under the endpoint name "embeddings")."""
        k = max(1, request.embedding_inputs)
        total = max(k, request.embedding_tokens or request.prompt_tokens or k)
        sizes = [total // k + (1 if i < total % k else 0) for i in range(k)]
        seed = _seed_of(f"emb:{self.seed}:{request.id}")
        units = self.calibration.units
        return [
            " ".join(_seeded_units(units, seed + i, self.calibration.units_for("embeddings", size)))
            for i, size in enumerate(sizes)
        ]


def endpoint_of(request: Request) -> str:
    """The executor endpoint name of a request type."""
    if request.type is RequestType.LLM_CHAT:
        return "chat"
    if request.type is RequestType.LLM_GENERATE:
        return "completions"
    return "embeddings"


def probe_body(endpoint: str, model: str, text: str) -> dict[str, Any]:
    if endpoint == "chat":
        return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    return {"model": model, "prompt": text, "max_tokens": 1}


def _single_token_units(client: httpx.Client, url: str, model: str) -> tuple[str, ...] | None:
    """The units that `/tokenize` encodes as one token after a space; None where there is no /tokenize."""
    kept: list[str] = []
    for unit in UNITS:
        text = " " + unit
        try:
            # llama-server reads `content`, vLLM reads `prompt` (+ `model`); send both.
            resp = client.post(
                f"{url}/tokenize", json={"content": text, "prompt": text, "model": model, "add_special": False}
            )
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        data = resp.json()
        tokens = data.get("tokens") if isinstance(data, dict) else None
        count = data.get("count") if isinstance(data, dict) else None
        n = count if isinstance(count, int) else (len(tokens) if isinstance(tokens, list) else None)
        if n is None:
            return None
        if n == 1:
            kept.append(unit)
    return tuple(kept) if len(kept) >= 8 else None


def calibrate(
    url: str,
    model: str,
    endpoints: Sequence[str] = ("chat", "completions"),
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    use_tokenize: bool = True,
) -> Calibration:
    """Fit `per_unit` and `overhead` for `endpoints` on the server at `url` (see the module docstring)."""
    cal = Calibration()
    with httpx.Client(timeout=timeout_s, headers=headers or {}) as client:
        units = _single_token_units(client, url, model) if use_tokenize else None
        if units:
            cal.units = units
        cal.method = "tokenize+probe" if units else "probe"
        for endpoint in endpoints:
            path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
            counts = []
            for n in PROBE_UNITS:
                text = " " + " ".join(_seeded_units(cal.units, _seed_of(f"probe:{n}"), n))
                try:
                    resp = client.post(
                        f"{url}{path}",
                        json=probe_body(endpoint, model, text),
                        headers={"X-Request-Id": f"{PROBE_ID_PREFIX}{endpoint}-{n}"},
                    )
                except httpx.HTTPError as exc:
                    raise PromptCalibrationError(
                        f"could not probe {url}{path} for token counts ({type(exc).__name__}: {exc}); "
                        "is the server up? (driver.prompts.calibrate=false skips probing)"
                    ) from None
                usage = resp.json().get("usage") if resp.status_code == 200 else None
                if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
                    raise PromptCalibrationError(
                        f"{url}{path} answered {resp.status_code} without usage.prompt_tokens to a probe; "
                        f"body: {resp.text[:200]!r} (driver.prompts.calibrate=false skips probing)"
                    )
                counts.append(usage["prompt_tokens"])
            (n1, n2), (t1, t2) = PROBE_UNITS, counts
            per = (t2 - t1) / (n2 - n1)
            if not per > 0:
                raise PromptCalibrationError(f"{url}{path}: probe token counts {counts} do not grow with the prompt")
            cal.per_unit[endpoint] = per
            cal.overhead[endpoint] = t1 - per * n1
    log.info("prompt calibration at %s: %s", url, cal.as_dict())
    return cal


def calibrate_embeddings(cal: Calibration, url: str, model: str, *, timeout_s: float = 60.0) -> Calibration:
    """Add the "embeddings" line (tokens per unit, overhead per input) measured on the server at
    `url` from two one-input probes; where the server reports no usage, one unit = one token stays."""
    counts = []
    with httpx.Client(timeout=timeout_s) as client:
        for n in PROBE_UNITS:
            text = " ".join(_seeded_units(cal.units, _seed_of(f"probe-emb:{n}"), n))
            try:
                resp = client.post(
                    f"{url}/v1/embeddings",
                    json={"model": model, "input": [text]},
                    headers={"X-Request-Id": f"{PROBE_ID_PREFIX}embeddings-{n}"},
                )
            except httpx.HTTPError as exc:
                raise PromptCalibrationError(
                    f"could not probe {url}/v1/embeddings ({type(exc).__name__}: {exc}); is the server up? "
                    "(driver.prompts.calibrate=false skips probing)"
                ) from None
            usage = resp.json().get("usage") if resp.status_code == 200 else None
            tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
            if not isinstance(tokens, int) or tokens <= 0:
                log.info("no usage.prompt_tokens from %s/v1/embeddings: assuming one token per unit", url)
                return cal
            counts.append(tokens)
    (n1, n2), (t1, t2) = PROBE_UNITS, counts
    per = (t2 - t1) / (n2 - n1)
    if per > 0:
        cal.per_unit["embeddings"] = per
        cal.overhead["embeddings"] = t1 - per * n1
    return cal
