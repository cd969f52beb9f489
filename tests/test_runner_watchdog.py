"""The runner's systemd watchdog follows the loop that does the work, not the main thread.

A real `whisperdrop runner` process with NOTIFY_SOCKET pointing at the test's own datagram socket and
WATCHDOG_USEC=1 s. Its engine's `transcribe` and `transcribe_many` are replaced (before the CLI starts) by one that hangs
until the runner cancels it: the serve loop is stuck inside a job, as with a wedged GPU driver.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from whisperdrop.gpu_runner.service import Liveness
from whisperdrop.shared.spool import TranscribeOptions, dumps, make_job_document

# Runs in the runner process: the real CLI, with an engine whose transcribe never returns by itself.
HANGING_RUNNER = """
import os, pathlib, sys
from whisperdrop.engine import engine

def hang(self, audio_path, options, *, cancel=None, **ignored):
    pathlib.Path(os.environ["HANG_MARKER"]).touch()
    cancel.wait()  # only the runner's stop releases it
    raise engine.Cancelled()

def hang_many(self, jobs, options, *, cancel=None, **ignored):
    hang(self, None, options, cancel=cancel)
    yield  # a generator, as transcribe_many is

engine.Engine.transcribe = hang
engine.Engine.transcribe_many = hang_many
from whisperdrop.cli.commands import main
sys.exit(main(sys.argv[1:]))
"""

QUIET_SECONDS = 3.0  # 6 ping periods without a ping: the runner has stopped pinging, not just been slow


@pytest.fixture
def notify_socket():
    """A bound AF_UNIX datagram socket on a short path (AF_UNIX paths end at 107 bytes)."""
    folder = tempfile.mkdtemp(prefix="wd-runner-notify-")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def _fields(sock: socket.socket) -> list[str]:
    try:
        return sock.recv(4096).decode().splitlines()
    except (socket.timeout, BlockingIOError):
        return []


def _submit(spool: Path) -> str:
    """A job whose audio passes the size and sha256 checks (the hanging engine never decodes it)."""
    audio = b"not really opus, never decoded" * 10
    job = hashlib.sha256(audio).hexdigest()
    for directory in ("incoming", "jobs"):
        (spool / directory).mkdir(parents=True, exist_ok=True)
    (spool / "incoming" / f"{job}.opus").write_bytes(audio)
    document = make_job_document(job, TranscribeOptions(model="bundled:tiny.en"), len(audio),
                                 hashlib.sha256(audio).hexdigest(), 11.0, "x.flac", time.time())
    (spool / "jobs" / f"{job}.json.tmp").write_bytes(dumps(document))
    os.replace(spool / "jobs" / f"{job}.json.tmp", spool / "jobs" / f"{job}.json")
    return job


def test_a_hung_serve_loop_stops_the_watchdog_pings(tmp_path, notify_socket):
    """While idle the runner pings WATCHDOG=1; once its serve loop hangs in a job the pings stop, and SIGTERM still parks the job."""
    sock, address = notify_socket
    spool = tmp_path / "spool"
    config = tmp_path / "runner.yaml"
    config.write_text(json.dumps({"runner": {
        "spool": str(spool), "name": "hung", "model": "bundled:tiny.en", "device": "cpu", "compute_type": "int8",
        "heartbeat_seconds": 0.5}}))  # JSON is YAML
    marker = tmp_path / "transcribe-entered"
    log_path = tmp_path / "runner.log"
    environment = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000", "HANG_MARKER": str(marker)}
    environment.pop("WATCHDOG_PID", None)
    with open(log_path, "wb") as output:
        process = subprocess.Popen([sys.executable, "-c", HANGING_RUNNER, "runner", "-c", str(config),
                                    "--log-format", "json"],
                                   cwd=tmp_path, env=environment, stdout=output, stderr=subprocess.STDOUT)
    try:
        # Idle, the loop turns over: pings arrive (the model is loaded by then, so the job below
        # does not wait on a model load, during which pings are owed).
        heartbeat = spool / "runners" / "hung.json"
        pings = 0
        deadline = time.monotonic() + 120
        while pings < 3 or not (heartbeat.exists() and json.loads(heartbeat.read_text())["state"] == "idle"):
            assert time.monotonic() < deadline, f"no idle pings: {log_path.read_text()[-3000:]}"
            assert process.poll() is None, log_path.read_text()[-3000:]
            pings += _fields(sock).count("WATCHDOG=1")

        job = _submit(spool)
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline, f"the job never reached the engine: {log_path.read_text()[-3000:]}"
            assert process.poll() is None, log_path.read_text()[-3000:]
            _fields(sock)

        # Hung: the pings must stop. Before the fix the main thread went on pinging every 0.5 s.
        last_ping = time.monotonic()
        deadline = last_ping + 60
        while time.monotonic() - last_ping < QUIET_SECONDS:
            assert time.monotonic() < deadline, "the runner kept pinging the watchdog while its loop was hung"
            assert process.poll() is None, log_path.read_text()[-3000:]
            if "WATCHDOG=1" in _fields(sock):
                last_ping = time.monotonic()

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        assert (spool / "jobs" / f"{job}.json").exists()  # parked for another runner, not lost
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_liveness_is_fresh_only_within_max_silence():
    """Liveness.alive() holds for max_silence seconds after the last beat, and a new beat restores it."""
    moment = [100.0]
    liveness = Liveness(10.0, clock=lambda: moment[0])
    assert liveness.alive()
    moment[0] = 109.9
    assert liveness.alive()
    moment[0] = 110.0
    assert not liveness.alive() and liveness.silent_for() == 10.0
    liveness.beat()
    assert liveness.alive(now=119.0) and not liveness.alive(now=120.5)
