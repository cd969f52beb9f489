"""One rule for a GPU host's runners: `doctor` and the daemon's routing read the same heartbeats over a
real sshd and judge them with the same function (health.live_runners), so they never disagree."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from whisperdrop.daemon import doctor
from whisperdrop.daemon.remote import RemotePool
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.shared import config as config_module

TIMEOUT_S = 10.0


def write_heartbeat(spool: Path, **fields) -> None:
    (spool / "runners").mkdir(parents=True, exist_ok=True)
    document = {"name": "gpu-test-0", "host": "gpu-test", "pid": 1, "device": "cuda", "gpu": "Test GPU",
                "model": "large-v3", "queue_length": 0, "updated_at": time.time(), "heartbeat_seconds": 5, **fields}
    temporary = spool / "runners" / ".gpu-test-0.json.tmp"  # whole or not at all, as the runner writes it
    temporary.write_text(json.dumps(document))
    temporary.replace(spool / "runners" / "gpu-test-0.json")


def verdicts(tmp_path: Path, settings: dict) -> tuple[list[doctor.Check], str | None]:
    """(doctor's checks of the host, routing's reason for having no runner there: None when it has one)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"transcription": {"provider": "remote"},
                                    "remote": {"hosts": [settings], "heartbeat_max_age": 60}}))
    config = config_module.load(path)

    async def both() -> tuple[list[doctor.Check], str | None]:
        checks = await doctor.check_host(dict(settings), config.remote, TIMEOUT_S, time.time())
        pool = RemotePool(config)
        try:
            gone = await pool.runners_gone(pool.states[0], Shutdown())
        finally:
            await pool.close()
        return checks, gone

    return asyncio.run(both())


@pytest.mark.parametrize("case", ["live", "skewed", "stopped", "stale"])
def test_doctor_and_routing_agree_on_a_runner(case, sshd, tmp_path):
    """A live runner passes both, even one whose clock is an hour behind ours while its heartbeat keeps
    changing; a stopped one (current timestamp) and a stale one (old and unchanged across a second
    read) fail both, with the same reason."""
    if case == "live":
        write_heartbeat(sshd.spool)
    elif case == "skewed":
        stop = threading.Event()

        def beat() -> None:  # a runner an hour behind that beats every 0.05 s
            while not stop.is_set():
                write_heartbeat(sshd.spool, updated_at=time.time() - 3600, heartbeat_seconds=0.05,
                                sequence=time.monotonic_ns())
                stop.wait(0.05)

        writer = threading.Thread(target=beat, name="heartbeat-skewed")
        writer.start()
    elif case == "stopped":
        write_heartbeat(sshd.spool, state="stopped")
    else:  # an hour old by our clock and never changing; it beats every 0.05 s, so the second read comes soon
        write_heartbeat(sshd.spool, updated_at=time.time() - 3600, heartbeat_seconds=0.05)
    try:
        checks, gone = verdicts(tmp_path, sshd.host_settings())
    finally:
        if case == "skewed":
            stop.set()
            writer.join()
    runner = [check for check in checks if check.step.startswith("runner")]
    assert len(runner) == 1, checks
    if case in ("live", "skewed"):
        assert runner[0].ok and runner[0].step == "runner gpu-test-0" and gone is None, (runner, gone)
        return
    assert not runner[0].ok and gone is not None, (runner, gone)
    expected = "gpu-test-0 stopped" if case == "stopped" else "gpu-test-0's heartbeat did not change while watched"
    assert expected in runner[0].detail and expected in gone, (runner[0].detail, gone)
