"""Hand-back (issue 29): a long file and a GPU host that comes back, with `remote.hand_back` and without.

A real daemon (`python -m whisperdrop run`), a real OpenSSH sshd on 127.0.0.1 and a real runner process
(tiny.en on this CPU, the runner's defaults: both cores, batch_size 16) on the spool it serves; the
outage is sshd stopped (connections refused), the return sshd started again. The daemon's `local`
section is SLOW_LOCAL (one thread, float32, batches of 2: about 3x the runner's time on a quiet
machine), so that the CPU fallback is slower than the "GPU" runner and outlasts the 30 s outage, as a
workstation's CPU is slower than a GPU host (there tens of times); everything else is shipped
defaults but the provider (`auto`) and the first back-off (`remote.retry_initial_seconds` 80 s). Each daemon first sends a 2-minute file to
the runner, so the runner has measured its speed, as in steady state.

- Arriving right after the host returns: the host failed (a short clip fell back), so it has a
  back-off of 80 s (what five failures in a row reach at the shipped 5 s doubling); it is back once
  the probe interval (5 s) has passed, and a 10-minute file is dropped at once. Without hand-back it goes to the CPU until the
  back-off ends; with it, the job about to fall back probes the host and goes there.
- Started during an outage that ends after 30 s: the 10-minute file is dropped with sshd stopped (it
  falls back to the CPU) and sshd starts 30 s after the drop. Without hand-back it stays on the CPU;
  with it, the watch hands it to the host when the estimate says the host finishes sooner (shipped
  margin 1.5), and with margin 0 whenever the host is back (the mechanism's own cost).

Each figure: drop (rename into the inbox) -> outbox .json, wall clock, median of the runs, with the
route each took and when (seconds after the drop, from the daemon's log). The runner is this CPU too,
so a hand-back gains only what the runner's settings gain over SLOW_LOCAL's, and loses what the local
run had done (the host starts from zero).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from common import Context, Row, loopback_gpu_host, ratio, root_problem, section_folders, skipped

SECTION = "handback"
OUTAGE_S = 30.0
BACKOFF_S = 80.0
SLOW_LOCAL = {"threads": 1, "compute_type": "float32", "batch_size": 2}


def _moment(event: dict) -> float:
    return datetime.datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def _drop(daemon, staging: Path, name: str, index: int, seconds: float) -> float:
    """A distinct speech file renamed into the inbox; the wall clock of the rename."""
    from daemon_helpers import write_speech_wav

    staged = write_speech_wav(staging / name, index, seconds)
    os.utime(staged)
    started = time.time()
    os.rename(staged, daemon.inbox / name)
    return started


def _result(daemon, stem: str, timeout: float) -> tuple[float, dict]:
    """Poll (every 20 ms) for the stem's outbox .json; (the wall clock it appeared, the Result)."""
    path = daemon.outbox / f"{stem}.json"
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or daemon.process.poll() is not None:
            raise AssertionError(f"no {path.name} within {timeout:.0f} s:\n{daemon.tail()}")
        time.sleep(0.02)
    return time.time(), json.loads(path.read_text())


def _story(daemon, job_id: str, started: float) -> str:
    """The route a job took and when, in seconds after its drop: e.g. `cpu +1.2 s, gpu +31.5 s`."""
    steps = []
    for event in daemon.events():
        if event.get("job_id") != job_id:
            continue
        name = event.get("event")
        if name == "route.fallback":
            steps.append(f"cpu +{_moment(event) - started:.1f} s")
        elif name == "route.handback":
            steps.append(f"handed back at {event['done_s'] / event['duration_s']:.0%} +{_moment(event) - started:.1f} s")
        elif name == "stage.upload":
            steps.append(f"gpu +{_moment(event) - started:.1f} s")
        elif name == "transcribe.resumed":
            steps.append(f"cpu again from {event['done_s']:.0f} s +{_moment(event) - started:.1f} s")
    return ", ".join(steps) or "?"


def _wait_probe_due(daemon) -> None:
    """Until the host may be probed again (hosts.json's next_probe_at, the daemon's wall clock)."""
    health = daemon.root / "state" / "hosts.json"
    daemon.wait_for(lambda: all((host.get("next_probe_at") or 0) <= time.time()
                                for host in json.loads(health.read_text())["hosts"]), timeout=60,
                    what="the probe interval")


