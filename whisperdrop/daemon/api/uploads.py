"""API uploads as sources of jobs: stored durably under `state_dir/uploads`, then delivered or discarded.

An accepted upload lives at `state_dir/uploads/<upload id>/<name>` beside `request.json` (what the
request asked of delivery), written and fsynced before the API answers. Its ledger source row has
the relative path `.api/<upload id>/<name>`: no inbox file can have it (the watcher skips dot
folders), so the stages tell the two apart by `is_upload`. Once the job is done, `deliver` writes
the outputs to `outbox/api/` (unless the request said no) and removes the upload; `discard` removes
the upload of a failed job. Nothing here imports FastAPI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from whisperdrop.daemon import outbox
from whisperdrop.daemon.extract import NOT_MEDIA, pyav_said
from whisperdrop.outputs import result as results
from whisperdrop.shared.files import fsync_directory, write_atomic

PREFIX = ".api/"
OUTBOX_FOLDER = "api"  # API jobs' outputs go to outbox/api/
CHUNK = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NAMING = threading.Lock()  # choosing an output name and writing it, one delivery at a time


class TooLarge(Exception):
    """The upload passed `limit` bytes (the API answers 413)."""

    def __init__(self, limit: int):
        super().__init__(f"the upload is larger than api.max_upload_mb ({limit / 1e6:g} MB)")
        self.limit = limit


class NotMedia(Exception):
    """The upload is not media with an audio stream PyAV can decode (the API answers 415)."""


@dataclass(frozen=True)
class Stored:
    """An upload written and fsynced: where it is, its ledger relpath, size, sha256 and mtime."""

    path: Path
    relpath: str
    size: int
    sha256: str
    mtime_ns: int
    inode: int


def is_upload(relpath: str) -> bool:
    """Whether a ledger source is an API upload rather than an inbox file."""
    return relpath.startswith(PREFIX)


def root(state_dir: Path) -> Path:
    return Path(state_dir) / "uploads"


def path_of(state_dir: Path, relpath: str) -> Path:
    """Where the upload of source `relpath` (`.api/<id>/<name>`) is stored."""
    return root(state_dir) / relpath[len(PREFIX):]


def safe_name(filename: str | None) -> str:
    """A file name for a name a client gave (an upload's, or `video_file`): its base name (after the
    last / or \\), unsafe characters replaced, at most 100 characters; "upload" when nothing is left."""
    name = _UNSAFE.sub("_", re.split(r"[/\\]", filename or "")[-1].strip()).strip("._")[:100]
    return name or "upload"


# Names that say nothing about the audio: what clients call every upload (Bazarr's `audio_file`,
# a browser's `blob`), and generated names (a UUID, a long hex or tempfile name).
GENERIC_STEMS = frozenset({"audio_file", "audio", "file", "blob", "upload", "video", "media", "recording", "speech",
                           "sound", "voice", "input", "data", "untitled", "tmp", "temp"})
_GENERATED = re.compile(r"[0-9a-f]{8}(-?[0-9a-f]{4}){3}-?[0-9a-f]{12}|[0-9a-f]{16,}|tmp[a-z0-9_]{6,}", re.IGNORECASE)
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,4}")


def is_generic(stem: str) -> bool:
    """Whether a name's stem says nothing about the audio (see GENERIC_STEMS)."""
    return stem.lower() in GENERIC_STEMS or bool(_GENERATED.fullmatch(stem))


def output_stem(video_file: str | None, filename: str | None, job_id: str, taken_at: float) -> str:
    """The name an API job's outputs get in outbox/api/: the base name of `video_file` (the video the
    audio comes from) when given, else of the upload's `filename`, made safe by `safe_name` and
    without its extension; when that is generic (`audio_file`, `blob`, a UUID...), the date the
    upload was taken and the job id's first 12 digits (`2026-05-01-1a2b3c4d5e6f`)."""
    for given in (video_file, filename):
        if not given:
            continue
        name = safe_name(given)
        extension = os.path.splitext(name)[1]
        stem = name[: -len(extension)] if extension and _EXTENSION.fullmatch(extension) \
            and not extension[1:].isdigit() else name
        stem = stem.strip("._")  # "Film (2019).mkv": Film_2019, not Film_2019_
        if stem and not is_generic(stem):
            return stem
    return f"{time.strftime('%Y-%m-%d', time.localtime(taken_at))}-{job_id[:12]}"


