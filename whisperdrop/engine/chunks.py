"""Audio to speech chunks for the engine: decode in bounded blocks, find speech, cut where there is none.

`ChunkSource(path, ...)` decodes the first audio stream to 16 kHz mono in blocks of BLOCK_SECONDS,
runs faster-whisper's Silero VAD over the stream (`SpeechFinder`: the model's state carries from block
to block, and the rules are those of `faster_whisper.vad.get_speech_timestamps` with the options of
faster-whisper's own batched pipeline, so the spans are exactly the ones it finds on the whole file),
and yields `Chunk`s of at most `max_seconds`:

- `keep_gap` a number (the VAD filter on): the speech spans, one after another, with pauses up to
  `keep_gap` seconds kept and longer ones left out, each span begun `onset_pad` seconds early; with
  the default 0 and no onset pad a chunk is what faster-whisper's `collect_chunks` makes, up to 30 s
  of speech however sparse it is in the file;
- `keep_gap` None: every sample, in contiguous windows (the VAD filter off, and the sequential route).

The onset pad (ONSET_PAD_SECONDS, on top of the VAD's own 400 ms) is for the word after a pause that
the VAD does not hear: Silero's state drifts over a recording, and a quiet onset ("ask" after "my
fellow Americans," in jfk.flac said 25 times) falls under its threshold from the sixth time on, so
its span starts at the next word, 0.7 s later, and the pause, that word in it, is cut out of the
chunk (issue 30; docs/models.md). So a pause left out keeps 0.4 s after the speech before it and
0.8 s before the speech after it.

A chunk ends only where the VAD finds no speech: at the start of a speech span or inside a silence,
never inside a span (the VAD itself splits speech longer than 30 s at its last pause of 98 ms or more,
as faster-whisper does). Memory is bounded whatever the duration: the block being decoded, the
samples since the VAD's horizon (at most one speech span, 30 s), and the chunk being filled.

One thing over 400 lines: the streaming VAD and the chunker share one promise (a cut falls only
where the VAD found no speech, with bounded memory), and each half is checked against the other's.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy

from whisperdrop.shared.files import Cancelled

SAMPLE_RATE = 16000
BLOCK_SECONDS = 30.0        # audio is decoded and searched for speech this much at a time
GROUP_SECONDS = 10          # decoded frames are resampled this much at a time
CHUNK_SECONDS = 30.0        # Whisper's input window: the longest chunk
KEEP_GAP_SECONDS = 0.0      # with the VAD filter, pauses longer than this are left out (0: speech spans only, as faster-whisper's batched pipeline does)
ONSET_PAD_SECONDS = 0.4     # ...and this much more of a pause is kept before the speech that ends it (module docstring)
VAD_WINDOW = 512            # Silero's window at 16 kHz, in samples
VAD_CONTEXT = 64            # samples of the previous window that Silero sees with each window
VAD_BATCH = 10000           # windows per ONNX run, as in faster-whisper


def vad_options() -> Any:
    """The VAD options of faster-whisper's batched pipeline: spans of at most 30 s, split at pauses of 160 ms."""
    from faster_whisper.vad import VadOptions

    return VadOptions(max_speech_duration_s=CHUNK_SECONDS, min_silence_duration_ms=160)


def resampler_16k_mono() -> Any:
    """A PyAV resampler to Whisper's input, 16 kHz mono signed 16-bit: the one definition that the
    daemon's Opus extraction and the engine's decoding share. Feed it frames, then None to flush."""
    import av

    return av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)


