"""Footprint: the idle daemon's CPU seconds per minute and its memory, before and after a model is loaded.

A real daemon (shipped watch settings, local CPU route, no remote hosts) on an empty inbox. After it
is ready and has settled for a few seconds, one idle window (60 s; 20 s with --quick) is cut into 3
equal parts: CPU seconds (utime + stime from /proc/PID/stat) per minute in each, RSS (VmRSS) at the end
of each; the figures are the medians. Then jfk.flac is dropped (the local engine loads tiny.en and
transcribes it), the daemon settles again, and the same window is measured. The ratio is after/before.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time

from common import JFK, Context, Row, cpu_seconds, ratio, rss_mib
from whisperdrop.shared import config

SECTION = "footprint"
PARTS = 3
SETTLE_AFTER = 5.0  # seconds between the daemon going quiet and the window


def _idle_window(pid: int, seconds: float) -> tuple[list[float], list[float]]:
    """CPU seconds per minute and RSS (MiB) for each of PARTS equal parts of `seconds`."""
    per_minute, rss = [], []
    part = seconds / PARTS
    for _ in range(PARTS):
        before, started = cpu_seconds(pid), time.monotonic()
        time.sleep(part)
        used, elapsed = cpu_seconds(pid) - before, time.monotonic() - started
        per_minute.append(used * 60 / elapsed)
        rss.append(rss_mib(pid))
    return per_minute, rss


def run(context: Context) -> list[Row]:
    from daemon_helpers import Daemon

    scratch = context.scratch / SECTION
    scratch.mkdir()
    window = 20.0 if context.quick else 60.0
    defaults = config.defaults()
    (scratch / "daemon").mkdir()
    daemon = Daemon(scratch / "daemon",
                    watch={key: defaults["watch"][key] for key in ("settle_seconds", "rescan_seconds")},
                    transcription={"provider": "local"})
    try:
        daemon.start()
        pid = daemon.process.pid
        time.sleep(SETTLE_AFTER)
        cpu_before, rss_before = _idle_window(pid, window)
        shutil.copy(JFK, daemon.inbox / "jfk.flac")
        daemon.wait_for(lambda: (daemon.outbox / "jfk.json").exists(), timeout=300, what="jfk transcript")
        time.sleep(SETTLE_AFTER)
        cpu_after, rss_after = _idle_window(pid, window)
    finally:
        try:
            daemon.stop()
        except subprocess.TimeoutExpired:
            daemon.kill()
    how = (f"median of {PARTS} x {window / PARTS:.0f} s idle; rescan every {defaults['watch']['rescan_seconds']:g} s; "
           "/proc counts 10 ms ticks, so 0 means under one tick per part")
    cpu_a, cpu_b = statistics.median(cpu_after), statistics.median(cpu_before)
    rss_a, rss_b = statistics.median(rss_after), statistics.median(rss_before)
    return [
        Row(SECTION, "idle daemon CPU, after a model is loaded", round(cpu_a, 4), "CPU s/min", round(cpu_b, 4),
            "before any model", ratio(cpu_a, cpu_b), note=f"({how})", runs=[round(v, 4) for v in cpu_after]),
        Row(SECTION, "idle daemon memory (RSS), after a model is loaded", round(rss_a, 1), "MiB", round(rss_b, 1),
            "before any model", ratio(rss_a, rss_b), note="(VmRSS; tiny.en int8 stays loaded for the next local job)",
            runs=[round(v, 1) for v in rss_after]),
    ]
