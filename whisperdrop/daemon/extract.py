"""Extraction stage: any media file in, 16 kHz mono Opus in Ogg out, with PyAV (no ffmpeg binary).

`extract(source, dest)` takes the first audio stream of `source`, decodes it, downmixes and resamples
it to 16 kHz mono, encodes it with libopus and writes `dest`, packet by packet: memory stays flat
however long the file. `dest` appears whole or not at all (written as `dest.tmp`, fsynced, renamed,
directory fsynced). The source is only read.

Two kinds of failure, because the caller treats them differently:

- `MediaError`: the source is not usable media (empty, not media, no audio stream, nothing
  decodable). Permanent: the pipeline moves the source to `failed/`.
- `OSError`: the destination cannot be written (disk full, permissions, missing folder) or the
  source vanished or cannot be read. Transient: the pipeline retries later. It propagates as is.

`Cancelled` (from the engine) when the `cancel` event is set between packets. No logging here: the
pipeline logs the stage event from the returned `Extracted`.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import av

from whisperdrop.engine.engine import SAMPLE_RATE, Cancelled, resampler_16k_mono
from whisperdrop.shared.errors import WhisperdropError
from whisperdrop.shared.files import fsync_directory, sha256_file


@dataclass(frozen=True)
class OpusSettings:
    """How libopus encodes the extracted audio (the bitrate is `extract`'s argument, from the config).

    `application`: libopus's tuning, "audio", "voip" or "lowdelay"; `complexity`: 0 (fastest) to 10
    (libopus's default, slowest); `frame_ms`: the length of one Opus packet (20, 40, 60, 80, 100, 120).
    """

    application: str = "audio"
    complexity: int = 0
    frame_ms: int = 60

    def codec_options(self) -> dict[str, str]:
        return {"application": self.application, "compression_level": str(self.complexity),
                "frame_duration": str(self.frame_ms)}


# Chosen by measurement (bench/bench_extraction.py; figures in bench/README.md): on one core, "audio" at
# complexity 0 extracts 350x to 570x real time, 4 to 6 times the earlier voip at complexity 10, and
# tiny.en's word error rate is no worse (jfk 0 % both; generated speech 13.8 % against 14.6 %). At a
# speech bitrate "audio" encodes with CELT, cheap at complexities 0-3; voip (SILK) is a third slower
# even at complexity 0, and anything at complexity 10 under 90x. "lowdelay" (CELT only) is as fast
# but lost 3 points of word error rate. 60 ms packets: less framing than 20 ms and a little faster;
# 120 ms gained nothing measurable.
OPUS = OpusSettings()

# Muxer options: "bitexact" makes the Ogg stream serial the stream index instead of a random number,
# and leaves the library version out of the header, so the same source gives the same bytes every time
# (and an upload of an earlier extraction can be resumed with a new one).
OGG_OPTIONS = {"fflags": "+bitexact"}
PROGRESS_EVERY_SECONDS = 5.0
BLOCK_SECONDS = 1.0  # decoded audio handed to the resampler and encoder at once (see `_transcode`)
MAX_DECODE_ERRORS = 100  # packets a decoder may reject (skipped, as ffmpeg does) before we give up

# errno values of a source read that may succeed later (a network mount, a disk hiccup): these
# propagate as OSError, never as MediaError, so the source is retried rather than failed.
_TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.ESTALE,
    errno.EAGAIN,
    errno.EINTR,
    errno.ENOMEM,
    errno.ETIMEDOUT,
    errno.ENXIO,
}


class MediaError(WhisperdropError):
    """Permanent (kind `media`, not retryable): the file is not usable media.

    `path` is the source, `reason` says what is wrong (with what PyAV said), `hint` what the user can
    do. `str()` gives all three in one line.
    """

    kind = "media"

    def __init__(self, path: Path, reason: str, hint: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}. {hint}", hint=hint)

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.hint))


@dataclass(frozen=True)
class Extracted:
    """What one extraction produced, with the figures the pipeline logs."""

    path: Path  # the .opus written
    duration: float  # seconds of audio, counted from the decoded samples
    bytes_in: int  # source size
    bytes_out: int  # opus size
    seconds: float  # wall time of the extraction
    source_codec: str  # decoder name of the audio stream, e.g. "aac", "mp3float"
    source_container: str  # demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    stream_index: int  # index of the audio stream used, among all streams of the source
    sha256: str  # hex sha256 of the .opus file


HINT_NOT_MEDIA = "Check that it is an audio or video file and that it was copied completely; then move it back to the inbox."
HINT_NO_AUDIO = "The file has no sound to transcribe; export it with its audio track and drop it again."
HINT_EMPTY = "The copy may have failed; copy the file again."
HINT_CORRUPT = "The audio is damaged; re-export or copy the file again, then move it back to the inbox."


NOT_MEDIA = "not an audio or video file PyAV can read"


def pyav_said(error: BaseException) -> str:
    """What PyAV said, as a person reads it: FFmpeg's sentence ("Invalid data found when processing
    input") without the `[Errno 1094995529]` that means nothing to anyone, nor the file name (every
    message here names the file already)."""
    said = getattr(error, "strerror", None)
    if isinstance(said, str) and said.strip():
        return said.strip()
    return str(error)


def _is_transient_source_error(error: BaseException) -> bool:
    """A source-side OSError that says nothing about the media itself (vanished, unreadable now)."""
    return isinstance(error, OSError) and getattr(error, "errno", None) in _TRANSIENT_ERRNOS


def _describe_streams(container: av.container.InputContainer) -> str:
    """"video h264 64x64, data bin_data" (or "none"), for messages about a missing audio stream."""
    parts = []
    for stream in container.streams:
        name = stream.codec_context.name if stream.codec_context is not None else "unknown"
        detail = f"{stream.type} {name}"
        if stream.type == "video" and stream.codec_context is not None and stream.codec_context.width:
            detail += f" {stream.codec_context.width}x{stream.codec_context.height}"
        parts.append(detail)
    return ", ".join(parts) or "none"


def _open_source(source: Path) -> av.container.InputContainer:
    """Open `source` for reading; MediaError when PyAV cannot make media of it."""
    try:
        return av.open(str(source), mode="r")
    except av.FFmpegError as error:
        if _is_transient_source_error(error):
            raise
        raise MediaError(source, f"{NOT_MEDIA} (PyAV: {pyav_said(error)})", HINT_NOT_MEDIA) from error


def _close_quietly(output: av.container.OutputContainer) -> None:
    """Free the muxer on a failure path; its own error (the disk that failed the write fails the
    trailer too) must not replace the one being raised."""
    try:
        output.close()
    except (OSError, av.FFmpegError):
        pass  # the failure being raised already says what went wrong with this file


def extract(
    source: Path,
    dest: Path,
    bitrate_kbps: int = 24,
    *,
    cancel: threading.Event | None = None,
    progress: Callable[[float], None] | None = None,
    opus: OpusSettings = OPUS,
) -> Extracted:
    """Write the first audio stream of `source` to `dest` as 16 kHz mono Opus in Ogg at `bitrate_kbps`.

    `progress(done_seconds)` is called about every 5 s of audio; `cancel` is checked between packets.
    `opus` sets the encoder (the measured default `OPUS`; the benchmark passes others to compare).
    Returns an `Extracted`. Raises `MediaError` for an unusable source, `OSError` for a destination
    that cannot be written or a source that vanished or cannot be read now, `Cancelled` when
    cancelled. On any failure `dest` is untouched and no temporary file is left.

    The same source with the same bitrate and settings gives the same bytes (see `OGG_OPTIONS`).
    """
    started = time.monotonic()
    source = Path(source)
    dest = Path(dest)
    bytes_in = source.stat().st_size  # FileNotFoundError propagates: the source vanished
    if bytes_in == 0:
        raise MediaError(source, "file is empty (0 bytes)", HINT_EMPTY)

    temporary = dest.with_name(dest.name + ".tmp")
    with _open_source(source) as container:
        if not container.streams.audio:
            streams = _describe_streams(container)
            if not container.streams:
                raise MediaError(source, f"{NOT_MEDIA} (PyAV found no streams in {container.format.name} data)",
                                 HINT_NOT_MEDIA)
            raise MediaError(source, f"has no audio stream (streams: {streams})", HINT_NO_AUDIO)
        stream = container.streams.audio[0]
        source_codec = stream.codec_context.name
        source_container = container.format.name
        stream_index = stream.index  # read now: a stream's fields are not valid once its container closes
        try:
            samples = _transcode(container, stream, source, temporary, bitrate_kbps, opus, cancel, progress)
        except BaseException as failure:
            try:
                temporary.unlink(missing_ok=True)
            except OSError as cleanup_error:  # never hide the real error behind the cleanup's
                if hasattr(failure, "add_note"):  # Python 3.11+
                    failure.add_note(f"also could not remove {temporary}: {cleanup_error}")
            raise

    try:
        os.replace(temporary, dest)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(dest.parent)
    return Extracted(
        path=dest,
        duration=samples / SAMPLE_RATE,
        bytes_in=bytes_in,
        bytes_out=dest.stat().st_size,
        seconds=time.monotonic() - started,
        source_codec=source_codec,
        source_container=source_container,
        stream_index=stream_index,
        sha256=sha256_file(dest),
    )


def _decoded_frames(
    container: av.container.InputContainer,
    stream: av.AudioStream,
    source: Path,
    cancel: threading.Event | None,
) -> Iterator[av.AudioFrame]:
    """Decoded frames of `stream`, packet by packet; the source side's errors are sorted out here.

    A packet the decoder rejects is skipped, as ffmpeg does, up to MAX_DECODE_ERRORS. A read error
    after some audio (a cut-off recording) ends the stream with what decoded. Raises `Cancelled`,
    `MediaError` (nothing decodable, or damage throughout), or OSError (a transient read failure).
    Errors raised by the consumer (the destination side) never pass through here."""
    where = f"stream {stream.index} ({stream.codec_context.name})"
    samples = 0
    decode_errors = 0
    last_decode_error: Exception | None = None
    try:
        for packet in container.demux(stream):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"extraction of {source} cancelled")
            try:
                frames = packet.decode()
            except (av.error.InvalidDataError, av.error.UndefinedError, av.error.PatchWelcomeError) as error:
                decode_errors += 1
                last_decode_error = error
                if decode_errors > MAX_DECODE_ERRORS:
                    raise MediaError(
                        source, f"{where}: more than {MAX_DECODE_ERRORS} packets failed to decode, last: {pyav_said(error)}",
                        HINT_CORRUPT
                    ) from error
                continue
            for frame in frames:
                samples += frame.samples
                yield frame
    except av.FFmpegError as error:
        if _is_transient_source_error(error):
            raise
        if samples == 0:
            raise MediaError(source, f"{where} could not be read (PyAV: {pyav_said(error)})", HINT_CORRUPT) from error
        return  # damage after some audio: keep what decoded
    if samples == 0:
        detail = (f"; {decode_errors} packets failed to decode, last: {pyav_said(last_decode_error)}"
                  if last_decode_error else "")
        raise MediaError(source, f"{where} decoded to no audio samples{detail}", HINT_CORRUPT)


def _transcode(
    container: av.container.InputContainer,
    stream: av.AudioStream,
    source: Path,
    temporary: Path,
    bitrate_kbps: int,
    opus: OpusSettings,
    cancel: threading.Event | None,
    progress: Callable[[float], None] | None,
) -> int:
    """Decode `stream`, resample to 16 kHz mono, encode to Opus and write `temporary` (fsynced).

    Decoded frames are gathered into blocks of `BLOCK_SECONDS` before the resampler and the encoder:
    their calls cost more per frame than the Opus encoding at the chosen settings (a 16 kHz mp3 has
    28 frames a second), so a frame at a time kept extraction under 300x real time on one core.
    Returns the number of output samples. Raises what `_decoded_frames` raises, and OSError from
    writing `temporary`."""
    resampler = resampler_16k_mono()
    block = av.AudioFifo()
    time_base = Fraction(1, SAMPLE_RATE)
    samples = 0
    next_progress = PROGRESS_EVERY_SECONDS

    with open(temporary, "wb") as handle:
        output = av.open(handle, mode="w", format="ogg", options=OGG_OPTIONS)
        try:
            encoder = output.add_stream("libopus", rate=SAMPLE_RATE, options=opus.codec_options())
            encoder.layout = "mono"
            encoder.format = "s16"
            encoder.bit_rate = bitrate_kbps * 1000
            encoder.time_base = time_base

            def write(frames: list[av.AudioFrame]) -> None:
                nonlocal samples
                for frame in frames:
                    frame.pts = samples
                    frame.time_base = time_base
                    samples += frame.samples
                    for packet in encoder.encode(frame):
                        output.mux(packet)

            for frame in _decoded_frames(container, stream, source, cancel):
                frame.pts = None  # output samples are numbered in `write`; gaps in the source do not matter
                block.write(frame)  # a change of format mid-stream raises ValueError, as the resampler would
                if block.samples >= BLOCK_SECONDS * frame.sample_rate:
                    write(resampler.resample(block.read()))
                    if progress is not None and samples >= next_progress * SAMPLE_RATE:
                        progress(samples / SAMPLE_RATE)
                        next_progress = samples / SAMPLE_RATE + PROGRESS_EVERY_SECONDS
            if block.samples:
                write(resampler.resample(block.read()))
            write(resampler.resample(None))
            for packet in encoder.encode(None):
                output.mux(packet)
            output.close()  # writes the last Ogg page
        except BaseException:
            _close_quietly(output)
            raise
        handle.flush()
        os.fsync(handle.fileno())
    return samples
