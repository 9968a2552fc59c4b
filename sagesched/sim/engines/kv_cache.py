"""A paged KV cache counted in blocks, with vLLM-style prefix caching.

Only counts are kept (no block ids): `used` blocks are referenced by at least one running request;
the rest are free. Blocks whose content has a prefix key stay in `cached` after their last user
leaves (refcount 0, "evictable"): they still count as free and are reused by a later request with
the same prefix, until an allocation needs them and evicts the least recently freed one. That is
vLLM's free-block queue: never-used blocks go first, then freed blocks in the order they were freed
(a request's tail blocks before its head, so shared prefixes live longest).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


class KvCache:
    """Block accounting for one engine. `num_blocks` x `block_size` tokens in all."""

    __slots__ = ("block_size", "cached", "evictable", "evictions", "lru", "num_blocks", "peak_used", "used")

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.used = 0
        self.peak_used = 0
        self.cached: dict[Hashable, int] = {}  # prefix key -> number of requests holding it
        self.lru: OrderedDict[Hashable, None] = OrderedDict()  # refcount-0 keys, least recently freed first
        self.evictable = 0
        self.evictions = 0

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - self.used

    @property
    def usage(self) -> float:
        return self.used / self.num_blocks

    def allocate(self, n: int) -> None:
        """Take `n` fresh (private) blocks; the caller has checked `n <= free_blocks`."""
        if n <= 0:
            return
        untouched = self.num_blocks - self.used - self.evictable
        self.used += n
        if self.used > self.num_blocks:
            raise RuntimeError(f"KV cache over-allocated: {self.used} > {self.num_blocks} blocks")
        if self.used > self.peak_used:
            self.peak_used = self.used
        if n > untouched:
            for _ in range(n - untouched):
                key, _none = self.lru.popitem(last=False)
                del self.cached[key]
            self.evictable -= n - untouched
            self.evictions += n - untouched

    def free_private(self, n: int) -> None:
        self.used -= n

    def lookup(self, keys: Sequence[Hashable], limit: int) -> tuple[int, int]:
        """(hits, evictable hits): the leading keys, at most `limit`, present in the cache. No side effects."""
        cached = self.cached
        hits = evictable = 0
        for key in keys[:limit]:
            ref = cached.get(key)
            if ref is None:
                break
            hits += 1
            if ref == 0:
                evictable += 1
        return hits, evictable

    def acquire(self, keys: Sequence[Hashable]) -> None:
        """Start using cached blocks `keys` (found by `lookup`)."""
        cached = self.cached
        for key in keys:
            ref = cached[key]
            if ref == 0:
                del self.lru[key]
                self.evictable -= 1
                self.used += 1
            cached[key] = ref + 1
        if self.used > self.peak_used:
            self.peak_used = self.used

    def release(self, keys: Sequence[Hashable]) -> None:
        """Stop using cached blocks `keys`; the last user leaving makes a block evictable (tail first)."""
        cached = self.cached
        for key in reversed(keys):
            ref = cached[key] - 1
            cached[key] = ref
            if ref == 0:
                self.lru[key] = None
                self.evictable += 1
                self.used -= 1

    def register(self, key: Hashable) -> bool:
        """Turn one of the caller's private, fully computed blocks into a cached block held by it.

        False if another block already holds that key (the caller's copy stays private).
        """
        if key in self.cached:
            return False
        self.cached[key] = 1
        return True
