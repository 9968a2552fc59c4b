"""slo_aware's `ttft_margin_factor`: a proportional slack margin that orders, while shedding reads factor 1.

The predicted TTFT prices a prompt at the isolated prefill rate; past saturation a prompt takes
1.3-2x that. With the factor an LLM request's TTFT slack is ``deadline - now - factor x predicted
TTFT``: it counts as late (served ahead of long-slack work) once the stretched prediction no longer
fits. Only a request late as predicted (factor 1) may be shed. (Indexed paths against the plain
reference: tests/sim/test_margin_factor_indexed.py.)
"""

from __future__ import annotations

import pytest

from sagesched.core import Assignment, Rejection
from sagesched.policies import make_policy
from sagesched.policies.base import LoadLedger
from sagesched.policies.slo_aware import slack_s

NOW = 10.0
RATE = 10_000.0  # prefill tokens/s: a 1,000-token prompt is predicted at 0.1 s


def test_factor_stretches_only_the_llm_ttft_term(make_request, make_view):
    view = make_view("gpu", "llm_embedding", models=("m", "e"), prefill_tokens_per_s=RATE, embedding_tokens_per_s=RATE)
    ledger = LoadLedger([view])
    chat = make_request("c", prompt_tokens=1000, arrival_s=NOW, ttft_ms=500)
    assert slack_s(ledger, "gpu", chat, NOW) == pytest.approx(0.4)
    assert slack_s(ledger, "gpu", chat, NOW, 2.0) == pytest.approx(0.3)  # 0.5 - 2 x 0.1
    emb = make_request("e", kind="embedding", model="e", prompt_tokens=1000, arrival_s=NOW, ttft_ms=500)
    assert slack_s(ledger, "gpu", emb, NOW, 2.0) == slack_s(ledger, "gpu", emb, NOW)
    tpot = make_request("t", prompt_tokens=1000, arrival_s=NOW, tpot_ms=100)  # no TTFT: unchanged
    assert slack_s(ledger, "gpu", tpot, NOW, 2.0) == slack_s(ledger, "gpu", tpot, NOW)


@pytest.mark.parametrize("bad", [0.5, 0.0, -1.0, float("inf"), float("nan")])
def test_bad_factor_names_the_fix(bad):
    with pytest.raises(ValueError, match="ttft_margin_factor must be a finite number >= 1"):
        make_policy("slo_aware", admission=True, ttft_margin_factor=bad)
    with pytest.raises(ValueError, match="ttft_margin_factor"):
        make_policy("slo_aware", admission=True, ttft_margin_factor=True)


def test_factor_needs_admission():
    with pytest.raises(ValueError, match="needs admission"):
        make_policy("slo_aware", ttft_margin_factor=1.5)
    with pytest.raises(ValueError, match="needs admission"):
        make_policy("hybrid", admission=False, llm_fallback_config={"ttft_margin_factor": 1.5})
    assert make_policy("hybrid", llm_fallback_config={"ttft_margin_factor": 1.5}).llm_fallback.ttft_factor == 1.5
    assert make_policy("slo_aware").ttft_factor == 1.0


def _two_requests(make_request):
    # Stretched-late, not late as predicted: 0.25 s to its deadline, 0.1 s predicted -> slack 0.15 s at
    # factor 1, -0.05 s at factor 3 (0.25 - 0.3).
    near = make_request("near", prompt_tokens=1000, arrival_s=NOW - 0.25, priority="low", ttft_ms=500)
    # Attainable either way: 1.9 s to go.
    far = make_request("far", prompt_tokens=1000, arrival_s=NOW - 0.1, priority="low", ttft_ms=2000)
    return near, far


@pytest.mark.parametrize("queued", [["near"], ["near", "far"]])  # lone path, and the full call
def test_stretched_late_request_is_served_first_and_never_shed(make_request, make_view, queued):
    """With budget to shed, a request late only under the factor is not refused: it is served ahead
    of work with more slack than `defer_slack_s` (here 0.5 s, so `far` is long-slack)."""
    near, far = _two_requests(make_request)
    queue = [r for r in (near, far) if r.id in queued]
    view = make_view("gpu", "llm", max_inflight=1, prefill_tokens_per_s=RATE)
    policy = make_policy("slo_aware", admission=True, ttft_margin_factor=3.0, max_shed_fraction=1.0, defer_slack_s=0.5)
    policy.admission.seen_count = 100  # budget to shed
    decisions = policy.schedule(NOW, queue, [view])
    assert [type(d) for d in decisions] == [Assignment]
    assert decisions[0].request_ids == ("near",)
    assert "SLO lost" in decisions[0].reason  # ordered as late (admission), not by slack
    # Without the factor it is attainable and ranked by slack (0.15 s, less than far's 1.8 s).
    plain = make_policy("slo_aware", admission=True, max_shed_fraction=1.0, defer_slack_s=0.5)
    first = plain.schedule(NOW, queue, [view])[0]
    assert first.request_ids == ("near",) and "least slack first" in first.reason


@pytest.mark.parametrize("queued", [["late"], ["late", "far"]])
def test_late_as_predicted_is_shed_with_its_unstretched_lateness(make_request, make_view, queued):
    late = make_request("late", prompt_tokens=1000, arrival_s=NOW - 0.45, priority="low", ttft_ms=500)
    far = make_request("far", prompt_tokens=1000, arrival_s=NOW - 0.1, priority="low", ttft_ms=2000)
    queue = [r for r in (late, far) if r.id in queued]
    view = make_view("gpu", "llm", max_inflight=1, prefill_tokens_per_s=RATE)
    policy = make_policy("slo_aware", admission=True, ttft_margin_factor=3.0, max_shed_fraction=1.0)
    policy.admission.seen_count = 100
    decisions = policy.schedule(NOW, queue, [view])
    shed = [d for d in decisions if isinstance(d, Rejection)]
    assert [d.request_id for d in shed] == ["late"]
    # Deadline 0.05 s away, 0.1 s predicted: 50 ms late as predicted (250 ms at factor 3).
    assert "lateness 50 ms" in shed[0].reason
