"""The local pipeline end to end: a real daemon process, real PyAV, the real engine with tiny.en.

One daemon serves the module's drop-in tests (each test uses its own file names); the crash,
shutdown and unwritable-outbox tests start daemons of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from daemon_helpers import Daemon, jfk_reference, wait_failed, word_error_rate, write_variant_wav
from media import JFK, make_clip, make_text_as_mp3, make_truncated_mp4, make_video_without_audio, speech_with_pauses
from sshd import skip_or_fail
from transcripts import assert_segments_in_order, missing_words


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    running = Daemon(tmp_path_factory.mktemp("daemon")).start()
    yield running
    assert running.stop() == 0


def drop(daemon: Daemon, source: Path, relative: str) -> Path:
    """Copy `source` into the inbox the way a user would: a temporary name, then a rename."""
    target = daemon.inbox / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".part")
    shutil.copyfile(source, temporary)
    os.rename(temporary, target)
    return target


def wait_result(daemon: Daemon, relative_json: str, timeout: float = 90) -> dict:
    path = daemon.outbox / relative_json
    daemon.wait_for(path.exists, timeout=timeout, what=str(path))
    result = json.loads(path.read_text())
    assert_segments_in_order(result.get("segments") or [], str(path))  # every route keeps the invariant (issue 30)
    return result



def test_jfk_flac_gives_all_outputs_and_is_archived(daemon):
    """jfk.flac dropped in gives jfk.json (WER <= 10%, word timestamps), .srt, .vtt, .txt; the source is archived."""
    drop(daemon, JFK, "jfk.flac")
    result = wait_result(daemon, "jfk.json")
    assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
    assert result["schema"] == "whisperdrop.result/1"
    assert result["executed_on"]["route"] == "local" and result["language"] == "en"
    assert all(segment["words"] for segment in result["segments"])
    assert_segments_in_order(result["segments"])
    first_word = result["segments"][0]["words"][0]
    assert 0 <= first_word["start"] < first_word["end"] <= result["duration"] + 0.5
    assert result["source"]["path"] == "jfk.flac" and result["source"]["size"] == JFK.stat().st_size
    for key in ("settle_s", "extract_s", "transcribe_s", "total_s"):
        assert key in result["timings"]
    for suffix in ("srt", "vtt", "txt"):
        assert (daemon.outbox / f"jfk.{suffix}").stat().st_size > 0
    # One line per segment, and where whisper ends a segment varies: compare the words, not the lines.
    assert "ask not what your country" in " ".join((daemon.outbox / "jfk.txt").read_text().lower().split())
    # A move is link, fsync, unlink: wait until the source has left the inbox too.
    daemon.wait_for(lambda: (daemon.archive / "jfk.flac").exists() and not (daemon.inbox / "jfk.flac").exists(),
                    what="archive/jfk.flac, and the inbox without it")


def test_words_after_pauses_are_kept_on_the_daemons_default_path(daemon, tmp_path):
    """Speech with mid-sentence pauses (jfk with its pause after "my fellow Americans," a second longer,
    said twice; espeak-ng sentences broken by a second of silence, the rest fading in) dropped in: every
    word said is in the Result, and its segments keep their order (issue 30: batched decoding lost the
    word after the pause)."""
    recordings = speech_with_pauses(tmp_path)
    for name, (path, _) in recordings.items():
        drop(daemon, path, f"{name}.wav")
    for name, (_, text) in recordings.items():
        result = wait_result(daemon, f"{name}.json")
        assert result["executed_on"]["route"] == "local"
        assert missing_words(text, result["text"]) == [], (name, result["text"])
        assert_segments_in_order(result["segments"], name)


@pytest.mark.parametrize("container", ["wav", "mp3", "mp4"])
def test_other_containers_transcribe(daemon, tmp_path, container):
    """Clips in wav, mp3 and mp4 (with a video stream) give the same transcript."""
    clip = make_clip(tmp_path / f"clip.{container}", container, video=container == "mp4")
    drop(daemon, clip, f"formats/clip-{container}.{container}")
    result = wait_result(daemon, f"formats/clip-{container}.json")
    assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
    daemon.wait_for(lambda: (daemon.archive / "formats" / f"clip-{container}.{container}").exists(), what="archived")


def test_zero_byte_file_fails_with_a_clear_record(daemon):
    """An empty file goes to failed/ with an error record that says it is empty."""
    (daemon.inbox / "empty.mp3").write_bytes(b"")
    record = wait_failed(daemon, "empty.mp3")
    assert "empty" in record["error"].lower() and record["path"] == "empty.mp3"
    assert "inbox" in record["retry"]


def test_text_named_mp3_fails(daemon, tmp_path):
    """A text file named .mp3 goes to failed/ with a record that says it is not media."""
    make_text_as_mp3(daemon.inbox / "notes.mp3")
    record = wait_failed(daemon, "notes.mp3")
    assert record["kind"] == "media" and record["path"] == "notes.mp3"
    assert "not an audio or video file" in record["error"]
    assert record["what_to_do"]


def test_truncated_mp4_fails(daemon, tmp_path):
    """A truncated mp4 goes to failed/ and is not retried."""
    make_truncated_mp4(tmp_path / "cut.mp4")
    drop(daemon, tmp_path / "cut.mp4", "cut.mp4")
    record = wait_failed(daemon, "cut.mp4")
    assert record["kind"] == "media"


def test_video_without_audio_fails(daemon, tmp_path):
    """A video with no audio stream goes to failed/ with a record that names the missing audio stream."""
    make_video_without_audio(tmp_path / "silent.mp4")
    drop(daemon, tmp_path / "silent.mp4", "silent.mp4")
    record = wait_failed(daemon, "silent.mp4")
    assert "audio stream" in record["error"]


@pytest.mark.parametrize("name", ["with space.wav", "ünïcødé 日本.wav", "-leading-dash.wav", "new\nline.wav"])
def test_awkward_names(daemon, name):
    """Names with spaces, unicode, a leading dash or a newline are transcribed under the same stem."""
    index = ["with space.wav", "ünïcødé 日本.wav", "-leading-dash.wav", "new\nline.wav"].index(name)
    write_variant_wav(daemon.inbox / "names" / (name + ".part"), 20 + index)
    os.rename(daemon.inbox / "names" / (name + ".part"), daemon.inbox / "names" / name)
    result = wait_result(daemon, "names/" + name[: -len(".wav")] + ".json")
    assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
    daemon.wait_for(lambda: (daemon.archive / "names" / name).exists(), what="archived")


def test_symlink_pointing_outside_is_not_followed(daemon, tmp_path):
    """A symlink in the inbox to a file outside it is never read, moved or transcribed."""
    outside = write_variant_wav(tmp_path / "outside.wav", 30)
    link = daemon.inbox / "link.wav"
    link.symlink_to(outside)
    marker = write_variant_wav(daemon.inbox / "after-link.wav", 31)  # a file dropped after it, to know we waited
    wait_result(daemon, "after-link.json")
    daemon.wait_for(lambda: not marker.exists(), what="after-link.wav archived")  # its job is through
    assert link.is_symlink() and outside.exists()
    assert not (daemon.outbox / "link.json").exists()
    assert not marker.exists()


def test_same_file_dropped_twice_is_transcribed_once(daemon):
    """The same bytes dropped twice give one transcription; both copies are archived, each beside
    outputs of its own name (a-1.wav pairs with a-1.json, served from the first job)."""
    first = write_variant_wav(daemon.inbox / "twice" / "a.wav.part", 40)
    os.rename(first, daemon.inbox / "twice" / "a.wav")
    result = wait_result(daemon, "twice/a.json")
    daemon.wait_for(lambda: (daemon.archive / "twice" / "a.wav").exists(), what="first archived")
    again = write_variant_wav(daemon.inbox / "twice" / "a.wav.part", 40)
    os.rename(again, daemon.inbox / "twice" / "a.wav")
    daemon.wait_for(lambda: (daemon.archive / "twice" / "a-1.wav").exists(), what="second archived")
    transcribed = [event for event in daemon.events()
                   if event.get("event") == "stage.transcribe" and event.get("job_id") == result["job_id"]]
    assert len(transcribed) == 1
    daemon.wait_for(lambda: (daemon.outbox / "twice" / "a-1.json").exists(), what="a-1.json")
    assert json.loads((daemon.outbox / "twice" / "a-1.json").read_text())["job_id"] == result["job_id"]


def test_same_name_in_two_subfolders(daemon):
    """Two different files with one name in two subfolders give two results, mirrored, no collision."""
    write_variant_wav(daemon.inbox / "left" / "talk.wav", 50)
    write_variant_wav(daemon.inbox / "right" / "talk.wav", 51)
    left = wait_result(daemon, "left/talk.json")
    right = wait_result(daemon, "right/talk.json")
    assert left["job_id"] != right["job_id"]
    assert left["source"]["path"] == "left/talk.wav" and right["source"]["path"] == "right/talk.wav"


@pytest.mark.slow
def test_slowly_written_file_is_taken_only_when_done(daemon):
    """A file written over 20 seconds is transcribed once, from its complete content."""
    content = write_variant_wav(daemon.root / "slow-source.wav", 60).read_bytes()
    target = daemon.inbox / "slow.wav"
    pieces = 50
    size = len(content) // pieces + 1
    with open(target, "wb") as stream:
        for index in range(pieces):
            stream.write(content[index * size:(index + 1) * size])
            stream.flush()
            # Less than settle_seconds (0.5). A longer pause on a loaded machine changes nothing: the
            # file stays open, and one with writes and no close-write waits up to open_cap_seconds (60 s).
            time.sleep(0.4)
    result = wait_result(daemon, "slow.json")
    assert result["source"]["size"] == len(content)
    assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
    taken = [event for event in daemon.events() if event.get("event") == "stage.intake" and event.get("path") == "slow.wav"]
    assert len(taken) == 1


def test_sigterm_exits_cleanly_mid_work(tmp_path):
    """SIGTERM while files are being processed makes the daemon exit 0 by itself and leaves no half-written output."""
    running = Daemon(tmp_path).start()
    for index in range(4):
        write_variant_wav(running.inbox / f"t{index}.wav", index)
    running.wait_for(lambda: running.count("stage.extract") >= 1, what="work started")
    assert running.stop(timeout=60) == 0  # a generous bound: how fast it stops is for the benchmarks
    assert running.count("daemon.stopping") == 1  # the SIGTERM went through the daemon's own stop
    leftovers = [path for path in running.outbox.rglob("*") if path.name.endswith(".tmp")]
    assert leftovers == []
    for path in running.outputs():
        json.loads(path.read_text())  # every JSON present is complete
    # what was not finished is still in the inbox, and a restart finishes it
    running.start()
    running.wait_for(lambda: len(running.outputs()) == 4, timeout=120, what="4 results after restart")
    assert running.stop() == 0


def test_kill_9_twice_then_restart_loses_and_repeats_nothing(tmp_path):
    """kill -9 twice with 10 files in flight, then a restart: 10 results, no repeated transcription, all archived."""
    running = Daemon(tmp_path).start()
    for index in range(10):
        write_variant_wav(running.inbox / f"batch/f{index:02d}.wav", index)
    running.wait_for(lambda: running.count("stage.transcribe") >= 1, timeout=90, what="first transcription")
    running.kill()
    running.start()
    running.wait_for(lambda: running.count("stage.transcribe") >= 4, timeout=90, what="more transcriptions")
    running.kill()
    running.start()
    running.wait_for(lambda: len(running.outputs()) >= 10 and not any((running.inbox / "batch").iterdir()),
                     timeout=180, what="10 results and an empty inbox")
    assert running.stop() == 0
    results = [json.loads(path.read_text()) for path in running.outputs()]
    assert len(results) == 10 and len({result["job_id"] for result in results}) == 10
    transcribed = Counter(event["job_id"] for event in running.events() if event.get("event") == "stage.transcribe")
    assert len(transcribed) == 10 and max(transcribed.values()) == 1
    assert sorted(path.name for path in (running.archive / "batch").iterdir()) == [f"f{i:02d}.wav" for i in range(10)]
    assert list(running.failed.rglob("*")) == []


@pytest.mark.needs_root
def test_unwritable_outbox_keeps_the_source_and_recovers(tmp_path):
    """A read-only outbox stops start-up with a message naming it; one that turns read-only while running
    gives a retried error naming it, the source stays, and the job finishes once it is writable again."""
    if os.geteuid() != 0:
        skip_or_fail("needs root to mount a read-only outbox")
    running = Daemon(tmp_path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,ro", "tmpfs", str(running.outbox)], check=True)
    try:
        running.start(wait_ready=False)
        assert running.process.wait(timeout=30) == 2
        assert f"At 'outbox': '{running.outbox}' is not writable" in running.tail()
        subprocess.run(["mount", "-o", "remount,rw", str(running.outbox)], check=True)
        running.start()
        subprocess.run(["mount", "-o", "remount,ro", str(running.outbox)], check=True)
        write_variant_wav(running.inbox / "ro.wav", 70)
        running.wait_for(lambda: running.count("job.retry") >= 1, timeout=90, what="an outbox write error")
        retry = next(event for event in running.events() if event.get("event") == "job.retry")
        assert retry["stage"] == "transcribed" and str(running.outbox) in retry["error"]
        assert "read-only" in retry["hint"] and "stays in the inbox" in retry["hint"]
        assert (running.inbox / "ro.wav").exists()
        subprocess.run(["mount", "-o", "remount,rw", str(running.outbox)], check=True)
        running.wait_for(lambda: (running.outbox / "ro.json").exists(), timeout=60, what="result once writable")
        running.wait_for(lambda: (running.archive / "ro.wav").exists(), what="archived")
        assert running.stop() == 0
    finally:
        running.kill()
        subprocess.run(["umount", str(running.outbox)], check=False)
