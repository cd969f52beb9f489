"""The engine's audio stage (whisperdrop.engine.chunks): streaming VAD, speech chunks, bounded memory.

Real PyAV on real speech (jfk.flac) placed in generated silence; faster-whisper's own VAD on the whole
array is the reference. No Whisper model is loaded here.
"""

from __future__ import annotations

import numpy
import pytest
from daemon_helpers import speech_at
from faster_whisper.audio import decode_audio
from faster_whisper.vad import collect_chunks, get_speech_timestamps

from whisperdrop.engine import chunks as chunks_module
from whisperdrop.engine.chunks import BLOCK_SECONDS, ONSET_PAD_SECONDS, SAMPLE_RATE, ChunkSource, SpeechFinder, vad_options
from whisperdrop.shared.files import Cancelled

RATE = SAMPLE_RATE


@pytest.fixture(scope="module")
def sparse_speech(tmp_path_factory):
    """Four minutes: jfk eleven times, once across the first 30 s block boundary, with pauses of 1-20 s."""
    placements = [2.0, 24.0, 37.0, 60.0, 72.5, 84.0, 110.0, 140.0, 160.0, 190.0, 215.0]
    return speech_at(tmp_path_factory.mktemp("audio") / "sparse.wav", placements, 240.0), placements


def test_streaming_vad_finds_the_same_spans_as_faster_whisper_on_the_whole_array(sparse_speech):
    """Fed in blocks of any size, SpeechFinder returns get_speech_timestamps' spans on the whole array, exactly."""
    path, _ = sparse_speech
    audio = decode_audio(str(path))
    whole = [(span["start"], span["end"]) for span in get_speech_timestamps(audio, vad_options())]
    for block in (RATE * 30, 12345, 512 * 7, RATE * 7 + 3):
        finder = SpeechFinder()
        spans, horizons = [], []
        for start in range(0, len(audio), block):
            found = finder.feed(audio[start:start + block])
            assert all(span_start >= horizon for span_start, _ in found for horizon in horizons)
            spans += found
            horizons.append(finder.horizon)
        spans += finder.finish()
        assert spans == whole, f"block of {block} samples"


def test_chunks_are_faster_whispers_chunks_with_more_of_each_pause_before_speech(sparse_speech):
    """With the VAD filter, chunks hold what faster-whisper's collect_chunks holds of the VAD's spans with
    each span begun ONSET_PAD_SECONDS earlier (never before the span before it ends), and each piece is
    the source's samples; with no onset pad, exactly faster-whisper's chunks."""
    path, _ = sparse_speech
    audio = decode_audio(str(path))
    spans = get_speech_timestamps(audio, vad_options())
    for pad in (0.0, ONSET_PAD_SECONDS):
        padded, previous_end = [], 0
        for span in spans:
            padded.append({"start": max(span["start"] - int(pad * RATE), previous_end), "end": span["end"]})
            previous_end = span["end"]
        reference, _ = collect_chunks(audio, padded, max_duration=30)
        chunks = list(ChunkSource(path, onset_pad=pad))
        assert [len(chunk.audio) for chunk in chunks] == [len(expected) for expected in reference], pad
        for chunk, expected in zip(chunks, reference):
            assert numpy.array_equal(chunk.audio, expected)
            assert chunk.duration <= 30.0
            for position, source, length in chunk.pieces:
                assert numpy.array_equal(chunk.audio[position:position + length], audio[source:source + length])


def test_no_chunk_boundary_falls_inside_speech_even_across_a_block_boundary(sparse_speech):
    """Every chunk ends where the whole-file VAD finds no speech, with jfk spoken across the 30 s block boundary."""
    path, placements = sparse_speech
    assert any(start < BLOCK_SECONDS < start + 11.0 for start in placements)
    audio = decode_audio(str(path))
    spans = [(span["start"], span["end"]) for span in get_speech_timestamps(audio, vad_options())]
    for keep_gap, max_seconds in ((0.0, 30.0), (None, 30.0), (None, 120.0)):
        chunks = list(ChunkSource(path, keep_gap=keep_gap, max_seconds=max_seconds))
        for chunk in chunks[:-1]:
            _, source, length = chunk.pieces[-1]
            cut = source + length
            assert not any(start < cut < end for start, end in spans), (keep_gap, max_seconds, cut / RATE)
        if keep_gap is None:  # every sample, in order
            covered = [(source, source + length) for chunk in chunks for _, source, length in chunk.pieces]
            assert covered[0][0] == 0 and covered[-1][1] == len(audio)
            assert all(previous[1] == following[0] for previous, following in zip(covered, covered[1:]))


def test_memory_is_bounded_however_long_the_audio(tmp_path, monkeypatch):
    """Over 20 minutes of sparse speech the rolling buffer never holds much more than two blocks of samples."""
    path = speech_at(tmp_path / "long.wav", [float(start) for start in range(30, 1200, 97)], 1200.0)
    largest = [0]
    original = chunks_module._Buffer.append

    def append(self, samples):
        original(self, samples)
        largest[0] = max(largest[0], len(self.data))

    monkeypatch.setattr(chunks_module._Buffer, "append", append)
    source = ChunkSource(path)
    count = sum(1 for _ in source)
    assert count >= 4 and source.samples == 1200 * RATE
    assert largest[0] <= 2 * BLOCK_SECONDS * RATE + RATE, largest[0] / RATE


def test_cancel_stops_between_blocks(sparse_speech):
    """A set cancel event raises Cancelled before the next block is decoded."""
    import threading

    path, _ = sparse_speech
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        list(ChunkSource(path, cancel=cancel))


def test_a_part_of_a_chunk_keeps_its_source_times(sparse_speech):
    """Chunk.part cuts pieces and speech spans to the part and keeps the map to source time."""
    path, _ = sparse_speech
    chunk = next(iter(ChunkSource(path)))
    assert len(chunk.pieces) >= 2
    start = chunk.pieces[1][0] - RATE
    end = chunk.pieces[1][0] + RATE
    part = chunk.part(start, end)
    assert len(part.audio) == end - start and numpy.array_equal(part.audio, chunk.audio[start:end])
    assert part.source_time(0.5) == pytest.approx(chunk.source_time((start + RATE // 2) / RATE))
    assert part.source_time(1.5) == pytest.approx(chunk.source_time((start + 3 * RATE // 2) / RATE))
    assert all(0 <= low < high <= len(part.audio) for low, high in part.speech)
