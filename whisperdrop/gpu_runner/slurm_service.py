"""The Slurm runner as a process: `serve` steps a `slurm.SlurmRunner` until told to stop, with a
heartbeat thread beside it; `main` is `whisperdrop runner` with runner.backend slurm.

Signal handlers only set the stop flag; the loop sees it, stops stepping and writes a last heartbeat.
Jobs already in Slurm go on running after a stop, and the next start adopts them.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

from whisperdrop import __version__
from whisperdrop.gpu_runner.slurm import SlurmRunner
from whisperdrop.shared import log
from whisperdrop.shared.spool import ProtocolError

EXPIRE_EVERY_SECONDS = 3600.0


def serve(runner: SlurmRunner, stop: threading.Event) -> None:
    """Adopt, then step every runner.slurm.poll_seconds until `stop` is set; a heartbeat thread
    beats meanwhile. Jobs in Slurm go on running after a stop (the next start adopts them).
    Raises OSError when the spool or Slurm cannot be reached at the start."""
    runner.state = "starting"
    runner.log.info("runner.start", spool=runner.spool, backend="slurm", partition=runner.options["partition"],
                    version=__version__)
    held = runner.hold_lock()
    runner.heartbeat()
    runner.adopt()
    beat = threading.Thread(target=_beat, args=(runner, stop), name=f"runner-heartbeat-{runner.name}", daemon=True)
    beat.start()
    runner.state = "idle"
    poll = float(runner.options["poll_seconds"])
    last_expire = -math.inf
    try:
        while not stop.is_set():
            moment = time.monotonic()
            try:
                if moment - last_expire >= EXPIRE_EVERY_SECONDS:
                    last_expire = moment
                    runner.expire()
                worked = runner.step()
            except OSError as error:
                runner.log.error("runner.spool_error", error=str(error))
                worked = False
            if not worked:
                stop.wait(poll)
    finally:
        stop.set()
        beat.join()
        if held is not None:
            os.close(held)
        runner.state = "stopped"
        try:
            runner.heartbeat()
        except OSError as error:
            runner.log.warning("runner.heartbeat_failed", error=str(error))
        runner.log.info("runner.stopped", jobs_done=runner.jobs_done, jobs_failed=runner.jobs_failed,
                        in_slurm=len(runner.tracked))


def _beat(runner: SlurmRunner, stop: threading.Event) -> None:
    while not stop.wait(runner.heartbeat_seconds):
        try:
            runner.heartbeat()
        except Exception:  # this thread must outlive any one bad beat
            runner.log.exception("runner.heartbeat_failed")


def main(config: Any) -> int:
    """`whisperdrop runner` with runner.backend slurm: serve until SIGTERM or SIGINT; 0 on a clean
    stop, 2 when it cannot start."""
    import signal

    stop = threading.Event()
    logger = log.get("runner", backend="slurm")

    def on_stop(signum: int, frame: Any) -> None:
        stop.set()

    previous = {number: signal.signal(number, on_stop) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            runner = SlurmRunner(config["runner"], config_path=str(config.source) if config.source else None)
            serve(runner, stop)
        except (ProtocolError, OSError) as error:
            logger.error("runner.cannot_start", error=str(error))
            return 2
        return 0
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
