"""The inbox watcher: the pure Settler (daemon.settle) with a fake clock and stat, and InboxWatcher on real folders."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat as stat_module
import threading
import time
from pathlib import Path, PurePath
from types import SimpleNamespace

import pytest
import structlog

from whisperdrop.daemon.settle import Settler, default_open_cap
from whisperdrop.daemon.watch import MISSING_RETRY_SECONDS, InboxWatcher, is_ignored

DEFAULT_IGNORE = ["*.part", "*.tmp", "*~", ".*", "*.crdownload", "*.partial", "*.swp"]


# -- Settler: fake clock, fake stat ----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeFiles:
    """A dict-based lstat: path -> (size, mtime_ns, mode)."""

    def __init__(self) -> None:
        self.files: dict[Path, tuple[int, int, int]] = {}
        self._tick = 0

    def write(self, path: Path, size: int, mode: int = stat_module.S_IFREG | 0o644) -> None:
        self._tick += 1
        self.files[path] = (size, self._tick * 1_000_000, mode)

    def remove(self, path: Path) -> None:
        del self.files[path]

    def __call__(self, path: Path):
        try:
            size, mtime_ns, mode = self.files[Path(path)]
        except KeyError:
            raise FileNotFoundError(2, "No such file or directory", str(path)) from None
        return SimpleNamespace(st_size=size, st_mtime_ns=mtime_ns, st_mode=mode)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def files() -> FakeFiles:
    return FakeFiles()


@pytest.fixture
def settler(clock: FakeClock, files: FakeFiles) -> Settler:
    return Settler(2.0, clock=clock, stat=files)


A = Path("/inbox/a.wav")
B = Path("/inbox/b.wav")


def test_closed_file_is_ready_only_after_settle_seconds(settler, clock, files):
    """A file written and closed is ready once settle_seconds pass without change, and not before."""
    files.write(A, 100)
    settler.observe(A, "created")
    settler.observe(A, "modified")
    settler.observe(A, "closed")
    assert settler.ready() == []
    assert settler.next_wakeup() == pytest.approx(clock.now + 2.0)
    clock.advance(1.9)
    assert settler.ready() == []
    clock.advance(0.1)
    assert settler.ready() == [A]
    assert settler.ready() == []
    assert settler.next_wakeup() is None


def test_each_event_restarts_the_quiet_time(settler, clock, files):
    """Writes with pauses shorter than settle_seconds keep the file waiting until the last one settles."""
    files.write(A, 0)
    settler.observe(A, "created")
    for size in range(1, 20):
        clock.advance(1.5)
        files.write(A, size * 10)
        settler.observe(A, "modified")
        assert settler.ready() == []
    settler.observe(A, "closed")
    clock.advance(1.9)
    assert settler.ready() == []
    clock.advance(0.2)
    assert settler.ready() == [A]


def test_file_open_for_writing_waits_past_settle_until_closed(settler, clock, files):
    """A file with modify events and no close-write waits even through a pause longer than settle_seconds."""
    files.write(A, 10)
    settler.observe(A, "created")
    settler.observe(A, "modified")
    clock.advance(30.0)
    assert settler.ready() == []
    files.write(A, 20)
    settler.observe(A, "modified")
    settler.observe(A, "closed")
    clock.advance(2.0)
    assert settler.ready() == [A]


def test_open_cap_lets_stat_stability_decide_without_close_write(clock, files):
    """A file never closed (an NFS writer) is taken once quiet for the open cap, max(60 s, 10 * settle)."""
    settler = Settler(2.0, clock=clock, stat=files)
    assert settler.open_cap_seconds == default_open_cap(2.0) == 60.0
    assert Settler(10.0, clock=clock, stat=files).open_cap_seconds == 100.0
    files.write(A, 10)
    settler.observe(A, "modified")
    assert settler.next_wakeup() == pytest.approx(clock.now + 60.0)
    clock.advance(59.0)
    assert settler.ready() == []
    clock.advance(1.0)
    assert settler.ready() == [A]


def test_open_cap_is_restarted_by_a_change_seen_only_by_stat(clock, files):
    """When the open cap expires but stat shows the file changed, it waits for another quiet period."""
    settler = Settler(2.0, clock=clock, stat=files, open_cap_seconds=10.0)
    files.write(A, 10)
    settler.observe(A, "modified")
    clock.advance(10.0)
    files.write(A, 20)  # changed with no event reaching us
    assert settler.ready() == []
    clock.advance(9.9)
    assert settler.ready() == []
    clock.advance(0.1)
    assert settler.ready() == [A]


def test_file_found_by_rescan_is_ready_once_stable_for_settle_seconds(settler, clock, files):
    """A file seen only by a rescan (present at start) is taken after settle_seconds of stable stat."""
    files.write(A, 100)
    settler.observe(A, "seen")
    assert settler.ready() == []
    clock.advance(2.0)
    assert settler.ready() == [A]


def test_file_found_by_rescan_that_keeps_growing_waits(settler, clock, files):
    """A rescan-found file whose size changes between looks (no events) waits until it stops changing."""
    files.write(A, 100)
    settler.observe(A, "seen")
    for size in (200, 300, 400):
        clock.advance(2.0)
        files.write(A, size)
        assert settler.ready() == []
    clock.advance(2.0)
    assert settler.ready() == [A]


def test_rename_from_temporary_name_settles_under_the_final_name(settler, clock, files):
    """A `.part` renamed to its final name is taken under the final name, timed from the rename."""
    part = Path("/inbox/a.wav.part")
    assert is_ignored(PurePath("a.wav.part"), DEFAULT_IGNORE)  # the shell never observes it
    clock.advance(50.0)
    files.write(A, 500)
    settler.observe(A, "moved_in")
    assert part not in settler.tracked()
    clock.advance(1.0)
    assert settler.ready() == []
    clock.advance(1.0)
    assert settler.ready() == [A]


def test_temporary_names_and_dot_folders_are_ignored():
    """Temporary names, dotfiles and anything in a dot folder are ignored; real names, also odd ones, are not."""
    for name in ["a.part", "a.tmp", "a~", ".hidden.wav", "a.crdownload", "a.partial", ".a.wav.swp",
                 "sub/a.part", ".git/a.wav", "a/.cache/b/c.wav"]:
        assert is_ignored(PurePath(name), DEFAULT_IGNORE), name
    for name in ["a.wav", "sub/a.wav", "with space.mp4", "-dash.wav", "new\nline.wav", "ünï 日本.mp3",
                 "a.part.wav", "notes.txt"]:
        assert not is_ignored(PurePath(name), DEFAULT_IGNORE), name
    assert is_ignored(PurePath("new\nline.tmp"), DEFAULT_IGNORE)
    assert is_ignored(PurePath(".dir/a.wav"), [])  # dot folders are skipped even with no patterns
    assert not is_ignored(PurePath(".a.wav"), [])


def test_emitted_version_is_not_emitted_again_until_it_changes(settler, clock, files):
    """A rescan of an emitted, unchanged file emits nothing; a new version is emitted once settled."""
    files.write(A, 100)
    settler.observe(A, "seen")
    clock.advance(2.0)
    assert settler.ready() == [A]
    for _ in range(5):
        clock.advance(60.0)
        settler.observe(A, "seen")
        assert settler.ready() == []
    settler.observe(A, "closed")  # opened for writing and closed with no change
    clock.advance(5.0)
    assert settler.ready() == []
    files.write(A, 150)
    settler.observe(A, "modified")
    settler.observe(A, "closed")
    clock.advance(2.0)
    assert settler.ready() == [A]


def test_rescan_notices_a_change_that_sent_no_event(settler, clock, files):
    """An emitted file changed without events is emitted again after a rescan sees the change and it settles."""
    files.write(A, 100)
    settler.observe(A, "seen")
    clock.advance(2.0)
    assert settler.ready() == [A]
    files.write(A, 999)
    settler.observe(A, "seen")
    assert settler.ready() == []
    clock.advance(2.0)
    assert settler.ready() == [A]


def test_vanished_file_is_dropped(settler, clock, files):
    """A file that disappears before settling is never returned and no longer tracked."""
    files.write(A, 100)
    files.write(B, 100)
    settler.observe(A, "created")
    settler.observe(B, "created")
    files.remove(A)
    clock.advance(2.0)
    assert settler.ready() == [B]
    assert settler.tracked() == [B]
    settler.observe(B, "deleted")
    assert settler.tracked() == []
    assert settler.next_wakeup() is None


def test_non_regular_files_are_never_ready(settler, clock, files):
    """Symlinks, directories and fifos (as lstat reports them) are dropped, not returned."""
    links = [Path("/inbox/link"), Path("/inbox/dir"), Path("/inbox/fifo")]
    for path, mode in zip(links, [stat_module.S_IFLNK, stat_module.S_IFDIR, stat_module.S_IFIFO]):
        files.write(path, 10, mode | 0o777)
        settler.observe(path, "created")
    clock.advance(10.0)
    assert settler.ready() == []
    assert settler.tracked() == []


def test_forget_lets_a_file_at_the_same_name_be_emitted_again(settler, clock, files):
    """After forget(), the same unchanged file is a new file: a rescan emits it again once settled."""
    files.write(A, 100)
    settler.observe(A, "seen")
    clock.advance(2.0)
    assert settler.ready() == [A]
    settler.forget(A)
    assert settler.tracked() == []
    settler.observe(A, "seen")
    assert settler.ready() == []
    clock.advance(2.0)
    assert settler.ready() == [A]


def test_file_renamed_onto_an_emitted_name_is_emitted_again(settler, clock, files):
    """A rename onto a name already emitted is a new file, even with the same size and mtime."""
    files.write(A, 100)
    settler.observe(A, "closed")
    clock.advance(2.0)
    assert settler.ready() == [A]
    settler.observe(A, "moved_in")
    clock.advance(2.0)
    assert settler.ready() == [A]


def test_zero_byte_file_is_emitted_once_settled(settler, clock, files):
    """An empty file is emitted once settled (the pipeline rejects it), never right after creation."""
    files.write(A, 0)
    settler.observe(A, "created")
    assert settler.ready() == []
    clock.advance(2.0)
    assert settler.ready() == [A]


def test_unknown_event_kind_is_refused(settler):
    """observe() raises ValueError naming the bad kind."""
    with pytest.raises(ValueError, match="'renamed'"):
        settler.observe(A, "renamed")


# -- InboxWatcher on a real folder -----------------------------------------------------------------

SETTLE = 0.3
WAIT_S = 60.0  # a generous bound on any one wait: the tests wait on events and state, never on a guess of speed
MARKER_PREFIX = "zz-marker-"  # files Harness.settled() drops in to know the watcher has caught up


async def until(condition, what: str, timeout: float = WAIT_S) -> None:
    """Yield to the loop until `condition()` is true; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
