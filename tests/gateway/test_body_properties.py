"""Property: whatever JSON a caller sends, body checking ends in a 4xx `LiveError` or a valid `Request`,
never another exception (which the gateway would have to answer with a 500)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from sagesched.live.errors import LiveError
from sagesched.live.openai_body import _loads, validate_body
from sagesched.live.requests import request_from_body

FIELDS = [
    "model", "messages", "prompt", "input", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "stream", "stream_options", "priority", "deadline_ms", "slo_ttft_ms", "slo_tpot_ms", "user", "stop", "seed",
    "dimensions", "encoding_format", "logprobs", "best_of",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=8) | st.sampled_from(["m", "", "high", "base64"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=8)


@settings(max_examples=400, deadline=None)
@given(endpoint=st.sampled_from(["chat", "completions", "embeddings"]), body=bodies)
def test_any_body_is_a_4xx_or_a_request(endpoint: str, body: dict) -> None:
    try:
        validate_body(endpoint, body, 2048)
        request = request_from_body(endpoint, body, {}, 0.0, request_id="r")
    except LiveError as exc:
        assert 400 <= exc.status < 500, exc
        return
    assert request.max_tokens >= 0 and float(request.max_tokens) < float("inf")


@settings(max_examples=200, deadline=None)
@given(
    raw=st.binary(max_size=64) | st.text(max_size=32).map(lambda t: json.dumps({"model": "m", "messages": t}).encode())
)
def test_any_bytes_decode_to_a_body_or_a_4xx(raw: bytes) -> None:
    try:
        _loads(raw.replace(b"x", b"\\ud800"))  # sprinkle lone surrogates into whatever was generated
    except LiveError as exc:
        assert exc.status == 400
