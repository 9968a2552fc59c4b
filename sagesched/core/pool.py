"""The instance views of one policy call, built lazily, plus the one index a least-loaded choice needs.

A policy call used to get a fresh snapshot of every instance. On a fleet (1,000 instances, most of
them in the middle of a decode run whose state moves with the clock) building those snapshots was
most of a simulation's time, though a least-loaded policy looks at one of them. `InstancePool` is
a `Sequence[InstanceView]` (every policy reads it as the list it always got: same order, same
values) whose views are computed the first time they are read, and which carries:

- `by_id()`: a read-only mapping id -> view, equally lazy (`LoadLedger` and the decision core use
  it instead of building a dict of every view);
- `idle_ids`: the ids of the instances with nothing in flight and no outstanding work, sorted.
  "The instance with the least outstanding work, then the fewest in flight, then the smallest id"
  is then the first compatible idle instance whenever one is idle, found without a scan
  (`LoadLedger.least_outstanding`).

A pool belongs to one call: the driver closes it when the call returns, and reading a view it never
built then raises (its instance has moved on). Drivers without the indexes pass a plain list;
policies must not rely on the extras being there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import overload

from sagesched.core.instance import InstanceView


class PoolClosed(RuntimeError):
    """A view of a past policy call was read after the call returned."""


class InstancePool(Sequence[InstanceView]):
    """Lazily built views of one policy call (module docstring)."""

    __slots__ = ("_build", "_closed", "_ids", "_index", "_views", "idle_ids", "serves_class", "uniform_llm")

    def __init__(
        self,
        views: list[InstanceView | None],
        ids: Sequence[str],
        index: Mapping[str, int],
        build: Callable[[int], InstanceView],
        idle_ids: tuple[str, ...] = (),
        serves_class: dict | None = None,
        uniform_llm: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        self._views = views  # None where not built yet (the pool's own list)
        self._ids = ids
        self._index = index
        self._build = build
        self._closed = False
        self.idle_ids = idle_ids
        # (is_embedding, model) -> whether any instance serves it, shared by the calls of a driver
        # whose instances never change kind or models (`policies.base.servable_classes`).
        self.serves_class = serves_class
        # model -> (prefill_tokens_per_s, decode_step_s) shared by every instance that can serve the
        # model's LLM requests, when those never change and every instance is always healthy (the
        # simulator's pools); None when the driver does not know. With it, an idle instance serving
        # the model is as fast as any and has nothing ahead: a least-work choice is an idle one.
        self.uniform_llm = uniform_llm

    def _get(self, i: int) -> InstanceView:
        view = self._views[i]
        if view is None:
            if self._closed:
                raise PoolClosed("an instance view was read after its policy call returned; copy what you keep")
            view = self._views[i] = self._build(i)
        return view

    def close(self) -> None:
        self._closed = True

    def __len__(self) -> int:
        return len(self._views)

    @overload
    def __getitem__(self, i: int) -> InstanceView: ...
    @overload
    def __getitem__(self, i: slice) -> list[InstanceView]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(k) for k in range(len(self._views))[i]]
        if i < 0:
            i += len(self._views)
        if not 0 <= i < len(self._views):
            raise IndexError("instance index out of range")
        return self._get(i)

    def __iter__(self) -> Iterator[InstanceView]:
        get = self._get
        for i, view in enumerate(self._views):
            yield get(i) if view is None else view

    def by_id(self) -> _ById:
        return _ById(self)

    def __repr__(self) -> str:
        built = sum(v is not None for v in self._views)
        return f"InstancePool({len(self)} instances, {built} built, {len(self.idle_ids)} idle)"


class _ById(Mapping[str, InstanceView]):
    """id -> view over an `InstancePool`, in the pool's order; builds only what is read."""

    __slots__ = ("_pool",)

    def __init__(self, pool: InstancePool) -> None:
        self._pool = pool

    def __getitem__(self, key: str) -> InstanceView:
        return self._pool._get(self._pool._index[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._pool._ids)

    def __len__(self) -> int:
        return len(self._pool._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._pool._index


class ViewList(list):
    """A driver's eager views of one call (a plain list of `InstanceView`) that also answers `by_id()`.

    The ledger and the decision core each need id -> view; over a plain list each built its own
    dict, and each asked the list for the pool's extras (`by_id`, `idle_ids`), an attribute miss
    that raises inside `getattr`. This list builds the mapping once per call and has the extras as
    attributes (no idle index: `idle_ids` is None). Build it with `ViewList.of`: a Python
    ``__init__`` on a list subclass cost more (~0.7 us a call) than the dict it saves.
    """

    # Class-level defaults (no __slots__), so that a plain `ViewList(views)` works too.
    idle_ids = None
    _by_id: dict[str, InstanceView] | None = None
    serves_class: dict | None = None  # as `InstancePool.serves_class`

    @classmethod
    def of(cls, views: Iterable[InstanceView], serves_class: dict | None = None) -> ViewList:
        made = cls(views)
        if serves_class is not None:
            made.serves_class = serves_class
        return made

    def by_id(self) -> dict[str, InstanceView]:
        found = self._by_id
        if found is None:
            found = self._by_id = {view.id: view for view in self}
        return found


def views_by_id(instances: Sequence[InstanceView]) -> Mapping[str, InstanceView]:
    """id -> view: the pool's lazy mapping, or a dict for any other sequence."""
    by_id = getattr(instances, "by_id", None)
    return by_id() if by_id is not None else {view.id: view for view in instances}


def is_idle(view: InstanceView) -> bool:
    """Nothing in flight and no outstanding token work: the least loaded an instance can be."""
    return view.running + view.waiting == 0 and view.queued_prefill_tokens + view.queued_decode_tokens == 0


__all__ = ["InstancePool", "PoolClosed", "ViewList", "is_idle", "views_by_id"]
