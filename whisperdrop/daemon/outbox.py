"""The outbox stage: render a Result to JSON, SRT, VTT and TXT, write each atomically, then move the
source away (archive) or into `failed/` beside an error record. The subtitle cues (SRT, VTT) are
built in `whisperdrop.outputs.subtitles`; the one-shot CLI writes through `write_outputs` too.

Every file is written to a temporary name, fsynced and renamed, and the folder fsynced, so a crash
leaves either the finished file or none. The JSON is written last: its presence, with this job's
id, means the outputs are complete. Names that collide get a suffix (`name-1.json`); nothing is
overwritten, and a source only leaves the inbox after its outputs (or its error record) are on disk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Callable

from whisperdrop.outputs.subtitles import Limits, render_srt, render_vtt
from whisperdrop.shared.files import fsync_directory, write_atomic  # write_atomic: callers use outbox.write_atomic too

FORMATS = ("srt", "vtt", "txt")


def render_txt(result: dict, limits: Limits | None = None) -> str:
    """One line a segment, as whisper cut them (`limits` is for the subtitle formats; unused here)."""
    lines = [segment["text"].strip() for segment in result["segments"]]
    return "\n".join(line for line in lines if line) + "\n"


RENDERERS = {"srt": render_srt, "vtt": render_vtt, "txt": render_txt}


def render(fmt: str, result: dict, limits: Limits) -> bytes:
    """`result` in format `fmt` (one of FORMATS), encoded as UTF-8."""
    return RENDERERS[fmt](result, limits).encode("utf-8")


def _json_made_by(path: Path) -> tuple[str | None, str | None]:
    """(job_id, model) of a Result file; (None, None) when it cannot be read as one."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return document.get("job_id"), document.get("model")
    except (OSError, ValueError, AttributeError):
        return None, None


def plan_outputs(folder: Path, stem: str, formats: list[str], job_id: str,
                 result: dict | None = None, limits: Limits = Limits(),
                 usable: Callable[[str], bool] | None = None) -> tuple[Path, bool]:
    """Choose the base path (without suffix) for a source's outputs in `folder`.

    Returns (base, already_written): `already_written` is True when `<base>.json` holds this job's
    Result already (a restart, or the same file dropped again), made by `result`'s model when given
    (a fallback model's Result of the same job is another transcript). Otherwise no file of the set exists,
    or (given `result`) the set has no JSON and every file present is byte for byte what `result`
    renders (SRT and VTT within the subtitle `limits` that `write_outputs` is given): a crash in
    `write_outputs` left it, and the set is completed in place, not beside it. A name for which
    `usable(name)` is False (the source's archive name is taken by another file) is passed over, so
    the outputs and the archived source share one name.
    """
    for index in range(10_000):
        base = folder / (stem if index == 0 else f"{stem}-{index}")
        if usable is not None and not usable(base.name):
            continue
        json_path = base.with_name(base.name + ".json")
        if json_path.exists():
            made_job, made_model = _json_made_by(json_path)
            if made_job == job_id and (result is None or made_model == result.get("model")):
                return base, True
        names = [json_path] + [base.with_name(f"{base.name}.{fmt}") for fmt in formats]
        if not any(os.path.lexists(name) for name in names):
            return base, False
        if result is not None and not os.path.lexists(json_path) and _ours(base, formats, result, limits):
            return base, False
    raise FileExistsError(errno.EEXIST, f"no free output name for {stem!r} in {folder}")


def _ours(base: Path, formats: list[str], result: dict, limits: Limits) -> bool:
    """Whether every format file present at `base` is a regular file holding what `result` renders."""
    for fmt in formats:
        path = base.with_name(f"{base.name}.{fmt}")
        if not os.path.lexists(path):
            continue
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode) or path.read_bytes() != render(fmt, result, limits):
                return False
        except OSError:
            return False
    return True