def _after_return(daemon, server, staging: Path, index: int, seconds: float) -> tuple[float, str, str]:
    """Fail the host (a short clip falls back), bring it back, drop the long file at once."""
    server.stop()
    _drop(daemon, staging, f"fail{index}.wav", 500 + index, 3.0)
    _result(daemon, f"fail{index}", 300)
    _wait_probe_due(daemon)
    server.start()
    started = _drop(daemon, staging, f"after{index}.wav", index, seconds)
    finished, result = _result(daemon, f"after{index}", 1800)
    return finished - started, result["executed_on"]["route"], _story(daemon, result["job_id"], started)


def _during_outage(daemon, server, staging: Path, index: int, seconds: float, outage: float) -> tuple[float, str, str]:
    """Stop the host, drop the long file, start the host `outage` seconds after the drop."""
    server.stop()
    started = _drop(daemon, staging, f"during{index}.wav", 100 + index, seconds)
    time.sleep(max(0.0, started + outage - time.time()))  # the outage is a length of time, not a condition
    server.start()
    finished, result = _result(daemon, f"during{index}", 1800)
    return finished - started, result["executed_on"]["route"], _story(daemon, result["job_id"], started)


def run(context: Context) -> list[Row]:
    problem = root_problem()
    if problem:
        return [skipped(SECTION, "hand-back to a returning GPU host", problem)]
    from daemon_helpers import Daemon

    scratch, staging = section_folders(context, SECTION)
    seconds = 180.0 if context.quick else 600.0
    outage = 15.0 if context.quick else OUTAGE_S
    variants = {"without": {"hand_back": False}, "with": {}, "with, margin 0": {"hand_back_margin": 0}}
    cases = {"after": ("without", "with"), "during": ("without", "with", "with, margin 0")}
    figures: dict[tuple[str, str], list[tuple[float, str, str]]] = {}
    daemons: dict[str, Daemon] = {}
    with loopback_gpu_host(scratch) as (server, _runner):
        try:
            for number, (variant, settings) in enumerate(variants.items()):  # idle beside each other
                root = scratch / f"daemon{number}"
                root.mkdir()
                daemons[variant] = Daemon(root, transcription={"provider": "auto"}, local=SLOW_LOCAL,
                                          remote={"hosts": [server.host_settings()], "retry_initial_seconds": BACKOFF_S,
                                                  **settings}).start()
                _drop(daemons[variant], staging, "warm.wav", 900 + number, 120.0)
                _result(daemons[variant], "warm", 600)
            for repeat in range(context.repeats):
                for case, names in cases.items():
                    for shift in range(len(names)):  # the variants in an order that rotates from run to run
                        variant = names[(repeat + shift) % len(names)]
                        index = 10 * repeat + list(variants).index(variant)
                        if case == "after":
                            outcome = _after_return(daemons[variant], server, staging, index, seconds)
                        else:
                            outcome = _during_outage(daemons[variant], server, staging, index, seconds, outage)
                        figures.setdefault((case, variant), []).append(outcome)
        finally:
            for daemon in daemons.values():
                try:
                    daemon.stop(timeout=60)
                except subprocess.TimeoutExpired:
                    daemon.kill()
    rows = []
    minutes = f"{seconds / 60:.0f} min file"
    labels = [("after", "with", f"{minutes} arriving right after the host returns (back-off {BACKOFF_S:.0f} s left)"),
              ("during", "with", f"{minutes} started on the CPU during an outage that ends after {outage:.0f} s"),
              ("during", "with, margin 0", f"{minutes} started on the CPU during an outage that ends after "
                                           f"{outage:.0f} s, remote.hand_back_margin 0")]
    for case, variant, label in labels:
        runs, baseline = figures[(case, variant)], figures[(case, "without")]
        value, base = statistics.median(run[0] for run in runs), statistics.median(run[0] for run in baseline)
        routes = "; ".join(f"{run[1]} in {run[0]:.0f} s: {run[2]}" for run in runs)
        before = "; ".join(f"{run[1]} in {run[0]:.0f} s: {run[2]}" for run in baseline)
        rows.append(Row(SECTION, f"{label}: drop -> Result, with hand-back vs without", round(value, 1), "s",
                        round(base, 1), "without (remote.hand_back false)", ratio(value, base),
                        note=f"(with: {routes} | without: {before}; median of {len(runs)} runs, variants in "
                             "rotating order; local: one thread, float32, batch_size 2; the runner: both cores, int8, batch_size 16; "
                             "tiny.en on this CPU for both)",
                        runs=[round(run[0], 1) for run in runs]))
    return rows
