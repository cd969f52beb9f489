"""The batched engine with the bundled tiny.en model: full batches, exact timestamps, batches across jobs.

Speech is jfk.flac placed in generated silence, so the words and where they are spoken are known.
The reference for timestamps is faster-whisper's own BatchedInferencePipeline on the same audio,
which forms the same chunks.
"""

from __future__ import annotations

import threading

import numpy
import pytest
from daemon_helpers import jfk_reference, speech_at, word_error_rate
from faster_whisper import BatchedInferencePipeline
from faster_whisper.audio import decode_audio
from faster_whisper.vad import get_speech_timestamps

from whisperdrop.engine.batched import AudioJob, _missed
from whisperdrop.engine.chunks import Chunk, vad_options
from whisperdrop.engine.engine import Engine, EngineError, ModelKey
from whisperdrop.shared.spool import TranscribeOptions

RATE = 16000
OPTIONS = TranscribeOptions()  # the shipped defaults: word timestamps, VAD, beam 5


@pytest.fixture(scope="module")
def engine():
    return Engine(max_models=1)


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    """Twelve minutes: jfk 24 times, 30 s apart: about nine 30 s chunks of speech, far apart in the file."""
    placements = [5.0 + 30.0 * index for index in range(24)]
    return speech_at(tmp_path_factory.mktemp("audio") / "sparse.wav", placements, 720.0), placements


def test_batches_are_full_however_sparse_the_speech(engine, sparse, batches):
    """Speech spread thinly over 12 minutes still fills a batch of 8 chunks, and every jfk is transcribed where it is."""
    path, placements = sparse
    result = engine.transcribe(path, OPTIONS, batch_size=8)
    assert batches[0] == 8 and sum(batches) >= 9
    assert word_error_rate(" ".join([jfk_reference()] * len(placements)), result["text"]) <= 0.10
    starts = [segment["start"] for segment in result["segments"]]
    assert starts == sorted(starts)
    for start in placements:  # the first word of each jfk within a second of where it was placed (not a chunk away)
        assert any(abs(word["start"] - start) < 1.0 and word["word"].strip().lower() == "and"
                   for segment in result["segments"] for word in segment["words"]), start
    assert result["engine"]["batch_size"] == 8 and abs(result["duration"] - 720.0) < 0.01


def test_timestamps_match_bare_faster_whisper_on_the_same_chunks(engine, sparse):
    """Every word and segment is within 0.05 s of faster-whisper's batched pipeline on the same audio, same words."""
    path, _ = sparse
    ours = engine.transcribe(path, OPTIONS, batch_size=8)
    model = engine.load(ModelKey(OPTIONS.model, "cpu", "int8"))
    segments, _ = BatchedInferencePipeline(model).transcribe(
        decode_audio(str(path)), batch_size=8, word_timestamps=True, vad_filter=True, beam_size=OPTIONS.beam_size)
    bare = [word for segment in segments for word in segment.words]
    words = [word for segment in ours["segments"] for word in segment["words"]]
    assert [word["word"] for word in words] == [word.word for word in bare]
    assert max(abs(word["start"] - other.start) for word, other in zip(words, bare)) <= 0.05
    assert max(abs(word["end"] - other.end) for word, other in zip(words, bare)) <= 0.05
    for segment in ours["segments"]:  # segments are their words' span, never across a left-out pause
        assert segment["start"] == segment["words"][0]["start"] and segment["end"] == segment["words"][-1]["end"]
    spans = get_speech_timestamps(decode_audio(str(path)), vad_options())
    pauses = [(left["end"] / RATE, right["start"] / RATE) for left, right in zip(spans, spans[1:])
              if right["start"] - left["end"] > RATE]
    for segment in ours["segments"]:
        assert not any(segment["start"] < low and high < segment["end"] for low, high in pauses)


def test_jobs_share_batches_and_a_bad_one_fails_alone(engine, tmp_path, batches):
    """Three files transcribed together share one batch; an undecodable fourth yields its own error, not theirs."""
    paths = [speech_at(tmp_path / f"clip{index}.wav", [0.5 + index], 13.0) for index in range(3)]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wave file" * 100)
    jobs = [AudioJob(path, tag=path.name) for path in [paths[0], broken, paths[1], paths[2]]]
    outcomes = dict((job.tag, outcome) for job, outcome in engine.transcribe_many(jobs, OPTIONS, batch_size=8))
    assert set(outcomes) == {"clip0.wav", "clip1.wav", "clip2.wav", "broken.wav"}
    assert isinstance(outcomes["broken.wav"], EngineError) and outcomes["broken.wav"].kind == "audio"
    for index in range(3):
        result = outcomes[f"clip{index}.wav"]
        assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
        assert abs(result["segments"][0]["words"][0]["start"] - (0.5 + index)) < 1.0
    assert batches == [3]


def test_jobs_handed_over_while_running_join_the_batches(engine, tmp_path, batches):
    """`more` is asked for jobs while batches have room; the jobs it hands over are transcribed in them."""
    paths = [speech_at(tmp_path / f"clip{index}.wav", [1.0], 12.0) for index in range(5)]
    waiting = [AudioJob(path, tag=index) for index, path in enumerate(paths[1:], start=1)]
    asked = []

    def more(count):
        asked.append(count)
        handed, waiting[:] = waiting[:count], waiting[count:]
        return handed

    tags = [job.tag for job, _ in engine.transcribe_many([AudioJob(paths[0], tag=0)], OPTIONS, batch_size=4, more=more)]
    assert sorted(tags) == [0, 1, 2, 3, 4] and asked[0] == 3
    assert batches[0] == 4 and sum(batches) == 5


def test_cancel_raises_between_batches(engine, sparse):
    """A set cancel event stops batched transcription with Cancelled, not a partial Result."""
    from whisperdrop.shared.files import Cancelled

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        engine.transcribe(sparse[0], OPTIONS, batch_size=8, cancel=cancel)


def test_speech_no_word_touches_is_found_for_decoding_again():
    """Consecutive speech spans that aligned words hardly cover, 3 s or more in all, are the part decoded again."""
    second = RATE
    chunk = Chunk(numpy.zeros(30 * second, dtype=numpy.float32), ((0, 0, 30 * second),),
                  ((0, 3 * second), (3 * second, 6 * second), (7 * second, 8 * second), (8 * second, 8 * second + 4000),
                   (20 * second, 25 * second)))
    spoken = [(0.2, 0.6), (1.0, 2.9), (20.1, 24.8)]  # the words: the first span, and the last one
    assert _missed(chunk, spoken) == [(3 * second, 8 * second + 4000)]  # one part from the first missed span to the last
    assert _missed(chunk, spoken + [(3.0, 5.9), (7.0, 8.2)]) == []
