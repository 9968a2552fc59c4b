"""The gateway queue handed to `Policy.schedule`: a plain sequence of requests, plus indexes.

Past saturation the gateway queue holds thousands of requests while only one instance slot frees
per policy call; a policy that sorts or scans the whole queue on every call then makes the
simulator (and a busy gateway) slow down with the queue's length. `GatewayQueue` keeps the indexes
a policy needs to look at only the requests it can act on:

- as a `Sequence[Request]` it is exactly what policies always got: the queued requests in the order
  they entered the queue (iteration, `len`, indexing), so a policy that ignores the indexes works
  unchanged and gives the same results;
- by *class*: ``(is_embedding, model)``, the two things that decide which instances can serve a
  request (`InstanceView.can_serve`), so "no instance of this kind and model has a free slot"
  rules out a whole class at once;
- within a class, one stream per priority, each in arrival order ``(arrival_s, id)`` (the order
  `policies.base.arrival_order` sorts by).

Removal is lazy: `pop` forgets the request in O(1) and the streams skip it when they reach it
(each stream is compacted when more than half of it is dead), so every operation is O(1) amortised
plus, for `add`, the position among requests with the same arrival time.

Policies must treat the queue as read-only. Build one from any sequence with `GatewayQueue.of`.
"""

from __future__ import annotations

import heapq
from bisect import insort
from collections.abc import Hashable, Iterable, Iterator, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any, overload

from sagesched.core.request import Request, RequestType

if TYPE_CHECKING:
    import numpy as np

ClassKey = tuple[bool, str]
"""``(is_embedding, model)``: requests of one class can be served by exactly the same instances."""

_EMBEDDING = RequestType.EMBEDDING


def class_of(request: Request) -> ClassKey:
    """The request's class: whether it is an embedding, and its model."""
    return (request.type is _EMBEDDING, request.model)


class _Stream:
    """Requests of one class and priority in (arrival_s, id) order; dead entries skipped lazily."""

    __slots__ = ("entries", "head")

    def __init__(self) -> None:
        # (arrival_s, id, serial, request); `serial` tells a live entry from a stale one with the
        # same id (a request popped and queued again).
        self.entries: list[tuple[float, str, int, Request]] = []
        self.head = 0

    def add(self, entry: tuple[float, str, int, Request]) -> None:
        entries = self.entries
        if not entries or entries[-1][:2] <= entry[:2]:
            entries.append(entry)  # the usual case: arrivals come in time order
        else:
            insort(entries, entry, lo=self.head)


class Columns:
    """One class's queued requests as numpy columns (what vectorised policy code reads).

    Rows are in insertion order; `alive` marks the rows still queued (a popped request's row stays
    until the next compaction). Times are seconds; a missing objective is NaN. `requests[i]` is
    row i's request.
    """

    FIELDS = ("arrival", "ttft_deadline", "deadline", "tpot_s", "prompt", "max_tokens", "work")
    __slots__ = ("alive", "has_slo", "has_ttft", "cache", "n", "requests", "row", "slo_alive", *FIELDS)
    # float64 columns (one per name in FIELDS), then bool ones; capacity >= n, rows past n unused.
    arrival: np.ndarray
    ttft_deadline: np.ndarray
    deadline: np.ndarray
    tpot_s: np.ndarray
    prompt: np.ndarray
    max_tokens: np.ndarray
    work: np.ndarray
    has_ttft: np.ndarray
    has_slo: np.ndarray
    alive: np.ndarray

    def __init__(self, requests: Iterable[Request] = ()) -> None:
        import numpy as np

        # Policies' per-row results for these rows (`policies.slack_columns.class_best_slacks`): a row never
        # changes once appended (a compaction makes new columns), so a result keyed by n stays valid.
        self.cache: dict[Hashable, Any] = {}
        self.n = 0
        self.slo_alive = 0  # rows alive with an SLO (a count policies would otherwise take per call)
        self.requests: list[Request] = []
        self.row: dict[str, int] = {}
        for name in self.FIELDS:
            setattr(self, name, np.empty(16))
        self.has_ttft = np.zeros(16, dtype=bool)
        self.has_slo = np.zeros(16, dtype=bool)
        self.alive = np.zeros(16, dtype=bool)
        for request in requests:
            self.append(request)

    def append(self, request: Request) -> None:
        import numpy as np

        i = self.n
        if i == len(self.alive):
            for name in (*self.FIELDS, "has_ttft", "has_slo", "alive"):
                old = getattr(self, name)
                new = np.zeros(2 * i, dtype=old.dtype)
                new[:i] = old
                setattr(self, name, new)
        slo = request.slo
        nan = float("nan")
        self.arrival[i] = request.arrival_s
        ttft = request.ttft_deadline_s
        self.ttft_deadline[i] = nan if ttft is None else ttft
        self.has_ttft[i] = slo.ttft_ms is not None and ttft is not None
        deadline = request.deadline_s
        self.deadline[i] = nan if deadline is None else deadline
        self.tpot_s[i] = nan if slo.tpot_ms is None else slo.tpot_ms / 1000.0
        self.prompt[i] = request.prompt_tokens
        self.max_tokens[i] = request.max_tokens
        self.work[i] = request.work_tokens
        self.has_slo[i] = has_slo = not slo.empty
        self.slo_alive += has_slo
        self.alive[i] = True
        self.row[request.id] = i
        self.requests.append(request)
        self.n = i + 1

    def remove(self, request_id: str) -> None:
        i = self.row.pop(request_id, None)
        if i is not None:
            self.alive[i] = False
            if self.has_slo[i]:
                self.slo_alive -= 1


