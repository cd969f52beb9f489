"""Watch the inbox: inotify events (watchdog) plus a full rescan at start-up and on a timer.

`InboxWatcher` is the thin I/O shell around `settle.Settler` (the pure core, which decides when a
path has settled): it runs a watchdog observer whose thread hands events to the asyncio loop,
rescans the inbox, wakes when the settler says something may be ready, and calls `on_ready(path)`
(and `on_closed(path)` as soon as a writer closes a file, for work that may start before it settles).

Rules, in short:

- A file is taken once nothing has changed for `settle_seconds`. A file with modify events and no
  close-write yet is still being written and waits, up to `open_cap_seconds` of quiet (writers on
  NFS and the like never send close-write), after which stat-stability alone decides.
- Each version of a file, `(size, mtime_ns)`, is emitted once. A rescan does not emit it again;
  a change, `forget()` (the pipeline took it away), or a new file at that name does.
- Temporary names (`*.part`, dotfiles...: the config's `watch.ignore`), dot directories, symlinks
  and anything under a symlinked directory are never taken. Directories are never emitted.

The first two rules are the Settler's, the third this shell's (`is_ignored`, the walk).
"""

from __future__ import annotations

import asyncio
import fnmatch
import inspect
import os
import stat as stat_module
import time
from pathlib import Path, PurePath
from typing import Awaitable, Callable, Iterable

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from whisperdrop.daemon.settle import Settler
from whisperdrop.daemon.shutdown import Shutdown

log = structlog.get_logger()

# While the inbox is missing it is looked for this often (a stat), so a recreated inbox is watched soon.
MISSING_RETRY_SECONDS = 2.0

# What the inotify watch asks for. Opens and close-without-write are left out: the daemon's own
# reads of a file would otherwise come back as events about it.
_EVENT_FILTER = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]


def is_ignored(relative: PurePath, patterns: Iterable[str]) -> bool:
    """True when a path (relative to the inbox) must not be taken.

    That is when any of its components matches one of the glob `patterns` (temporary names such
    as `*.part`), or any of its folders is a dot folder (always skipped, whatever the patterns).
    Matching is case-sensitive, and `*` matches any character, newlines included.
    """
    parts = relative.parts
    if any(part.startswith(".") for part in parts[:-1]):
        return True
    return any(fnmatch.fnmatchcase(part, pattern) for part in parts for pattern in patterns)


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's thread: turns events into (kind, path) and hands them to the loop."""

    def __init__(self, deliver: Callable[[list[tuple[str, str]]], None]):
        super().__init__()
        self._deliver = deliver

    def dispatch(self, event: FileSystemEvent) -> None:
        items = _translate(event)
        if items:
            self._deliver(items)


def _translate(event: FileSystemEvent) -> list[tuple[str, str]]:
    """One watchdog event as a list of (kind, path) pairs; kinds beyond the settler's: dir_in, dir_gone."""
    src = os.fsdecode(event.src_path)
    dest = os.fsdecode(event.dest_path) if event.dest_path else ""
    if isinstance(event, FileMovedEvent):
        items = [("deleted", src)] if src else []
        return items + ([("moved_in", dest)] if dest else [])
    if isinstance(event, DirMovedEvent):
        items = [("dir_gone", src)] if src else []
        return items + ([("dir_in", dest)] if dest else [])
    kind = {
        FileCreatedEvent: "created",
        FileModifiedEvent: "modified",
        FileAttribEvent: "seen",
        FileClosedEvent: "closed",
        FileDeletedEvent: "deleted",
        DirCreatedEvent: "dir_in",
        DirDeletedEvent: "dir_gone",
    }.get(type(event))
    return [(kind, src)] if kind else []


