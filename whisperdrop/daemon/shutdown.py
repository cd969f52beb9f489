"""The daemon's one stop request: an asyncio event for the loop's side, a threading event for workers.

The service makes one `Shutdown` and hands it to the pipeline (its stages, intake and the routes),
the watcher and, through the pipeline, the HTTP API. `request(reason)` sets both events: worker
threads (the engine, PyAV, hashing) look at `threads` between steps; coroutines `await wait()`,
which also serves as a sleep that a stop cuts short (`wait(timeout)`), so nothing polls for a stop.
"""

from __future__ import annotations

import asyncio
import threading


class Shutdown:
    """One stop request for the whole daemon, safe to make from any thread (see the module doc)."""

    def __init__(self) -> None:
        self.threads = threading.Event()  # for worker threads: `cancel=` of the engine, extract, sha256_file
        self.reason: str | None = None  # what the first request said (a signal's name, "drain", ...)
        self._event = asyncio.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = _running_loop()

    def request(self, reason: str) -> bool:
        """Ask everything to stop, from the loop's thread, a signal handler or any other thread: the
        threading event is set at once, the asyncio one on the loop (call_soon_threadsafe from another
        thread). Returns True for the first request, False when a stop was already asked."""
        with self._lock:
            first = self.reason is None
            if first:
                self.reason = reason
            loop = self._loop
        if loop is None or _running_loop() is loop:
            # On the loop's thread (or before anything waited): the loop's side first, so the
            # coroutine that waits for the stop runs before any worker thread's Cancelled lands.
            self._event.set()
            self.threads.set()
            return first
        self.threads.set()
        try:
            loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:  # the loop is closed: nobody waits any more
            self._event.set()
        return first

    def is_set(self) -> bool:
        """True once a stop was requested (from any thread; read by workers and coroutines alike)."""
        return self.threads.is_set()

    async def wait(self, timeout: float | None = None, *, wake: asyncio.Event | None = None) -> bool:
        """Wait on the loop until a stop is requested, `timeout` seconds pass, or `wake` is set
        (whichever comes first). Returns whether a stop was requested. Never swallows a cancellation
        of the caller (it waits with asyncio.wait, not wait_for: CPython gh-86296)."""
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
        if self.is_set():  # covers a request from a thread made before this loop was known
            return True
        if timeout is None and wake is None:
            await self._event.wait()
            return True
        waiters = {asyncio.ensure_future(self._event.wait())}
        if wake is not None:
            waiters.add(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self.is_set()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
