"""Issue 13, item 14: a long local transcription stopped part way goes on from where it stopped.

The real engine with the bundled tiny.en model on jfk.flac placed in generated silence: a run is
stopped (its cancel event, set by the checkpoint once it holds some chunks) and run again with the
same checkpoint file; the chunks finished before are not decoded again and the Result is the one an
uninterrupted run gives.
"""

from __future__ import annotations

import json
import threading

import numpy
import pytest
from daemon_helpers import jfk_reference, speech_at, word_error_rate
from transcripts import assert_segments_in_order

from whisperdrop.engine import checkpoint as checkpoints
from whisperdrop.engine.chunks import Chunk, ChunkSource
from whisperdrop.engine.engine import Cancelled, Engine
from whisperdrop.shared.spool import TranscribeOptions

OPTIONS = TranscribeOptions(model="bundled:tiny.en")  # the shipped defaults otherwise: word timestamps, VAD, beam 5
SETTINGS = dict(device="cpu", compute_type="default", batch_size=2, chunking={"keep_gap": 0.0})


@pytest.fixture(scope="module")
def engine():
    return Engine(max_models=1)


@pytest.fixture(scope="module")
def long_audio(tmp_path_factory):
    """Four minutes: jfk (11 s) fourteen times, some close together, some far apart: about six chunks."""
    placements = [2.0, 14.0, 26.0, 45.0, 60.0, 72.0, 95.0, 110.0, 122.0, 140.0, 160.0, 172.0, 200.0, 220.0]
    return speech_at(tmp_path_factory.mktemp("audio") / "long.wav", placements, 240.0)


def _open(folder, audio, options=OPTIONS, **settings):
    return checkpoints.open_for(folder, "job", audio, None, options.to_dict(), **{**SETTINGS, **settings})


class StopAfter(checkpoints.Checkpoint):
    """A checkpoint that sets `cancel` once it has kept `chunks` chunks: the stop comes from the work done."""

    def __init__(self, path, key, cancel: threading.Event, chunks: int):
        super().__init__(path, key)
        self.cancel, self.limit, self.kept = cancel, chunks, 0

    def add_batch(self, items, *args):
        super().add_batch(items, *args)
        self.kept += len(items)
        if self.kept >= self.limit:
            self.cancel.set()


def _times(result: dict) -> list:
    """The Result's segments and words with their times (after checking the segments keep their order)."""
    assert_segments_in_order(result["segments"])
    return [(segment["start"], segment["end"], segment["text"],
             [(word["start"], word["end"], word["word"]) for word in segment["words"]])
            for segment in result["segments"]]


def test_chunks_are_the_same_each_time_the_audio_is_read(long_audio):
    """A chunk's identity (its pieces in samples) is the same on every reading of the same audio."""
    first = [chunk.pieces for chunk in ChunkSource(long_audio)]
    assert len(first) >= 4
    assert [chunk.pieces for chunk in ChunkSource(long_audio)] == first


def test_a_stopped_batched_run_goes_on_without_decoding_finished_chunks(engine, long_audio, tmp_path, batches):
    """Stopped after two batches and run again, the finished chunks are reused, not decoded, and the
    Result equals an uninterrupted run's in text and timestamps."""
    whole = engine.transcribe(long_audio, OPTIONS, batch_size=2)
    decoded_whole = sum(batches)
    batches.clear()

    cancel = threading.Event()
    plain = _open(tmp_path, long_audio)
    stopping = StopAfter(plain.path, plain.key, cancel, chunks=4)
    with pytest.raises(Cancelled):
        engine.transcribe(long_audio, OPTIONS, batch_size=2, cancel=cancel, checkpoint=stopping)
    decoded_before = sum(batches)
    assert 4 <= decoded_before < decoded_whole
    batches.clear()

    resumed = _open(tmp_path, long_audio)
    assert resumed.resumed_s > 0
    result = engine.transcribe(long_audio, OPTIONS, batch_size=2, checkpoint=resumed)
    assert resumed.reused >= 2
    assert sum(batches) == decoded_whole - decoded_before  # not one finished chunk decoded again
    assert result["text"] == whole["text"]
    assert _times(result) == _times(whole)
    assert (result["duration"], result["duration_after_vad"], result["language"]) == \
        (whole["duration"], whole["duration_after_vad"], whole["language"])


