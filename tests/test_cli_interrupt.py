"""`whisperdrop transcribe` and Ctrl-C (issue 13, item 1): run on a real terminal (a pty), interrupted
while it transcribes a long file."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from daemon_helpers import write_speech_wav


class TerminalRun:
    """A command with stdout and stderr on a pty; `read_until` collects what it prints."""

    def __init__(self, arguments: list[str], cwd: Path):
        self.master, slave = os.openpty()
        self.process = subprocess.Popen([sys.executable, "-m", "whisperdrop", *arguments], cwd=cwd,
                                        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
        os.close(slave)
        self.output = ""

    def read_until(self, text: str | None, timeout: float) -> None:
        """Read until `text` was printed (None: until the command closes the terminal)."""
        deadline = time.monotonic() + timeout
        while text is None or text not in self.output:
            assert time.monotonic() < deadline, (f"no {text!r}" if text else "no end") + \
                f" within {timeout} s:\n{self.output!r}"
            if select.select([self.master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: every writer of the terminal is gone
                    chunk = b""
                if not chunk:
                    assert text is None, f"the command ended before printing {text!r}:\n{self.output!r}"
                    return
                self.output += chunk.decode("utf-8", "replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)
        os.close(self.master)


def _files(tmp_path: Path) -> list[str]:
    write_speech_wav(tmp_path / "short.wav", 1, seconds=3)
    write_speech_wav(tmp_path / "long.wav", 2, seconds=900)
    write_speech_wav(tmp_path / "clip.wav", 3, seconds=3)
    return ["transcribe", "short.wav", "long.wav", "clip.wav", "-o", "out"]


def test_ctrl_c_stops_at_once_and_says_what_was_done(tmp_path):
    """Ctrl-C while the long file is transcribed ends the command (130) without running on to 100%:
    it clears the progress line, lists the file finished, the one stopped and the one not started,
    and writes nothing for the stopped file."""
    run = TerminalRun(_files(tmp_path), tmp_path)
    try:
        run.read_until("long.wav: transcribing", timeout=300)
        run.process.send_signal(signal.SIGINT)
        run.read_until(None, timeout=120)
        assert run.process.wait(timeout=60) == 130
    finally:
        run.close()
    output = run.output
    summary = output.index("\r\x1b[Kwhisperdrop transcribe: interrupted")  # the progress line cleared first
    assert ": transcribing" not in output[summary:], output[summary:]  # no progress after the summary
    assert "long.wav: transcribing 100.0%" not in output
    tail = output[summary:].replace("\r\n", "\n")
    assert "finished:    short.wav -> out/short.json" in tail, tail
    assert "stopped:     long.wav while transcribing it" in tail and "nothing written" in tail, tail
    assert "not started: clip.wav" in tail, tail
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "short.json", "short.srt", "short.txt", "short.vtt"]


def test_a_second_ctrl_c_exits_at_once_without_a_crash(tmp_path):
    """Two Ctrl-C in a row while transcribing end the command with 130, never a segmentation fault,
    and leave no output of the file in hand."""
    run = TerminalRun(_files(tmp_path), tmp_path)
    try:
        run.read_until("long.wav: transcribing", timeout=300)
        run.process.send_signal(signal.SIGINT)
        run.process.send_signal(signal.SIGINT)
        run.read_until(None, timeout=120)
        assert run.process.wait(timeout=60) == 130
    finally:
        run.close()
    assert not list((tmp_path / "out").glob("long*")) and not list((tmp_path / "out").glob("clip*"))