def no_thread_leak():
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        leaked = [thread for thread in threading.enumerate() if thread not in before and thread.is_alive()]
        leaked = [thread for thread in leaked if not thread.name.startswith("asyncio_")]  # to_thread's pool
        if not leaked:
            return
        time.sleep(0.05)
    pytest.fail(f"threads leaked: {leaked}")


@pytest.fixture
def inbox(tmp_path: Path, no_thread_leak) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


class Harness:
    """Runs an InboxWatcher in a task and records what it emits, with the time of each emission.

    Marker files (see `settled`) are recorded in `markers`, not in `emitted`.
    """

    def __init__(self, inbox: Path, **options):
        settings = dict(settle_seconds=SETTLE, rescan_seconds=30.0, recursive=True, ignore=DEFAULT_IGNORE)
        settings.update(options)
        self.watcher = InboxWatcher(inbox, **settings)
        self.emitted: list[Path] = []
        self.times: list[float] = []
        self.markers: list[Path] = []
        self._task: asyncio.Task | None = None

    async def _on_ready(self, path: Path) -> None:
        if path.name.startswith(MARKER_PREFIX):
            self.markers.append(path)
            return
        self.emitted.append(path)
        self.times.append(time.monotonic())

    async def __aenter__(self) -> "Harness":
        self._task = asyncio.create_task(self.watcher.run(self._on_ready))
        started = asyncio.create_task(self.watcher.started.wait())
        await asyncio.wait({self._task, started}, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        await asyncio.gather(started, return_exceptions=True)
        # the observer is up and the first rescan done, and run() is still going
        assert self.watcher.started.is_set() and not self._task.done(), self._task
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task

    async def wait_for(self, count: int, timeout: float = WAIT_S) -> None:
        await until(lambda: len(self.emitted) >= count, f"{count} emitted (so far {self.emitted})", timeout)

    async def settled(self, *, rescan: bool = True) -> None:
        """Wait until the watcher has had every chance to emit what the inbox holds now.

        A marker file written now is emitted: every event from before it has been handled, and every
        file the watcher knew of by then has been quiet for settle_seconds. With `rescan` (for a
        short rescan_seconds), two more full rescans have finished, so one began after this call,
        and the settler holds nothing pending: what is not emitted by then is not emitted at all
        until it changes. A check that something was *not* emitted comes after this.
        """
        rescans = self.watcher.rescans
        marker = self.watcher.inbox / f"{MARKER_PREFIX}{len(self.markers)}.wav"
        marker.write_bytes(b"m")
        await until(lambda: marker in self.markers, f"the marker {marker.name} to be emitted")
        if rescan:
            await until(lambda: self.watcher.rescans >= rescans + 2 and self.watcher.settler.next_wakeup() is None,
                        "two more full rescans and nothing pending")


def run(coroutine) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 5 * WAIT_S))


