"""No tracebacks from the CLI (issue 13, item 4): every mistake a user can make on the command line
gets one line that says what and what to do; results go to stdout, messages to stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from media import JFK


def whisperdrop(*arguments: str, cwd: Path, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisperdrop", *arguments], cwd=cwd, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=300)


def no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


def test_output_folder_that_cannot_be_made(tmp_path):
    """`-o /proc/nope` exits 2 with one line naming the folder and why, before any work."""
    done = whisperdrop("transcribe", str(JFK), "-o", "/proc/nope/out", cwd=tmp_path)
    no_traceback(done)
    assert done.returncode == 2
    assert "cannot create the output folder /proc/nope/out" in done.stderr


def test_output_naming_an_existing_file(tmp_path):
    """`-o` naming a file exits 2 and says it is a file, not a folder."""
    (tmp_path / "notes.txt").write_text("mine")
    done = whisperdrop("transcribe", str(JFK), "-o", "notes.txt", cwd=tmp_path)
    no_traceback(done)
    assert done.returncode == 2 and "-o notes.txt: that is a file" in done.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_folder_or_missing_file_as_input(tmp_path):
    """A folder given as input is called a folder (not "no such file"), a missing one "no such file";
    the good file among them is still transcribed, and the exit status is 1."""
    (tmp_path / "clips").mkdir()
    done = whisperdrop("transcribe", "clips", "gone.mp3", str(JFK), "-o", "out", cwd=tmp_path)
    no_traceback(done)
    assert done.returncode == 1
    assert "clips: FAILED: is a folder" in done.stderr and "no such file" not in done.stderr.split("gone.mp3")[0]
    assert "gone.mp3: FAILED: no such file" in done.stderr
    assert (tmp_path / "out" / "jfk.json").exists()


def test_results_on_stdout_messages_on_stderr_and_no_inbox_hint(tmp_path):
    """One-shot: the paths written are on stdout, a failure on stderr, and the hint for a file that is
    not media says nothing about an inbox (there is none in one-shot mode)."""
    (tmp_path / "notes.mp3").write_text("not audio")
    done = whisperdrop("transcribe", "notes.mp3", str(JFK), "-o", "out", cwd=tmp_path)
    no_traceback(done)
    assert done.returncode == 1
    # stdout is the paths written, one per line (issue 12: a script reads them); the summary is on stderr
    assert done.stdout.splitlines() == ["out/jfk.srt", "out/jfk.vtt", "out/jfk.txt", "out/jfk.json"]
    assert "jfk.flac: done" in done.stderr
    assert "notes.mp3: FAILED: not an audio or video file PyAV can read" in done.stderr
    assert "jfk.json" not in done.stderr
    assert "inbox" not in done.stderr and "whisperdrop transcribe" in done.stderr


def test_not_media_shows_pyavs_sentence_without_its_error_number(tmp_path):
    """`transcribe` on a text file named .mp4 says it is not an audio or video file PyAV can read, with
    PyAV's sentence as the evidence and without `[Errno 1094995529]` (issue 22, item 2)."""
    (tmp_path / "x.mp4").write_text("not a video\n")
    done = whisperdrop("transcribe", "x.mp4", "-o", "out", cwd=tmp_path)
    no_traceback(done)
    assert done.returncode == 1
    assert ("x.mp4: FAILED: not an audio or video file PyAV can read "
            "(PyAV: Invalid data found when processing input)") in done.stderr, done.stderr
    assert "Errno" not in done.stderr and "1094995529" not in done.stderr


def test_closed_stdout_is_not_a_traceback(tmp_path):
    """`check-config | head -0` (a reader that closed the pipe) ends quietly: no BrokenPipeError."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before anything is written
    try:
        done = whisperdrop("check-config", cwd=tmp_path, stdout=write_end)
    finally:
        os.close(write_end)
    no_traceback(done)
    assert "BrokenPipeError" not in done.stderr and done.returncode == 141


def test_yaml_error_names_the_file(tmp_path):
    """A YAML syntax error names the config file and its line, not `<unicode string>`."""
    (tmp_path / "broken.yaml").write_text("inbox: [unclosed\n")
    done = whisperdrop("check-config", "-c", "broken.yaml", cwd=tmp_path)
    no_traceback(done)
    assert done.returncode == 2
    assert "<unicode string>" not in done.stderr and "broken.yaml, line 2, column 1" in done.stderr, done.stderr


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_broken_yaml_is_one_item_of_the_problem_list(tmp_path, command):
    """Broken YAML is reported by `check-config` and by the daemon's start as one problem item, with
    the file, line and column, like every other problem: no PyYAML line outside the list (issue 22, item 3)."""
    (tmp_path / "broken.yaml").write_text("inbox: inbox\nwatch: {settle_seconds: 2\noutbox: out\n")
    done = whisperdrop(command, "-c", "broken.yaml", cwd=tmp_path)
    no_traceback(done)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "whisperdrop: broken.yaml: 1 problem(s) in the configuration:",
        "  - broken.yaml, line 3, column 7: not valid YAML: expected ',' or '}', but got ':' "
        "(while parsing a flow mapping that began at line 2, column 8)",
    ]


def test_config_path_that_is_a_folder(tmp_path):
    """`-c` naming a folder says it is a folder rather than claiming it does not exist."""
    done = whisperdrop("check-config", "-c", str(tmp_path), cwd=tmp_path)
    no_traceback(done)
    assert done.returncode == 2 and "is a folder" in done.stderr and "does not exist" not in done.stderr
