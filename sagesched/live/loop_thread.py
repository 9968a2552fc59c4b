"""A private asyncio event loop on a daemon thread, for clients that offer sync and async methods."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class LoopThread:
    """A private asyncio loop on a daemon thread; coroutines are submitted to it from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="sagesched-client-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        if self.loop.is_closed():
            if hasattr(coro, "close"):
                coro.close()  # type: ignore[attr-defined]
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def run(self, coro: Awaitable[T]) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("a sync client method was called from inside the client's own loop")
        return self.submit(coro).result()

    async def arun(self, coro: Awaitable[T]) -> T:
        return await asyncio.wrap_future(self.submit(coro))

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is self._thread:
            return  # called from the loop itself (a finalizer run there): the loop stops after this step
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


__all__ = ["LoopThread"]
