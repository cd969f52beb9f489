"""`whisperdrop run`: the daemon. Watch the inbox, feed the pipeline, talk to systemd, stop cleanly.

First SIGTERM (or Ctrl-C): stop taking files, park or finish the current stages, exit 0 within
`STOP_TIMEOUT_S`. A second one exits at once; the ledger resumes everything on the next start.
"""

from __future__ import annotations

import asyncio
import io
import os
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from whisperdrop.daemon.metrics import MetricsWriter
from whisperdrop.daemon.pipeline import Pipeline
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.daemon.watch import InboxWatcher
from whisperdrop.engine import engine
from whisperdrop.engine.engine import Engine, EngineError
from whisperdrop.shared import log
from whisperdrop.shared.notify import Notifier

STOP_TIMEOUT_S = 8.0
STOP_DEADLINE_S = 9.5
TICK_S = 1.0  # the systemd/metrics loop's period; WATCHDOG=1 still goes out at half of WatchdogSec


def build_remote(config: Any) -> Any | None:
    """The remote route (GPU hosts over SSH), or None when no hosts are configured."""
    if not config.remote.hosts:
        return None
    from whisperdrop.daemon.remote import RemotePool

    return RemotePool(config)


def raise_open_file_limit(logger: Any) -> int:
    """Raise the soft limit on open files (RLIMIT_NOFILE) to the hard one: systemd's default soft
    limit, 1024, is low for a server (the HTTP API's connections each take one), and the hard limit
    is usually far higher. Logs `daemon.open_files`; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:  # the kernel's own ceiling then (an "unlimited" soft limit is refused)
        try:
            wanted = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            wanted = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as error:
            logger.warning("daemon.open_files", limit=soft, hard=hard, error=str(error),
                           hint="raise LimitNOFILE= in the unit (the shipped one sets 65536)")
            return soft
        logger.info("daemon.open_files", limit=wanted, hard=hard, raised_from=soft)
        return wanted
    logger.info("daemon.open_files", limit=soft, hard=hard)
    return soft


async def serve(config: Any, notifier: Notifier | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the exit status."""
    logger = log.get("daemon")
    raise_open_file_limit(logger)
    notifier = notifier or Notifier()
    remote = build_remote(config)
    shutdown = Shutdown()  # the one stop request: the pipeline (stages, intake, routes, API) and the watcher share it
    pipeline = Pipeline(config, remote=remote, shutdown=shutdown)
    if not await _check_local_model(config, pipeline, remote, logger):  # every job would fail: say so, exit
        if remote is not None:
            await remote.close()
        pipeline.close()
        return 1
    await pipeline.start()
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(number: int) -> None:  # only requests the stop; the loop does the work
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            os._exit(1)
        shutdown.request(signal.Signals(number).name)

    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, on_signal, number)
    loop.add_signal_handler(signal.SIGHUP, log.reopen)

    recovered = await pipeline.recover()
    api = await _start_api(config, pipeline, remote, logger)
    if api is False:  # api.listen is set but cannot be served: say so, exit
        await pipeline.drain(STOP_TIMEOUT_S)
        if remote is not None:
            await remote.close()
        pipeline.close()
        return 1
    watcher = InboxWatcher(
        config.inbox, settle_seconds=config.watch.settle_seconds, rescan_seconds=config.watch.rescan_seconds,
        recursive=config.watch.recursive, ignore=list(config.watch.ignore), on_closed=pipeline.closed,
        shutdown=shutdown,
    )
    intake: set[asyncio.Task] = set()

    def on_ready(path) -> None:
        task = loop.create_task(take_or_offer_again(pipeline, watcher, path))
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
    # Rendered in the writer's own thread: its aggregates scan the whole ledger.
    metrics = MetricsWriter(config.logging.metrics_textfile, pipeline.ledger.path,
                            config.path("state_dir") / "hosts.json", lambda: pipeline.ledger.db.total_changes,
                            api=api.figures if api is not None else None)
    heartbeat = loop.create_task(_keep_systemd_informed(notifier, pipeline, shutdown, metrics), name="notify")
    await shutdown.wait()

    started = time.monotonic()
    notifier.stopping()
    logger.info("daemon.stopping", busy_jobs=pipeline.busy())
    _arm_stop_deadline(logger)
    if api is not None:
        api.begin_stop()  # no new requests; the waiting ones answer 503 once their jobs are parked
    watch_task.cancel()  # the watcher returns on the shutdown by itself; this only makes sure
    heartbeat.cancel()
    for task in list(intake):
        task.cancel()
    waited_out = []  # the bounded waits that ran out: none, when the stop goes as it should
    parked = await pipeline.drain(STOP_TIMEOUT_S)
    if not parked:
        waited_out.append("jobs")
    if api is not None and not await api.stop():
        waited_out.append("api")
    if remote is not None:
        await remote.close()
    # Bounded: a task that lost its cancellation (see InboxWatcher.stop) must not hold the stop.
    _, pending = await asyncio.wait({watch_task, heartbeat, *intake}, timeout=STOP_TIMEOUT_S / 2)
    if pending:
        waited_out.append("watcher")
    await metrics.close()  # the last state, before the ledger closes
    pipeline.close()
    logger.info("daemon.stopped", seconds=round(time.monotonic() - started, 3), clean=parked and not pending,
                waited_out=waited_out)
    # The deadline stays armed: asyncio.run's own teardown (joining executor threads) comes after
    # this, and the caller exits the process right after it (see cli.cmd_run).
    return 0