class GatewayQueue(Sequence[Request]):
    """Queued requests in insertion order, indexed by class, priority and arrival (module docstring)."""

    __slots__ = ("_columns", "_counts", "_dead", "_indexed", "_items", "_list", "_serial", "_streams")

    def __init__(self, requests: Iterable[Request] = ()) -> None:
        self._items: dict[str, tuple[int, Request]] = {}
        # Queued requests per class, in the order classes were first seen (kept always: cheap).
        self._counts: dict[ClassKey, int] = {}
        # The streams, dead counts and columns exist only while `_indexed` (`_build_index`).
        self._indexed = False
        self._streams: dict[ClassKey, dict[int, _Stream]] = {}
        self._dead: dict[ClassKey, int] = {}
        self._serial = 0
        self._list: list[Request] | None = None
        self._columns: dict[ClassKey, Columns] = {}
        for request in requests:
            self.add(request)

    @classmethod
    def of(cls, queue: Sequence[Request] | GatewayQueue) -> GatewayQueue:
        """`queue` itself if it is a `GatewayQueue`, else a new one holding its requests in order."""
        return queue if isinstance(queue, GatewayQueue) else cls(queue)

    # -- mutation (drivers only) -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue `request` (its id must not be queued already)."""
        rid = request.id
        items = self._items
        if rid in items:
            raise ValueError(f"request {rid!r} is already queued")
        self._serial += 1
        serial = self._serial
        items[rid] = (serial, request)
        key = (request.type is _EMBEDDING, request.model)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        self._list = None
        if self._indexed:
            self._index(request, serial, key)

    def _index(self, request: Request, serial: int, key: ClassKey) -> None:
        """Enter a queued request into its class's priority stream (and the class's columns)."""
        by_priority = self._streams.get(key)
        if by_priority is None:
            by_priority = self._streams[key] = {}
            self._dead[key] = 0
        priority = int(request.priority)
        stream = by_priority.get(priority)
        if stream is None:
            stream = by_priority[priority] = _Stream()
        stream.add((request.arrival_s, request.id, serial, request))
        columns = self._columns.get(key)
        if columns is not None:
            columns.append(request)

    def _build_index(self) -> None:
        """Build the streams from the queued requests, on the first read of an index.

        The indexes pay off past saturation (policies read them only from `INDEX_MIN_QUEUE` queued
        requests on); at light load the queue holds a request or two and keeping them up to date was
        most of `add` and `pop` (~3 us of ~4 per request on the default trace, where no call ever
        reads them). Once built they are kept up to date until the queue empties. Built in insertion
        order, they hold the same live entries, in the same order, as if kept from the start.
        """
        self._indexed = True
        for serial, request in self._items.values():
            self._index(request, serial, (request.type is _EMBEDDING, request.model))

    def pop(self, request_id: str, default: Request | None = None) -> Request | None:
        """Remove and return the queued request with this id, or `default`."""
        item = self._items.pop(request_id, None)
        if item is None:
            return default
        request = item[1]
        key = (request.type is _EMBEDDING, request.model)
        self._counts[key] -= 1
        self._list = None
        if not self._indexed:
            return request
        if not self._items:
            # Empty: drop the indexes (the next read rebuilds them), so light load stays unindexed.
            self._indexed = False
            self._streams, self._dead, self._columns = {}, {}, {}
            return request
        dead = self._dead[key] = self._dead[key] + 1
        columns = self._columns.get(key)
        if columns is not None:
            columns.remove(request_id)
        if dead > 64 and dead > self._counts[key]:
            self._compact(key)
        return request

    def _compact(self, key: ClassKey) -> None:
        items = self._items
        for stream in self._streams[key].values():
            stream.entries = [e for e in stream.entries[stream.head :] if _alive(items, e)]
            stream.head = 0
        self._dead[key] = 0
        if key in self._columns:
            self._columns[key] = Columns(self.of_class(key))

    # -- lookup ------------------------------------------------------------------------------------
    def get(self, request_id: str, default: Request | None = None) -> Request | None:
        item = self._items.get(request_id)
        return default if item is None else item[1]

    def has(self, request_id: str) -> bool:
        """Whether a request with this id is queued (``in`` tests requests, as for any sequence)."""
        return request_id in self._items

    def ids(self) -> Iterable[str]:
        return self._items.keys()

    @property
    def last_serial(self) -> int:
        """The serial of the most recently added request (0 when none ever was)."""
        return self._serial

    def queued_by(self, request_id: str, serial: int) -> bool:
        """Whether the request is queued and was added at or before `serial` (`last_serial` then)."""
        item = self._items.get(request_id)
        return item is not None and item[0] <= serial

    def added_since(self, serial: int) -> Iterator[Request]:
        """The queued requests added after `serial`, newest first: O(their number), since the
        requests are kept in insertion order (a re-queued request moves to the end)."""
        for added, request in reversed(self._items.values()):
            if added <= serial:
                return
            yield request

    def serial(self, request_id: str) -> int:
        """Position of the request in insertion order (increasing; for ordering, not indexing)."""
        return self._items[request_id][0]

    # -- Sequence ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        # A C-level map rather than a generator: policies iterate short queues on every call.
        return map(_request_of, self._items.values())

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, Request):
            return False
        item = self._items.get(value.id)
        return item is not None and item[1] == value

    @overload
    def __getitem__(self, index: int) -> Request: ...
    @overload
    def __getitem__(self, index: slice) -> list[Request]: ...
    def __getitem__(self, index):
        if self._list is None:
            self._list = [request for _, request in self._items.values()]
        return self._list[index]

    def __repr__(self) -> str:
        return f"GatewayQueue({len(self)} requests, classes={self.counts()})"

    # -- indexes -----------------------------------------------------------------------------------
    def counts(self) -> dict[ClassKey, int]:
        """Queued requests per class (classes with none left out), in first-seen order."""
        return {key: n for key, n in self._counts.items() if n}

    def classes(self) -> list[ClassKey]:
        return [key for key, n in self._counts.items() if n]

    def of_class(self, key: ClassKey) -> list[Request]:
        """The class's queued requests in insertion order (O(requests of the class))."""
        if not self._indexed:
            self._build_index()
        items = self._items
        found = [e for s in self._streams.get(key, {}).values() for e in s.entries[s.head :] if _alive(items, e)]
        found.sort(key=_serial_of)
        return [e[3] for e in found]

    def columns(self, key: ClassKey) -> Columns:
        """The class's requests as numpy columns, kept up to date from the first call on."""
        columns = self._columns.get(key)
        if columns is None:
            columns = Columns(self.of_class(key))  # builds the index first: columns live with it
            self._columns[key] = columns
        return columns

    def stream(self, key: ClassKey, priority: int) -> Iterator[Request]:
        """Requests of one class and priority in (arrival_s, id) order."""
        if not self._indexed:
            self._build_index()
        by_priority = self._streams.get(key)
        if not by_priority or priority not in by_priority:
            return iter(())
        return self._walk(by_priority[priority])

    def priorities(self, key: ClassKey) -> list[int]:
        if not self._indexed:
            self._build_index()
        return sorted(self._streams.get(key, {}))

    def _walk(self, stream: _Stream) -> Iterator[Request]:
        items = self._items
        entries = stream.entries
        i = stream.head
        # Skip the dead prefix for good: it is never alive again (a re-queued id gets a new serial).
        while i < len(entries) and not _alive(items, entries[i]):
            i += 1
        stream.head = i
        while i < len(entries):
            entry = entries[i]
            i += 1
            if _alive(items, entry):
                yield entry[3]

    def in_arrival_order(self, classes: Iterable[ClassKey] | None = None) -> Iterator[Request]:
        """Requests of `classes` (default: all) in (arrival_s, id) order, merged lazily.

        Stops costing anything once the caller stops iterating: a policy that can place only a few
        requests reads only those (plus the ones it skips).
        """
        if not self._indexed:
            self._build_index()
        keys = self.classes() if classes is None else classes
        streams = [self._walk(s) for key in keys for s in self._streams.get(key, {}).values()]
        if len(streams) == 1:
            return streams[0]
        return heapq.merge(*streams, key=_arrival_key)


