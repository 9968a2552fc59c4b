"""Embedding vectors on the wire: checking what a backend sent, and OpenAI's base64 encoding.

A malformed vector from a backend (not numbers, NaN, bad base64) is caught where it arrives and
blamed on the backend (502): passed on, it would surface as a 500 or as a wrong answer in the
caller's hands. Shared by the executor's backend calls (`backends.BackendClient`),
its per-caller encoding (`dispatch`) and the client's simple mode (`client`).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from sagesched.live.errors import UpstreamError


def checked_vector(value: Any, source: str) -> list[float]:
    """One embedding as finite floats; anything else is the backend's fault (502), never a 500.

    Checked with numpy rather than per element in Python: a 1,024-float vector costs ~20 us this way.
    """
    import numpy as np

    try:
        vec = decode_base64(value) if isinstance(value, str) else value
    except ValueError as exc:
        raise UpstreamError(f"{source} sent an embedding that is not valid base64: {exc}") from None
    if not isinstance(vec, list) or not vec:
        raise UpstreamError(f"{source} sent an embedding that is not a non-empty list of numbers")
    arr = np.asarray(vec) if not any(isinstance(x, (list, dict)) for x in vec[:1]) else np.asarray([], dtype=object)
    if arr.ndim != 1 or arr.dtype.kind not in "iuf" or len(arr) != len(vec):
        raise UpstreamError(f"{source} sent an embedding holding something other than numbers")
    if not np.isfinite(arr).all():
        raise UpstreamError(f"{source} sent a non-finite value (NaN or infinity) in an embedding")
    return arr.astype(float).tolist()


def openai_vectors(data: Any, count: int, source: str) -> list[list[float]]:
    """The `count` vectors of an OpenAI ``/v1/embeddings`` answer in input order (the executor's
    backend calls and the client's simple mode); anything else is an `UpstreamError` naming `source`."""
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) != count:
        got = len(items) if isinstance(items, list) else type(data).__name__
        raise UpstreamError(f"{source}: /v1/embeddings returned {got} vectors for {count} inputs")
    try:
        ordered = sorted(items, key=lambda item: item.get("index", 0))
        return [checked_vector(item.get("embedding"), source) for item in ordered]
    except (AttributeError, TypeError, ValueError) as exc:
        raise UpstreamError(f"{source}: /v1/embeddings answered malformed data: {exc}") from None


def encode_base64(vector: Sequence[float]) -> str:
    """OpenAI's base64 embedding encoding: little-endian float32 bytes, base64."""
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_base64(data: str) -> list[float]:
    """The inverse of `encode_base64`: little-endian float32 bytes back to floats."""
    import numpy as np

    return np.frombuffer(base64.b64decode(data), dtype="<f4").astype(float).tolist()


__all__ = ["checked_vector", "decode_base64", "encode_base64", "openai_vectors"]
