"""`whisperdrop run`: the daemon. Watch the inbox, feed the pipeline, talk to systemd, stop cleanly.

First SIGTERM (or Ctrl-C): stop taking files, park or finish the current stages, exit 0 within
`STOP_TIMEOUT_S`. A second one exits at once; the ledger resumes everything on the next start.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from whisperdrop import log
from whisperdrop.daemon.notify import Notifier
from whisperdrop.daemon.pipeline import Pipeline
from whisperdrop.daemon.watch import InboxWatcher

STOP_TIMEOUT_S = 8.0


def build_remote(config: Any) -> Any | None:
    """The remote route (GPU hosts over SSH), or None when no hosts are configured."""
    if not config.remote.hosts:
        return None
    from whisperdrop.daemon.remote import RemotePool

    return RemotePool(config)


async def serve(config: Any, notifier: Notifier | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the exit status."""
    logger = log.get("daemon")
    notifier = notifier or Notifier()
    remote = build_remote(config)
    pipeline = Pipeline(config, remote=remote)
    await pipeline.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(number: int) -> None:  # only sets flags; the loop does the work
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            os._exit(1)
        stop.set()

    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, on_signal, number)
    loop.add_signal_handler(signal.SIGHUP, log.reopen)

    recovered = await pipeline.recover()
    watcher = InboxWatcher(
        config.inbox, settle_seconds=config.watch.settle_seconds, rescan_seconds=config.watch.rescan_seconds,
        recursive=config.watch.recursive, ignore=list(config.watch.ignore),
    )
    intake: set[asyncio.Task] = set()

    def on_ready(path) -> None:
        task = loop.create_task(pipeline.take(path))
        intake.add(task)
        task.add_done_callback(intake.discard)

    watch_task = loop.create_task(watcher.run(on_ready), name="watcher")
    await watcher.started.wait()
    logger.info(
        "daemon.ready", inbox=str(config.inbox), outbox=str(config.outbox), provider=config.transcription.provider,
        hosts=[host["name"] for host in config.remote.hosts], recovered_jobs=recovered, pid=os.getpid(),
        config=str(config.source) if config.source else "embedded default",
    )
    notifier.ready(status="watching the inbox")
    heartbeat = loop.create_task(_keep_systemd_informed(notifier, pipeline, stop), name="notify")
    await stop.wait()

    started = time.monotonic()
    notifier.stopping()
    logger.info("daemon.stopping", busy_jobs=pipeline.busy())
    watch_task.cancel()
    heartbeat.cancel()
    for task in list(intake):
        task.cancel()
    parked = await pipeline.drain(STOP_TIMEOUT_S)
    if remote is not None:
        await remote.close()
    pipeline.close()
    await asyncio.gather(watch_task, heartbeat, *intake, return_exceptions=True)
    logger.info("daemon.stopped", seconds=round(time.monotonic() - started, 3), clean=parked)
    return 0


async def _keep_systemd_informed(notifier: Notifier, pipeline: Pipeline, stop: asyncio.Event) -> None:
    """WATCHDOG=1 at half of WatchdogSec, and a STATUS= line with the queue and the current job."""
    interval = notifier.watchdog_interval or 5.0
    last_status = ""
    while not stop.is_set():
        if notifier.watchdog_interval:
            notifier.watchdog()
        current = next(iter(pipeline.current.items()), None)
        status = f"{pipeline.busy()} job(s) in progress"
        if current:
            status += f"; {current[0][:12]} at {current[1]}"
        if status != last_status:
            notifier.status(status)
            last_status = status
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except asyncio.TimeoutError:
            pass
