"""The serving frontend's share of client-side latency, applied to a finished run's records.

Why after the run rather than as SimPy events: the OpenAI server's work (HTTP, tokenisation, hand-off,
stream delivery) delays what the *client* sees, not what the engine does next, so it changes no
scheduling decision; adding it to the records keeps jump and step mode identical and costs O(n log n)
once per run. The cost per delivery is `LLMPerfModel.frontend_s(prompt_tokens, running)`, with
`running` the requests in flight on the instance's engine at that moment (the frontend turns every
running sequence's output into stream chunks each step, so a busier engine delivers later).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def frontend_delays(
    fe, start: np.ndarray, first: np.ndarray, finish: np.ndarray, prompt: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(delay added to the first token, delay added to the finish) per request of one instance.

    `start`, `first`, `finish`: engine-side times (np.inf for unfinished); `fe` the perf model's
    `frontend_s`. In flight at t: started at or before t and not finished by t.
    """
    starts = np.sort(start)
    ends = np.sort(finish)

    def inflight(t: np.ndarray) -> np.ndarray:
        return np.searchsorted(starts, t, side="right") - np.searchsorted(ends, t, side="right")

    base = np.array([fe(int(p), 0) for p in prompt], dtype=float)
    per_seq = fe(0, 1) - fe(0, 0)
    if per_seq == 0.0:
        return base, base
    return base + per_seq * inflight(first), base + per_seq * inflight(np.where(np.isfinite(finish), finish, first))


def frontend_prices(perf: Any, rec: Any) -> bool:
    """Whether `perf`'s frontend cost applies to record `rec`: every LLM request, and an embedding
    only on a server whose perf model covers them (llama-server's; not a TEI or vLLM pooling engine)."""
    return not rec.embedding_inputs or getattr(perf, "frontend_covers_embeddings", False)


def apply_frontend(records: Iterable[Any], perf_by_instance: Mapping[str, Any]) -> int:
    """Add the frontend's cost to completed LLM records served by instances whose perf model has one.

    Records are `RequestRecord`s (mutated in place). Returns how many were adjusted.
    """
    by_inst: dict[str, list[Any]] = {}
    for rec in records:
        perf = perf_by_instance.get(rec.instance_id)
        if perf is None or rec.dispatch_s is None or rec.first_token_s is None:
            continue
        if not frontend_prices(perf, rec):
            continue
        by_inst.setdefault(rec.instance_id, []).append(rec)
    done = 0
    for inst_id, recs in by_inst.items():
        fe = perf_by_instance[inst_id].frontend_s
        if fe(0, 0) == 0.0 and fe(1, 1) == 0.0:
            continue
        start = np.array([r.dispatch_s for r in recs], dtype=float)
        first = np.array([r.first_token_s for r in recs], dtype=float)
        finish = np.array([np.inf if r.finish_s is None else r.finish_s for r in recs], dtype=float)
        prompt = np.array([r.prompt_tokens for r in recs])
        d_first, d_finish = frontend_delays(fe, start, first, finish, prompt)
        for r, a, b in zip(recs, d_first, d_finish, strict=True):
            r.first_token_s += float(a)
            if r.finish_s is not None:
                # One stream delivers its chunks in order: the last never reaches the client before the
                # first. (Fewer requests may be in flight at the finish than at the first token, e.g. when
                # a batch finishes together, so the finish's delay alone could put it first.)
                finish = r.finish_s + float(b)
                r.finish_s = finish if finish >= r.first_token_s else r.first_token_s
            done += 1
    return done
