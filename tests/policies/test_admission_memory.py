"""Admission control in a long-running gateway: counting requests seen must not keep every id."""

from __future__ import annotations

import sys

from sagesched.policies.admission import AdmissionConfig, AdmissionControl


def test_seen_count_is_exact_and_memory_stays_bounded(make_request):
    control = AdmissionControl(AdmissionConfig(max_shed_fraction=0.1))
    queue = [make_request(f"q{i}") for i in range(5)]
    for step in range(2_000):
        # A rolling queue: each call the oldest leaves (dispatched) and a new one arrives.
        control.observe(queue)
        queue = [*queue[1:], make_request(f"n{step}")]
    assert control.seen_count == 5 + 1_999  # every request counted once, however many calls saw it
    held = [getattr(control, name) for name in control.__slots__ if isinstance(getattr(control, name), set)]
    assert all(len(ids) <= 5 for ids in held), "admission keeps ids of requests no longer queued"
    assert sum(sys.getsizeof(ids) for ids in held) < 10_000
