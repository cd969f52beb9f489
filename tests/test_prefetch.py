"""Prefetch: a closed inbox file is hashed and extracted while it settles, and that work is used only
for exactly the version a stage took (real PyAV on jfk.flac, a real watcher on a real folder)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import pytest
import structlog

from whisperdrop.daemon.prefetch import MAX_ENTRIES, Prefetch, version_of
from whisperdrop.daemon.watch import InboxWatcher

JFK = Path(__file__).resolve().parents[2] / "shared" / "audio" / "jfk.flac"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(coroutine_function) -> None:
    """Run `coroutine_function(prefetch, tmp)` with a Prefetch over a real thread pool, closed after."""
    async def main(tmp: Path) -> None:
        with ThreadPoolExecutor(2) as io:
            prefetch = Prefetch(tmp / "prefetch", io, 24, structlog.get_logger())
            prefetch.start()
            try:
                await coroutine_function(prefetch, tmp)
            finally:
                await prefetch.close()
    return main


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def test_a_closed_file_is_hashed_and_extracted_and_its_audio_handed_over(tmp_path, inbox):
    source = inbox / "jfk.flac"
    shutil.copyfile(JFK, source)

    async def body(prefetch: Prefetch, tmp: Path) -> None:
        prefetch.closed("jfk.flac", source)
        info = os.lstat(source)
        assert await prefetch.digest("jfk.flac", info) == sha256(source)
        dest = tmp / "work.opus"
        extracted = await prefetch.take_audio("jfk.flac", version_of(info), sha256(source), dest)
        assert extracted is not None and extracted.path == dest and 10.5 < extracted.duration < 11.5
        with av.open(str(dest)) as container:
            assert container.streams.audio[0].codec_context.name == "opus"
        assert extracted.sha256 == sha256(dest)
        assert prefetch.used == 1 and list((tmp / "prefetch").iterdir()) == []
        assert await prefetch.take_audio("jfk.flac", version_of(info), sha256(source), dest) is None  # once

    asyncio.run(run(body)(tmp_path))


def test_work_on_another_version_is_never_used_and_is_removed(tmp_path, inbox):
    source = inbox / "talk.flac"
    shutil.copyfile(JFK, source)

    async def body(prefetch: Prefetch, tmp: Path) -> None:
        prefetch.closed("talk.flac", source)
        old = os.lstat(source)
        assert await prefetch.digest("talk.flac", old) is not None
        with open(source, "ab") as stream:  # rewritten after it was read: a new version
            stream.write(b"\0" * 10)
        new = os.lstat(source)
        assert await prefetch.digest("talk.flac", new) is None
        assert await prefetch.take_audio("talk.flac", version_of(new), sha256(source), tmp / "a.opus") is None
        assert await prefetch.take_audio("talk.flac", version_of(old), "0" * 64, tmp / "b.opus") is None  # wrong bytes
        prefetch.closed("talk.flac", source)  # the new version replaces the old work, whose audio goes
        await prefetch.digest("talk.flac", new)
        assert len(list((tmp / "prefetch").glob("*.opus"))) == 1
        assert not (tmp / "a.opus").exists() and not (tmp / "b.opus").exists()

    asyncio.run(run(body)(tmp_path))


def test_a_file_that_is_not_media_leaves_nothing_for_the_extract_stage(tmp_path, inbox):
    source = inbox / "notes.mp3"
    source.write_bytes(b"not audio at all" * 1000)

    async def body(prefetch: Prefetch, tmp: Path) -> None:
        prefetch.closed("notes.mp3", source)
        info = os.lstat(source)
        assert await prefetch.digest("notes.mp3", info) == sha256(source)  # intake still saves the hashing
        assert await prefetch.take_audio("notes.mp3", version_of(info), sha256(source), tmp / "x.opus") is None
        assert list((tmp / "prefetch").iterdir()) == []

    asyncio.run(run(body)(tmp_path))


def test_at_most_max_entries_are_held_and_close_removes_everything(tmp_path, inbox):
    names = [f"clip{index}.flac" for index in range(MAX_ENTRIES + 2)]
    for name in names:
        shutil.copyfile(JFK, inbox / name)

    async def body(prefetch: Prefetch, tmp: Path) -> None:
        for name in names:
            prefetch.closed(name, inbox / name)
        assert len(prefetch._entries) == MAX_ENTRIES and "clip0.flac" not in prefetch._entries
        assert await prefetch.digest("clip0.flac", os.lstat(inbox / "clip0.flac")) is None
        for name in names[2:]:
            await prefetch.digest(name, os.lstat(inbox / name))
        assert len(list((tmp / "prefetch").glob("*.opus"))) == MAX_ENTRIES

    asyncio.run(run(body)(tmp_path))
    assert list((tmp_path / "prefetch").iterdir()) == []  # close() removed the audio nobody took


def test_start_removes_what_an_earlier_run_left(tmp_path):
    folder = tmp_path / "prefetch"
    folder.mkdir()
    (folder / "stale.opus").write_bytes(b"x")
    with ThreadPoolExecutor(1) as io:
        Prefetch(folder, io, 24, structlog.get_logger()).start()
    assert list(folder.iterdir()) == []


def test_the_watcher_reports_a_closed_file_before_it_settles(tmp_path, inbox):
    """on_closed fires on the close, long before a settle time no test waits for."""
    async def main() -> None:
        closed: list[Path] = []
        seen = asyncio.Event()

        def on_closed(path: Path) -> None:
            closed.append(path)
            seen.set()

        watcher = InboxWatcher(inbox, settle_seconds=3600, rescan_seconds=3600, recursive=True,
                               ignore=[".*"], on_closed=on_closed)
        ready: list[Path] = []
        task = asyncio.create_task(watcher.run(ready.append))
        try:
            await asyncio.wait_for(watcher.started.wait(), 60)
            shutil.copyfile(JFK, inbox / "jfk.flac")
            await asyncio.wait_for(seen.wait(), 60)
            assert closed[0] == inbox / "jfk.flac" and ready == []
        finally:
            watcher.stop()
            await asyncio.wait_for(task, 60)

    asyncio.run(main())


def test_the_daemon_uses_the_audio_extracted_while_the_file_settled(tmp_path):
    """A file copied into a running daemon's inbox is hashed and extracted on its close; the extract
    stage takes that audio (stage.extract says prefetched) and the transcript is right."""
    import json

    from daemon_helpers import Daemon, jfk_reference, word_error_rate

    daemon = Daemon(tmp_path, transcription={"provider": "local"}).start()
    try:
        shutil.copyfile(JFK, daemon.inbox / "jfk.flac")
        daemon.wait_for(lambda: (daemon.outbox / "jfk.json").exists(), 180, "jfk.json in the outbox")
        extracts = [event for event in daemon.events() if event.get("event") == "stage.extract"]
        assert [event.get("prefetched") for event in extracts] == [True]
        result = json.loads((daemon.outbox / "jfk.json").read_text())
        assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
        assert result["source"]["sha256"] == sha256(JFK)
        assert list((tmp_path / "state" / "prefetch").iterdir()) == []
    finally:
        assert daemon.stop() == 0
