"""Malformed input never gets a 500 or a crash: always a 4xx with an OpenAI-shaped error body.

The gateway here fronts a backend address where nothing listens: every body the fuzzer builds is
invalid, so it must be refused by the gateway's own validation, before any backend is involved.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagesched.live.real_backends import free_port

MODEL = "m-llm"
EMB = "m-emb"
VALID = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 4},
    "/v1/embeddings": {"model": EMB, "input": ["hi"]},
}
# (endpoint, field, invalid values): each value alone makes a valid body invalid.
NOT_BOOL = [1, 0, "true", None.__class__.__name__, [], {}]
CORRUPTIONS = {
    "/v1/chat/completions": {
        "model": [None, 1, "", "  ", [], {}],
        "messages": [
            None,
            "hi",
            [],
            [1],
            [{"content": "no role"}],
            [{"role": 1}],
            [{"role": "user", "content": 5}],
            {},
        ],
        "max_tokens": [-1, 1.5, "4", True, []],
        "max_completion_tokens": [-5, "x", 2.5],
        "n": [0, -1, 1.5, "2", True, 1000],
        "temperature": [-0.1, 2.5, "hot", True, []],
        "top_p": [1.5, -1, "x"],
        "stream": NOT_BOOL,
        "stream_options": ["yes", 1, []],
        "stop": [1, [1, 2], {"a": 1}],
        "priority": ["urgent", 7, -1, 1.5, True],
        "deadline_ms": [-5, 0, "soon", True],
        "slo_ttft_ms": [0, "x", -1],
        "user": [1, [], {}],
        "logprobs": ["yes", 1],
    },
    "/v1/completions": {
        "model": [None, 5],
        "prompt": [None, 5, [], [1.5], [[]], ["a", 1], {}, True],
        "max_tokens": [-1, "x"],
        "echo": ["no", 1],
        "best_of": [0, "x"],
        "suffix": [1, []],
    },
    "/v1/embeddings": {
        "model": [None, 3, ""],
        "input": [None, 5, [], [[]], ["a", 1], [1.5], "", ["ok", ""], {"a": 1}, True],
        "encoding_format": ["binary", 1, None.__class__.__name__],
        "dimensions": [0, -3, "8", 1.5, True],
    },
}
CASES = [
    (path, field, value) for path, fields in CORRUPTIONS.items() for field, values in fields.items() for value in values
]


@pytest.fixture(scope="module")
def gateway():
    from sagesched.live.gateway_config import GatewayConfig
    from sagesched.live.server import UnifiedAPIServer

    nowhere = f"http://127.0.0.1:{free_port()}"
    config = GatewayConfig.from_dict(
        {
            "policy": "hybrid",
            "backends": [
                {"url": nowhere, "kind": "llm", "models": [MODEL]},
                {"url": nowhere + "/", "kind": "embedding", "models": [EMB], "id": "emb"},
            ],
            "max_body_bytes": 64 * 1024,
            "max_batch_inputs": 16,
            "executor": {"no_backend_grace_s": 0.2, "health_interval_s": 60},
        }
    )
    server = UnifiedAPIServer(config, port=0).start()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client
    server.stop()


def assert_openai_error(response: httpx.Response, statuses: set[int]) -> dict:
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(("path", "field", "value"), CASES)
def test_each_invalid_field_is_a_400_naming_it(gateway, path, field, value):
    body = {**VALID[path], field: value}
    if field == "stream_options":
        body["stream"] = True
    if value is None and field in {"model", "messages", "prompt", "input"}:
        del body[field]  # a missing required field
    error = assert_openai_error(gateway.post(path, json=body), {400})
    assert error["type"] == "invalid_request_error"
    assert field in (error["param"] or "") or field in error["message"], error


def test_priority_header_is_validated(gateway):
    path = "/v1/chat/completions"
    error = assert_openai_error(gateway.post(path, json=VALID[path], headers={"X-Request-Priority": "urgent"}), {400})
    assert error["param"] == "X-Request-Priority" and "critical" in error["message"]
    error = assert_openai_error(gateway.post(path, json=VALID[path], headers={"X-SLO-Deadline-Ms": "-3"}), {400})
    assert error["param"] == "X-SLO-Deadline-Ms"


def test_body_and_batch_limits_give_413(gateway):
    big = {"model": MODEL, "prompt": "x" * (70 * 1024)}
    error = assert_openai_error(gateway.post("/v1/completions", json=big), {413})
    assert "max_body_bytes" in error["message"]
    many = {"model": EMB, "input": ["a"] * 17}
    error = assert_openai_error(gateway.post("/v1/embeddings", json=many), {413})
    assert "at most 16" in error["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b" " * 4096

    assert_openai_error(gateway.post("/v1/completions", content=chunks()), {413})


def test_unknown_routes_and_methods_are_openai_shaped(gateway):
    assert_openai_error(gateway.get("/v1/nope"), {404})
    assert_openai_error(gateway.get("/v1/chat/completions"), {405})
    assert_openai_error(gateway.delete("/v1/models"), {405})


def test_valid_body_with_no_reachable_backend_is_503_not_500(gateway):
    error = assert_openai_error(gateway.post("/v1/completions", json=VALID["/v1/completions"]), {503})
    assert error["type"] == "server_error"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(path=st.sampled_from(sorted(VALID)), raw=st.binary(max_size=300))
def test_random_bytes(gateway, path, raw):
    assert_openai_error(gateway.post(path, content=raw), {400})


@FUZZ
@given(path=st.sampled_from(sorted(VALID)), value=json_values)
def test_random_json_documents(gateway, path, value):
    # No random document names a served model with valid fields, so all are refused up front.
    assert_openai_error(gateway.post(path, content=json.dumps(value).encode()), {400, 404})


@FUZZ
@given(
    path=st.sampled_from(sorted(VALID)),
    extra=st.dictionaries(
        st.sampled_from(["model", "messages", "prompt", "input", "n", "stream", "max_tokens", "dimensions"]),
        json_values,
        min_size=1,
    ),
)
def test_valid_bodies_with_random_overrides_never_500(gateway, path, extra):
    response = gateway.post(path, json={**VALID[path], **extra})
    # Some overrides are valid: those reach the (absent) backend and get 503; none may be a 500.
    assert_openai_error(response, {400, 404, 413, 503})


@FUZZ
@given(raw=st.text(max_size=200))
def test_non_utf8_and_odd_encodings(gateway, raw):
    for payload in (raw.encode("utf-16"), b"\xff\xfe" + raw.encode("latin-1", "replace"), b'{"model": "\xc3\x28"}'):
        assert_openai_error(gateway.post("/v1/chat/completions", content=payload), {400})


def test_deeply_nested_json_is_a_400(gateway):
    deep = b"[" * 100_000 + b"]" * 100_000
    assert_openai_error(gateway.post("/v1/embeddings", content=deep), {400, 413})
    deep = b'{"model": "m-llm", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert_openai_error(gateway.post("/v1/chat/completions", content=deep), {400})
