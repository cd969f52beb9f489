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

from transcripts import assert_segments_in_order, missing_words

from whisperdrop.engine import batched, chunks, guard
from whisperdrop.engine.batched import AudioJob, _missed, _squeezed
from whisperdrop.engine.guard import needs_fallback
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
    """Speech spread thinly over 12 minutes still fills a batch of 8 chunks, and every jfk is transcribed
    where it is, each word once: none missing, none written twice (the decoder wrote one sentence twice
    in four of the chunks; issue 30)."""
    path, placements = sparse
    result = engine.transcribe(path, OPTIONS, batch_size=8)
    assert batches[0] == 8 and sum(batches) >= 9
    spoken = " ".join([jfk_reference()] * len(placements))
    assert missing_words(spoken, result["text"]) == [] and missing_words(result["text"], spoken) == []
    assert_segments_in_order(result["segments"])
    for start in placements:  # the first word of each jfk within a second of where it was placed (not a chunk away)
        assert any(abs(word["start"] - start) < 1.0 and word["word"].strip().lower() == "and"
                   for segment in result["segments"] for word in segment["words"]), start
    assert result["engine"]["batch_size"] == 8 and abs(result["duration"] - 720.0) < 0.01


def test_timestamps_match_bare_faster_whisper_on_the_same_chunks(engine, sparse, monkeypatch):
    """Every word and segment is within 0.05 s of faster-whisper's batched pipeline on the same audio,
    same words, when whisperdrop cuts the same chunks (no onset pad) and keeps every word it decodes."""
    monkeypatch.setattr(chunks, "ONSET_PAD_SECONDS", 0.0)
    monkeypatch.setattr(batched, "SQUEEZED_WORDS", 0)
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


def test_a_repeat_the_decoder_wrote_that_alignment_puts_in_no_time_is_found():
    """Words that word alignment gives no time (a run of 3 or more under 20 ms each) are text the decoder
    wrote twice: found, with the repeated word at the run's edge (here the second 'ask'); a lone
    short word is not. The words are those of a chunk of jfk said 25 times (issue 30)."""
    def words(*items):
        return [{"start": start, "end": end, "word": word, "probability": 0.9} for start, end, word in items]

    chunk = words((19.24, 20.02, " you"), (20.02, 20.64, " ask"), *[(20.64, 20.64, f" {word}") for word in
                  "what you can do for your country and so my fellow Americans ask not what your country can do for you".split()],
                  (20.64, 20.66, " ask"), (20.66, 20.96, " what"), (20.96, 21.28, " you"))
    found = _squeezed(chunk)
    assert found == set(range(2, 23)) | {23}
    kept = [word["word"] for index, word in enumerate(chunk) if index not in found]
    assert kept == [" you", " ask", " what", " you"]
    assert _squeezed(words((1.0, 1.4, " a"), (1.4, 1.41, " b"), (1.41, 1.8, " c"), (1.8, 1.81, " d"), (1.81, 1.82, " e"))) == set()


# Chunk figures recorded with tiny.en (int8, CPU) at temperature 0, for the guard against repetition
# loops: (tokens, avg_logprob, no_speech_prob, compression_ratio, seconds of speech in the chunk).
CHUNKS_TO_DECODE_AGAIN = {
    "German (espeak-ng de), a sentence three times: issue 21's": (30, -0.990, 0.453, 2.52, 13.7),
    "Portuguese (espeak-ng pt), 'unsee or unsee or...', sure of it": (224, -0.212, 0.439, 5.01, 10.8),
    "German (espeak-ng de+m3), 'In the ocean, the ocean...', sure of it": (85, -0.308, 0.185, 11.92, 13.1),
    "Apollo 11's radio, 'yeah, yeah...' over other words, sure of it": (224, -0.259, 0.565, 7.05, 29.2),
    "German from a WAV, unsure of it (faster-whisper's rule)": (16, -1.411, 0.588, 0.92, 13.7),
}
CHUNKS_TO_KEEP = {
    "jfk said 25 times, 1 s apart, its first chunk: the speech repeats": (61, -0.080, 0.110, 3.29, 27.5),
    "jfk said 25 times, its second chunk": (66, -0.054, 0.398, 3.78, 29.2),
    "English read fast (espeak-ng en-us, 240 words a minute)": (47, -0.260, 0.407, 1.47, 8.9),
    "laughter heard as 'Thank you very much.'": (5, -0.984, 0.675, 0.71, 2.1),
}


def test_loops_and_guesses_are_decoded_again_and_speech_that_repeats_is_not():
    """The guard decodes a chunk again when it loops (unsure, or faster than speech) or is a guess, and
    keeps speech that really repeats (jfk three times: ratio 3.3-3.8, sure of it, at a speaking pace)."""
    def output(tokens, logprob, no_speech, ratio):
        return {"tokens": [0] * tokens, "avg_logprob": logprob, "no_speech_prob": no_speech, "compression_ratio": ratio}

    for what, (tokens, logprob, no_speech, ratio, speech) in CHUNKS_TO_DECODE_AGAIN.items():
        assert needs_fallback(output(tokens, logprob, no_speech, ratio), speech), what
    for what, (tokens, logprob, no_speech, ratio, speech) in CHUNKS_TO_KEEP.items():
        assert not needs_fallback(output(tokens, logprob, no_speech, ratio), speech), what


def test_speech_that_repeats_is_decoded_once_at_temperature_zero(engine, tmp_path, monkeypatch):
    """jfk said five times with 1 s between: its chunks' text repeats (compression ratio over 2.4), yet
    no chunk is decoded again (issue 30: the repetition is in the speech, and a fallback would cost
    several decodes per chunk); each segment says its temperature and compression ratio."""
    again = []
    original = guard.decode_again
    monkeypatch.setattr(guard, "decode_again", lambda *args: again.append(args) or original(*args))
    path = speech_at(tmp_path / "five.wav", [12.0 * index for index in range(5)], 60.0)
    result = engine.transcribe(path, OPTIONS, batch_size=8)
    assert again == []
    assert word_error_rate(" ".join([jfk_reference()] * 5), result["text"]) <= 0.10
    assert {segment["temperature"] for segment in result["segments"]} == {0.0}
    assert max(segment["compression_ratio"] for segment in result["segments"]) > guard.COMPRESSION_RATIO_THRESHOLD


def test_a_chunk_that_fails_the_guard_is_decoded_again_at_a_higher_temperature(engine, tmp_path, monkeypatch):
    """A chunk whose first decoding fails the guard (here: every decoding at temperature 0 is made to
    fail it) is decoded again with faster-whisper's fallback temperatures; the one at 0.2 passes, and
    its segments carry that temperature and still read jfk."""
    original = guard.needs_fallback
    monkeypatch.setattr(guard, "needs_fallback",
                        lambda output, speech: output["temperature"] == 0.0 or original(output, speech))
    result = engine.transcribe(speech_at(tmp_path / "once.wav", [1.0], 14.0), OPTIONS, batch_size=8)
    assert {segment["temperature"] for segment in result["segments"]} == {guard.FALLBACK_TEMPERATURES[0]}
    assert word_error_rate(jfk_reference(), result["text"]) <= 0.25
    assert all(segment["words"] for segment in result["segments"])  # aligned as a chunk decoded in its batch is