def write_outputs(base: Path, result: dict, formats: list[str], limits: Limits = Limits()) -> list[Path]:
    """Write the configured formats (SRT and VTT cues within `limits`) and then `<base>.json`; return
    the paths written."""
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = base.with_name(f"{base.name}.{fmt}")
        write_atomic(path, render(fmt, result, limits), durable=False)  # the folder is fsynced below
        written.append(path)
    json_path = base.with_name(base.name + ".json")
    write_atomic(json_path, json.dumps(result, ensure_ascii=False, indent=2).encode("utf-8") + b"\n", durable=False)
    written.append(json_path)
    fsync_directory(base.parent)
    return written


def _free_name(path: Path) -> Path:
    if not os.path.lexists(path):
        return path
    suffixes = "".join(path.suffixes[-1:])
    stem = path.name[: len(path.name) - len(suffixes)] if suffixes else path.name
    for index in range(1, 10_000):
        candidate = path.with_name(f"{stem}-{index}{suffixes}")
        if not os.path.lexists(candidate):
            return candidate
    raise FileExistsError(errno.EEXIST, f"no free name for {path}")


def free_or_same(candidate: Path, source: Path) -> bool:
    """Whether `candidate` is free, or already `source` itself (a hard link a crashed move left)."""
    try:
        other = os.lstat(candidate)
    except FileNotFoundError:
        return True
    try:
        status = os.lstat(source)
    except FileNotFoundError:
        return False
    return (other.st_dev, other.st_ino) == (status.st_dev, status.st_ino)


def move_without_overwrite(source: Path, destination: Path) -> Path:
    """Move `source` to `destination` (or a suffixed free name beside it); never overwrite.

    Same filesystem: hard link then unlink (atomic, fails rather than overwrite). Across filesystems:
    copy to a temporary name, fsync, link into place, then remove the source. Returns the final path.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    linked = _linked_copy(source, destination)
    if linked is not None:  # a crash between link and unlink left it there already: finish the move
        os.unlink(source)
        fsync_directory(source.parent)
        return linked
    while True:
        target = _free_name(destination)
        try:
            os.link(source, target, follow_symlinks=False)
        except FileExistsError:
            continue  # somebody took the name meanwhile
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP):
                raise
            target = _copy_then_link(source, target)
        break
    fsync_directory(target.parent)
    os.unlink(source)
    fsync_directory(source.parent)
    return target


def _linked_copy(source: Path, destination: Path) -> Path | None:
    """`destination` or a suffixed name beside it that is a hard link of `source` (same inode), if any."""
    try:
        status = os.lstat(source)
    except FileNotFoundError:
        return None
    candidate = destination
    stem = destination.name[: len(destination.name) - len(destination.suffix)] if destination.suffix else destination.name
    for index in range(1, 10_000):
        try:
            other = os.lstat(candidate)
        except FileNotFoundError:
            return None
        if (other.st_dev, other.st_ino) == (status.st_dev, status.st_ino):
            return candidate
        candidate = destination.with_name(f"{stem}-{index}{destination.suffix}")
    return None


def _copy_then_link(source: Path, target: Path) -> Path:
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        with open(source, "rb") as reader, open(temporary, "wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)
            writer.flush()
            os.fsync(writer.fileno())
        shutil.copystat(source, temporary)
        while True:
            try:
                os.link(temporary, target)
                return target
            except FileExistsError:
                target = _free_name(target)
    finally:
        temporary.unlink(missing_ok=True)


def record_failure(source: Path, failed_root: Path, relpath: str, error: dict) -> Path:
    """Move a source with a permanent error into `failed/` beside `<name>.error.json`.

    The error record is written first, so a crash in between leaves the source in the inbox with
    its record already in place (the next attempt rewrites it). Returns the source's new path.
    """
    destination = _free_name(failed_root / relpath)
    destination.parent.mkdir(parents=True, exist_ok=True)
    record = destination.with_name(destination.name + ".error.json")
    write_atomic(record, json.dumps(error, ensure_ascii=False, indent=2).encode("utf-8") + b"\n")
    if source.exists() or source.is_symlink():
        return move_without_overwrite(source, destination)
    return destination
