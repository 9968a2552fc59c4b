"""Requests cut off by driver.drain_timeout_s mid-stream say so, in both live driver modes.

test_live_driver_faults.py pins the reason for requests that never got a byte; a stream that was
already relaying chunks when the deadline passed ends down another path (the relay, not the
dispatch), and its record must carry the same drain_timeout reason and a finish time at the cut.
"""

from __future__ import annotations

import pytest

from tests.replay import test_live_driver_faults as faults

# The fault tests' fixtures (a raw socket server, a small trace), shared rather than copied.
serve, trace = faults.serve, faults.trace


@pytest.mark.parametrize("mode", ["endpoint", "policy"])
def test_a_stream_relaying_chunks_when_the_drain_deadline_passes_says_drain_timeout(serve, trace, tmp_path, mode):
    url = serve(faults._trickle)
    timeouts = ["driver.request_timeout_s=120", "driver.drain_timeout_s=1"]
    records, wall = faults._replay([*trace, *faults._mode(mode, url), *timeouts], tmp_path)
    assert len(records) == faults.N and (records["outcome"] == "failed").all()
    assert (records["reason"] == "drain_timeout: unfinished 1s after the last send (driver.drain_timeout_s)").all(), (
        records["reason"].tolist()
    )
    assert records["first_token_s"].notna().all()  # they were streaming when cut
    last_arrival = records["arrival_s"].max()
    assert (records["finish_s"] < last_arrival + 1 + 5).all()  # ended at the cut, not at request_timeout_s
    assert wall < 60