def decode_blocks(audio_path: Any, block_seconds: float = BLOCK_SECONDS) -> Iterator[numpy.ndarray]:
    """Yield the first audio stream of `audio_path` as float32 samples at 16 kHz mono, `block_seconds`
    at a time (the last block shorter). Frames are resampled in groups of GROUP_SECONDS, as
    faster-whisper's decode_audio does (the same samples, far fewer calls). Raises PyAV's errors for
    undecodable audio."""
    import av

    size = int(block_seconds * SAMPLE_RATE)
    resampler = resampler_16k_mono()
    fifo = av.AudioFifo()
    pending: list[numpy.ndarray] = []
    count = 0

    def grouped(container: Any) -> Iterator[Any]:
        for frame in container.decode(audio=0):
            frame.pts = None  # the fifo checks timestamps; the resampler does not need them
            fifo.write(frame)
            if fifo.samples >= GROUP_SECONDS * frame.sample_rate:
                yield fifo.read()
        if fifo.samples:
            yield fifo.read()

    with av.open(str(audio_path)) as container:
        for frame in itertools.chain(grouped(container), [None]):  # None flushes the resampler
            for out in resampler.resample(frame):
                pending.append(out.to_ndarray().reshape(-1))
                count += out.samples
            while count >= size:
                joined = numpy.concatenate(pending)
                yield joined[:size].astype(numpy.float32) / 32768.0
                pending, count = [joined[size:]], len(joined) - size
    if count:
        yield numpy.concatenate(pending).astype(numpy.float32) / 32768.0


