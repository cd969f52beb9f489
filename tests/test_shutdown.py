"""The daemon's one stop request (daemon.shutdown.Shutdown): both events set by one call, from any thread."""

from __future__ import annotations

import asyncio
import threading

from whisperdrop.daemon.remote_steps import sleep_unless
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.engine.engine import Cancelled

WAIT_S = 30.0  # a bound for a hang, never reached when the behaviour holds


def test_a_request_from_a_thread_wakes_the_loop_and_sets_both_events():
    """request() from another thread wakes a coroutine waiting on the loop and sets the workers' event too."""
    async def scenario() -> tuple[bool, bool, bool, str | None]:
        shutdown = Shutdown()
        waiting = asyncio.ensure_future(shutdown.wait())
        await asyncio.sleep(0)  # the waiter is parked on the event before the thread asks
        thread = threading.Thread(target=shutdown.request, args=("from a thread",))
        thread.start()
        done, _ = await asyncio.wait({waiting}, timeout=WAIT_S)
        thread.join()
        return waiting in done and waiting.result(), shutdown.threads.is_set(), shutdown.is_set(), shutdown.reason

    assert asyncio.run(scenario()) == (True, True, True, "from a thread")


def test_wait_with_a_timeout_is_a_sleep_a_stop_cuts_short():
    """wait(timeout) returns False when nothing asked, True at once when a stop is asked, and the
    first reason is kept while later requests say they were not the first."""
    async def scenario() -> tuple[bool, bool, bool, bool, str | None]:
        shutdown = Shutdown()
        quiet = await shutdown.wait(0.01)
        sleeping = asyncio.ensure_future(shutdown.wait(WAIT_S))
        await asyncio.sleep(0)
        first = shutdown.request("SIGTERM")
        done, _ = await asyncio.wait({sleeping}, timeout=WAIT_S)
        return quiet, sleeping in done and sleeping.result(), first, shutdown.request("drain"), shutdown.reason

    assert asyncio.run(scenario()) == (False, True, True, False, "SIGTERM")


def test_wait_returns_when_its_wake_event_is_set():
    """wait(wake=event) returns False when the other event wakes it (the watcher's inotify events)."""
    async def scenario() -> bool:
        shutdown, wake = Shutdown(), asyncio.Event()
        waiting = asyncio.ensure_future(shutdown.wait(WAIT_S, wake=wake))
        await asyncio.sleep(0)
        wake.set()
        done, _ = await asyncio.wait({waiting}, timeout=WAIT_S)
        return waiting in done and not waiting.result() and not shutdown.is_set()

    assert asyncio.run(scenario())


def test_a_request_before_the_loop_waited_is_seen():
    """A stop asked from a thread before anything waited on the loop is seen by the first wait."""
    shutdown = Shutdown()
    thread = threading.Thread(target=shutdown.request, args=("early",))
    thread.start()
    thread.join()
    assert asyncio.run(shutdown.wait(WAIT_S)) is True


def test_a_remote_sleep_raises_cancelled_on_a_stop():
    """The remote route's sleeps wait on the shutdown (no polling): a stop ends one at once with Cancelled."""
    async def scenario() -> BaseException | None:
        shutdown = Shutdown()
        sleeping = asyncio.ensure_future(sleep_unless(shutdown, WAIT_S))
        await asyncio.sleep(0)
        thread = threading.Thread(target=shutdown.request, args=("from a thread",))
        thread.start()
        done, _ = await asyncio.wait({sleeping}, timeout=WAIT_S)
        thread.join()
        return sleeping.exception() if sleeping in done else None

    assert isinstance(asyncio.run(scenario()), Cancelled)
