"""The outbox stage's file work, run in a worker thread: outputs for one source, then the source
leaves the inbox (archive, delete or keep); or, for a failed job, the source goes to `failed/`
beside its error record. In library mode (`library_mode`, see `library.py`) the subtitles go beside
the source instead, the JSON Result to the outbox, and the source stays where it is, done or failed.

These functions touch only files; they return what happened, and the caller (on the event loop)
records it in the ledger afterwards, so a crash between the two finds the files done and the
ledger behind, which the next start completes (the outputs are recognised as already written).
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whisperdrop.daemon import library, outbox
from whisperdrop.daemon.ledger import Job, Source
from whisperdrop.outputs import result as results
from whisperdrop.shared.files import fsync_directory


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
    timings written with them, and `cached_from` when the Result was served from an earlier run.
    `outputs`: the absolute paths holding the transcript; `kept`: files of others at the names library
    mode would have used, left alone; `source`: where the source is now (None once deleted)."""

    replaced: bool
    base: str | None = None
    already: bool = False
    timings: dict | None = None
    cached_from: dict | None = None  # served from the job done earlier: its id and when
    outputs: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    source: str | None = None
    language: str | None = None


def deliver_source(config: Any, job: Job, source: Source, result: dict, formats: list[str]) -> Delivered:
    """Write the outputs of `result` for `source` (unless already there), then apply `after_success`
    to the inbox file; in library mode, the subtitle formats beside the source and the JSON to the
    outbox, the source kept. Raises OSError (the caller retries)."""
    inbox, outbox_root = Path(config.inbox), Path(config.outbox)
    path = inbox / source.relpath
    relative = Path(source.relpath)
    if os.path.lexists(path) and not same_version(path, source.size, source.mtime_ns):
        return Delivered(replaced=True)  # a new version at this path gets its own job; this is not its transcript
    added = {"settle_s": round(source.settle_s, 3)}
    archive_folder = Path(config.archive) / relative.parent
    usable = None
    in_library = bool(getattr(config, "library_mode", False))
    outbox_formats = [] if in_library else formats  # library mode: the JSON alone goes to the outbox
    if config.after_success == "archive" and os.path.lexists(path) and not in_library:  # outputs and archived copy share a name
        def usable(name: str) -> bool:
            return outbox.free_or_same(archive_folder / (name + relative.suffix), path)
    limits = outbox.Limits.from_config(config.subtitles)  # how SRT and VTT cues are cut
    base, already = outbox.plan_outputs(outbox_root / relative.parent, relative.stem, outbox_formats, job.job_id,
                                        result, limits, usable=usable)
    cached_from = None
    if job.finished_at is not None and source.taken_at > job.finished_at:  # dropped again after the job was done
        cached_from = {"job_id": job.job_id,
                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job.finished_at))}
    outputs = [base.with_name(f"{base.name}.{fmt}") for fmt in outbox_formats] + [base.with_name(base.name + ".json")]
    beside = library.Beside((), ())
    if in_library and os.path.lexists(path):  # beside it first: the outbox JSON, written last, means all is done
        beside = library.write_beside(path, result, formats, limits)
        outputs = list(beside.outputs) + outputs
    if not already:
        added["total_s"] = round(source.settle_s + (time.time() - source.taken_at), 3)
        document = results.for_source(result, path=source.relpath, size=source.size, sha256=job.source_sha256,
                                      timings=added, cached_from=cached_from)
        outbox.write_outputs(base, document, outbox_formats, limits)
    now_at: Path | None = path
    if os.path.lexists(path) and not in_library:
        if config.after_success == "archive":
            now_at = outbox.move_without_overwrite(path, archive_folder / (base.name + relative.suffix))
        elif config.after_success == "delete":
            os.unlink(path)
            fsync_directory(path.parent)
            now_at = None
    return Delivered(replaced=False, base=str(base.relative_to(outbox_root)), already=already,
                     timings=added if cached_from else {**(result.get("timings") or {}), **added},
                     cached_from=cached_from, outputs=tuple(str(output) for output in outputs),
                     kept=tuple(str(other) for other in beside.kept), source=str(now_at) if now_at else None,
                     language=result.get("language"))


def fail_source(config: Any, job: Job, source: Source) -> tuple[dict, Path]:
    """Move a failed job's source to `failed/` beside `<name>.error.json`; returns (the record, where
    the source went). The record says what failed, why, and how to try again. In library mode the
    source stays where it is and only the record goes to `failed/<path>.error.json`. Raises OSError."""
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
    if getattr(config, "library_mode", False):
        record["left_in_place"] = True
        record["what_to_do"] = job.hint or failure_hint(kind, library=True)
        record["retry"] = ("the file stays in the library; once it is fixed or replaced (or touched) it is taken "
                           "again")
        record_path = Path(config.failed) / (source.relpath + ".error.json")
        record_path.parent.mkdir(parents=True, exist_ok=True)
        outbox.write_atomic(record_path, json.dumps(record, ensure_ascii=False, indent=2).encode("utf-8") + b"\n")
        return record, Path(config.inbox) / source.relpath
    moved = outbox.record_failure(Path(config.inbox) / source.relpath, config.failed, source.relpath, record)
    return record, moved


def failure_hint(kind: str, library: bool = False) -> str:
    """What a person can do about a failed job of this kind (the error record's `what_to_do`); with
    `library`, for a source that stays in the library."""
    again = ("it stays in the library and is taken again once it changes (fix, replace or touch it)" if library
             else "move the file back into the inbox to try again")
    if kind in ("media", "audio"):
        return ("the file is not media with an audio stream that PyAV can decode; check it plays, re-export or "
                f"re-download it; {again}")
    if kind == "error":
        return f"an unexpected error, the same at every attempt; the daemon's log has its traceback (job.retry); {again}"
    return f"see the error; {again}"