class SpeechFinder:
    """Silero VAD over a stream of samples, with the rules of faster-whisper's `get_speech_timestamps`.

    `feed(samples)` and, at the end, `finish()` return the speech spans that became final, as
    (start, end) sample positions, padded as `get_speech_timestamps` pads them. `horizon` is the
    earliest position where a span still to come may start. Fed the same samples, it finds the same
    spans as `get_speech_timestamps` on the whole array.
    """

    def __init__(self, options: Any = None, sampling_rate: int = SAMPLE_RATE):
        from faster_whisper.vad import get_vad_model

        options = options or vad_options()
        self.session = get_vad_model().session
        self.threshold = options.threshold
        self.neg_threshold = options.neg_threshold if options.neg_threshold is not None else max(options.threshold - 0.15, 0.01)
        self.pad = sampling_rate * options.speech_pad_ms / 1000
        self.min_speech = sampling_rate * options.min_speech_duration_ms / 1000
        self.max_speech = sampling_rate * options.max_speech_duration_s - VAD_WINDOW - 2 * self.pad
        self.min_silence = sampling_rate * options.min_silence_duration_ms / 1000
        self.min_silence_at_max = sampling_rate * 98 / 1000
        self._h = numpy.zeros((1, 1, 128), dtype=numpy.float32)
        self._c = numpy.zeros((1, 1, 128), dtype=numpy.float32)
        self._context = numpy.zeros(VAD_CONTEXT, dtype=numpy.float32)
        self._leftover = numpy.zeros(0, dtype=numpy.float32)
        self.samples = 0                 # fed so far
        self._window = 0                 # index of the next window
        self._triggered = False
        self._start = 0                  # start of the speech in progress (when triggered)
        self._temp_end = self._prev_end = self._next_start = 0
        self._raw: list[tuple[int, int]] = []   # finished speeches, not yet padded and returned
        self._last_raw_end: int | None = None   # unpadded end of the last span returned
        self._last_end = 0                       # padded end of the last span returned
        self._finished = False

    def feed(self, samples: numpy.ndarray) -> list[tuple[int, int]]:
        """Run the VAD over more samples (float32); the spans that are final now."""
        self.samples += len(samples)
        data = numpy.concatenate([self._leftover, samples]) if len(self._leftover) else samples
        whole = len(data) // VAD_WINDOW * VAD_WINDOW
        self._leftover = numpy.array(data[whole:], dtype=numpy.float32)
        if whole:
            self._scan(data[:whole].reshape(-1, VAD_WINDOW))
        return self._ready()

    def finish(self) -> list[tuple[int, int]]:
        """The spans left at the end of the stream (the last window padded with zeros, as the whole-array
        VAD pads it, its last 64 samples zeroed as there)."""
        last = numpy.zeros(VAD_WINDOW, dtype=numpy.float32)
        last[: len(self._leftover)] = self._leftover
        last[-VAD_CONTEXT:] = 0
        self._scan(last.reshape(1, VAD_WINDOW))
        if self._triggered and self.samples - self._start > self.min_speech:
            self._raw.append((self._start, self.samples))
        self._triggered = False
        self._finished = True
        return self._ready()

    @property
    def horizon(self) -> int:
        """No span still to come starts before this sample position."""
        if self._raw:
            start = self._raw[0][0]
        else:
            start = self._start if self._triggered else VAD_WINDOW * self._window
        return max(self._last_end, int(start - self.pad))

    def _scan(self, windows: numpy.ndarray) -> None:
        context = numpy.empty((len(windows), VAD_CONTEXT), dtype=numpy.float32)
        context[0] = self._context
        context[1:] = windows[:-1, -VAD_CONTEXT:]
        self._context = numpy.array(windows[-1, -VAD_CONTEXT:])
        batch = numpy.concatenate([context, windows], axis=1)
        for index in range(0, len(batch), VAD_BATCH):
            output, self._h, self._c = self.session.run(
                None, {"input": batch[index:index + VAD_BATCH], "h": self._h, "c": self._c})
            for probability in numpy.asarray(output).reshape(-1):
                self._step(float(probability))

    def _step(self, probability: float) -> None:
        """One window of get_speech_timestamps' loop, line for line."""
        position = VAD_WINDOW * self._window
        self._window += 1
        if probability >= self.threshold and self._temp_end:
            self._temp_end = 0
            if self._next_start < self._prev_end:
                self._next_start = position
        if probability >= self.threshold and not self._triggered:
            self._triggered = True
            self._start = position
            return
        if self._triggered and position - self._start > self.max_speech:
            if self._prev_end:
                self._raw.append((self._start, self._prev_end))
                if self._next_start < self._prev_end:
                    self._triggered = False
                else:
                    self._start = self._next_start
                self._prev_end = self._next_start = self._temp_end = 0
            else:
                self._raw.append((self._start, position))
                self._prev_end = self._next_start = self._temp_end = 0
                self._triggered = False
                return
        if probability < self.neg_threshold and self._triggered:
            if not self._temp_end:
                self._temp_end = position
            if position - self._temp_end > self.min_silence_at_max:
                self._prev_end = self._temp_end
            if position - self._temp_end < self.min_silence:
                return
            if self._temp_end - self._start > self.min_speech:
                self._raw.append((self._start, self._temp_end))
            self._prev_end = self._next_start = self._temp_end = 0
            self._triggered = False

    def _ready(self) -> list[tuple[int, int]]:
        """Pad the finished speeches whose neighbours are known (get_speech_timestamps' second loop)."""
        spans = []
        while self._raw:
            start, end = self._raw[0]
            if len(self._raw) > 1:
                silence = self._raw[1][0] - end
                padded_end = end + int(silence // 2) if silence < 2 * self.pad else int(end + self.pad)
            elif self._finished:
                padded_end = int(min(self.samples, end + self.pad))
            else:
                next_start = self._start if self._triggered else VAD_WINDOW * self._window
                if next_start - end < 2 * self.pad:
                    break  # the next speech may still come close enough to share this pause
                padded_end = int(end + self.pad)
            if self._last_raw_end is None:
                padded_start = int(max(0, start - self.pad))
            else:
                silence = start - self._last_raw_end
                padded_start = int(max(0, start - silence // 2)) if silence < 2 * self.pad else int(max(0, start - self.pad))
            self._raw.pop(0)
            self._last_raw_end = end
            self._last_end = padded_end
            spans.append((padded_start, padded_end))
        return spans


@dataclass(frozen=True)
class Chunk:
    """Up to 30 s of audio cut from a source: `audio` (float32, 16 kHz); `pieces`, the
    (chunk_position, source_position, length) sample runs it is made of, in order; and `speech`,
    the (start, end) chunk positions of the VAD's speech spans in it."""

    audio: numpy.ndarray
    pieces: tuple[tuple[int, int, int], ...]
    speech: tuple[tuple[int, int], ...]

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    @property
    def source_end(self) -> float:
        """Seconds into the source where this chunk's audio ends."""
        position, source, length = self.pieces[-1]
        return (source + length) / SAMPLE_RATE

    def piece_index(self, seconds: float, is_end: bool = False) -> int:
        """Which piece chunk time `seconds` falls in (faster-whisper's SpeechTimestampsMap rule: the
        first piece ending after it; an end exactly on a piece's end stays in that piece)."""
        sample = int(seconds * SAMPLE_RATE)
        for index, (position, _, length) in enumerate(self.pieces):
            if sample < position + length or (is_end and sample == position + length):
                return index
        return len(self.pieces) - 1

    def source_time(self, seconds: float, index: int | None = None, is_end: bool = False) -> float:
        """Chunk time `seconds` as seconds into the source, through piece `index` (found when None)."""
        position, source, _ = self.pieces[self.piece_index(seconds, is_end) if index is None else index]
        return float((source - position) / SAMPLE_RATE + seconds)

    def part(self, start: int, end: int) -> "Chunk":
        """The chunk positions [start, end) as a chunk of their own (to decode a stretch again)."""
        pieces = []
        for position, source, length in self.pieces:
            low, high = max(start, position), min(end, position + length)
            if low < high:
                pieces.append((low - start, source + low - position, high - low))
        speech = tuple((max(start, low) - start, min(end, high) - start) for low, high in self.speech
                       if low < end and high > start)
        return Chunk(self.audio[start:end], tuple(pieces), speech)


class _Chunker:
    """Fills chunks from the stream of speech spans and silences, cutting only outside speech.

    `keep_gap` (samples) drops silences longer than it and those before the first and after the last
    speech; None keeps every sample. Each method returns the chunks that became full.
    """

    def __init__(self, max_samples: int, keep_gap: int | None):
        self.max = max_samples
        self.keep_gap = keep_gap
        self._parts: list[tuple[int, numpy.ndarray]] = []   # (source position, samples) of the chunk being filled
        self._length = 0
        self._speech: list[list[int]] = []   # speech spans of the chunk being filled, chunk positions
        self._silence: list[tuple[int, numpy.ndarray]] = []  # a pause not yet known to be kept
        self._silence_length = 0
        self._dropping = False   # the pending pause is longer than keep_gap

    def speech(self, source: int, samples: numpy.ndarray) -> list[Chunk]:
        chunks = self._settle_silence()
        if self._length + len(samples) > self.max:
            chunks += self._cut()
        while len(samples) > self.max:  # only when chunks are shorter than the VAD's longest span
            self._add(source, samples[: self.max], speech=True)
            chunks += self._cut()
            source, samples = source + self.max, samples[self.max:]
        self._add(source, samples, speech=True)
        return chunks

    def silence(self, source: int, samples: numpy.ndarray) -> list[Chunk]:
        if self.keep_gap is None:
            return self._fill(source, samples)
        if self._dropping or not self._parts:
            return []  # a long pause, or silence before any speech: left out
        self._silence.append((source, numpy.array(samples)))  # a copy: never pin the rolling buffer
        self._silence_length += len(samples)
        if self._silence_length > self.keep_gap:
            self._silence, self._silence_length, self._dropping = [], 0, True
        return []

    def finish(self) -> list[Chunk]:
        self._silence, self._silence_length, self._dropping = [], 0, False
        return self._cut() if self._length else []

    def _settle_silence(self) -> list[Chunk]:
        chunks = []
        for source, samples in self._silence:
            chunks += self._fill(source, samples)
        self._silence, self._silence_length, self._dropping = [], 0, False
        return chunks

    def _fill(self, source: int, samples: numpy.ndarray) -> list[Chunk]:
        """Add silence, cutting inside it wherever the chunk is full."""
        chunks = []
        while len(samples):
            room = self.max - self._length
            if room <= 0:
                chunks += self._cut()
                continue
            self._add(source, samples[:room], speech=False)
            source, samples = source + min(room, len(samples)), samples[room:]
        return chunks

    def _add(self, source: int, samples: numpy.ndarray, speech: bool) -> None:
        if not len(samples):
            return
        self._parts.append((source, numpy.array(samples, dtype=numpy.float32)))
        if speech:
            self._speech.append([self._length, self._length + len(samples)])
        self._length += len(samples)

    def _cut(self) -> list[Chunk]:
        if not self._parts:
            return []
        pieces: list[list[int]] = []
        position = 0
        for source, samples in self._parts:
            if pieces and pieces[-1][1] + pieces[-1][2] == source:
                pieces[-1][2] += len(samples)
            else:
                pieces.append([position, source, len(samples)])
            position += len(samples)
        chunk = Chunk(numpy.concatenate([samples for _, samples in self._parts]),
                      tuple(tuple(piece) for piece in pieces), tuple(tuple(span) for span in self._speech))
        self._parts, self._length, self._speech = [], 0, []
        return [chunk]


class _Buffer:
    """The decoded samples from `start` on; older ones are dropped with `release`."""

    def __init__(self):
        self.start = 0
        self.data = numpy.zeros(0, dtype=numpy.float32)

    def append(self, samples: numpy.ndarray) -> None:
        self.data = numpy.concatenate([self.data, samples])

    def read(self, start: int, end: int) -> numpy.ndarray:
        return self.data[start - self.start:end - self.start]

    def release(self, before: int) -> None:
        if before > self.start:
            self.data = self.data[before - self.start:]
            self.start = before


class ChunkSource:
    """The chunks of one audio file, produced as they are iterated (see the module's docstring).

    `keep_gap` seconds (None: keep every sample), `onset_pad` seconds (None: ONSET_PAD_SECONDS; only
    with `keep_gap` a number) and `max_seconds` shape the chunks. While and after
    iterating, `samples` is the count decoded and `speech_samples` the count inside speech spans;
    `on_block(samples)` is called after each decoded block. Iterating raises PyAV's errors for
    undecodable audio, and Cancelled between blocks once `cancel` is set.
    """

    def __init__(self, audio_path: Any, *, keep_gap: float | None = KEEP_GAP_SECONDS,
                 max_seconds: float = CHUNK_SECONDS, block_seconds: float = BLOCK_SECONDS,
                 cancel: threading.Event | None = None, on_block: Callable[[int], None] | None = None,
                 onset_pad: float | None = None):
        self.audio_path = audio_path
        self.keep_gap = keep_gap
        onset_pad = ONSET_PAD_SECONDS if onset_pad is None else onset_pad
        self.onset_pad = int(onset_pad * SAMPLE_RATE) if keep_gap is not None else 0
        self.max_seconds = max_seconds
        self.block_seconds = block_seconds
        self.cancel = cancel
        self.on_block = on_block
        self.samples = 0
        self.speech_samples = 0

    def __iter__(self) -> Iterator[Chunk]:
        finder = SpeechFinder()
        chunker = _Chunker(int(self.max_seconds * SAMPLE_RATE),
                           None if self.keep_gap is None else int(self.keep_gap * SAMPLE_RATE))
        buffer = _Buffer()
        self._position = 0  # the timeline up to here went to the chunker
        for block in decode_blocks(self.audio_path, self.block_seconds):
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled()
            buffer.append(block)
            self.samples += len(block)
            yield from self._advance(chunker, buffer, finder.feed(block), finder.horizon - self.onset_pad)
            if self.on_block is not None:
                self.on_block(self.samples)
        yield from self._advance(chunker, buffer, finder.finish(), self.samples)
        yield from chunker.finish()

    def _advance(self, chunker: _Chunker, buffer: _Buffer, spans: list[tuple[int, int]], horizon: int) -> Iterator[Chunk]:
        for start, end in spans:
            start = max(start - self.onset_pad, self._position)
            if start > self._position:
                yield from chunker.silence(self._position, buffer.read(self._position, start))
            yield from chunker.speech(start, buffer.read(start, end))
            self.speech_samples += end - start
            self._position = end
        if horizon > self._position:
            yield from chunker.silence(self._position, buffer.read(self._position, horizon))
            self._position = horizon
        buffer.release(self._position)
