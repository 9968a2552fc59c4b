"""`request_from_body`: token estimates, scheduling headers, and errors that name the field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagesched.core import Priority, RequestType
from sagesched.live.errors import InvalidRequest, LiveError, QueueFull, RequestRejected, error_from_response
from sagesched.live.requests import DEFAULT_MAX_TOKENS, backend_body, request_from_body


def test_chat_estimates_and_headers_take_precedence() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x" * 40}],
        "max_tokens": 7,
        "priority": "low",
        "user": "u1",
    }
    headers = {
        "x-request-priority": "critical",
        "X-SLO-Deadline-Ms": "1500",
        "X-SLO-TTFT-Ms": "200",
        "X-SLO-TPOT-Ms": "50",
    }
    r = request_from_body("chat", body, headers, now=3.5)
    assert r.type is RequestType.LLM_CHAT and r.model == "m" and r.arrival_s == 3.5
    assert r.prompt_tokens == 10 + 4  # 40 chars / 4 + per-message framing
    assert r.max_tokens == 7
    assert r.priority is Priority.CRITICAL  # header beats body
    assert (r.slo.e2e_ms, r.slo.ttft_ms, r.slo.tpot_ms) == (1500.0, 200.0, 50.0)
    assert r.tenant == "u1"
    assert request_from_body("chat", body, {"X-Tenant": "t9"}).tenant == "t9"
    assert request_from_body("chat", body).priority is Priority.LOW


def test_completions_token_arrays_are_exact_and_n_multiplies() -> None:
    r = request_from_body("completions", {"model": "m", "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 4, "n": 2})
    assert r.type is RequestType.LLM_GENERATE and r.prompt_tokens == 5 and r.max_tokens == 4 * 2 * 2
    r = request_from_body("completions", {"model": "m", "prompt": "abcdefgh", "max_completion_tokens": 9})
    assert r.prompt_tokens == 2 and r.max_tokens == 9
    assert request_from_body("completions", {"model": "m", "prompt": "x"}).max_tokens == DEFAULT_MAX_TOKENS


def test_embeddings_inputs_and_defaults() -> None:
    r = request_from_body("embeddings", {"model": "e", "input": ["abcd", "abcdefgh"]}, {"X-Request-Id": "rid-1"})
    assert r.type is RequestType.EMBEDDING and r.embedding_inputs == 2 and r.embedding_tokens == 3
    assert r.prompt_tokens == r.embedding_tokens and r.max_tokens == 0 and r.id == "rid-1"
    r = request_from_body("embeddings", {"input": [7, 8, 9]}, default_model="e")
    assert r.model == "e" and r.embedding_inputs == 1 and r.embedding_tokens == 3


@pytest.mark.parametrize(
    ("endpoint", "body", "headers", "param"),
    [
        ("chat", {"messages": [{"role": "user", "content": "x"}]}, {}, "model"),
        ("chat", {"model": "m", "messages": []}, {}, "messages"),
        ("chat", {"model": "m", "messages": [{"content": "x"}]}, {}, "messages"),
        ("completions", {"model": "m", "prompt": 5}, {}, "prompt"),
        ("completions", {"model": "m", "prompt": "x", "max_tokens": -1}, {}, "max_tokens"),
        ("completions", {"model": "m", "prompt": "x", "max_tokens": True}, {}, "max_tokens"),
        ("completions", {"model": "m", "prompt": "x", "n": 0}, {}, "n"),
        ("completions", {"model": "m", "prompt": "x", "stream": "yes"}, {}, "stream"),
        ("completions", {"model": "m", "prompt": "x", "priority": "urgent"}, {}, "priority"),
        ("completions", {"model": "m", "prompt": "x", "priority": 9}, {}, "priority"),
        ("completions", {"model": "m", "prompt": "x"}, {"X-Request-Priority": "7"}, "X-Request-Priority"),
        ("completions", {"model": "m", "prompt": "x"}, {"X-SLO-Deadline-Ms": "soon"}, "X-SLO-Deadline-Ms"),
        ("completions", {"model": "m", "prompt": "x"}, {"X-SLO-TTFT-Ms": "-5"}, "X-SLO-TTFT-Ms"),
        ("completions", {"model": "m", "prompt": "x", "slo_tpot_ms": "inf"}, {}, "slo_tpot_ms"),
        ("completions", {"model": "m", "prompt": "x", "user": 5}, {}, "user"),
        ("embeddings", {"model": "e", "input": []}, {}, "input"),
        ("embeddings", {"model": "e", "input": [1.5]}, {}, "input"),
        ("embeddings", {"model": "e", "input": "x", "dimensions": 0}, {}, "dimensions"),
        ("embeddings", {"model": "e", "input": "x", "encoding_format": "hex"}, {}, "encoding_format"),
    ],
)
def test_invalid_values_name_the_field(endpoint: str, body: dict, headers: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        request_from_body(endpoint, body, headers)
    assert err.value.param == param and err.value.status == 400
    assert err.value.to_dict()["error"]["param"] == param


def test_unknown_endpoint_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="chat, completions, embeddings"):
        request_from_body("rerank", {"model": "m"})


def test_backend_body_drops_scheduler_fields_only() -> None:
    body = {"model": "m", "prompt": "x", "priority": 1, "deadline_ms": 5, "user": "u", "top_k": 3}
    assert backend_body(body) == {"model": "m", "prompt": "x", "user": "u", "top_k": 3}


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["model", "prompt", "max_tokens", "n", "priority", "deadline_ms", "stream", "user"]),
        st.one_of(
            st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=5), st.lists(st.integers(0, 9), max_size=3)
        ),
    )
)
def test_any_body_gives_a_request_or_invalid_request(body: dict) -> None:
    try:
        r = request_from_body("completions", body)
    except InvalidRequest as exc:
        assert exc.param  # always names the field
    else:
        assert r.prompt_tokens >= 0 and r.max_tokens >= 0


def test_error_shapes_and_status_mapping() -> None:
    assert LiveError(400, "bad", "msg", "x").to_dict() == {
        "error": {"message": "msg", "type": "invalid_request_error", "param": "x", "code": "bad"}
    }
    full = QueueFull("busy", retry_after_s=2.6)
    assert full.status == 429 and full.headers() == {"Retry-After": "3"}
    assert RequestRejected("big", code="too_large").status == 413
    assert RequestRejected("nope", code="no_compatible_instance").status == 404
    err = error_from_response(422, {"error": {"message": "bad field", "code": "x"}})
    assert err.status == 422 and err.message == "bad field" and err.type == "invalid_request_error"
    assert error_from_response(500, "boom").type == "server_error"
