"""`SimConfig.view_rates == "learned"`: the simulator's instances learn their view rates as live.

The live executor moves each backend's rates with every finished request
(`sagesched.core.rates.ThroughputEstimate`); this gives each simulated instance the same
estimator, fed at the same two moments: at dispatch (whether an LLM request starts clear) and at
completion (what the request showed a client). An instance's new rates go into its constant view
part (`InstanceState.static_view`), so snapshots carry them with no cost on the nominal path.
"""

from __future__ import annotations

from collections.abc import Sequence

from sagesched.core import InstanceView, RequestRecord
from sagesched.core.rates import ThroughputEstimate, starts_clear
from sagesched.sim.frontend import frontend_prices
from sagesched.sim.instance_state import InstanceState
from sagesched.sim.views import STATIC_SLOT

_RATE_SLOTS = tuple(STATIC_SLOT[name] for name in ("prefill_tokens_per_s", "decode_step_s", "embedding_tokens_per_s"))


class LearnedRates:
    """One `ThroughputEstimate` per instance (by `InstanceState.index`), started from its nominal rates."""

    def __init__(self, instances: Sequence[InstanceState], smoothing: float) -> None:
        self.smoothing = smoothing
        self.estimates = [ThroughputEstimate(*(inst.static_view[i] for i in _RATE_SLOTS)) for inst in instances]
        self.started_clear: set[str] = set()  # LLM requests that found nothing ahead at dispatch

    def dispatching(self, request_id: str, view: InstanceView) -> None:
        """An LLM request is about to join the instance `view` shows (its state before the request)."""
        if starts_clear(view):
            self.started_clear.add(request_id)

    def completed(self, rec: RequestRecord, now: float, inst: InstanceState) -> bool:
        """Fold a finished request into `inst`'s rates; True when its view rates changed (then
        `inst.static_view` holds them and the caller re-snapshots the instance).

        The live client sees the serving frontend's delivery cost, which the records get only after
        the run (`sagesched.sim.frontend`): it is priced here as that module prices it, with the
        requests in flight now standing in for those in flight at the first token.
        """
        core = inst.llm
        delivery = 0.0
        if core is not None and frontend_prices(core.perf, rec):
            delivery = core.perf.frontend_s(rec.prompt_tokens, inst.inflight)
        clear = rec.request_id in self.started_clear
        self.started_clear.discard(rec.request_id)
        estimate = self.estimates[inst.index]
        if not estimate.learn(rec, now, rec.output_tokens, self.smoothing, started_clear=clear, delivery_s=delivery):
            return False
        static = list(inst.static_view)
        for slot, value in zip(_RATE_SLOTS, estimate.as_tuple(), strict=True):
            static[slot] = value
        inst.static_view = tuple(static)
        inst.cached_view = None  # the load part (`cached_load`) does not depend on the rates
        return True
