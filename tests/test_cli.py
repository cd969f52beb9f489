"""The one-shot `whisperdrop transcribe` command and `check-config`, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

from daemon_helpers import jfk_reference, word_error_rate
from media import JFK, speech_with_pauses
from transcripts import assert_segments_in_order, missing_words


def whisperdrop(*arguments: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisperdrop", *arguments], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_transcribe_writes_outputs_and_leaves_the_source(tmp_path):
    """`transcribe FILE -o DIR` writes json/srt/vtt/txt into DIR, exits 0 and leaves the source where it was."""
    done = whisperdrop("transcribe", str(JFK), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out" / "jfk.json").read_text())
    assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
    assert_segments_in_order(result["segments"])
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["jfk.json", "jfk.srt", "jfk.txt", "jfk.vtt"]
    assert JFK.exists() and "jfk.json" in done.stdout  # the result on stdout; progress and messages on stderr


def test_transcribe_keeps_the_words_after_pauses(tmp_path):
    """`transcribe` on speech with mid-sentence pauses (jfk with its pause after "my fellow Americans," a
    second longer, said twice; espeak-ng sentences broken by a second of silence, the rest fading in):
    every word said is in the Result, and its segments keep their order (issue 30: batched decoding lost
    the word after the pause)."""
    recordings = speech_with_pauses(tmp_path)
    done = whisperdrop("transcribe", *(str(path) for path, _ in recordings.values()), "-o", str(tmp_path / "out"),
                       "--format", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name, (_, text) in recordings.items():
        result = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert missing_words(text, result["text"]) == [], (name, result["text"])
        assert_segments_in_order(result["segments"], name)


def test_transcribe_fails_nonzero_on_a_bad_file(tmp_path):
    """A file that is not media makes `transcribe` exit 1 with a message naming it, after doing the good ones."""
    bad = tmp_path / "notes.mp3"
    bad.write_text("not audio")
    done = whisperdrop("transcribe", str(bad), str(JFK), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1
    assert "notes.mp3: FAILED: not an audio or video file PyAV can read" in done.stderr
    assert (tmp_path / "out" / "jfk.json").exists()


def test_check_config_on_the_shipped_default(tmp_path):
    """`check-config` in an empty folder reports the embedded default as OK (run makes the default inbox) and creates nothing."""
    done = whisperdrop("check-config", cwd=tmp_path)
    assert done.returncode == 0 and "embedded default" in done.stdout and "made on first run" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_quick_start_runs_on_the_shipped_config(tmp_path):
    """`whisperdrop run` beside the shipped config.yaml (the README's quick start) makes its folders, gets ready and stops with 0."""
    import shutil
    import signal
    import time
    from pathlib import Path

    shutil.copy(Path(__file__).resolve().parents[1] / "config.yaml", tmp_path / "config.yaml")
    process = subprocess.Popen([sys.executable, "-m", "whisperdrop", "run", "--log-format", "json"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while '"daemon.ready"' not in line and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line or process.poll() is None, "the daemon exited before it was ready"
        assert '"daemon.ready"' in line
        assert all((tmp_path / name).is_dir() for name in ("inbox", "outbox", "archive", "failed", "state"))
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