class InboxWatcher:
    """Watches `inbox` and calls `on_ready(path)` for each settled file (see the module docstring).

    Paths handed out are under `inbox` as given (made absolute), even when it is itself a symlink.
    `run()` returns once `shutdown` (the daemon's stop request; a watcher of its own when not given)
    is requested.
    """

    def __init__(
        self,
        inbox: Path,
        *,
        settle_seconds: float,
        rescan_seconds: float,
        recursive: bool,
        ignore: list[str],
        clock: Callable[[], float] = time.monotonic,
        on_closed: Callable[[Path], None] | None = None,
        shutdown: Shutdown | None = None,
    ):
        if rescan_seconds <= 0:
            raise ValueError(f"rescan_seconds must be greater than 0, got {rescan_seconds!r}")
        self.inbox = Path(os.path.abspath(inbox))
        self.rescan_seconds = float(rescan_seconds)
        self.recursive = recursive
        self.ignore = list(ignore)
        self._clock = clock
        self.settler = Settler(settle_seconds, clock=clock)
        self._wakeup: asyncio.Event | None = None
        self._pending: list[tuple[str, str]] = []
        self._observer: Observer | None = None
        self._watch = None
        self._watch_root: Path | None = None
        self._watch_identity: tuple[str, int, int] | None = None
        self._inbox_present: bool | None = None
        self._rescan_now = False
        self.started = asyncio.Event()  # set once the inbox is watched and first scanned
        self.rescans = 0  # full rescans finished: lets a caller know the watcher has looked again
        self.shutdown = shutdown or Shutdown()
        # Told (on the loop, never awaited) when a writer closes a file or moves one in, so its reading
        # can start while the settle timer runs (daemon.prefetch); whether it is taken is still ready()'s call.
        self._on_closed = on_closed

    def forget(self, path: Path) -> None:
        """The pipeline took `path` away: a file at that name later is a new file."""
        self.settler.forget(path)

    def stop(self) -> None:
        """Ask `run()` to return at its next turn: requests the watcher's `shutdown` (the whole
        daemon's, when it was given the daemon's)."""
        self.shutdown.request("watcher stopped")

    async def run(self, on_ready: Callable[[Path], Awaitable[None] | None]) -> None:
        """Watch until cancelled, calling (and awaiting, if it returns an awaitable) `on_ready(path)`.

        An exception from `on_ready` is logged with the path and does not stop the watch. On exit the
        observer thread is stopped and joined.
        """
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()

        def deliver(items: list[tuple[str, str]]) -> None:  # on watchdog's thread
            try:
                loop.call_soon_threadsafe(self._receive, items)
            except RuntimeError:
                pass  # the loop is closed: run() has ended and nobody wants events any more

        self._observer = Observer()
        self._observer.start()
        self._handler = _Handler(deliver)
        try:
            await self._rescan()
            self.started.set()
            next_rescan = self._clock() + self._rescan_interval()
            while not self.shutdown.is_set():
                self._apply_pending()
                if self._rescan_now or self._clock() >= next_rescan:
                    self._rescan_now = False
                    await self._rescan()
                    next_rescan = self._clock() + self._rescan_interval()
                    self._apply_pending()
                for path in self.settler.ready():
                    await self._call(on_ready, path)
                wake = self.settler.next_wakeup()
                deadline = next_rescan if wake is None else min(next_rescan, wake)
                timeout = max(0.0, deadline - self._clock())
                if not self._pending and not self._rescan_now:
                    self._wakeup.clear()
                    await self.shutdown.wait(timeout, wake=self._wakeup)  # events, the deadline, or a stop
        finally:
            observer, self._observer, self._watch = self._observer, None, None
            observer.stop()
            # Joined off the event loop: a slow inotify thread must not freeze the daemon's stop.
            await asyncio.to_thread(observer.join, 10)
            if observer.is_alive():
                log.error("watch.observer_stuck", inbox=str(self.inbox))

    def _rescan_interval(self) -> float:
        """Seconds to the next rescan: `rescan_seconds`, or at most MISSING_RETRY_SECONDS while the inbox is missing."""
        if self._inbox_present is False:
            return min(self.rescan_seconds, MISSING_RETRY_SECONDS)
        return self.rescan_seconds

    # -- events ---------------------------------------------------------------------------------

    def _receive(self, items: list[tuple[str, str]]) -> None:
        """On the loop: queue events from watchdog's thread and wake the loop."""
        self._pending.extend(items)
        if self._wakeup is not None:
            self._wakeup.set()

    def _apply_pending(self) -> None:
        items, self._pending = self._pending, []
        for kind, raw in items:
            if self._watch_root is None:
                continue
            try:
                relative = Path(raw).relative_to(self._watch_root)
            except ValueError:
                continue
            if kind == "dir_gone" and relative == Path("."):
                self._drop_watch()  # the inbox itself went away: the rescan says so, and re-watches it when back
                self._rescan_now = True
                continue
            if relative == Path(".") or not self._wanted(relative):
                continue
            path = self.inbox / relative
            if kind == "dir_in":
                if self.recursive:
                    for found in self._walk(path):
                        self.settler.observe(found, "seen")
            elif kind == "dir_gone":
                for known in self.settler.tracked():
                    if path in known.parents:
                        self.settler.observe(known, "seen")  # ready() finds it gone and drops it
            elif kind == "deleted":
                self.settler.observe(path, kind)
            elif not self._under_symlink(relative):
                self.settler.observe(path, kind)
                if kind in ("closed", "moved_in") and self._on_closed is not None:
                    try:
                        self._on_closed(path)
                    except Exception:  # early work is optional; it must never stop the watch
                        log.exception("watch.on_closed_failed", path=str(path))

    def _wanted(self, relative: Path) -> bool:
        if not self.recursive and len(relative.parts) > 1:
            return False
        return not is_ignored(relative, self.ignore)

    def _under_symlink(self, relative: Path) -> bool:
        """True when a folder between the inbox and this path is a symlink (never followed)."""
        folder = self.inbox
        for part in relative.parts[:-1]:
            folder = folder / part
            try:
                if stat_module.S_ISLNK(os.lstat(folder).st_mode):
                    return True
            except OSError:
                return True
        return False

    async def _call(self, on_ready: Callable[[Path], Awaitable[None] | None], path: Path) -> None:
        try:
            outcome = on_ready(path)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as error:  # one failing file never stops the watch
            log.exception("watch.on_ready_failed", path=str(path), error=repr(error))

    # -- rescans --------------------------------------------------------------------------------

    async def _rescan(self) -> None:
        """Make sure the inbox is watched, list every file in it, and drop what vanished unseen."""
        present = self.inbox.is_dir()
        if present:
            if self._watch is not None and self._watched_identity() != self._watch_identity:
                self._drop_watch()  # the inbox was replaced or moved away since it was watched
            self._ensure_watch()
            found = await asyncio.to_thread(self._list_all)
        else:
            found = None
        if found is None:
            self._drop_watch()
            if self._inbox_present is not False:
                log.error("watch.inbox_missing", inbox=str(self.inbox), retry_seconds=min(self.rescan_seconds, MISSING_RETRY_SECONDS))
            self._inbox_present = False
            found = []
        elif self._inbox_present is False:
            log.info("watch.inbox_back", inbox=str(self.inbox))
            self._inbox_present = True
        else:
            self._inbox_present = True
        found_set = set(found)
        for path in found:
            self.settler.observe(path, "seen")
        for known in self.settler.tracked():
            if known not in found_set:
                self.settler.observe(known, "seen")  # ready() stats it: gone is dropped, present is kept
        self.rescans += 1

    def _list_all(self) -> list[Path] | None:
        """Every wanted regular file in the inbox (None when the inbox cannot be listed at all)."""
        try:
            with os.scandir(self.inbox):
                pass
        except OSError:
            return None
        return list(self._walk(self.inbox))

    def _walk(self, top: Path) -> Iterable[Path]:
        """Regular files under `top` (recursively if configured), not following symlinks, skipping ignored names."""
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                if folder != self.inbox and not stat_module.S_ISDIR(os.lstat(folder).st_mode):
                    continue  # replaced by a symlink (or a file) since it was listed: never followed
                with os.scandir(folder) as entries:
                    listed = list(entries)
            except OSError as error:
                if folder != self.inbox:
                    log.warning("watch.scan_failed", folder=str(folder), error=str(error))
                continue
            for entry in listed:
                path = Path(entry.path)
                relative = path.relative_to(self.inbox)
                if is_ignored(relative, self.ignore):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if self.recursive:
                            stack.append(path)
                    elif entry.is_file(follow_symlinks=False):
                        yield path
                except OSError:
                    continue

    def _ensure_watch(self) -> None:
        """Schedule the inotify watch on the inbox if it has none (first start, or the inbox came back)."""
        if self._watch is not None or self._observer is None:
            return
        root = Path(os.path.realpath(self.inbox))
        identity = self._watched_identity()
        try:
            self._watch = self._observer.schedule(
                self._handler, str(root), recursive=self.recursive, event_filter=_EVENT_FILTER
            )
        except OSError as error:
            log.error("watch.watch_failed", inbox=str(self.inbox), error=str(error))
            return
        self._watch_root = root
        self._watch_identity = identity

    def _watched_identity(self) -> tuple[str, int, int] | None:
        """Which folder the inbox path names now: (real path, device, inode), or None if it names none."""
        root = os.path.realpath(self.inbox)
        try:
            result = os.stat(root)
        except OSError:
            return None
        return (root, result.st_dev, result.st_ino)

    def _drop_watch(self) -> None:
        if self._watch is None or self._observer is None:
            return
        try:
            self._observer.unschedule(self._watch)
        except (KeyError, OSError):
            pass  # its emitter already stopped when the inbox was deleted
        self._watch = None
