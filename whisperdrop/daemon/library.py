"""Media-library mode (`library_mode: true`): subtitles beside the source, named as media servers look
for them (`movie.mkv` -> `movie.en.srt`, `movie.en.vtt`, `movie.en.txt`), the source left where it is.

Rules, in short:

- The language tag is the Result's `language` (`en`); a translation's is `en` (Whisper translates to
  English); a Result without one gets `und` (undetermined, as Jellyfin and Plex read it).
- Nothing in the library is overwritten. A file already at a name is compared with what would be
  written: the same bytes are ours from an earlier run (a restart) and count as written; anything
  else belongs to someone else (Bazarr, a download) and is left alone, that one format not written.
  A new file is written to a hidden temporary name and hard-linked into place, which fails rather
  than replace a file that appeared meanwhile.
- The library holds more than media: subtitles, posters, `.nfo` files. `is_sidecar` names what the
  daemon never takes there (our own outputs included), so it neither loops on what it wrote nor
  records a poster as a failed job.

Pure functions plus one writer, run in the pipeline's worker threads; the caller logs what they return.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from whisperdrop.daemon import outbox
from whisperdrop.outputs.subtitles import Limits
from whisperdrop.shared.files import fsync_directory, write_all

# Names the daemon never takes in library mode: subtitles and text (ours and others'), artwork, metadata.
SIDECAR_SUFFIXES = frozenset({
    ".srt", ".vtt", ".txt", ".json", ".ass", ".ssa", ".sub", ".idx", ".sup", ".smi", ".lrc",
    ".nfo", ".xml", ".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tbn", ".ico", ".db", ".pdf", ".md",
})


def is_sidecar(path: Path | str) -> bool:
    """True for a file that is never media in a library (a subtitle, an image, a `.nfo`...)."""
    return Path(path).suffix.lower() in SIDECAR_SUFFIXES


def language_tag(result: dict) -> str:
    """The `<lang>` of `<stem>.<lang>.srt`: `en` for a translation, else the Result's language, else `und`."""
    if (result.get("options") or {}).get("task") == "translate":
        return "en"
    language = result.get("language")
    return language if isinstance(language, str) and language.isascii() and language.isalnum() else "und"


def subtitle_paths(source: Path, result: dict, formats: list[str]) -> dict[str, Path]:
    """Where each format goes beside `source`: `<folder>/<stem>.<lang>.<format>`."""
    tag = language_tag(result)
    return {fmt: source.with_name(f"{source.stem}.{tag}.{fmt}") for fmt in formats}


@dataclass(frozen=True)
class Beside:
    """What `write_beside` did: `outputs` hold this Result (written now or by an earlier run); `kept`
    are other files at our names, left alone (that format was not written)."""

    outputs: tuple[Path, ...]
    kept: tuple[Path, ...]


def write_beside(source: Path, document: dict, formats: list[str], limits: Limits = Limits()) -> Beside:
    """Write `document` in each of `formats` beside `source`, never over an existing file (see the
    module docstring). Returns what was written and what was left alone. Raises OSError."""
    outputs, kept = [], []
    wrote = False
    for fmt, path in subtitle_paths(source, document, formats).items():
        data = outbox.render(fmt, document, limits)
        if _holds(path, data):
            outputs.append(path)
            continue
        if os.path.lexists(path) or not _write_new(path, data):
            kept.append(path)
            continue
        outputs.append(path)
        wrote = True
    if wrote:
        fsync_directory(source.parent)
    return Beside(tuple(outputs), tuple(kept))


def _holds(path: Path, data: bytes) -> bool:
    """Whether `path` is a regular file holding exactly `data`."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError:
        return False


def _write_new(path: Path, data: bytes) -> bool:
    """Create `path` holding `data`; False (nothing written) when a file is at that name already.

    A hidden temporary, fsynced, then hard-linked into place (a link never replaces a file). On a file
    system without hard links (some SMB and FAT mounts), an exclusive create of `path` itself instead."""
    temporary = path.with_name(f".{path.name}.whisperdrop.tmp")
    temporary.unlink(missing_ok=True)  # a crashed writer's leftover
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        try:
            write_all(descriptor, data)
        finally:
            os.close(descriptor)
        try:
            os.link(temporary, path, follow_symlinks=False)
            return True
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
    finally:
        temporary.unlink(missing_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        return False
    try:
        write_all(descriptor, data)
    finally:
        os.close(descriptor)
    return True
