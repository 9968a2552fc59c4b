"""`LoadLedger` and the hybrid policy's view adjustment, against their plain definitions.

The ledger's hot methods are written as single passes over its dicts for speed; these tests pin
them to the one-line definitions in their docstrings, over random instances and placements.
"""

from __future__ import annotations

from conftest import build_request, build_view
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagesched.core import InstanceView
from sagesched.policies.base import LoadLedger

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def views(draw: st.DrawFn) -> list[InstanceView]:
    out = []
    for k in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["llm", "embedding", "llm_embedding"]))
        max_inflight = draw(st.integers(1, 6))
        running = draw(st.integers(0, max_inflight + 1))
        out.append(
            build_view(
                f"i{k}",
                kind,
                draw(st.sampled_from([("m",), ("e",), ("m", "e")])),
                healthy=draw(st.booleans()),
                running=running,
                waiting=draw(st.integers(0, 2)),
                embedding_inflight=0 if kind == "llm" else draw(st.integers(0, running)),
                queued_prefill_tokens=draw(st.sampled_from([0, 100, 100, 5000])),  # repeats make ties
                queued_decode_tokens=draw(st.sampled_from([0, 50, 50])),
                max_inflight=max_inflight,
            )
        )
    return out


def naive_candidates(ledger: LoadLedger, request) -> list[InstanceView]:
    return [v for v in ledger.views.values() if v.healthy and v.can_serve(request) and ledger.free_slots(v.id) > 0]


def naive_least(ledger: LoadLedger, pool: list[InstanceView]) -> InstanceView | None:
    if not pool:
        return None
    return min(pool, key=lambda v: (ledger.outstanding_tokens(v.id), ledger.inflight(v.id), v.id))


@SETTINGS
@given(instances=views(), kinds=st.lists(st.sampled_from(["chat", "embedding"]), max_size=12), data=st.data())
def test_least_outstanding_and_candidates_match_their_definitions(instances, kinds, data) -> None:
    ledger = LoadLedger(instances)
    for i, kind in enumerate(kinds):
        request = build_request(
            f"r{i}",
            kind,
            data.draw(st.sampled_from(["m", "e"])),
            prompt_tokens=data.draw(st.sampled_from([10, 100])),
        )
        pool = naive_candidates(ledger, request)
        assert ledger.candidates(request) == pool
        expected = naive_least(ledger, pool)
        assert ledger.least_outstanding(request) == expected
        # An explicit pool is taken as given (no filtering), in any order.
        everything = list(reversed(ledger.views.values()))
        assert ledger.least_outstanding(request, everything) == naive_least(ledger, everything)
        if expected is not None:
            ledger.assign(expected, [request], "test")
            assert ledger.free_slots(expected.id) == max(0, expected.max_inflight - ledger.inflight(expected.id))


class Recorder:
    """Wraps a fallback policy and keeps the views each call was shown."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.seen: list[list[InstanceView]] = []

    def schedule(self, now, queue, instances):
        self.seen.append(list(instances))
        return self.inner.schedule(now, queue, instances)