def test_copied_file_is_emitted_once(inbox, tmp_path):
    """A file copied into the inbox is emitted exactly once, after it settled."""
    source = tmp_path / "source.wav"
    source.write_bytes(os.urandom(3_000_000))

    async def scenario():
        async with Harness(inbox, rescan_seconds=0.2) as harness:
            start = time.monotonic()
            shutil.copyfile(source, inbox / "talk.wav")
            await harness.wait_for(1)
            assert harness.times[0] - start >= SETTLE
            await harness.settled()  # rescans later, it is still emitted once
            assert harness.emitted == [inbox / "talk.wav"]

    run(scenario())


def test_file_present_before_start_is_emitted_by_rescan(inbox):
    """Files already in the inbox (and its subfolders) at start-up are emitted once, found by the rescan."""
    (inbox / "old.mp3").write_bytes(b"x" * 1000)
    (inbox / "sub" / "deeper").mkdir(parents=True)
    (inbox / "sub" / "deeper" / "old2.mp3").write_bytes(b"y" * 1000)

    async def scenario():
        async with Harness(inbox, rescan_seconds=0.2) as harness:
            await harness.wait_for(2)
            await harness.settled()
            assert sorted(harness.emitted) == [inbox / "old.mp3", inbox / "sub" / "deeper" / "old2.mp3"]

    run(scenario())


