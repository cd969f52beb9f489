"""`whisperdrop status` tells the truth (issue 13, item 5): whether the daemon runs, what waits in
the inbox, and host figures with the age of the snapshot they come from."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from daemon_helpers import REPO, Daemon
from media import JFK
from whisperdrop.daemon.ledger import Ledger


def status(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisperdrop", "status", *arguments], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_status_says_whether_the_daemon_runs_and_what_waits_in_the_inbox(tmp_path):
    """While the daemon runs, status names it and its pid; after a kill -9, status says it is not
    running and counts the file dropped since, which nothing has taken."""
    daemon = Daemon(tmp_path, transcription={"provider": "local"})
    config = str(daemon.config_path)
    try:
        daemon.start()
        running = status("-c", config)
        assert running.returncode == 0, running.stderr
        assert f"daemon: running, pid {daemon.process.pid}" in running.stdout, running.stdout
        assert json.loads(status("--json", "-c", config).stdout)["daemon"]["running"] is True
        os.kill(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait(timeout=60)
        (daemon.inbox / "jfk.flac").write_bytes(JFK.read_bytes())
        stopped = status("-c", config)
        assert stopped.returncode == 0, stopped.stderr
        assert "daemon: NOT running" in stopped.stdout, stopped.stdout
        assert "inbox: 1 file(s), 0 of them taken" in stopped.stdout, stopped.stdout
        figures = json.loads(status("--json", "-c", config).stdout)
        assert figures["daemon"]["running"] is False and figures["inbox_files"] == 1
    finally:
        daemon.kill()


def test_a_second_daemon_on_the_same_state_dir_is_refused(tmp_path):
    """`run` while another daemon holds the state folder exits 2 naming that daemon's pid."""
    daemon = Daemon(tmp_path, transcription={"provider": "local"})
    try:
        daemon.start()
        second = subprocess.run([sys.executable, "-m", "whisperdrop", "run", "-c", str(daemon.config_path)],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert second.returncode == 2
        assert f"pid {daemon.process.pid}" in second.stderr and "already running" in second.stderr, second.stderr
        assert daemon.process.poll() is None
    finally:
        daemon.kill()


def test_host_figures_carry_the_snapshot_age_and_heartbeat_age_at_that_time(tmp_path):
    """A runner that beat 2 s before a 70 s old snapshot shows "heartbeat 2 s old" and the snapshot's
    age, never a 72 s heartbeat; a runner without a GPU prints no stray space before its comma."""
    (tmp_path / "inbox").mkdir()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"remote": {"hosts": [{"name": "gpu1", "host": "127.0.0.1"}]}}))
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite3")
    ledger.close()
    now = time.time()
    (tmp_path / "state" / "hosts.json").write_text(json.dumps({"updated_at": now - 70, "hosts": [
        {"name": "gpu1", "up": True, "failures": 0, "last_error": None, "in_flight": 1,
         "runners": [{"name": "gpu1-cpu0", "device": "cpu", "gpu": None, "queue_length": 0, "model": "small",
                      "updated_at": now - 72, "current": {"job_id": "ab" * 32}}]}]}))
    text = status("-c", str(path))
    assert text.returncode == 0, text.stderr
    seen = re.search(r"GPU hosts \(as the daemon last saw them, (\d+) (s|min) ago\):", text.stdout)
    assert seen and (int(seen.group(1)) >= 70 or seen.group(2) == "min"), text.stdout
    assert "heartbeat 2 s old" in text.stdout and "72 s" not in text.stdout, text.stdout
    assert "cpu , " not in text.stdout and "runner gpu1-cpu0: cpu, model small" in text.stdout, text.stdout
    runner = json.loads(status("--json", "-c", str(path)).stdout)["hosts"][0]["runners"][0]
    assert runner["heartbeat_age_s"] == 2.0
