"""Media-library mode with the real daemon: subtitles named `<stem>.<lang>.<format>` beside the source,
the source untouched, nothing in the library overwritten or moved, its own outputs never taken as
media, and a restart that transcribes nothing again."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from daemon_helpers import Daemon
from media import JFK, make_text_as_mp3

OTHERS = "1\n00:00:00,000 --> 00:00:01,000\nsomeone else's subtitle\n"


def fingerprint(path: Path) -> tuple:
    """What must not change about a library file: its bytes, inode and mtime."""
    info = os.stat(path)
    return path.read_bytes(), info.st_ino, info.st_mtime_ns


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A daemon whose inbox is a media library (after_success left at archive: library mode keeps anyway),
    with a film, a film that already has someone's English SRT, and a broken file."""
    root = tmp_path_factory.mktemp("library")
    daemon = Daemon(root, library_mode=True, transcription={"provider": "local"},
                    logging={"format": "json", "level": "debug"})
    films = daemon.inbox / "Films" / "JFK (1961)"
    films.mkdir(parents=True)
    shutil.copyfile(JFK, films / "JFK (1961).flac")
    shutil.copyfile(JFK, daemon.inbox / "Films" / "speech.flac")
    (daemon.inbox / "Films" / "speech.en.srt").write_text(OTHERS)
    make_text_as_mp3(daemon.inbox / "Films" / "broken.mp3")
    before = {path: fingerprint(path) for path in daemon.inbox.rglob("*") if path.is_file()}
    try:
        daemon.start()
        daemon.wait_for(lambda: daemon.count("job.done") == 2 and daemon.count("job.failed") == 1, timeout=180,
                        what="two films done and the broken file failed")
        yield daemon, films, before
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_subtitles_land_beside_the_source_which_stays_untouched(library):
    """`JFK (1961).en.srt`, `.vtt`, `.txt` appear beside the film; the film keeps its bytes, inode and mtime;
    the JSON Result goes to the outbox; nothing reaches archive/."""
    daemon, films, before = library
    film = films / "JFK (1961).flac"
    assert fingerprint(film) == before[film]
    srt = films / "JFK (1961).en.srt"
    assert srt.read_text().startswith("1\n00:00:00,") and "country" in srt.read_text()
    assert (films / "JFK (1961).en.vtt").read_text().startswith("WEBVTT")
    assert "country" in (films / "JFK (1961).en.txt").read_text()
    result = json.loads((daemon.outbox / "Films" / "JFK (1961)" / "JFK (1961).json").read_text())
    assert result["language"] == "en" and result["source"]["path"] == "Films/JFK (1961)/JFK (1961).flac"
    assert not list(daemon.archive.rglob("*"))
    assert not list(daemon.outbox.rglob("*.srt"))  # the subtitles are in the library only


def test_an_existing_subtitle_is_not_overwritten(library):
    """Someone's `speech.en.srt` stays byte for byte (library.exists says so); the other formats are written."""
    daemon, _, before = library
    others = daemon.inbox / "Films" / "speech.en.srt"
    assert fingerprint(others) == before[others] and others.read_text() == OTHERS
    [kept] = [event for event in daemon.events() if event["event"] == "library.exists"]
    assert kept["output"] == str(others) and kept["path"] == "Films/speech.flac"
    assert (daemon.inbox / "Films" / "speech.en.vtt").exists() and (daemon.inbox / "Films" / "speech.en.txt").exists()


def test_a_broken_file_is_recorded_and_left_in_place(library):
    """The broken file stays where it is, unchanged; its error record is in failed/ and says so."""
    daemon, _, before = library
    broken = daemon.inbox / "Films" / "broken.mp3"
    assert fingerprint(broken) == before[broken]
    record = json.loads((daemon.failed / "Films" / "broken.mp3.error.json").read_text())
    assert record["kind"] == "media" and record["left_in_place"] is True and "library" in record["retry"]
    assert sorted(path.name for path in daemon.failed.rglob("*") if path.is_file()) == ["broken.mp3.error.json"]
    [failed] = [event for event in daemon.events() if event["event"] == "job.failed"]
    assert failed["moved_to"] == str(broken)


def test_its_own_outputs_are_never_taken(library):
    """The subtitles it wrote (and anyone's) are passed over as not media: no job, no failure for them."""
    daemon, films, _ = library
    wrote = films / "JFK (1961).en.srt"
    daemon.wait_for(lambda: any(event["event"] == "intake.skipped" and event["path"] == "Films/JFK (1961)/JFK (1961).en.srt"
                                for event in daemon.events()), timeout=60, what="its own SRT looked at and passed over")
    assert wrote.exists()
    taken = {event["path"] for event in daemon.events() if event["event"] == "stage.intake"}
    assert taken == {"Films/JFK (1961)/JFK (1961).flac", "Films/speech.flac", "Films/broken.mp3"}


def test_a_restart_transcribes_nothing_again(library):
    """After a restart every library file, done or broken, is recognised unchanged (size, mtime, inode):
    no intake, no job, no failure record again."""
    daemon, films, before = library
    assert daemon.stop() == 0
    daemon.start()
    expected = {"Films/JFK (1961)/JFK (1961).flac", "Films/speech.flac", "Films/broken.mp3"}
    daemon.wait_for(lambda: {event["path"] for event in daemon.events(since_start=True)
                             if event["event"] == "intake.already_done"} == expected,
                    timeout=60, what="each library file recognised as done")
    assert not [event for event in daemon.events(since_start=True)
                if event["event"] in ("stage.intake", "job.done", "job.failed", "stage.extract")]
    for path, print_before in before.items():
        assert fingerprint(path) == print_before, path
