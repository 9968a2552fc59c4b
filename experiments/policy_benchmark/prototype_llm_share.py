"""A dropped prototype, kept so that its numbers can be reproduced: hybrid's load rule with a shared
GPU's LLM share priced differently (`hybrid_llm.LlmPlacement._llm_share` patched in this process).

The rule counts a shared GPU's LLM speed at `hybrid_instance_ratio` only while embedding work is in
flight or queued on it at that instant. Variants (env ``H13_VARIANT``):

- ``always``: the ratio on every shared GPU at all times;
- ``ewma``: ``1 - (1 - ratio) x f``, f the time-weighted busy fraction of its embedding side over
  ``H13_TAU`` seconds (default 2), or 1 while it is busy now.

Runs `sagesched.experiment` with the given arguments after patching, e.g. (held-out windows):

    H13_VARIANT=ewma SAGESCHED_BENCH_DIR=/tmp/proto python experiments/policy_benchmark/prototype_llm_share.py \\
        -m --config-dir experiments/policy_benchmark/conf +benchmark=embedding_heavy hydra.launcher.n_jobs=1 \\
        policy=hybrid label=hybrid_shareewma seed=3,4,5,6 'window_starts_s=[3000.0,1200.0,2400.0,0.0,600.0,1800.0]'

(n_jobs=1 keeps the jobs in this process, where the patch lives.) Results: reports/policy_benchmark/
README.md, "Held-out windows, and a proportional slack margin".
"""

from __future__ import annotations

import math
import os
import sys

import sagesched.policies.hybrid_llm as hybrid_llm
from sagesched.policies.hybrid_config import _MIXED, LLM

VARIANT = os.environ.get("H13_VARIANT", "ewma")
TAU_S = float(os.environ.get("H13_TAU", "2.0"))
_state: dict[tuple[int, str], tuple[float, float, bool]] = {}


def _share(self, call, view) -> float:
    if view.kind is not _MIXED:
        return 1.0
    busy_now = call.ledger.embedding_inflight(view.id) > 0 or call.other_waits(LLM, view)
    ratio = self.config.hybrid_instance_ratio
    if VARIANT == "always":
        return ratio
    if VARIANT != "ewma":
        raise SystemExit(f"unknown H13_VARIANT {VARIANT!r}; use always or ewma")
    key = (id(self), view.id)
    last_t, frac, last_busy = _state.get(key, (call.now, 0.0, False))
    w = math.exp(-max(0.0, call.now - last_t) / TAU_S)
    frac = frac * w + (1 - w) * (1.0 if last_busy else 0.0)
    _state[key] = (call.now, frac, busy_now)
    return 1.0 - (1.0 - ratio) * max(frac, 1.0 if busy_now else 0.0)


if __name__ == "__main__":
    hybrid_llm.LlmPlacement._llm_share = _share  # type: ignore[method-assign]
    from sagesched.experiment import main

    main(sys.argv[1:])
