"""Issue 13, item 12: stopping is driven by the signal, not by a wait running out. Real daemon
processes; no timing is asserted (bench/bench_stop.py measures how long a stop takes)."""

from __future__ import annotations

import os
import signal

from daemon_helpers import Daemon, write_speech_wav


def stop_events(daemon: Daemon) -> list[dict]:
    return [event for event in daemon.events(since_start=True)
            if event.get("event") in ("daemon.stopping", "job.parked", "daemon.stopped")]


def test_sigterm_mid_transcription_parks_the_job_without_waiting_out_the_drain(tmp_path):
    """SIGTERM while a long local transcription runs: the job is parked and the daemon stops clean
    (no bounded wait ran out on the way), exit 0; a restart takes the job up again."""
    daemon = Daemon(tmp_path)
    daemon.start()
    write_speech_wav(tmp_path / "long.part", 1, 240)
    os.rename(tmp_path / "long.part", daemon.inbox / "long.wav")
    daemon.wait_for(lambda: daemon.count("stage.extract") >= 1, timeout=120, what="extracted")
    assert daemon.stop(timeout=60) == 0
    events = stop_events(daemon)
    assert [event["event"] for event in events] == ["daemon.stopping", "job.parked", "daemon.stopped"], events
    assert events[-1]["clean"] is True and events[-1]["waited_out"] == [], events[-1]
    assert (daemon.inbox / "long.wav").exists() and not daemon.outputs()
    daemon.start()
    daemon.wait_for(lambda: daemon.count("ledger.recovered") >= 1, timeout=60, what="ledger.recovered")
    assert daemon.stop(timeout=60) == 0


def test_sigterm_when_idle_stops_clean_with_nothing_waited_out(tmp_path):
    """SIGTERM to an idle daemon: daemon.stopped follows daemon.stopping, clean, no wait ran out, exit 0."""
    daemon = Daemon(tmp_path).start()
    assert daemon.stop(timeout=60) == 0
    events = stop_events(daemon)
    assert [event["event"] for event in events] == ["daemon.stopping", "daemon.stopped"]
    assert events[-1]["clean"] is True and events[-1]["waited_out"] == []


def test_second_sigterm_exits_at_once_without_the_stop_path(tmp_path):
    """A second SIGTERM during a stop ends the process at once (exit 1, as docs/troubleshooting.md says), whatever
    the first stop was waiting on; the ledger keeps the job for the next start."""
    daemon = Daemon(tmp_path)
    daemon.start()
    write_speech_wav(tmp_path / "long.part", 2, 240)
    os.rename(tmp_path / "long.part", daemon.inbox / "long2.wav")
    daemon.wait_for(lambda: daemon.count("stage.extract") >= 1, timeout=120, what="extracted")
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for(lambda: daemon.count("daemon.stopping") >= 1, timeout=60, what="daemon.stopping")
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGTERM)
    code = daemon.process.wait(timeout=60)
    assert code in (0, 1)
    assert (daemon.inbox / "long2.wav").exists()