def test_part_file_renamed_is_emitted_under_final_name(inbox):
    """A `.part` download is not taken; once renamed it is emitted under its final name only."""

    async def scenario():
        async with Harness(inbox, rescan_seconds=0.2) as harness:
            with open(inbox / "movie.mkv.part", "wb") as handle:
                handle.write(b"a" * 100_000)
            await harness.settled()
            assert harness.emitted == []
            os.rename(inbox / "movie.mkv.part", inbox / "movie.mkv")
            await harness.wait_for(1)
            await harness.settled()
            assert harness.emitted == [inbox / "movie.mkv"]

    run(scenario())


def test_files_in_subfolders_are_emitted_and_hidden_ones_are_not(inbox, tmp_path):
    """Files in new subfolders (made after start, or moved in whole) are emitted; dot folders and temp names are not."""
    outside = tmp_path / "prepared"
    (outside / "inner").mkdir(parents=True)
    (outside / "inner" / "c.wav").write_bytes(b"c" * 500)

    async def scenario():
        async with Harness(inbox) as harness:
            (inbox / "a" / "b").mkdir(parents=True)
            (inbox / "a" / "b" / "one.wav").write_bytes(b"1" * 500)
            (inbox / ".hidden").mkdir()
            (inbox / ".hidden" / "secret.wav").write_bytes(b"s" * 500)
            (inbox / "a" / ".dotfile.wav").write_bytes(b"d" * 500)
            (inbox / "a" / "x.tmp").write_bytes(b"t" * 500)
            os.rename(outside, inbox / "moved")
            await harness.wait_for(2)
            await harness.settled(rescan=False)  # found by events: the next full rescan is 30 s away
            assert sorted(harness.emitted) == [inbox / "a" / "b" / "one.wav", inbox / "moved" / "inner" / "c.wav"]

    run(scenario())


def test_non_recursive_watch_ignores_subfolders(inbox):
    """With recursive off, only files directly in the inbox are emitted."""
    (inbox / "sub").mkdir()

    async def scenario():
        async with Harness(inbox, recursive=False, rescan_seconds=0.2) as harness:
            (inbox / "sub" / "deep.wav").write_bytes(b"d" * 100)
            (inbox / "top.wav").write_bytes(b"t" * 100)
            await harness.wait_for(1)
            await harness.settled()
            assert harness.emitted == [inbox / "top.wav"]

    run(scenario())


