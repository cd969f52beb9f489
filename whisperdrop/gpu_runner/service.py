"""The runner service: the worker's step in a loop, with threads, signals, heartbeat and watchdog.

`Runner.serve(stop)` runs `Worker.step` until `stop` is set: a heartbeat thread writes
runners/<name>.json, a watchdog observer on jobs/ plus a rescan timer wakes the loop (a missed event
delays a job, never loses it), dead runners' claims are returned and leftovers expired. `main(config)`
is the `whisperdrop runner` entry point: signals set flags, and systemd's watchdog is pinged only
while the serve loop shows life (`Liveness`), so a hung loop gets the unit restarted.

Direction of imports: service -> worker -> store -> spool, files.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Any, Callable

from whisperdrop import __version__
from whisperdrop.engine.engine import Engine, EngineError
from whisperdrop.gpu_runner.worker import Worker
from whisperdrop.shared import log
from whisperdrop.shared.notify import Notifier
from whisperdrop.shared.spool import ProtocolError

RESCAN_SECONDS = 2.0        # jobs/ is rescanned at least this often, whatever watchdog reports
IDLE_FIRST_SECONDS = 0.05   # first idle wait; doubles up to RESCAN_SECONDS
EXPIRE_EVERY_SECONDS = 3600.0
MAX_SILENCE_SECONDS = 60.0  # without a systemd watchdog: how long the loop may show no life


class Liveness:
    """When the work loop last showed life, so that only a loop that moves gets the watchdog pinged.

    The loop calls `beat()` each turn and the worker on each claim and transcribed segment; the
    thread that pings asks `alive(now)`: True when the last beat is under `max_silence` seconds old.
    Times are `time.monotonic()` seconds.
    """

    def __init__(self, max_silence: float, clock: Callable[[], float] = time.monotonic):
        self.max_silence = float(max_silence)
        self.clock = clock
        self.last = clock()

    def beat(self) -> None:
        self.last = self.clock()

    def alive(self, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        return now - self.last < self.max_silence

    def silent_for(self, now: float | None = None) -> float:
        return (self.clock() if now is None else now) - self.last


class Runner:
    """One runner over a spool directory: a `Worker` and the loop, threads and liveness around it.

    `settings`, `engine`, `clock` and `name` go to `Worker` (see there; raises what it raises).
    `max_silence` is how long the serve loop may show no life before `alive()` says False (main
    passes systemd's WatchdogSec).
    """

    def __init__(self, settings: dict, *, engine: Engine | None = None, clock: Callable[[], float] = time.time,
                 name: str | None = None, max_silence: float = MAX_SILENCE_SECONDS):
        self.liveness = Liveness(max_silence)
        self.worker = Worker(settings, engine=engine, clock=clock, name=name, alive=self.liveness.beat)
        self.name, self.spool, self.layout, self.engine = (
            self.worker.name, self.worker.spool, self.worker.layout, self.worker.engine)
        self.log = self.worker.log
        self._wake = threading.Event()     # set by watchdog events on jobs/ and by stop

    # The worker's operations, for callers that hold a Runner (the CLI, tests, benchmarks).
    def step(self, now: float | None = None) -> bool:
        return self.worker.step(now)

    def heartbeat(self, now: float | None = None) -> None:
        self.worker.heartbeat(now)

    def reclaim_stale(self, now: float | None = None) -> list[str]:
        return self.worker.reclaim_stale(now)

    def expire(self, now: float | None = None) -> int:
        return self.worker.expire(now)

    def preload(self) -> None:
        self.worker.preload()

    def queue_length(self) -> int:
        return self.worker.queue_length()

    def alive(self) -> bool:
        """Whether the serve loop showed life within `max_silence`, or is waiting on a model load
        (which reports no progress; its silence counts from when it ends)."""
        if self.worker.loading():
            self.liveness.beat()
            return True
        return self.liveness.alive()

    def status(self) -> str:
        """One line for systemd's STATUS=: the state and the queue length."""
        try:
            queue = self.worker.queue_length()
        except OSError as error:
            return f"{self.worker.state}, spool unreadable: {error}"
        return f"{self.worker.state}, queue {queue}"

    # ------------------------------------------------------------------------------------ serving

    def serve(self, stop: threading.Event) -> None:
        """Process jobs until `stop` is set; sets `stop` itself when it ends for another reason.

        On stop the job in hand is cancelled between segments and put back in jobs/. Returns within
        about one engine segment (or model load) of `stop.set()`. Raises what the first heartbeat
        raises (OSError: the spool is not writable).
        """
        worker = self.worker
        worker.cancel.clear()
        worker.state = "starting"
        self.liveness.beat()
        self.log.info("runner.start", spool=self.spool, model=worker.model, device=worker.device, gpu=worker.gpu,
                      compute_type=worker.compute_type, batch_size=worker.batch_size,
                      max_jobs_per_batch=worker.max_jobs, version=__version__)
        worker.heartbeat()
        worker.reclaim_stale()
        beat = threading.Thread(target=self._beat, args=(stop,), name=f"runner-heartbeat-{self.name}", daemon=True)
        beat.start()
        observer = self._watch_jobs()
        try:
            worker.state = "loading"
            worker.preload()
            worker.state = "idle"
            self._loop(stop)
        finally:
            stop.set()
            self._wake.set()
            beat.join()
            if observer is not None:
                observer.stop()
                observer.join()
            worker.state = "stopped"
            try:
                worker.heartbeat()
            except OSError as error:
                self.log.warning("runner.heartbeat_failed", error=str(error))
            self.log.info("runner.stopped", jobs_done=worker.jobs_done, jobs_failed=worker.jobs_failed)

    def _loop(self, stop: threading.Event) -> None:
        idle = IDLE_FIRST_SECONDS
        longest_wait = min(RESCAN_SECONDS, self.liveness.max_silence / 4)  # beat well inside max_silence
        last_reclaim = time.monotonic()
        last_expire = -math.inf
        while not stop.is_set():
            self.liveness.beat()
            moment = time.monotonic()
            if moment - last_expire >= EXPIRE_EVERY_SECONDS:
                last_expire = moment
                self._guarded(self.worker.expire)
            if moment - last_reclaim >= self.worker.heartbeat_seconds:
                last_reclaim = moment
                self._guarded(self.worker.reclaim_stale)
            worked = self._guarded(self.worker.step)
            if worked or stop.is_set():
                idle = IDLE_FIRST_SECONDS
                continue
            self._wake.wait(min(idle, longest_wait))
            self._wake.clear()
            idle = min(idle * 2, RESCAN_SECONDS)

    def _guarded(self, action: Callable[[], Any]) -> Any:
        """Run one loop action; an OSError (spool unreachable, disk full) is logged and waited out."""
        try:
            return action()
        except OSError as error:
            self.log.error("runner.spool_error", action=action.__name__, error=str(error))
            return None

    def _beat(self, stop: threading.Event) -> None:
        deadline = time.monotonic() + self.worker.heartbeat_seconds
        while not stop.wait(max(0.0, deadline - time.monotonic())):
            deadline += self.worker.heartbeat_seconds
            try:
                self.worker.heartbeat()
            except Exception:  # this thread must outlive any one bad beat, or others take our claims
                self.log.exception("runner.heartbeat_failed")
        self.worker.cancel.set()
        self._wake.set()

    def _watch_jobs(self) -> Any:
        """A watchdog observer that wakes the loop on any change in jobs/; None if it cannot start."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        wake = self._wake

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                wake.set()

        observer = Observer()
        try:
            observer.schedule(Wake(), self.layout.directory("jobs"), recursive=False)
            observer.start()
        except OSError as error:  # inotify limits: the rescan timer still finds every job
            self.log.warning("runner.watch_failed", error=str(error))
            return None
        return observer


def main(config: Any) -> int:
    """Run the runner from a validated config until SIGTERM or SIGINT; 0 on a clean stop, 1 after a
    crash of the serve loop, 2 when the runner cannot start.

    The first signal sets a flag: the job in hand is put back in jobs/ and the runner exits. A second
    one exits at once (its claim goes back at the next start). SIGHUP reopens the log file. Under
    systemd, WATCHDOG=1 goes out only while the serve loop shows life (`Runner.alive`).
    """
    stop = threading.Event()
    reopen = threading.Event()

    def on_stop(signum: int, frame: Any) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    def on_hangup(signum: int, frame: Any) -> None:
        reopen.set()

    previous = {number: signal.signal(number, handler)
                for number, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hangup))}
    logger = log.get("runner")
    notifier = Notifier()
    # The loop must show life once per WatchdogSec (twice the ping interval) to keep the pings going.
    max_silence = 2 * notifier.watchdog_interval if notifier.watchdog_interval else MAX_SILENCE_SECONDS
    try:
        try:
            runner = Runner(config["runner"], max_silence=max_silence)
        except (ProtocolError, EngineError, OSError) as error:
            logger.error("runner.cannot_start", error=str(error))
            return 2
        crashed: list[BaseException] = []

        def serve() -> None:
            try:
                runner.serve(stop)
            except BaseException as error:  # reported below, after the thread ends
                crashed.append(error)
                stop.set()

        # The loop runs in a thread so that the main thread stays free to run signal handlers at once.
        worker = threading.Thread(target=serve, name="runner-serve")
        worker.start()
        # READY before the model loads, so downloading large-v3 cannot hit systemd's start timeout.
        notifier.ready(status=f"serving {runner.spool}")
        withheld = False
        while worker.is_alive():
            if runner.alive():
                if withheld:
                    logger.info("runner.watchdog_resumed")
                    withheld = False
                notifier.tick(status=runner.status)
            elif not withheld:  # no ping: systemd restarts the unit after WatchdogSec
                withheld = True
                silent = round(runner.liveness.silent_for(), 1)
                logger.error("runner.watchdog_withheld", silent_s=silent, state=runner.worker.state,
                             job_id=runner.worker.in_hand())
                notifier.status(f"serve loop silent for {silent} s; watchdog pings withheld")
            worker.join(0.5)
            if reopen.is_set():
                reopen.clear()
                log.reopen()
        if crashed:
            logger.error("runner.crashed", error=f"{type(crashed[0]).__name__}: {crashed[0]}",
                         exc_info=crashed[0])
            return 1
        return 0
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
