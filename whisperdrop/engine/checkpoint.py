"""Finished work of one transcription kept on disk, so that a restart goes on from there.

A checkpoint is a JSON-lines file (the daemon keeps one per job at state_dir/partial/<job_id>.jsonl):
a header line with its key (the audio's sha256 and size, the options with the model, the engine's
device, compute type and batch size, the chunking constants), then one line per decoded batch
(batched decoding) or window (sequential decoding), appended and fsynced as each finishes. A file
whose key differs (other audio, options or model) is discarded, never reused; a line cut by a crash
(the last one) is dropped.

The engine reads a chunk's record by the chunk's identity, its pieces (chunk, source, length in
samples) and the pass it was decoded in: the same audio with the same VAD settings is cut into the
same chunks, so a chunk finished before a restart is recognised and not decoded again. Chunks finish
out of order (speech a batch missed is decoded again in a later batch), so each is kept on its own
with the stretches it missed; those not yet decoded go back in the queue in the order they had.
Each batch line also keeps the batch decoder's clock and last speech time, so the batches after a
restart are decoded exactly as an uninterrupted run decodes them.

Imports only `files` and the standard library; the engine calls it through `AudioJob.checkpoint`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from whisperdrop.shared.files import fsync_directory, sha256_file, write_all, write_atomic

SCHEMA = "whisperdrop.checkpoint/1"
SUFFIX = ".jsonl"

Pieces = tuple[tuple[int, int, int], ...]


def _pieces(value: Iterable[Iterable[int]]) -> Pieces:
    return tuple(tuple(int(number) for number in piece) for piece in value)


class Checkpoint:
    """The checkpoint file at `path` for the work named by `key` (a JSON-able dict; see `key_for`).

    Loading drops a file with another key and a torn last line. Writing failures (a full disk) never
    stop the transcription: the first OSError is kept in `error` and nothing more is written.
    `resumed_s` is how far into the audio the work found at loading reached (0.0 for none).
    """

    def __init__(self, path: str | os.PathLike, key: dict):
        self.path = Path(path)
        self.key = json.loads(json.dumps(key))  # as it reads back from the file
        self.chunks: dict[tuple[Pieces, int], dict] = {}   # (pieces, pass) -> its record, with its "order"
        self.windows: dict[Pieces, dict] = {}
        self.decoders: dict[str, tuple[int, float]] = {}   # language -> (frames, last_speech) after the last batch
        self.error: OSError | None = None
        self.reused = 0            # chunks and windows taken from the file instead of decoded
        self.saved = 0             # batch or window lines this object appended (a hand-back waits for the next)
        self._lines = 0            # batch lines read or written (each chunk's order is (line, position))
        self._pending: list[tuple[tuple[int, int, int], Any, int]] = []
        self._load()
        self.resumed_s = self.done_s()

    # reading

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as error:
            self.error = error
            return
        lines = data.split(b"\n")
        kept = 0
        try:
            header = json.loads(lines[0])
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("schema") != SCHEMA or header.get("key") != self.key:
            self.remove()  # other audio, options or model: never reused
            return
        for index, line in enumerate(lines[1:], start=1):
            try:
                record = json.loads(line)
            except ValueError:
                break  # the line a crash cut (only ever the last)
            self._read(record)
            kept = index
        intact = b"\n".join(lines[:kept + 1]) + b"\n"
        if intact != data:  # a torn line: write the file back without it, so appends start on a line
            self._write_whole(intact)

    def _read(self, record: dict) -> None:
        if "window" in record:
            self.windows[_pieces(record["window"])] = record
            return
        self._lines += 1
        for position, chunk in enumerate(record["chunks"]):
            chunk["order"] = (self._lines, position)
            self.chunks[(_pieces(chunk["pieces"]), int(chunk["pass"]))] = chunk
        self.decoders[record["language"]] = (int(record["frames"]), float(record["last_speech"]))

    def done_s(self) -> float:
        """Seconds into the audio up to which everything is decoded: the end of the last chunk or window kept."""
        ends = [piece[1] + piece[2] for (pieces, passes) in self.chunks if passes == 1 for piece in pieces[-1:]]
        ends += [pieces[-1][1] + pieces[-1][2] for pieces in self.windows]
        return round(max(ends, default=0) / 16000, 3)

    def finished(self) -> int:
        """How many chunks (first passes) or windows the file holds."""
        return sum(1 for _, passes in self.chunks if passes == 1) + len(self.windows)

    def reuse(self, chunk: Any, max_passes: int) -> list[dict] | None:
        """The segments of `chunk` (a chunks.Chunk taken in its first pass) and of every stretch of it
        decoded again, when the file has it; None when it does not. The stretches it missed that are
        not decoded yet wait for `pending()`."""
        record = self.chunks.get((chunk.pieces, 1))
        if record is None:
            return None
        self.reused += 1
        segments: list[dict] = []
        stack = [(chunk, record, 1)]
        while stack:
            current, record, passes = stack.pop()
            segments += copy.deepcopy(record["segments"])
            if passes >= max_passes:
                continue
            for index, (start, end) in enumerate(record["missed"]):
                part = current.part(int(start), int(end))
                decoded = self.chunks.get((part.pieces, passes + 1))
                if decoded is not None:
                    stack.append((part, decoded, passes + 1))
                else:
                    self._pending.append(((*record["order"], index), part, passes + 1))
        return segments

    def pending(self) -> list[tuple[Any, int]]:
        """The stretches that reused chunks missed and that were not decoded again yet, as (chunk, pass),
        in the order the interrupted run had queued them; emptied."""
        pending = [(part, passes) for _, part, passes in sorted(self._pending, key=lambda item: item[0])]
        self._pending = []
        return pending

    def resume_decoder(self, decoder: Any, language: str) -> None:
        """Set a new batch decoder's clock and last speech time to where the interrupted run left them."""
        if language in self.decoders:
            decoder.frames, decoder.last_speech = self.decoders[language]

    def window(self, pieces: Pieces) -> dict | None:
        """A sequential window's record (`segments`, and `info`: add_window's figures), or None."""
        record = self.windows.get(_pieces(pieces))
        if record is not None:
            self.reused += 1
            record = copy.deepcopy(record)
        return record

    # writing

    def add_batch(self, items: list[tuple[Any, int, list[dict], list[tuple[int, int]]]], language: str,
                  frames: int, last_speech: float) -> None:
        """Append one decoded batch's chunks of this job: (chunk, pass, segments, missed) each, and the
        decoder's state after it."""
        record = {"language": language, "frames": int(frames), "last_speech": float(last_speech), "chunks": [
            {"pieces": chunk.pieces, "pass": passes, "segments": segments, "missed": [list(span) for span in missed]}
            for chunk, passes, segments, missed in items]}
        self._append(record)
        self._lines += 1

    def add_window(self, pieces: Pieces, segments: list[dict], info: Any) -> None:
        """Append one decoded sequential window: its segments and faster-whisper's TranscriptionInfo
        figures that the engine reads (language, language_probability, duration, duration_after_vad)."""
        figures = {name: getattr(info, name, None) for name in ("language", "language_probability", "duration",
                                                                "duration_after_vad")}
        self._append({"window": pieces, "segments": segments, "info": {
            name: value if isinstance(value, str) or value is None else float(value) for name, value in figures.items()}})

    def _append(self, record: dict) -> None:
        if self.error is not None:
            return
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        try:
            if not self.path.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                header = json.dumps({"schema": SCHEMA, "key": self.key}, separators=(",", ":")).encode() + b"\n"
                self._write_whole(header + line)
            else:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                try:
                    write_all(descriptor, line)
                finally:
                    os.close(descriptor)
        except OSError as error:
            self.error = error
            return
        if self.error is None:
            self.saved += 1

    def _write_whole(self, data: bytes) -> None:
        try:
            write_atomic(self.path, data)
        except OSError as error:
            self.error = error

    def remove(self) -> None:
        """Delete the file (the Result is safe elsewhere, or the key changed). Raises nothing for a missing file."""
        remove(self.path)