def test_symlinks_are_not_followed(inbox, tmp_path):
    """A symlink to a file outside the inbox, and files under a symlinked folder, are never emitted."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.wav").write_bytes(b"s" * 500)
    os.symlink(outside / "secret.wav", inbox / "present-link.wav")
    os.symlink(outside, inbox / "present-dir")

    async def scenario():
        async with Harness(inbox, rescan_seconds=0.2) as harness:
            os.symlink(outside / "secret.wav", inbox / "link.wav")
            os.symlink(outside, inbox / "linked-dir")
            (outside / "new.wav").write_bytes(b"n" * 500)
            (inbox / "real.wav").write_bytes(b"r" * 500)
            await harness.wait_for(1)
            await harness.settled()
            assert harness.emitted == [inbox / "real.wav"]

    run(scenario())


def test_odd_names_are_handled(inbox):
    """Names with spaces, unicode, a leading dash, a newline and non-UTF-8 bytes are emitted as they are."""
    names = ["with space.wav", "ünïcödé – 日本語.mp3", "-leading-dash.wav", "new\nline.wav",
             os.fsdecode(b"latin1-\xe9t\xe9.wav")]

    async def scenario():
        async with Harness(inbox) as harness:
            for name in names:
                with open(os.path.join(os.fsencode(inbox), os.fsencode(name)), "wb") as handle:
                    handle.write(b"z" * 100)
            await harness.wait_for(len(names))
            await harness.settled(rescan=False)
            assert sorted(harness.emitted) == sorted(inbox / name for name in names)
            for path in harness.emitted:
                assert os.path.exists(path)

    run(scenario())


def test_file_held_open_waits_through_a_long_pause(inbox):
    """A file still open for writing is not emitted during a pause longer than settle, only after close."""

    async def scenario():
        async with Harness(inbox) as harness:
            with open(inbox / "recording.wav", "wb") as handle:
                handle.write(b"a" * 1000)
                handle.flush()
                # The marker is emitted: the recording's events were handled and it has been quiet
                # for more than settle_seconds, by the watcher's own clock.
                await harness.settled(rescan=False)
                assert harness.emitted == []
                handle.write(b"b" * 1000)
            closed = time.monotonic()
            await harness.wait_for(1)
            assert harness.times[0] - closed >= SETTLE * 0.9
            assert harness.emitted == [inbox / "recording.wav"]

    run(scenario())


def test_forget_lets_the_next_rescan_emit_it_again(inbox):
    """A file still in the inbox is not emitted again by rescans until forget() is called for it."""

    async def scenario():
        async with Harness(inbox, rescan_seconds=0.2) as harness:
            (inbox / "a.wav").write_bytes(b"a" * 100)
            await harness.wait_for(1)
            await harness.settled()
            assert len(harness.emitted) == 1
            harness.watcher.forget(inbox / "a.wav")
            await harness.wait_for(2)
            assert harness.emitted == [inbox / "a.wav"] * 2

    run(scenario())


def test_on_ready_failure_does_not_stop_the_watch(inbox):
    """An exception from on_ready is logged with the path and later files are still emitted."""
    seen: list[Path] = []

    def on_ready(path: Path) -> None:
        seen.append(path)
        if path.name == "bad.wav":
            raise RuntimeError("boom")

    async def scenario():
        watcher = InboxWatcher(inbox, settle_seconds=SETTLE, rescan_seconds=30, recursive=True, ignore=DEFAULT_IGNORE)
        task = asyncio.create_task(watcher.run(on_ready))
        try:
            (inbox / "bad.wav").write_bytes(b"b")
            await until(lambda: seen, "bad.wav to be emitted")
            (inbox / "good.wav").write_bytes(b"g")
            await until(lambda: len(seen) >= 2, "good.wav to be emitted")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with structlog.testing.capture_logs() as logs:
        run(scenario())
    assert seen == [inbox / "bad.wav", inbox / "good.wav"]
    assert [entry["path"] for entry in logs if entry["event"] == "watch.on_ready_failed"] == [str(inbox / "bad.wav")]


def logged(logs: list[dict], event: str) -> int:
    """How many log entries captured so far are `event`."""
    return sum(1 for entry in logs if entry["event"] == event)


def test_missing_inbox_is_reported_and_watched_once_it_returns(tmp_path, no_thread_leak):
    """A missing (or deleted) inbox logs watch.inbox_missing; files are emitted again once it is back."""
    inbox = tmp_path / "inbox"

    async def scenario():
        async with Harness(inbox, rescan_seconds=0.2) as harness:  # its first rescan found no inbox
            inbox.mkdir()
            (inbox / "first.wav").write_bytes(b"1" * 100)
            await harness.wait_for(1)
            shutil.rmtree(inbox)
            await until(lambda: logged(logs, "watch.inbox_missing") == 2, "the deleted inbox to be reported")
            inbox.mkdir()
            await until(lambda: logged(logs, "watch.inbox_back") == 2, "a rescan to re-watch the inbox")
            (inbox / "second.wav").write_bytes(b"2" * 100)
            await harness.wait_for(2)
            assert harness.emitted == [inbox / "first.wav", inbox / "second.wav"]

    with structlog.testing.capture_logs() as logs:
        run(scenario())
    events = [entry["event"] for entry in logs]
    assert events.count("watch.inbox_missing") == 2
    assert all(entry["log_level"] == "error" for entry in logs if entry["event"] == "watch.inbox_missing")


def test_inbox_replaced_is_watched_by_events_again(tmp_path, no_thread_leak):
    """A deleted and recreated inbox gets a new inotify watch: a new file in it is taken with no full rescan in between."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()

    async def scenario():
        # Full rescans 10 minutes apart; while the inbox is missing it is looked for every MISSING_RETRY_SECONDS.
        async with Harness(inbox, rescan_seconds=600.0) as harness:
            inbox.rmdir()
            await until(lambda: logged(logs, "watch.inbox_missing") == 1, "the deleted inbox to be reported")
            inbox.mkdir()
            await until(lambda: logged(logs, "watch.inbox_back") == 1,
                        f"the recreated inbox to be found (looked for every {MISSING_RETRY_SECONDS} s)")
            rescans = harness.watcher.rescans
            (inbox / "new.wav").write_bytes(b"n" * 100)
            await harness.wait_for(1)
            assert harness.emitted == [inbox / "new.wav"]
            assert harness.watcher.rescans == rescans  # so it came by an inotify event on the new folder

    with structlog.testing.capture_logs() as logs:
        run(scenario())


