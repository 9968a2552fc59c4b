"""Hybrid's `slack_margin_ms`: the LLM fallback ranks as of ``now + margin``, sheds only by the clock.

The predicted TTFT prices a prompt at the isolated prefill rate; past saturation the engine's steps
also carry the decodes, so a request dispatched at slack 0 misses by the prediction's error. The
margin makes the least-slack order and admission's "late first" act while a request can still make
it; shedding must not follow it (that would refuse requests that meet their SLO).
"""

from __future__ import annotations

import pytest

from sagesched.core import Assignment, Rejection
from sagesched.policies import make_policy
from sagesched.policies.admission import AdmissionConfig
from sagesched.policies.hybrid import HybridConfig

NOW = 10.0
RATE = 10_000.0  # prefill tokens/s: a 1,000-token prompt is predicted at 0.1 s


def _urgent_and_normal(make_request):
    # Urgent (high, 500 ms TTFT): 0.25 s to its deadline, 0.1 s of prefill -> slack 0.15 s.
    urgent = make_request("u", prompt_tokens=1000, arrival_s=NOW - 0.25, priority="high", ttft_ms=500)
    # Normal (2 s TTFT): 0.2 s to its deadline -> slack 0.1 s, the least of the two.
    normal = make_request("n", prompt_tokens=1000, arrival_s=NOW - 1.8, ttft_ms=2000)
    return urgent, normal


def test_default_margin_is_documented_and_reaches_admission():
    assert HybridConfig().slack_margin_ms == 200.0
    policy = make_policy("hybrid")
    assert policy.llm_fallback.admission.config.shed_margin_s == pytest.approx(0.2)
    assert make_policy("hybrid", slack_margin_ms=0).llm_fallback.admission.config.shed_margin_s == 0.0
    # Without admission the fallback is asked at the clock (late requests go last there).
    assert make_policy("hybrid", admission=False)._slack_margin_s == 0.0
    assert make_policy("hybrid", llm_fallback_policy="fifo")._slack_margin_s == 0.0


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_bad_margin_names_the_fix(bad):
    with pytest.raises(ValueError, match="slack_margin_ms must be a finite number >= 0"):
        make_policy("hybrid", slack_margin_ms=bad)
    with pytest.raises(ValueError, match="shed_margin_s must be a finite number >= 0"):
        AdmissionConfig(shed_margin_s=bad)


def test_margin_sends_an_urgent_request_near_its_deadline_first(make_request, make_view):
    """One free slot. By slack alone the normal request (0.1 s) goes before the urgent one (0.15 s);
    with a 200 ms margin both count as late and the urgent class's late requests go first."""
    urgent, normal = _urgent_and_normal(make_request)
    view = make_view("gpu", "llm", max_inflight=1, prefill_tokens_per_s=RATE)
    without = make_policy("hybrid", slack_margin_ms=0, llm_holdback_ms=0).schedule(NOW, [urgent, normal], [view])
    with_margin = make_policy("hybrid", llm_holdback_ms=0).schedule(NOW, [urgent, normal], [view])
    assert [d.request_ids for d in without] == [("n",)]
    assert [d.request_ids for d in with_margin] == [("u",)]
    assert all(isinstance(d, Assignment) for d in without + with_margin)  # nothing shed


@pytest.mark.parametrize("queued", [[], ["other"]])  # lone fast path, and the fallback's full call
def test_margin_never_sheds_what_the_clock_says_can_make_it(make_request, make_view, queued):
    """Admission sheds only requests late by the clock itself: 0.1 s of slack left is inside the
    200 ms margin (served first) but not shed; 0.1 s past the deadline is shed, and its reason
    names the clock's lateness (100 ms), not the margin's."""
    view = make_view("gpu", "llm", max_inflight=8, prefill_tokens_per_s=RATE)
    config = {"llm_fallback_config": {"max_shed_fraction": 1.0}}
    others = [make_request(i, prompt_tokens=10, arrival_s=NOW) for i in queued]  # no SLO: never shed

    tight = make_request("t", prompt_tokens=1000, arrival_s=NOW - 0.3, ttft_ms=500)  # slack +0.1 s
    decisions = make_policy("hybrid", **config).schedule(NOW, [tight, *others], [view])
    assert not any(isinstance(d, Rejection) for d in decisions)
    assert any(isinstance(d, Assignment) and "t" in d.request_ids for d in decisions)

    late = make_request("l", prompt_tokens=1000, arrival_s=NOW - 0.5, ttft_ms=500)  # slack -0.1 s
    decisions = make_policy("hybrid", **config).schedule(NOW, [late, *others], [view])
    (shed,) = [d for d in decisions if isinstance(d, Rejection)]
    assert shed.request_id == "l" and "lateness 100 ms" in shed.reason
    # Without the margin the same request is shed alike: the margin moves no shedding threshold.
    decisions = make_policy("hybrid", slack_margin_ms=0, **config).schedule(NOW, [late, *others], [view])
    assert [d.request_id for d in decisions if isinstance(d, Rejection)] == ["l"]


# -- mixed-GPU ingest guard (`mixed_ingest_guard_ms`) -----------------------------------------------


def test_ingest_waits_while_a_mixed_gpus_llm_engine_is_prefilling(make_request, make_view):
    """Background embeddings (no SLO) join a mixed GPU's embedding engine only while its LLM engine
    has at most 100 ms of prefill queued (the batch would stretch the prefill's steps); a query with
    an SLO still goes; an embedding-only GPU takes the ingest; 0 turns the guard off."""
    ingest = make_request("ing", kind="embedding", inputs=32, prompt_tokens=8192, priority="background")
    query = make_request("q", kind="embedding", inputs=1, prompt_tokens=32, e2e_ms=50)
    # 3,000 LLM prompt tokens queued at 10k tokens/s: 300 ms of prefill (its embedding queue is empty).
    busy = make_view(
        "mix", "llm_embedding", running=3, queued_prefill_tokens=3_000, prefill_tokens_per_s=RATE, max_inflight=64
    )
    assert make_policy("hybrid").schedule(NOW, [ingest], [busy]) == []  # held at the gateway
    (placed,) = make_policy("hybrid", mixed_ingest_guard_ms=0).schedule(NOW, [ingest], [busy])
    assert placed.request_ids == ("ing",) and placed.instance_id == "mix"
    (q,) = make_policy("hybrid").schedule(NOW, [query], [busy])
    assert q.request_ids == ("q",)
    # 500 tokens (50 ms) of prefill: under the guard, the ingest goes.
    light = make_view(
        "mix", "llm_embedding", running=3, queued_prefill_tokens=500, prefill_tokens_per_s=RATE, max_inflight=64
    )
    (placed,) = make_policy("hybrid").schedule(NOW, [ingest], [light])
    assert placed.instance_id == "mix"
    # An embedding-only GPU is not guarded.
    tei = make_view("tei", "embedding", max_inflight=64)
    (placed,) = make_policy("hybrid").schedule(NOW, [ingest], [busy, tei])
    assert placed.instance_id == "tei"


def test_bad_guard_names_the_fix():
    with pytest.raises(ValueError, match="mixed_ingest_guard_ms must be a finite number >= 0"):
        make_policy("hybrid", mixed_ingest_guard_ms=-1)
