"""Early work on a file closed after writing, done while its settle timer runs.

When a writer closes an inbox file the watcher calls `Prefetch.closed(relpath, path)`. In a worker
thread the file is hashed and its audio extracted into state/prefetch/, the same work intake and the
extract stage do once the file has settled. Those stages then ask for it by the file's version
(size, mtime, inode): `digest()` gives intake the sha256, `take_audio()` hands the extract stage the
Opus file. Work is used only for exactly the version a stage took, and only when the file was
unchanged from before the hashing to after the extraction; any other (the file was rewritten,
replaced, never taken) is thrown away. The settle rule itself is unchanged: a file is still taken
only after `settle_seconds` of quiet; prefetch only moves the reading earlier. At most
`MAX_ENTRIES` files are held at once (the oldest is dropped first), so a burst of files costs
bounded disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import threading
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from whisperdrop.daemon.extract import Extracted, MediaError, extract
from whisperdrop.engine.engine import Cancelled
from whisperdrop.shared.files import sha256_file

MAX_ENTRIES = 8

Version = tuple[int, int, int]  # size, mtime_ns, inode: one version of a file, told apart without reading it


def version_of(info: os.stat_result) -> Version:
    return info.st_size, info.st_mtime_ns, info.st_ino


def _current_version(path: Path) -> Version | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return version_of(info) if stat.S_ISREG(info.st_mode) else None


@dataclass
class _Entry:
    version: Version
    audio: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task | None = None
    digest: str | None = None
    extracted: Extracted | None = None


class Prefetch:
    """Hashes and extracts closed inbox files ahead of intake; see the module docstring.

    Used from the event loop's thread only; the reading runs on `io`, under `slots` (the pipeline's
    bound on concurrent PyAV work) when given.
    """

    def __init__(self, folder: Path, io: Executor, bitrate_kbps: int, log: Any,
                 slots: asyncio.Semaphore | None = None):
        self.folder = Path(folder)
        self.io = io
        self.bitrate_kbps = bitrate_kbps
        self.log = log
        self.slots = slots
        self._entries: dict[str, _Entry] = {}  # inbox-relative path -> its newest prefetched version
        self.used = 0  # how many prefetched extractions a stage took (tests and status read it)

    def start(self) -> None:
        """Make the folder and remove what an earlier run left there (its versions are unknown now)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.glob("*.opus"):
            leftover.unlink(missing_ok=True)

    def closed(self, relpath: str, path: Path) -> None:
        """A writer closed `path`: start hashing and extracting this version, dropping an older one."""
        version = _current_version(path)
        if version is None:
            return
        entry = self._entries.get(relpath)
        if entry is not None:
            if entry.version == version:
                return
            self.discard(relpath, "the file changed again")
        while len(self._entries) >= MAX_ENTRIES:
            self.discard(next(iter(self._entries)), "too many files waiting to settle")
        entry = _Entry(version, self.folder / f"{uuid.uuid4().hex}.opus")
        self._entries[relpath] = entry
        entry.task = asyncio.get_running_loop().create_task(self._work(relpath, path, entry))

    async def _work(self, relpath: str, path: Path, entry: _Entry) -> None:
        def read() -> None:
            digest = sha256_file(path, entry.cancel)
            if _current_version(path) != entry.version:
                return
            entry.digest = digest
            try:
                extracted = extract(path, entry.audio, self.bitrate_kbps, cancel=entry.cancel)
            except MediaError:
                return  # the extract stage meets the same error and reports it with the source's name
            if _current_version(path) == entry.version:
                entry.extracted = extracted

        loop = asyncio.get_running_loop()
        try:
            if self.slots is None:
                await loop.run_in_executor(self.io, read)
            else:
                async with self.slots:
                    await loop.run_in_executor(self.io, read)
        except (OSError, Cancelled) as error:  # gone, unreadable, or discarded: the stages do it themselves
            self.log.debug("prefetch.skipped", path=relpath, reason=str(error) or type(error).__name__)
        finally:
            if self._entries.get(relpath) is not entry or entry.extracted is None:
                entry.audio.unlink(missing_ok=True)
        if entry.extracted is not None and self._entries.get(relpath) is entry:
            self.log.debug("prefetch.done", path=relpath, seconds=round(entry.extracted.seconds, 3))

    async def _finished(self, relpath: str, version: Version) -> _Entry | None:
        """The entry for exactly this version once its work has ended, or None."""
        entry = self._entries.get(relpath)
        if entry is None or entry.version != version or entry.task is None:
            return None
        await asyncio.wait({entry.task})
        return entry if self._entries.get(relpath) is entry else None

    async def digest(self, relpath: str, info: os.stat_result) -> str | None:
        """The sha256 of the version `info` describes, if it was prefetched (waits for it to end)."""
        entry = await self._finished(relpath, version_of(info))
        return None if entry is None else entry.digest

    async def take_audio(self, relpath: str, version: Version, sha256: str, dest: Path) -> Extracted | None:
        """Move the prefetched audio of this version to `dest` when its content hashed to `sha256`;
        None when there is none (the caller extracts). Raises OSError when the move fails."""
        entry = await self._finished(relpath, version)
        if entry is None or entry.extracted is None or entry.digest != sha256:
            return None
        del self._entries[relpath]
        os.replace(entry.audio, dest)
        self.used += 1
        return dataclasses.replace(entry.extracted, path=dest)

    def discard(self, relpath: str, reason: str) -> None:
        """Drop the work for `relpath`: its reading is cancelled and its audio removed."""
        entry = self._entries.pop(relpath, None)
        if entry is None:
            return
        entry.cancel.set()
        if entry.task is not None and entry.task.done():
            entry.audio.unlink(missing_ok=True)
        self.log.debug("prefetch.discarded", path=relpath, reason=reason)

    async def close(self) -> None:
        """Cancel every reading, wait for the threads to notice, and remove the audio."""
        tasks = [entry.task for entry in self._entries.values() if entry.task is not None]
        for relpath in list(self._entries):
            self.discard(relpath, "the daemon is stopping")
        if tasks:
            await asyncio.wait(tasks)
