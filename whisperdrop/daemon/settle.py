"""When a file in the inbox has arrived: the watcher's pure core, with an injected clock and stat.

`Settler` is told what happened to a path (`observe`, one of KINDS) and decides when the path has
settled (`ready`); no threads, no sleeping. `watch.InboxWatcher` feeds it from inotify events and
rescans. The rules:

- A file is taken once nothing has changed for `settle_seconds`. A file with modify events and no
  close-write yet is still being written and waits, up to `open_cap_seconds` of quiet (writers on
  NFS and the like never send close-write), after which stat-stability alone decides.
- Each version of a file, `(size, mtime_ns)`, is emitted once. A rescan does not emit it again;
  a change, `forget()` (the pipeline took it away), or a new file at that name does.
- A path that is not a regular file (a symlink, a folder, a fifo) is never emitted.
"""

from __future__ import annotations

import os
import stat as stat_module
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

KINDS = frozenset({"created", "modified", "closed", "moved_in", "deleted", "seen"})

# Events that mean "the content at this name was (re)written just now": they restart the quiet time.
_CHANGE_KINDS = frozenset({"created", "modified", "closed", "moved_in"})

def default_open_cap(settle_seconds: float) -> float:
    """How long a file with writes but no close-write may stay quiet before stat alone decides."""
    return max(60.0, 10.0 * settle_seconds)


@dataclass
class _PathState:
    """What the settler knows about one path (mutable, private to `Settler`)."""

    last_change: float  # clock time of the last event or stat change that restarted the quiet time
    version: tuple[int, int] | None  # (size, mtime_ns) at the last stat; None before any good stat
    writing: bool = False  # modify events seen and no close-write (or rename in) since
    emitted: tuple[int, int] | None = None  # the version handed out by ready(), if any
    dirty: bool = True  # observed since the last stat: ready() must stat it again


class Settler:
    """Pure: decides when paths are settled. No threads, no sleeping.

    `clock` returns seconds (monotonic); `stat` is `os.lstat`-like (a symlink is reported as such,
    so it is never taken). `open_cap_seconds` defaults to `max(60, 10 * settle_seconds)`.
    """

    def __init__(
        self,
        settle_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        stat: Callable[[Path], os.stat_result] = os.lstat,
        open_cap_seconds: float | None = None,
    ):
        if settle_seconds < 0:
            raise ValueError(f"settle_seconds must be 0 or more, got {settle_seconds!r}")
        self.settle_seconds = float(settle_seconds)
        self.open_cap_seconds = float(
            default_open_cap(settle_seconds) if open_cap_seconds is None else max(open_cap_seconds, settle_seconds)
        )
        self._clock = clock
        self._stat = stat
        self._states: dict[Path, _PathState] = {}

    def observe(self, path: Path, kind: str) -> None:
        """Record that `kind` happened to `path` now; kind is one of `KINDS` ("seen": found by a rescan).

        Raises ValueError for an unknown kind.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}; expected one of {sorted(KINDS)}")
        path = Path(path)
        if kind == "deleted":
            self._states.pop(path, None)
            return
        now = self._clock()
        version = self._version(path)
        state = self._states.get(path)
        if state is None:
            state = self._states[path] = _PathState(last_change=now, version=version)
        if kind in _CHANGE_KINDS or version != state.version:
            state.version = version
            state.last_change = now
        if kind == "modified":
            state.writing = True
        elif kind in ("closed", "moved_in"):
            state.writing = False
        if kind in ("created", "moved_in"):
            state.emitted = None  # a new file at this name, whatever its size and mtime
        state.dirty = True

    def ready(self) -> list[Path]:
        """Paths settled now, each returned once per version; vanished and non-regular paths are dropped."""
        now = self._clock()
        settled: list[Path] = []
        for path, state in list(self._states.items()):
            pending = state.version is None or state.version != state.emitted
            if not state.dirty and not (pending and now >= state.last_change + self._quiet_needed(state)):
                continue
            state.dirty = False
            version = self._version(path)
            if version is None:
                del self._states[path]  # gone, or a symlink, directory, fifo...: never taken
                continue
            if version != state.version:
                state.version = version
                state.last_change = now
                continue
            if version == state.emitted:
                continue
            if now >= state.last_change + self._quiet_needed(state):
                state.emitted = version
                settled.append(path)
        return settled

    def next_wakeup(self) -> float | None:
        """Clock time at which `ready()` may next return something, or None when nothing is pending."""
        times = [
            state.last_change + self._quiet_needed(state)
            for state in self._states.values()
            if state.dirty or state.version is None or state.version != state.emitted
        ]
        return min(times) if times else None

    def forget(self, path: Path) -> None:
        """The pipeline took `path` away (moved or archived): stop tracking it."""
        self._states.pop(Path(path), None)

    def tracked(self) -> list[Path]:
        """Every path the settler holds, emitted or not (for rescans to find vanished ones)."""
        return list(self._states)

    def _quiet_needed(self, state: _PathState) -> float:
        return self.open_cap_seconds if state.writing else self.settle_seconds

    def _version(self, path: Path) -> tuple[int, int] | None:
        try:
            result = self._stat(path)
        except OSError:
            return None
        if not stat_module.S_ISREG(result.st_mode):
            return None
        return (result.st_size, result.st_mtime_ns)
