"""The outbox stage: formats, atomic writes, collisions, archive moves and failure records."""

import json
import os
import subprocess

import pytest

from whisperdrop.daemon import outbox
from whisperdrop.outputs.subtitles import Limits

RESULT = {
    "job_id": "a" * 64,
    "text": "Hello there. General Kenobi.",
    "segments": [
        {"start": 0.0, "end": 1.5, "text": " Hello there."},
        {"start": 3661.25, "end": 3662.0, "text": " General Kenobi."},
    ],
}


def test_srt_vtt_txt_rendering():
    """SRT uses numbered blocks and commas, VTT a header and dots, TXT one line a segment."""
    srt = outbox.render_srt(RESULT)
    assert srt.startswith("1\n00:00:00,000 --> 00:00:01,500\nHello there.\n")
    assert "2\n01:01:01,250 --> 01:01:02,000\nGeneral Kenobi.\n" in srt
    vtt = outbox.render_vtt(RESULT)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n")
    assert outbox.render_txt(RESULT) == "Hello there.\nGeneral Kenobi.\n"


def test_outputs_written_with_json_last_and_no_temp_left(tmp_path):
    """write_outputs leaves the four files and no temporary names."""
    written = outbox.write_outputs(tmp_path / "talk", RESULT, ["srt", "vtt", "txt"])
    assert [path.name for path in written] == ["talk.srt", "talk.vtt", "talk.txt", "talk.json"]
    assert sorted(os.listdir(tmp_path)) == ["talk.json", "talk.srt", "talk.txt", "talk.vtt"]
    assert json.loads((tmp_path / "talk.json").read_text())["job_id"] == "a" * 64


def long_segment_result() -> dict:
    """One 25 s segment, as batched transcription makes them, with word timestamps."""
    words, at = [], 0.0
    for index in range(60):
        text = f" word{index}" + ("." if index % 12 == 11 else "")
        words.append({"start": round(at, 3), "end": round(at + 0.3, 3), "word": text, "probability": 0.9})
        at += 0.42
    segment = {"id": 1, "start": 0.0, "end": round(at, 3), "text": "".join(word["word"] for word in words),
               "words": words}
    return {"job_id": "c" * 64, "text": segment["text"], "segments": [segment]}


def test_json_keeps_whisper_segments_while_subtitles_are_cut_from_words(tmp_path):
    """The JSON holds the segment exactly as whisper made it; SRT and VTT show it as short cues."""
    result = long_segment_result()
    outbox.write_outputs(tmp_path / "talk", result, ["srt", "vtt", "txt"])
    assert json.loads((tmp_path / "talk.json").read_text())["segments"] == result["segments"]
    srt = (tmp_path / "talk.srt").read_text()
    assert srt.count(" --> ") >= 5 and "00:00:00,000 --> 00:00:25" not in srt
    assert (tmp_path / "talk.txt").read_text() == result["text"].strip() + "\n"


def test_configured_subtitle_limits_shape_the_files_and_the_crash_check(tmp_path):
    """write_outputs cuts cues within the limits it is given, and plan_outputs, given the same limits,
    takes a set a crash left without its JSON as this job's (other limits render other bytes)."""
    result = long_segment_result()
    narrow = Limits(max_line_chars=16, max_lines=1, max_cue_seconds=2.0, pause_seconds=0.5)
    outbox.write_outputs(tmp_path / "talk", result, ["srt"], narrow)
    blocks = [block.split("\n") for block in (tmp_path / "talk.srt").read_text().strip("\n").split("\n\n")]
    assert len(blocks) >= 20 and all(len(block) == 3 and len(block[2]) <= 16 for block in blocks)
    (tmp_path / "talk.json").unlink()  # as if the crash came before the JSON
    assert outbox.plan_outputs(tmp_path, "talk", ["srt"], "c" * 64, result, narrow) == (tmp_path / "talk", False)
    assert outbox.plan_outputs(tmp_path, "talk", ["srt"], "c" * 64, result) == (tmp_path / "talk-1", False)


def test_collision_gets_a_suffix_and_same_job_is_recognised(tmp_path):
    """Another job's outputs are never overwritten; this job's existing outputs count as written."""
    outbox.write_outputs(tmp_path / "talk", RESULT, ["txt"])
    assert outbox.plan_outputs(tmp_path, "talk", ["txt"], "a" * 64) == (tmp_path / "talk", True)
    assert outbox.plan_outputs(tmp_path, "talk", ["txt"], "b" * 64) == (tmp_path / "talk-1", False)
    (tmp_path / "song.srt").write_text("a user's own file")
    assert outbox.plan_outputs(tmp_path, "song", ["srt"], "b" * 64) == (tmp_path / "song-1", False)


def test_move_never_overwrites(tmp_path):
    """Archiving a source next to one of the same name keeps both."""
    (tmp_path / "in").mkdir()
    first = tmp_path / "in" / "a.mp3"
    first.write_bytes(b"one")
    archive = tmp_path / "archive" / "a.mp3"
    assert outbox.move_without_overwrite(first, archive) == archive
    first.write_bytes(b"two")
    second = outbox.move_without_overwrite(first, archive)
    assert second.name == "a-1.mp3" and second.read_bytes() == b"two" and archive.read_bytes() == b"one"
    assert not first.exists()


def test_failure_record_beside_the_source(tmp_path):
    """A permanent failure leaves the source in failed/ beside <name>.error.json."""
    source = tmp_path / "in" / "sub" / "bad.mp3"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"not audio")
    moved = outbox.record_failure(source, tmp_path / "failed", "sub/bad.mp3", {"error": "not media"})
    assert moved == tmp_path / "failed" / "sub" / "bad.mp3"
    assert json.loads((tmp_path / "failed" / "sub" / "bad.mp3.error.json").read_text()) == {"error": "not media"}
    assert not source.exists()


def test_unwritable_outbox_raises_and_leaves_nothing(tmp_path):
    """Writing into a folder that cannot be written raises OSError and leaves no partial file."""
    folder = tmp_path / "outbox"
    folder.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: a read-only mount is what stops root
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)], check=True)
    else:
        folder.chmod(0o500)
    try:
        with pytest.raises(OSError):
            outbox.write_outputs(folder / "x", RESULT, ["txt"])
        assert os.listdir(folder) == []
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(folder)], check=False)
        folder.chmod(0o700)