def test_a_stopped_sequential_run_goes_on_from_its_last_window(engine, tmp_path, monkeypatch):
    """Sequential decoding (batch size 1) keeps each 120 s window; stopped after the first, a second run
    decodes only the rest and takes the first window's segments as they were kept.

    (faster-whisper's sequential decoding falls back to sampling at higher temperatures, so two whole
    runs may differ in a word: the kept window is compared with what was kept, not with another run.)"""
    from faster_whisper import WhisperModel

    audio = speech_at(tmp_path / "two-windows.wav", [3.0, 50.0, 125.0, 170.0], 190.0)
    windows = [chunk.pieces for chunk in ChunkSource(audio, keep_gap=None, max_seconds=120.0)]
    assert len(windows) == 2
    decoded = []
    original = WhisperModel.transcribe
    monkeypatch.setattr(WhisperModel, "transcribe", lambda self, audio, **kwargs: (
        decoded.append(len(audio)), original(self, audio, **kwargs))[1])
    cancel = threading.Event()

    class StopAfterWindow(checkpoints.Checkpoint):
        def add_window(self, *args):
            super().add_window(*args)
            cancel.set()

    plain = _open(tmp_path, audio, batch_size=1)
    with pytest.raises(Cancelled):
        engine.transcribe(audio, OPTIONS, batch_size=1, cancel=cancel, checkpoint=StopAfterWindow(plain.path, plain.key))
    assert len(decoded) == 1
    resumed = _open(tmp_path, audio, batch_size=1)
    assert list(resumed.windows) == windows[:1] and resumed.resumed_s >= 60
    kept = resumed.windows[windows[0]]["segments"]
    result = engine.transcribe(audio, OPTIONS, batch_size=1, checkpoint=resumed)
    assert resumed.reused == 1 and len(decoded) == 2  # the second window only
    assert result["segments"][:len(kept)] == kept
    later = result["segments"][len(kept):]
    assert later and all(segment["start"] >= 120.0 for segment in later)
    assert word_error_rate(" ".join([jfk_reference()] * 4), result["text"]) < 0.2
    assert [segment["id"] for segment in result["segments"]] == list(range(1, len(result["segments"]) + 1))
    assert result["duration"] == 190.0


def test_a_checkpoint_is_only_reused_for_the_same_audio_and_options(long_audio, tmp_path):
    """A checkpoint file made for other options (another model) or other audio is discarded, not reused."""
    kept = _open(tmp_path, long_audio)
    chunk = next(iter(ChunkSource(long_audio)))
    kept.add_batch([(chunk, 1, [{"start": 0.0, "end": 1.0, "text": " x", "words": []}], [])], "en", 3000, 30.0)
    assert _open(tmp_path, long_audio).reuse(chunk, 3) is not None

    other_model = TranscribeOptions(model="base.en")
    assert _open(tmp_path, long_audio, options=other_model).chunks == {}
    assert not kept.path.exists()  # the other key's file went
    kept = _open(tmp_path, long_audio)
    kept.add_batch([(chunk, 1, [], [])], "en", 3000, 30.0)
    other_audio = speech_at(tmp_path / "other.wav", [1.0], 20.0)
    assert checkpoints.open_for(tmp_path, "job", other_audio, None, OPTIONS.to_dict(), **SETTINGS).chunks == {}


def test_a_line_cut_by_a_crash_is_dropped_and_appending_goes_on(long_audio, tmp_path):
    """A kill -9 in the middle of an append leaves a torn last line: loading drops it and the next
    batch is appended on a line of its own."""
    first, second = list(ChunkSource(long_audio))[:2]
    kept = _open(tmp_path, long_audio)
    kept.add_batch([(first, 1, [], [])], "en", 3000, 30.0)
    with open(kept.path, "ab") as stream:
        stream.write(b'{"language":"en","frames":60')
    again = _open(tmp_path, long_audio)
    assert set(again.chunks) == {(first.pieces, 1)}
    again.add_batch([(second, 1, [], [])], "en", 6000, 60.0)
    lines = kept.path.read_bytes().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)
    assert set(_open(tmp_path, long_audio).chunks) == {(first.pieces, 1), (second.pieces, 1)}


def _chunk(source: int, seconds: float) -> Chunk:
    length = int(seconds * 16000)
    return Chunk(numpy.zeros(length, dtype=numpy.float32), ((0, source, length),), ((0, length),))


def test_missed_speech_not_decoded_yet_is_queued_in_the_order_the_stopped_run_had(tmp_path):
    """Speech a finished chunk missed goes back in the queue when it was not decoded again; a stretch
    that was decoded again gives its segments; the queue order is the interrupted run's (batch, then
    position in the batch), not the order the chunks are read again."""
    store = checkpoints.Checkpoint(tmp_path / "job.jsonl", {"audio": "x"})
    one, two = _chunk(0, 20.0), _chunk(20 * 16000, 20.0)
    one_a, one_b, two_a = one.part(0, 32000), one.part(64000, 96000), two.part(0, 32000)
    one_a_again = one_a.part(0, 16000)
    segment = lambda text: {"start": 0.0, "end": 1.0, "text": text, "words": []}  # noqa: E731
    store.add_batch([(one, 1, [segment("one")], [(0, 32000), (64000, 96000)]),
                     (two, 1, [segment("two")], [(0, 32000)])], "en", 3000, 40.0)
    store.add_batch([(one_a, 2, [segment("one a")], [(0, 16000)])], "en", 3200, 42.0)
    store.add_batch([(_chunk(40 * 16000, 5.0), 1, [], [])], "en", 3700, 44.0)  # another chunk in a later batch

    loaded = checkpoints.Checkpoint(tmp_path / "job.jsonl", {"audio": "x"})
    assert [segment["text"] for segment in loaded.reuse(one, 3)] == ["one", "one a"]
    assert [segment["text"] for segment in loaded.reuse(two, 3)] == ["two"]
    pending = loaded.pending()
    # queued after batch 1: one_b, two_a (one_a was decoded); after batch 2: one_a_again
    assert [(part.pieces, passes) for part, passes in pending] == \
        [(one_b.pieces, 2), (two_a.pieces, 2), (one_a_again.pieces, 3)]
    assert loaded.pending() == []
    assert loaded.reuse(_chunk(60 * 16000, 5.0), 3) is None
    assert loaded.decoders == {"en": (3700, 44.0)}
    assert loaded.resumed_s == 45.0