def key_for(audio_sha256: str, audio_size: int, options: dict, *, device: str, compute_type: str,
            batch_size: int, chunking: dict) -> dict:
    """The key a checkpoint is reused under: the same audio, options (model included) and engine settings."""
    return {"audio_sha256": audio_sha256, "audio_size": int(audio_size), "options": options, "device": device,
            "compute_type": compute_type, "batch_size": int(batch_size), "chunking": chunking}


def open_for(folder: str | os.PathLike, job_id: str, audio: str | os.PathLike, audio_sha256: str | None,
             options: dict, **settings: Any) -> Checkpoint:
    """The checkpoint of job `job_id` in `folder` for `audio` (its sha256 computed when not given);
    `settings` are key_for's keywords. Raises OSError when the audio cannot be read."""
    size = os.stat(audio).st_size
    sha256 = audio_sha256 or sha256_file(audio)
    return Checkpoint(Path(folder) / f"{job_id}{SUFFIX}", key_for(sha256, size, options, **settings))


def remove(path: str | os.PathLike) -> None:
    """Delete a checkpoint file, durably. Raises OSError other than a missing file."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_directory(os.path.dirname(os.fspath(path)) or ".")


def path_of(folder: str | os.PathLike, job_id: str) -> Path:
    return Path(folder) / f"{job_id}{SUFFIX}"


def sweep(folder: str | os.PathLike, keep: Callable[[str], bool]) -> int:
    """Remove the checkpoints in `folder` whose job id `keep` refuses (the job is gone or past
    transcription), and temporaries a crash left. Returns how many files went. Raises OSError."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.iterdir():
        stale = path.name.startswith(".") and path.name.endswith(".tmp")
        if stale or (path.name.endswith(SUFFIX) and not keep(path.name[:-len(SUFFIX)])):
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        fsync_directory(folder)
    return removed


def resume_decoder(decoder: Any, language: str, jobs: Iterable[Any]) -> None:
    """A batch decoder just made for `language`: set its clock and last speech time as the first of
    `jobs` (batched.AudioJob) with a checkpoint left them, so its next batches decode as they would have."""
    for job in jobs:
        if job.checkpoint is not None and language in job.checkpoint.decoders:
            job.checkpoint.resume_decoder(decoder, language)
            return


def save_batch(batch: list[tuple[Any, Any, int]], decoded: list[Any], language: str, decoder: Any) -> None:
    """Append each job's share of a decoded batch to its checkpoint: `batch` is batched's
    (run, chunk, pass) list and `decoded` its outcome per chunk (segments, missed). One write and
    fsync per job with a checkpoint; none without."""
    shares: dict[int, tuple[Checkpoint, list]] = {}
    for (run, chunk, passes), outcome in zip(batch, decoded):
        if run.job.checkpoint is not None:
            shares.setdefault(id(run.job.checkpoint), (run.job.checkpoint, []))[1].append(
                (chunk, passes, outcome.segments, outcome.missed))
    for job_checkpoint, items in shares.values():
        job_checkpoint.add_batch(items, language, decoder.frames, decoder.last_speech)