async def take_or_offer_again(pipeline: Pipeline, watcher: InboxWatcher, path: Any) -> None:
    """The watcher's callback: take `path` (Pipeline.take); after a passing error (no file descriptor
    left), have the watcher forget it, so that its next rescan offers the file again."""
    if await pipeline.take(path):
        watcher.forget(path)


async def _start_api(config: Any, pipeline: Pipeline, remote: Any | None, logger: Any) -> Any:
    """The HTTP API on this loop when `api.listen` is set (None when it is not); False, with the
    reason logged, when it cannot listen there."""
    if not config.api.listen:
        return None
    from whisperdrop.daemon.api.app import ApiServer, ApiUnavailable

    server = ApiServer(config, pipeline, remote)
    try:
        await server.start()
    except ApiUnavailable as error:
        logger.error("api.unavailable", listen=config.api.listen, error=str(error))
        return False
    return server


LOCAL_MODEL_HINT = ("set local.model to bundled:tiny.en or a CTranslate2 model folder, or fetch the model on a "
                    "machine with network and point local.model at its folder (docs/models.md); "
                    "`whisperdrop doctor` checks it")


async def _check_local_model(config: Any, pipeline: Pipeline, remote: Any | None, logger: Any) -> bool:
    """Find at start whether the local model can load, as `doctor` does, instead of by every job
    looping in job.retry. Where every job runs here (provider local, or no hosts) the model is loaded
    now (the first job then finds it loaded); a failure is logged and False returned (`run` exits 1).
    Where the local engine is only the fallback (provider auto with hosts), the model is looked up
    without loading it; if it is missing, the fallback is switched off (jobs wait for a host) and a
    warning says why. True when the daemon can go on."""
    provider = config.transcription.provider
    if remote is not None and provider == "remote":
        return True
    every_job_local = remote is None or provider == "local"
    local = config.local
    try:
        await asyncio.get_running_loop().run_in_executor(
            None, _load_local_model if every_job_local else _find_local_model, local, pipeline.local.engine)
    except (EngineError, RuntimeError, ValueError, OSError) as error:
        message = str(error) if isinstance(error, EngineError) else f"{local.model}: {type(error).__name__}: {error}"
        if every_job_local:
            logger.error("daemon.local_unavailable", model=local.model, error=message, hint=LOCAL_MODEL_HINT,
                         fallback=None)
            return False
        pipeline.router.provider = remote.provider = "remote"  # the local rung is off: jobs wait for a host
        logger.warning("daemon.local_unavailable", model=local.model, error=message, fallback="off",
                       hint=f"jobs wait for a GPU host instead of falling back to this machine; {LOCAL_MODEL_HINT}")
    return True


def _find_local_model(local: Any, engine_object: Engine) -> None:
    """Raise EngineError when `local.model` is not available here (offline and not cached, no folder)."""
    engine.resolve_model_path(local.model)


def _load_local_model(local: Any, engine_object: Engine) -> None:
    """Load `local`'s model into the local route's engine, under the key its transcriptions use."""
    device = engine.resolve_device(local.device)
    engine_object.load(engine.ModelKey(local.model, device, engine.resolve_compute_type(local.compute_type, device),
                                       0, local.threads))


def _arm_stop_deadline(logger: Any) -> threading.Timer:
    """The promise behind SIGTERM: exit 0 within STOP_DEADLINE_S however the stop goes.

    Every stage is committed to the ledger before the next starts, so exiting from here is as safe
    as the kill -9 the crash tests prove harmless; the stacks of every thread are logged first, so
    a stop that hangs is still seen and can be fixed.
    """
    def expire() -> None:
        stacks = io.StringIO()
        for thread_id, frame in sys._current_frames().items():
            stacks.write(f"thread {thread_id}:\n{''.join(traceback.format_stack(frame))}\n")
        logger.error("daemon.stop_deadline", seconds=STOP_DEADLINE_S, stacks=stacks.getvalue(),
                     note="the stop took too long; exiting anyway: the ledger resumes every job on the next start")
        sys.stdout.flush()
        os._exit(0)

    timer = threading.Timer(STOP_DEADLINE_S, expire)
    timer.daemon = True
    timer.start()
    return timer


def _status_line(pipeline: Pipeline) -> str:
    """The STATUS= text: jobs in progress and the first one's stage."""
    status = f"{pipeline.busy()} job(s) in progress"
    current = next(iter(pipeline.current.items()), None)
    if current:
        status += f"; {current[0][:12]} at {current[1]}"
    return status


async def _keep_systemd_informed(notifier: Notifier, pipeline: Pipeline, shutdown: Shutdown,
                                 metrics: MetricsWriter | None = None) -> None:
    """WATCHDOG=1 at half of WatchdogSec, a STATUS= line with the queue and the current job, and the
    Prometheus textfile (`logging.metrics_textfile`) when it is due."""
    interval = min(notifier.watchdog_interval or TICK_S, TICK_S)
    while not shutdown.is_set():
        notifier.tick(status=lambda: _status_line(pipeline))
        if metrics is not None:
            metrics.step()
        await shutdown.wait(interval)