def test_no_thread_is_left_after_run_is_cancelled(tmp_path):
    """Cancelling run() stops and joins watchdog's threads: none is left running."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    before = set(threading.enumerate())

    async def scenario():
        async with Harness(inbox) as harness:
            (inbox / "a.wav").write_bytes(b"a")
            await harness.wait_for(1)
            assert len(threading.enumerate()) > len(before)  # the observer was running

    run(scenario())
    leaked = [thread for thread in threading.enumerate() if thread not in before and thread.is_alive()]
    assert [thread for thread in leaked if not thread.name.startswith("asyncio_")] == []


@pytest.mark.slow
def test_file_written_slowly_is_emitted_once_after_the_last_write(inbox):
    """A file written over ~20 s in chunks with pauses shorter than settle is emitted once, after the last write."""
    settle = 0.5

    async def scenario():
        async with Harness(inbox, settle_seconds=settle, rescan_seconds=0.7) as harness:
            # The file stays open throughout: a pause longer than settle on a loaded machine still
            # holds it (no close-write yet: open_cap_seconds, 60 s here), so the outcome does not
            # hang on how long each sleep really took.
            with open(inbox / "slow.wav", "wb") as handle:
                for index in range(60):
                    handle.write(os.urandom(4096))
                    handle.flush()
                    await asyncio.sleep(0.33 if index % 2 else 0.3)
                    assert harness.emitted == [], f"emitted during the write, after chunk {index}"
                handle.write(b"end")
            last_write = time.monotonic()
            await harness.wait_for(1)
            assert harness.times[0] >= last_write
            await harness.settled()
            assert harness.emitted == [inbox / "slow.wav"]
            assert (inbox / "slow.wav").stat().st_size == 60 * 4096 + 3

    run(scenario())


def test_stop_ends_run_without_cancelling_the_task(tmp_path):
    """stop() alone makes run() return and join its observer, so a lost cancellation cannot hold a daemon's stop."""
    async def scenario():
        watcher = InboxWatcher(tmp_path, settle_seconds=0.3, rescan_seconds=60, recursive=True, ignore=[])
        task = asyncio.get_running_loop().create_task(watcher.run(lambda path: None))
        await watcher.started.wait()
        watcher.stop()
        await asyncio.wait_for(task, timeout=WAIT_S)
        return task.done() and not task.cancelled()

    before = {thread.ident for thread in threading.enumerate()}
    assert asyncio.run(scenario())
    assert [thread for thread in threading.enumerate() if thread.ident not in before and thread.is_alive()] == []
