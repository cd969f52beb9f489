"""Issue 10's daemon bugs, end to end: a real daemon, a real sshd and, where one is needed, a real runner.

Each test pins the behaviour the issue expects; each failed against the code before its fix.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from daemon_helpers import Daemon, jfk_reference, word_error_rate, write_variant_wav
from media import JFK
from test_remote import FAST_REMOTE, RunnerProcess, result_of

PATIENT_REMOTE = {**FAST_REMOTE, "heartbeat_max_age": 10.0, "job_timeout": 900.0}
"""A job_timeout far beyond any wait in these tests: a job that falls back did so for another reason."""


def daemon_for(tmp_path: Path, host: dict, provider: str, **remote) -> Daemon:
    """A daemon in tmp_path/daemon with one GPU host and the PATIENT_REMOTE settings (plus `remote`)."""
    (tmp_path / "daemon").mkdir(exist_ok=True)
    return Daemon(tmp_path / "daemon", transcription={"provider": provider},
                  remote={**PATIENT_REMOTE, **remote, "hosts": [host]})


def spool_leftovers(spool: Path) -> list[str]:
    return [path.name for folder in ("incoming", "jobs", "work", "results")
            for path in (spool / folder).iterdir()] if (spool / "jobs").exists() else []


class HeartbeatWriter:
    """A stand-in runner that only writes its heartbeat, every `interval` s, with a clock `skew_s` off ours."""

    def __init__(self, spool: Path, name: str, skew_s: float, interval: float = 0.5):
        self.path = spool / "runners" / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.name, self.skew_s, self.interval = name, skew_s, interval
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"heartbeat-{name}", daemon=True)

    def _run(self) -> None:
        sequence = 0
        while not self.stop_event.is_set():
            sequence += 1
            document = {"name": self.name, "state": "idle", "updated_at": time.time() + self.skew_s,
                        "queue_length": 0, "heartbeat_seconds": self.interval, "sequence": sequence}
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(json.dumps(document))
            os.replace(temporary, self.path)
            self.stop_event.wait(self.interval)

    def __enter__(self) -> "HeartbeatWriter":
        self.write_once()
        self.thread.start()
        return self

    def write_once(self) -> None:
        self.path.write_text(json.dumps({"name": self.name, "state": "idle", "updated_at": time.time() + self.skew_s,
                                         "queue_length": 0, "sequence": 0}))

    def __exit__(self, *exc_info) -> None:
        self.stop_event.set()
        self.thread.join(10)


# bug 1: runner health


def test_a_stopped_runner_gets_no_jobs(sshd, tmp_path):
    """A runner whose last heartbeat says `stopped` is no runner: provider auto transcribes locally, with the reason."""
    runner = RunnerProcess(tmp_path, sshd.spool).start()
    runner.stop()  # a clean stop writes a last heartbeat with state "stopped" and a current updated_at
    assert json.loads((sshd.spool / "runners" / "gpu-test.json").read_text())["state"] == "stopped"
    daemon = daemon_for(tmp_path, sshd.host_settings(), "auto").start()
    try:
        write_variant_wav(daemon.inbox / "after-stop.wav", 3)
        result = result_of(daemon, "after-stop", timeout=120)
        assert result["executed_on"]["route"] == "local"
        assert "testhost" in result["fallback_reason"] and "stopped" in result["fallback_reason"]
        assert spool_leftovers(sshd.spool) == []
    finally:
        assert daemon.stop() == 0


def test_a_job_queued_on_a_runner_that_dies_goes_elsewhere(sshd, tmp_path):
    """A job submitted to a runner that then dies (heartbeat frozen) falls back within heartbeat_max_age,
    not job_timeout, and its remote files are removed."""
    writer = HeartbeatWriter(sshd.spool, "doomed", skew_s=0.0)
    daemon = daemon_for(tmp_path, sshd.host_settings(), "auto").start()
    try:
        with writer:  # alive while the job is submitted, then silent: the runner died with the job queued
            write_variant_wav(daemon.inbox / "orphan.wav", 4)
            jobs = sshd.spool / "jobs"
            daemon.wait_for(lambda: jobs.exists() and any(jobs.glob("*.json")), timeout=60, what="job submitted")
        result = result_of(daemon, "orphan", timeout=120)
        assert result["executed_on"]["route"] == "local"
        assert "testhost" in result["fallback_reason"] and "job_timeout" not in result["fallback_reason"]
        daemon.wait_for(lambda: spool_leftovers(sshd.spool) == [], timeout=60, what="remote files removed")
    finally:
        assert daemon.stop() == 0


def test_a_runner_whose_clock_is_an_hour_behind_is_healthy(sshd, tmp_path):
    """A runner that keeps writing heartbeats is alive whatever its clock says: the job is submitted to it."""
    daemon = daemon_for(tmp_path, sshd.host_settings(), "remote").start()
    try:
        with HeartbeatWriter(sshd.spool, "skewed", skew_s=-3600.0):
            shutil.copy(JFK, daemon.inbox / "jfk.flac")
            jobs = sshd.spool / "jobs"
            daemon.wait_for(lambda: jobs.exists() and any(jobs.glob("*.json")), timeout=60, what="job submitted")
    finally:
        assert daemon.stop() == 0
