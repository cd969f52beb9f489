"""systemd integration: the unit files verify cleanly, the daemon speaks sd_notify on a socket of
the test's own (READY=1, WATCHDOG=1, STATUS=, STOPPING=1), Notifier's rules, and SIGHUP reopening
logging.file after logrotate moved it."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from daemon_helpers import REPO, Daemon
from sshd import skip_or_fail
from whisperdrop.shared.notify import Notifier

UNITS = ("whisperdrop.service", "whisperdrop-runner.service")
SHIPPED_BINARY = "/opt/whisperdrop/venv/bin/whisperdrop"


def _unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies_without_any_warning(unit, tmp_path):
    """The shipped unit, with ExecStart pointed at this venv's real whisperdrop, passes `systemd-analyze verify` silently."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        skip_or_fail("needs systemd-analyze (apt-get install systemd)")
    text = (REPO / "systemd" / unit).read_text()
    assert f"ExecStart={SHIPPED_BINARY} " in text
    binary = Path(sys.executable).parent / "whisperdrop"
    assert binary.is_file(), f"{binary} missing: pip install -e . in the venv"
    # verify needs the binary to exist; the rest of the unit is checked exactly as shipped.
    # User=whisperdrop need not exist on this machine: verify does not resolve users (it says nothing).
    (tmp_path / unit).write_text(text.replace(SHIPPED_BINARY, str(binary)))
    checked = subprocess.run([analyze, "verify", str(tmp_path / unit)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == "", checked.stdout + checked.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_unit_has_the_promised_settings(unit):
    """Each unit is Type=notify with a watchdog, restarts on failure, runs as its own user and is hardened."""
    settings = _unit_settings((REPO / "systemd" / unit).read_text())
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    assert settings["Restart"] == ["on-failure"] and settings["WatchdogSec"]
    assert settings["User"][0].startswith("whisperdrop")
    for key, value in (("NoNewPrivileges", "true"), ("ProtectSystem", "strict"), ("PrivateTmp", "true"),
                       ("ProtectHome", "true")):
        assert settings[key] == [value], key
    assert settings["ReadWritePaths"]
    assert "/etc/whisperdrop/" in settings["ExecStart"][0]


def _bind_datagram(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    return sock


def _receive(sock: socket.socket) -> list[str]:
    try:
        return sock.recv(4096).decode().splitlines()
    except (socket.timeout, BlockingIOError):
        return []


def test_daemon_sends_ready_watchdog_and_status_to_notify_socket(tmp_path):
    """A real daemon with NOTIFY_SOCKET and WATCHDOG_USEC=1 s sends READY=1, STATUS=, WATCHDOG=1 again and again, STOPPING=1.

    The pings' period (half of WatchdogSec) is pinned on a fake clock by the tick and Notifier tests below.
    """
    folder = tempfile.mkdtemp(prefix="wd-notify-")  # a short path: AF_UNIX paths end at 107 bytes
    sock = _bind_datagram(os.path.join(folder, "notify"))
    daemon = Daemon(tmp_path)
    try:
        daemon.start(wait_ready=False, env={"NOTIFY_SOCKET": os.path.join(folder, "notify"),
                                            "WATCHDOG_USEC": "1000000"})
        fields: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and fields.count("WATCHDOG=1") < 3:
            assert daemon.process.poll() is None, daemon.tail()
            fields += _receive(sock)
        assert "READY=1" in fields, fields
        assert fields.count("WATCHDOG=1") >= 3, fields
        assert any(field.startswith("STATUS=") for field in fields), fields
        assert fields.index("READY=1") < fields.index("WATCHDOG=1")
        assert daemon.stop() == 0
        tail = []
        while True:
            received = _receive(sock)
            if not received:
                break
            tail += received
        assert "STOPPING=1" in tail, tail
    finally:
        daemon.kill()
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_notifier_reaches_an_abstract_socket():
    """NOTIFY_SOCKET='@name' addresses the abstract namespace; READY=1 and STATUS= arrive in one datagram."""
    name = f"wd-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled and notifier.ready(status="watching")
        assert sock.recv(4096).decode().splitlines() == ["READY=1", "STATUS=watching"]


def test_notifier_does_nothing_without_notify_socket():
    """Without NOTIFY_SOCKET every call returns False and no watchdog interval is set."""
    notifier = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.watchdog() and not notifier.status("x") and not notifier.stopping()
    assert not notifier.tick(status="x", now=100.0)


def test_notifier_ignores_a_watchdog_meant_for_another_process():
    """WATCHDOG_PID naming another process leaves the watchdog off; a missing or matching one turns it on at half the period."""
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000",
                     "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 0.5
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "3000000"}).watchdog_interval == 1.5


def test_tick_pings_at_half_the_watchdog_period_and_sends_status_on_change(tmp_path):
    """tick() (the runner's hook) sends WATCHDOG=1 once per half period however often it is called, and STATUS= only when it changes."""
    path = str(tmp_path / "n")
    with _bind_datagram(path) as sock:
        notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        sent = [notifier.tick(status="idle", now=moment) for moment in (10.0, 10.1, 10.4, 10.5, 10.9, 11.0)]
        assert sent == [True, False, False, True, False, True]
        notifier.tick(status=lambda: "busy", now=11.1)
        received = []
        while (fields := _receive(sock)):
            received += fields
        assert received == ["WATCHDOG=1", "STATUS=idle", "WATCHDOG=1", "WATCHDOG=1", "STATUS=busy"]


def test_sighup_reopens_the_log_file_after_it_was_renamed(tmp_path):
    """After logrotate-style rename and SIGHUP, the daemon writes its next JSON lines to a new logging.file."""
    log_file = tmp_path / "logs" / "whisperdrop.log"
    daemon = Daemon(tmp_path, logging={"format": "json", "file": str(log_file)})
    try:
        daemon.start()
        daemon.wait_for(lambda: log_file.exists() and "daemon.ready" in log_file.read_text(), timeout=30,
                        what="daemon.ready in logging.file")
        rotated = log_file.with_name("whisperdrop.log.1")
        os.rename(log_file, rotated)
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for(log_file.exists, timeout=10, what="a new log file after SIGHUP")
        assert daemon.stop() == 0
        new_lines = log_file.read_text().splitlines()
        assert any('"daemon.stopped"' in line for line in new_lines), new_lines
        assert "daemon.stopped" not in rotated.read_text()
        assert "daemon.ready" in rotated.read_text()
    finally:
        daemon.kill()