def store(stream: BinaryIO, state_dir: Path, filename: str | None, limit: int, *, raw_pcm: bool = False,
          write_outbox: bool = True, request: dict | None = None) -> Stored:
    """Copy `stream` to a new upload folder, hashing as it goes; fsync the file and folders. Raw
    16 kHz mono s16le PCM (`raw_pcm`, /asr's `encode=false`) is stored as a WAV file. Raises
    TooLarge past `limit` bytes, OSError; a failed store leaves nothing behind. Runs in a thread."""
    upload_id = os.urandom(12).hex()
    name = safe_name(filename)
    if raw_pcm:
        name = os.path.splitext(name)[0] + ".wav"
    folder = root(state_dir) / upload_id
    folder.mkdir(parents=True)
    path = folder / name
    try:
        digest = hashlib.sha256()
        with open(path, "wb") as writer:
            remaining = None  # raw PCM: exactly the whole samples, after a WAV header
            if raw_pcm:
                stream.seek(0, os.SEEK_END)
                size = stream.tell()
                stream.seek(0)
                if size > limit:
                    raise TooLarge(limit)
                remaining = size - size % 2
                header = wav_header(remaining)
                writer.write(header)
                digest.update(header)
            total = 0
            while chunk := stream.read(CHUNK if remaining is None else min(CHUNK, remaining)):
                total += len(chunk)
                if total > limit:
                    raise TooLarge(limit)
                if remaining is not None:
                    remaining -= len(chunk)
                writer.write(chunk)
                digest.update(chunk)
            writer.flush()
            os.fsync(writer.fileno())
        document = {"outbox": write_outbox, "filename": filename, **(request or {})}
        write_atomic(folder / "request.json", json.dumps(document).encode(), durable=False)
        fsync_directory(folder)
        fsync_directory(folder.parent)
        info = os.stat(path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Stored(path, PREFIX + f"{upload_id}/{name}", info.st_size, digest.hexdigest(), info.st_mtime_ns,
                  info.st_ino)


def wav_header(data_bytes: int, rate: int = 16000) -> bytes:
    """A 44-byte RIFF header for `data_bytes` of mono 16-bit PCM at `rate` Hz."""
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", data_bytes))


def probe(path: Path, filename: str | None) -> float:
    """Check that `path` is media with an audio stream PyAV decodes (its first frame); returns the
    stated duration in seconds (0.0 when unknown). Raises NotMedia naming the upload. Runs in a thread."""
    import av

    shown = filename or path.name
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.audio:
                kinds = ", ".join(stream.type for stream in container.streams) or "none"
                raise NotMedia(f"{shown!r} has no audio stream (streams: {kinds}); send an audio or video file "
                               "with sound")
            stream = container.streams.audio[0]
            for packet_count, packet in enumerate(container.demux(stream)):
                if packet.size and list(packet.decode()):
                    break
                if packet_count > 200:
                    raise NotMedia(f"{shown!r}: no audio frame could be decoded in its first 200 packets")
            else:
                raise NotMedia(f"{shown!r}: its audio stream holds no decodable audio")
            return float(container.duration or 0) / av.time_base
    except av.FFmpegError as error:  # PyAV's sentence only: the file name in it is our state path, not theirs
        raise NotMedia(f"{shown!r} is {NOT_MEDIA} (PyAV: {pyav_said(error)}); send an audio or "
                       "video file (WAV, FLAC, MP3, Opus, M4A, MP4, MKV...)") from error


def remove(state_dir: Path, relpath: str) -> None:
    """Remove an upload's folder (after delivery, a failure, or a rejected request)."""
    folder = path_of(state_dir, relpath).parent
    shutil.rmtree(folder, ignore_errors=True)
    try:
        fsync_directory(folder.parent)
    except OSError:
        pass  # the folder is gone or the root never existed; nothing to make durable


def request_of(state_dir: Path, relpath: str) -> dict:
    """What the request asked of delivery (`outbox`, `filename`); {} when the record is gone."""
    try:
        return json.loads((path_of(state_dir, relpath).parent / "request.json").read_text())
    except (OSError, ValueError):
        return {}


def deliver(config: Any, job: Any, source: Any, result: dict) -> Any:
    """Write the outputs of `result` for an upload to `outbox/api/` in the formats its request
    planned (unless it said outbox=false, or `api.write_outbox` is false), named by `output_stem`, then
    remove the upload.
    Returns a `delivery.Delivered` (base None and no outputs when none were written; `source` None:
    the upload is gone). Raises OSError. Runs in a thread."""
    from whisperdrop.daemon.delivery import Delivered

    state_dir = config.path("state_dir")
    request = request_of(state_dir, source.relpath)
    base_name, already, written = None, False, ()
    if request.get("outbox", True) and config.api.write_outbox:
        outbox_root = Path(config.outbox)
        formats = list(request.get("formats", config.transcription.outputs))
        stem = output_stem(request.get("video_file"), request.get("filename") or Path(source.relpath).name,
                           job.job_id, source.taken_at)
        limits = outbox.Limits.from_config(config.subtitles)
        named = {**result, "profile": request.get("profile")} if request.get("profile") else result
        with _NAMING:  # two jobs of one name delivered at once: the second sees the first's files, takes `-1`
            base, already = outbox.plan_outputs(outbox_root / OUTBOX_FOLDER, stem, formats, job.job_id, named, limits)
            if not already:
                document = results.for_source(
                    named, path=f"{OUTBOX_FOLDER}/{Path(source.relpath).name}", size=source.size,
                    sha256=job.source_sha256, timings={"total_s": round(time.time() - source.taken_at, 3)})
                outbox.write_outputs(base, document, formats, limits)
        base_name = str(base.relative_to(outbox_root))
        written = tuple(str(base.with_name(f"{base.name}.{fmt}")) for fmt in [*formats, "json"])
    remove(state_dir, source.relpath)
    return Delivered(replaced=False, base=base_name, already=already, outputs=written, source=None,
                     language=result.get("language"))


def sweep(state_dir: Path, keep: set[str]) -> int:
    """Remove upload folders no pending source points at (a request cut between storing and
    recording, or a crash in between); `keep` holds the pending sources' relpaths. Returns how many."""
    folder = root(state_dir)
    if not folder.is_dir():
        return 0
    wanted = {relpath[len(PREFIX):].split("/", 1)[0] for relpath in keep if is_upload(relpath)}
    removed = 0
    for entry in folder.iterdir():
        if entry.name not in wanted and not entry.name.startswith("."):  # .incoming: the parser's spool
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed
