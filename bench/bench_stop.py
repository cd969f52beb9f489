"""How long the daemon takes to stop: idle, mid-transcription, and on a second SIGTERM.

Runs real daemons (tests/daemon_helpers.Daemon, bundled tiny.en) and prints, for each case, the wall
time from the signal to the process's exit and the daemon's own `daemon.stopped` figures. A
benchmark, not a test: the tests (tests/test_daemon_stop.py) check that the stop waits on nothing
that can run out; this prints how long it takes on this machine.

    .venv/bin/python bench/bench_stop.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from daemon_helpers import Daemon, write_speech_wav  # noqa: E402


def stopped(daemon: Daemon) -> dict:
    return next((event for event in reversed(daemon.events()) if event.get("event") == "daemon.stopped"), {})


def one(case: str, root: Path) -> tuple[float, dict, int]:
    daemon = Daemon(root).start()
    if case != "idle":
        write_speech_wav(root / "long.part", 1, 240)
        os.rename(root / "long.part", daemon.inbox / "long.wav")
        daemon.wait_for(lambda: daemon.count("stage.extract") >= 1, timeout=120, what="extracted")
        time.sleep(2)  # into the transcription
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    if case == "second":
        daemon.wait_for(lambda: daemon.count("daemon.stopping") >= 1, timeout=60, what="stopping")
        started = time.monotonic()
        if daemon.process.poll() is None:
            daemon.process.send_signal(signal.SIGTERM)
    code = daemon.process.wait(timeout=60)
    return time.monotonic() - started, stopped(daemon), code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    for case in ("idle", "mid-job", "second"):
        walls, logged, codes = [], [], []
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as folder:
                wall, event, code = one(case, Path(folder))
            walls.append(wall)
            logged.append(event.get("seconds"))
            codes.append(code)
        print(f"{case:8s} signal to exit: median {statistics.median(walls):.2f} s (max {max(walls):.2f}); "
              f"daemon.stopped seconds {logged}; exit {codes}")


if __name__ == "__main__":
    main()
