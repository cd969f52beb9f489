"""Issue 13, a new user's first day, met through a real daemon process: failure records, names that
pair up, duplicates, the log schema, stopping. One daemon serves the drop-in tests of this module."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from daemon_helpers import Daemon, wait_failed, write_variant_wav
from sshd import skip_or_fail
from media import JFK, make_text_as_mp3


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    running = Daemon(tmp_path_factory.mktemp("first-day")).start()
    yield running
    assert running.stop(timeout=60) == 0


def drop(daemon: Daemon, source: Path, relative: str) -> Path:
    """Copy `source` into the inbox as a user would: a temporary name, then a rename."""
    target = daemon.inbox / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".part")
    shutil.copyfile(source, temporary)
    os.rename(temporary, target)
    return target



def test_empty_file_error_record_keeps_the_specific_hint_in_one_error_line(daemon):
    """An empty file's error.json says to copy it again (the hint the extractor gave), its message does
    not name the inbox path the file left, and the daemon logs one error line for it."""
    (daemon.inbox / "empty-hint.mp3").write_bytes(b"")
    record = wait_failed(daemon, "empty-hint.mp3")
    assert "copy the file again" in record["what_to_do"].lower()
    assert str(daemon.inbox) not in record["error"] and "empty" in record["error"]
    errors = [event for event in daemon.events() if event.get("level") == "error"
              and (event.get("job_id") == record["job_id"] or event.get("path") == "empty-hint.mp3")]
    assert len(errors) == 1, errors
    assert errors[0]["hint"] == record["what_to_do"] and errors[0]["path"] == "empty-hint.mp3"


def test_not_media_error_names_the_file_by_its_inbox_relative_path(daemon):
    """A text file named .mp3: the record names sub/notes-path.mp3 but not the inbox folder it left."""
    (daemon.inbox / "sub").mkdir(exist_ok=True)
    make_text_as_mp3(daemon.inbox / "sub" / "notes-path.mp3")
    record = wait_failed(daemon, "sub/notes-path.mp3")
    assert record["path"] == "sub/notes-path.mp3" and str(daemon.inbox) not in json.dumps(record)


def test_outputs_and_archive_names_pair_up(daemon, tmp_path):
    """Each source's outputs and its archived copy share one name: another file of the same stem and
    the same file dropped again each get a suffix that is the same in outbox/ and archive/."""
    drop(daemon, JFK, "pair/jfk.flac")
    daemon.wait_for(lambda: (daemon.archive / "pair" / "jfk.flac").exists(), what="jfk.flac archived")
    first = json.loads((daemon.outbox / "pair" / "jfk.json").read_text())
    drop(daemon, write_variant_wav(tmp_path / "jfk.wav", 7), "pair/jfk.wav")  # other bytes, same stem
    daemon.wait_for(lambda: not (daemon.inbox / "pair" / "jfk.wav").exists(), what="jfk.wav delivered")
    assert (daemon.archive / "pair" / "jfk-1.wav").exists() and (daemon.outbox / "pair" / "jfk-1.json").exists()
    other = json.loads((daemon.outbox / "pair" / "jfk-1.json").read_text())
    assert other["job_id"] != first["job_id"] and other["source"]["path"] == "pair/jfk.wav"
    drop(daemon, JFK, "pair/jfk.flac")  # the same bytes again
    daemon.wait_for(lambda: not (daemon.inbox / "pair" / "jfk.flac").exists(), what="second jfk.flac delivered")
    assert (daemon.archive / "pair" / "jfk-2.flac").exists() and (daemon.outbox / "pair" / "jfk-2.json").exists()
    again = json.loads((daemon.outbox / "pair" / "jfk-2.json").read_text())
    assert again["job_id"] == first["job_id"]
    archived = sorted(path.name for path in (daemon.archive / "pair").iterdir())
    outputs = sorted(path.name for path in (daemon.outbox / "pair").glob("*.json"))
    assert [name.rsplit(".", 1)[0] for name in archived] == [name[:-5] for name in outputs]


def test_duplicate_says_it_was_served_from_an_earlier_job(daemon, tmp_path):
    """The same file dropped again is marked `cached_from` the earlier job (its id and when), and its
    timings are this delivery's only, not the first run's load and transcription."""
    source = write_variant_wav(tmp_path / "dup.wav", 11)
    drop(daemon, source, "dup/talk.wav")
    daemon.wait_for(lambda: (daemon.archive / "dup" / "talk.wav").exists(), what="first archived")
    first = json.loads((daemon.outbox / "dup" / "talk.json").read_text())
    assert "cached_from" not in first and "transcribe_s" in first["timings"]
    drop(daemon, source, "dup/talk.wav")
    daemon.wait_for(lambda: (daemon.archive / "dup" / "talk-1.wav").exists(), what="second archived")
    second = json.loads((daemon.outbox / "dup" / "talk-1.json").read_text())
    assert second["cached_from"]["job_id"] == first["job_id"] and second["cached_from"]["at"]
    assert "transcribe_s" not in second["timings"] and "load_s" not in second["timings"]
    assert "total_s" in second["timings"] and second["text"] == first["text"]


def test_readme_result_section_documents_cached_from():
    """The Result section of docs/results.md says what `cached_from` means."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    section = page.split("## The Result", 1)[1].split("\n## ", 1)[0]
    assert "cached_from" in section


