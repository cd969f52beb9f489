"""The outbox stage's file work, run in a worker thread: outputs for one source, then the source
leaves the inbox (archive, delete or keep); or, for a failed job, the source goes to `failed/`
beside its error record.

These functions touch only files; they return what happened, and the caller (on the event loop)
records it in the ledger afterwards, so a crash between the two finds the files done and the
ledger behind, which the next start completes (the outputs are recognised as already written).
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whisperdrop import result as results
from whisperdrop.daemon import outbox
from whisperdrop.daemon.ledger import Job, Source
from whisperdrop.files import fsync_directory


def same_version(path: Path, size: int, mtime_ns: int) -> bool:
    """True when `path` is still a regular file with this size and mtime (the version taken at intake)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and (info.st_size, info.st_mtime_ns) == (size, mtime_ns)


@dataclass(frozen=True)
class Delivered:
    """What `deliver_source` did: `replaced` (another version is at the path now; nothing written),
    else the outputs' base path relative to the outbox, whether they were there already, the
    timings written with them, and `cached_from` when the Result was served from an earlier run."""

    replaced: bool
    base: str | None = None
    already: bool = False
    timings: dict | None = None
    cached_from: dict | None = None  # served from the job done earlier: its id and when


def deliver_source(config: Any, job: Job, source: Source, result: dict, formats: list[str]) -> Delivered:
    """Write the outputs of `result` for `source` (unless already there), then apply `after_success`
    to the inbox file. Raises OSError (the caller retries)."""
    inbox, outbox_root = Path(config.inbox), Path(config.outbox)
    path = inbox / source.relpath
    relative = Path(source.relpath)
    if os.path.lexists(path) and not same_version(path, source.size, source.mtime_ns):
        return Delivered(replaced=True)  # a new version at this path gets its own job; this is not its transcript
    added = {"settle_s": round(source.settle_s, 3)}
    archive_folder = Path(config.archive) / relative.parent
    usable = None
    if config.after_success == "archive" and os.path.lexists(path):  # outputs and archived copy share a name
        def usable(name: str) -> bool:
            return outbox.free_or_same(archive_folder / (name + relative.suffix), path)
    limits = outbox.Limits.from_config(config.subtitles)  # how SRT and VTT cues are cut
    base, already = outbox.plan_outputs(outbox_root / relative.parent, relative.stem, formats, job.job_id, result,
                                        limits, usable=usable)
    cached_from = None
    if job.finished_at is not None and source.taken_at > job.finished_at:  # dropped again after the job was done
        cached_from = {"job_id": job.job_id,
                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job.finished_at))}
    if not already:
        added["total_s"] = round(source.settle_s + (time.time() - source.taken_at), 3)
        document = results.for_source(result, path=source.relpath, size=source.size, sha256=job.source_sha256,
                                      timings=added, cached_from=cached_from)
        outbox.write_outputs(base, document, formats, limits)
    if os.path.lexists(path):
        if config.after_success == "archive":
            outbox.move_without_overwrite(path, archive_folder / (base.name + relative.suffix))
        elif config.after_success == "delete":
            os.unlink(path)
            fsync_directory(path.parent)
    return Delivered(replaced=False, base=str(base.relative_to(outbox_root)), already=already,
                     timings=added if cached_from else {**(result.get("timings") or {}), **added},
                     cached_from=cached_from)


def fail_source(config: Any, job: Job, source: Source) -> tuple[dict, Path]:
    """Move a failed job's source to `failed/` beside `<name>.error.json`; returns (the record, where
    the source went). The record says what failed, why, and how to try again. Raises OSError."""
    kind, _, message = (job.last_error or "error: unknown").partition(": ")
    record = {
        "path": source.relpath,
        "job_id": job.job_id,
        "kind": kind,
        "error": message,
        "what_to_do": job.hint or failure_hint(kind),
        "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "retry": "move the file back into the inbox once it is fixed; it will be taken again",
    }
    moved = outbox.record_failure(Path(config.inbox) / source.relpath, config.failed, source.relpath, record)
    return record, moved


def failure_hint(kind: str) -> str:
    """What a person can do about a failed job of this kind (the error record's `what_to_do`)."""
    if kind in ("media", "audio"):
        return ("the file is not media with an audio stream that PyAV can decode; check it plays, re-export or "
                "re-download it, then move it back into the inbox")
    if kind == "error":
        return ("an unexpected error, the same at every attempt; the daemon's log has its traceback (job.retry); "
                "move the file back into the inbox to try again")
    return "see the error; move the file back into the inbox to try again"
