"""The one policy contract both drivers call, and the small shared machinery policies build on.

A policy is deterministic in (now, queue, instances, its own state, its seed). It does no I/O,
reads no wall clock and imports neither simpy nor asyncio; everything it knows about instances
comes through `InstanceView`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from operator import attrgetter
from typing import Any, ClassVar

from sagesched.core import (
    Assignment,
    Decision,
    InstanceKind,
    InstanceView,
    RejectCode,
    Rejection,
    Request,
    RequestType,
)
from sagesched.core.pool import InstancePool, ViewList, views_by_id
from sagesched.core.queue import ClassKey, GatewayQueue

_EMBEDDING_KIND = InstanceKind.EMBEDDING
_LLM_KIND = InstanceKind.LLM
_EMBEDDING_REQUEST = RequestType.EMBEDDING


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Base for every policy's config. Subclasses add typed, documented fields with defaults."""


class Policy(ABC):
    """Subclasses set `name` and `Config` and implement `schedule`.

    `schedule` returns a list of `Assignment` and `Rejection`; requests it leaves out stay queued.
    `next_wakeup` returns the absolute time the policy wants to be called again even if nothing
    arrives or completes (an embedding batch window closing), or None.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[PolicyConfig]] = PolicyConfig

    def __init__(self, config: PolicyConfig | None = None, **overrides: Any) -> None:
        base = config if config is not None else self.Config()
        self.config = dataclasses.replace(base, **overrides) if overrides else base

    @abstractmethod
    def schedule(self, now: float, queue: Sequence[Request], instances: Sequence[InstanceView]) -> list[Decision]:
        """Decide for some of `queue` (in any order); keyed by request id."""

    def next_wakeup(self, now: float) -> float | None:
        return None

    def describe(self) -> dict[str, Any]:
        """Name and resolved config, for summaries and the admin API."""
        return {"name": self.name, **dataclasses.asdict(self.config)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dataclasses.asdict(self.config)})"


# -- shared helpers ------------------------------------------------------------------------------
#
# These run on every `schedule` call (in simulation: once per arrival and completion, tens of
# thousands of times per replay), usually with a handful of queued requests and instances. They
# are written as plain loops over local names rather than layered method calls for that reason;
# what they compute is the same as the one-line definitions in their docstrings.

arrival_order = attrgetter("arrival_s", "id")
"""Sort key for "first come, first served" (ties by id); a C-level getter, so sorting stays cheap."""


def reject_unservable(
    queue: Iterable[Request], instances: Sequence[InstanceView], rule: str
) -> tuple[list[Rejection], list[Request]]:
    """Split off requests no registered instance could ever serve (any health), with the reason.

    Unhealthy-but-compatible instances keep a request queued: they may come back. Both returned
    lists are new, so callers may extend or sort them in place.
    """
    rejected: list[Rejection] = []
    servable: list[Request] = []
    known = _known_classes(instances)
    for request in queue:
        if _served(request, known, instances):
            servable.append(request)
        else:
            rejected.append(unservable_rejection(request, rule))
    return rejected, servable


def is_servable(request: Request, instances: Sequence[InstanceView]) -> bool:
    """Whether some registered instance could ever serve `request` (`reject_unservable` keeps it)."""
    return _served(request, _known_classes(instances), instances)


def _served(request: Request, known: dict | None, instances: Sequence[InstanceView]) -> bool:
    """`is_servable`, given `_known_classes(instances)` (read once per call by `reject_unservable`)."""
    if known is None:
        return any(view.can_serve(request) for view in instances)
    return _class_served(known, (request.type is _EMBEDDING_REQUEST, request.model), instances)


def _known_classes(instances: Sequence[InstanceView]) -> dict | None:
    """The driver's per-class answers (`servable_classes`), when its views carry them: a class
    lookup per request is cheaper than asking each view (this runs on every call)."""
    kind = type(instances)
    return instances.serves_class if kind is ViewList or kind is InstancePool else None  # type: ignore[attr-defined]


def _class_served(known: dict, cls: ClassKey, instances: Sequence[InstanceView]) -> bool:
    served = known.get(cls)
    if served is None:
        served = known[cls] = any(class_served_by(view, cls) for view in instances)
    return served


def unservable_rejection(request: Request, rule: str) -> Rejection:
    """The rejection of a request no registered instance could ever serve."""
    kinds = "llm or llm_embedding" if request.type.is_llm else "embedding or llm_embedding"
    return Rejection(
        request.id,
        f"no instance of kind {kinds} serves model {request.model!r}",
        RejectCode.NO_COMPATIBLE_INSTANCE,
        rule,
    )


# Below this many queued requests a policy's plain-list code (a sort of a short list) is cheaper
# than reading the queue's indexes (merging streams, numpy columns): at light load the queue holds a
# request or two per call. Both paths give the same decisions (tests/sim/test_indexed_queue.py).
INDEX_MIN_QUEUE = 24


def use_index(queue: Sequence[Request]) -> bool:
    """Whether to take the indexed path: a `GatewayQueue` long enough to be worth it."""
    return type(queue) is GatewayQueue and len(queue) >= INDEX_MIN_QUEUE


def class_served_by(view: InstanceView, cls: ClassKey) -> bool:
    """`view.can_serve(request)` for every request of class `cls` (kind and model)."""
    embedding, model = cls
    return (view.kind is not _LLM_KIND if embedding else view.kind is not _EMBEDDING_KIND) and model in view.models


def servable_classes(
    queue: Sequence[Request], instances: Sequence[InstanceView], rule: str
) -> tuple[list[Rejection], GatewayQueue, list[ClassKey]]:
    """`reject_unservable` by class: (rejections, the queue as a `GatewayQueue`, servable classes).

    Requests of one class (`GatewayQueue` docstring) are served by the same instances, so one
    representative per class decides: O(classes x instances) instead of O(queue x instances).
    Rejections come in queue order, as `reject_unservable` gives them.
    """
    q = GatewayQueue.of(queue)
    classes: list[ClassKey] = []
    unservable: list[Request] = []
    # A driver whose instances never change kind or models (the simulator) passes a pool that
    # remembers the answer per class across calls.
    known = getattr(instances, "serves_class", None)
    for cls in q.classes():
        if known is not None:
            served = _class_served(known, cls, instances)
        else:
            served = any(class_served_by(view, cls) for view in instances)
        if served:
            classes.append(cls)
        else:
            unservable.extend(q.of_class(cls))
    if len(unservable) > 1:
        unservable.sort(key=lambda r: q.serial(r.id))
    return [unservable_rejection(r, rule) for r in unservable], q, classes


class LoadLedger:
    """The load each instance will carry once this call's assignments land.

    Every policy places through a ledger so that N requests placed in one call spread out
    instead of all landing on the instance that looked emptiest before the call.

    `views` maps instance id to its snapshot; ``added_*`` hold, per instance id, what this call has
    assigned so far (requests, of them embeddings, prefill tokens, decode tokens). All four counters
    only ever grow together through `add`, so ``added_requests[id] == 0`` means the instance still
    carries exactly its snapshot's load.
    """

    __slots__ = (
        "added_decode",
        "added_embedding",
        "added_embedding_inputs",
        "added_embedding_tokens",
        "added_prefill",
        "added_requests",
        "idle_ids",
        "views",
    )

    def __init__(self, instances: Sequence[InstanceView]) -> None:
        # id -> view; lazy when the driver passes an `InstancePool` (views built only when read).
        self.views = views_by_id(instances)
        # Sorted ids of idle instances when the driver passes an `InstancePool` (else None).
        self.idle_ids: tuple[str, ...] | None = getattr(instances, "idle_ids", None)
        zeros = dict.fromkeys(self.views, 0)
        self.added_requests = zeros
        self.added_embedding = zeros.copy()
        self.added_prefill = zeros.copy()
        self.added_decode = zeros.copy()
        # Of added_prefill, the embedding tokens (they queue at a mixed GPU's embedding engine, not
        # ahead of its LLM work), and the embedding inputs (TEI admits a bounded number at once).
        self.added_embedding_tokens = zeros.copy()
        self.added_embedding_inputs = zeros.copy()

    def candidates(self, request: Request) -> list[InstanceView]:
        """Healthy, compatible instances with a free slot (``free_slots(id) > 0``), in the caller's order."""
        added = self.added_requests
        found = [
            v
            for v in self.views.values()
            if v.healthy and v.inflight + added[v.id] < v.max_inflight and v.can_serve(request)
        ]
        if request.is_embedding:
            found = [v for v in found if self.fits_embedding_inputs(v, request.embedding_inputs)]
        return found

    def embedding_input_room(self, instance_id: str) -> int:
        """Embedding inputs the instance's embedding engine still admits after this call's placements."""
        return self.views[instance_id].embedding_input_room - self.added_embedding_inputs[instance_id]

    def fits_embedding_inputs(self, view: InstanceView, inputs: int) -> bool:
        """Whether `inputs` more embedding inputs stay within `view`'s cap now. A call larger than the
        whole cap passes: waiting would never make room, and the backend's own error (TEI's 413/429)
        then ends the request with the precise reason instead of leaving it queued forever."""
        cap = view.max_embedding_inputs
        return cap <= 0 or inputs > cap or self.embedding_input_room(view.id) >= inputs

    def has_room(self, request: Request) -> bool:
        """Whether some healthy, compatible instance still has a free slot (any health-independent
        cap aside): false means `candidates(request)` is empty for every request of its class for
        the rest of this call, since a ledger only ever adds load."""
        added = self.added_requests
        for v in self.views.values():
            if v.healthy and v.inflight + added[v.id] < v.max_inflight and v.can_serve(request):
                return True
        return False

    def inflight(self, instance_id: str) -> int:
        return self.views[instance_id].inflight + self.added_requests[instance_id]

    def embedding_inflight(self, instance_id: str) -> int:
        return self.views[instance_id].embedding_inflight + self.added_embedding[instance_id]

    def llm_inflight(self, instance_id: str) -> int:
        return self.inflight(instance_id) - self.embedding_inflight(instance_id)

    def free_slots(self, instance_id: str) -> int:
        view = self.views[instance_id]
        return max(0, view.max_inflight - view.inflight - self.added_requests[instance_id])

    def outstanding_tokens(self, instance_id: str) -> int:
        view = self.views[instance_id]
        return (
            view.queued_prefill_tokens
            + view.queued_decode_tokens
            + self.added_prefill[instance_id]
            + self.added_decode[instance_id]
        )

    def predicted_wait_s(self, instance_id: str) -> float:
        """When new LLM work would start on `instance_id` (this call's placements included)."""
        view = self.views[instance_id]
        extra = self.added_prefill[instance_id]
        if view.kind is not _EMBEDDING_KIND:
            extra -= self.added_embedding_tokens[instance_id]
        return view.predicted_wait_s(extra, self.added_decode[instance_id])

    def predicted_embedding_wait_s(self, instance_id: str) -> float:
        """When a new embedding would start at `instance_id`'s embedding engine."""
        return self.views[instance_id].predicted_embedding_wait_s(self.added_embedding_tokens[instance_id])

    def predicted_ttft_s(self, instance_id: str, request: Request) -> float:
        view = self.views[instance_id]
        if request.is_embedding:
            return self.predicted_embedding_wait_s(instance_id) + request.work_tokens / view.embedding_tokens_per_s
        return self.predicted_wait_s(instance_id) + request.prompt_tokens / view.prefill_tokens_per_s

    def add(self, instance_id: str, requests: Iterable[Request]) -> None:
        for request in requests:
            self.added_requests[instance_id] += 1
            if request.is_embedding:
                self.added_embedding[instance_id] += 1
                self.added_prefill[instance_id] += request.work_tokens
                self.added_embedding_tokens[instance_id] += request.work_tokens
                self.added_embedding_inputs[instance_id] += request.embedding_inputs
            else:
                self.added_prefill[instance_id] += request.prompt_tokens
                self.added_decode[instance_id] += request.max_tokens

    def least_outstanding(
        self, request: Request, candidates: Sequence[InstanceView] | None = None
    ) -> InstanceView | None:
        """The candidate with the least outstanding token work (ties: fewer in flight, then id).

        Without `candidates`, the pool is `candidates(request)`. One pass over the pool both filters
        and keeps the minimum of (`outstanding_tokens`, `inflight`, id), spelled out over the ledger's
        dicts: this runs once per placed request, so it builds neither the candidate list nor a key
        function call per instance.
        """
        filtering = candidates is None
        pool = self.views.values() if candidates is None else candidates
        added, prefill, decode = self.added_requests, self.added_prefill, self.added_decode
        best: InstanceView | None = None
        best_key: tuple[int, int, str] | None = None
        embedding_inputs = request.embedding_inputs if request.is_embedding else 0
        if filtering and self.idle_ids:
            # An idle instance this call has not used has the key (0, 0, id), below any other
            # instance's: the first compatible one in id order is the answer, without a scan of the
            # pool (1,000 instances at 80% busy: ~2 ms -> ~5 us a placement).
            views = self.views
            for vid in self.idle_ids:
                if added[vid]:
                    continue
                v = views[vid]
                if (
                    v.healthy
                    and v.inflight < v.max_inflight
                    and v.can_serve(request)
                    and (not embedding_inputs or self.fits_embedding_inputs(v, embedding_inputs))
                ):
                    return v
        # `v.inflight` and `v.can_serve(request)`, spelled out (per instance per placed request).
        embedding = request.type is _EMBEDDING_REQUEST
        model = request.model
        for v in pool:
            vid = v.id
            inflight = v.running + v.waiting + added[vid]
            if filtering and not (
                v.healthy
                and inflight < v.max_inflight
                and (v.kind is not _LLM_KIND if embedding else v.kind is not _EMBEDDING_KIND)
                and model in v.models
            ):
                continue
            if embedding_inputs and not self.fits_embedding_inputs(v, embedding_inputs):
                continue  # its embedding engine would refuse the inputs (TEI 429)
            outstanding = v.queued_prefill_tokens + v.queued_decode_tokens + prefill[vid] + decode[vid]
            if best_key is not None and outstanding > best_key[0]:
                continue  # loses on the key's first term: no tuple to build
            key = (outstanding, inflight, vid)
            if best_key is None or key < best_key:
                best, best_key = v, key
        return best

    def assign(
        self,
        instance: InstanceView,
        requests: Sequence[Request],
        rule: str,
        reason: str = "",
        priority_hint: int | None = None,
    ) -> Assignment:
        """Record the load and build the Assignment in one step."""
        self.add(instance.id, requests)
        return Assignment(instance.id, tuple([r.id for r in requests]), priority_hint, rule, reason)