def test_local_result_timings_and_transfer_are_as_the_readme_says(daemon, tmp_path):
    """A local Result's transfer is {} and each of its timings is named in the Result section of docs/results.md."""
    drop(daemon, write_variant_wav(tmp_path / "timed.wav", 13), "timed/timed.wav")
    daemon.wait_for(lambda: (daemon.archive / "timed" / "timed.wav").exists(), what="timed.wav archived")
    result = json.loads((daemon.outbox / "timed" / "timed.json").read_text())
    page = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    section = page.split("## The Result", 1)[1].split("\n## ", 1)[0]
    assert result["transfer"] == {}
    assert [key for key in result["timings"] if f"`{key}`" not in section] == []


GERMAN = ("Guten Morgen. Heute sprechen wir über die Entwicklung der erneuerbaren Energien in Deutschland und "
          "die Frage, wie die Stromnetze in den nächsten zehn Jahren ausgebaut werden müssen. Die Regierung hat "
          "einen Plan vorgelegt, der viele Milliarden Euro kostet.")


def test_english_only_model_warns_on_speech_that_is_not_english(daemon, tmp_path):
    """German speech through the English-only tiny.en gets a language_warning in its Result and in
    stage.transcribe, naming the multilingual models; English speech (jfk) gets none."""
    if shutil.which("espeak-ng") is None:
        skip_or_fail("espeak-ng is not installed (it speaks the German clip; bash scripts/test installs it as root)")
    import subprocess

    subprocess.run(["espeak-ng", "-v", "de", "-w", str(tmp_path / "german.wav"), GERMAN], check=True,
                   capture_output=True)
    drop(daemon, tmp_path / "german.wav", "lang/german.wav")
    drop(daemon, write_variant_wav(tmp_path / "english.wav", 17), "lang/english.wav")
    daemon.wait_for(lambda: (daemon.archive / "lang" / "german.wav").exists()
                    and (daemon.archive / "lang" / "english.wav").exists(), what="both archived")
    german = json.loads((daemon.outbox / "lang" / "german.json").read_text())
    english = json.loads((daemon.outbox / "lang" / "english.json").read_text())
    assert "not english" in german["language_warning"].lower() and "large-v3" in german["language_warning"]
    assert english.get("language_warning") is None
    logged = [event for event in daemon.events() if event.get("event") == "stage.transcribe"
              and event.get("job_id") == german["job_id"]]
    assert logged and logged[0]["language_warning"] == german["language_warning"] and logged[0]["level"] == "warning"


def test_not_media_is_said_as_a_person_would_everywhere(daemon):
    """A text file named .mp4 is "not an audio or video file PyAV can read", with PyAV's sentence as
    the evidence and no `[Errno 1094995529]`, in its error.json, the daemon's log line and `status`
    (issue 22, item 2)."""
    import subprocess
    import sys

    (daemon.inbox / "x.mp4").write_text("a shopping list, not a video\n" * 20)  # bytes no other test drops
    record = wait_failed(daemon, "x.mp4")
    errors = [event for event in daemon.events() if event.get("level") == "error" and event.get("path") == "x.mp4"]
    shown = subprocess.run([sys.executable, "-m", "whisperdrop", "status", "-c", str(daemon.config_path)],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    status_line = next(line for line in shown.stdout.splitlines() if "x.mp4" in line)
    for said in (record["error"], json.dumps(errors), status_line):
        assert "not an audio or video file PyAV can read" in said, said
        assert "Invalid data found when processing input" in said, said
        assert "Errno" not in said and "1094995529" not in said, said