class RankedMerge:
    """Queued requests of some classes in one ranked order, merged lazily; `drop` a class mid-way.

    `key(request)` must be non-decreasing along each (class, priority) stream's arrival order and
    end with ``(arrival_s, id)`` so that keys are unique (e.g. ``(arrival_s, id)`` itself, or an
    aged priority class followed by them). Iterating yields ``(class, request)`` in key order; a
    policy that finds a class without room calls `drop(cls)` and is never shown its requests again,
    so a call costs O(requests looked at * log streams), not O(queue).
    """

    __slots__ = ("_dropped", "_heap", "_key")

    def __init__(self, queue: GatewayQueue, classes: Iterable[ClassKey], key=None) -> None:
        self._key = key or _arrival_key
        self._dropped: set[ClassKey] = set()
        if not queue._indexed:
            queue._build_index()
        heap = []
        for cls in classes:
            for stream in queue._streams.get(cls, {}).values():
                it = queue._walk(stream)
                first = next(it, None)
                if first is not None:
                    heap.append((self._key(first), cls, first, it))
        heapq.heapify(heap)
        self._heap = heap

    def drop(self, cls: ClassKey) -> None:
        self._dropped.add(cls)

    def __iter__(self) -> Iterator[tuple[ClassKey, Request]]:
        heap, dropped, key = self._heap, self._dropped, self._key
        if len(heap) == 1:  # one stream (one class, one priority): no ordering to do
            _, cls, first, it = heap.pop()
            current: Request | None = first
            while current is not None and cls not in dropped:
                yield cls, current
                current = next(it, None)
            return
        while heap:
            _, cls, request, it = heap[0]
            if cls in dropped:
                heapq.heappop(heap)
                continue
            yield cls, request
            if cls in dropped:
                heapq.heappop(heap)
                continue
            following = next(it, None)
            if following is None:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (key(following), cls, following, it))


def _alive(items: dict[str, tuple[int, Request]], entry: tuple[float, str, int, Request]) -> bool:
    item = items.get(entry[1])
    return item is not None and item[0] == entry[2]


_request_of = itemgetter(1)


def _serial_of(entry: tuple[float, str, int, Request]) -> int:
    return entry[2]


def _arrival_key(request: Request) -> tuple[float, str]:
    return (request.arrival_s, request.id)


__all__ = ["ClassKey", "Columns", "GatewayQueue", "RankedMerge", "class_of"]
