"""A console log a person can read (issue 13, item 9): the real daemon on a real terminal (a pty of
80 columns) with `logging.format: auto`."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import yaml

from daemon_helpers import write_speech_wav

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
COLUMNS = 80


class TerminalDaemon:
    """`whisperdrop run` with its stdout and stderr on a pty of COLUMNS columns; `read_until` collects
    what it prints."""

    def __init__(self, root: Path, settings: dict):
        (root / "inbox").mkdir()
        self.inbox = root / "inbox"
        (root / "config.yaml").write_text(yaml.safe_dump(settings))
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
        env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
        self.process = subprocess.Popen([sys.executable, "-m", "whisperdrop", "run", "-c", "config.yaml"], cwd=root,
                                        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        self.output = ""

    def read_until(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{self.output}"
            assert self.process.poll() is None or select.select([self.master], [], [], 0)[0], self.output
            if select.select([self.master], [], [], 0.5)[0]:
                try:
                    self.output += os.read(self.master, 65536).decode("utf-8", "replace")
                except OSError:  # EIO: the daemon closed the terminal
                    break

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.read_until("daemon.stopped", timeout=60)
            finally:
                self.process.wait(timeout=60)
        os.close(self.master)


def test_console_log_is_readable_on_a_terminal(tmp_path):
    """On an 80-column terminal each line starts with the local time or is an indented continuation,
    fits the width, shows job ids cut to 12 digits, has no `=None`; a long transcription logs its
    progress (here every report: logging.progress_seconds 0)."""
    daemon = TerminalDaemon(tmp_path, {"watch": {"settle_seconds": 0.5}, "transcription": {"provider": "local"},
                                       "logging": {"format": "auto", "progress_seconds": 0}})
    try:
        daemon.read_until("daemon.ready", timeout=120)
        write_speech_wav(tmp_path / "talk.wav.part", 1, seconds=30)
        os.rename(tmp_path / "talk.wav.part", daemon.inbox / "talk.wav")
        daemon.read_until("job.done", timeout=600)
    finally:
        daemon.stop()
    lines = ANSI.sub("", daemon.output).replace("\r\n", "\n").splitlines()
    events = [line for line in lines if not line.startswith(" ")]
    assert events and all(re.match(r"\d\d:\d\d:\d\d (info |WARN |ERROR|debug) \S", line) for line in events), lines
    assert all(len(line) <= COLUMNS for line in lines), [line for line in lines if len(line) > COLUMNS]
    assert not re.search(r"[0-9a-f]{64}", daemon.output) and re.search(r"job=[0-9a-f]{12}\b", daemon.output)
    assert "=None" not in daemon.output
    progress = [line for line in events if " job.progress " in f"{line} "]
    assert progress and "percent=" in daemon.output, lines
    assert next(index for index, line in enumerate(lines) if "job.progress" in line) < \
        next(index for index, line in enumerate(lines) if "job.done" in line)
