"""Batched decoding: chunks of speech from one or several audio files share each batch of the model.

`transcribe_batched(model, jobs, options, ...)` reads each job's chunks lazily (`chunks.ChunkSource`:
bounded memory), fills every batch with up to `batch_size` chunks, taken in turn from the jobs in
hand so that a short job finishes within a batch or two, asks `more` for further jobs whenever fewer
jobs than `batch_size` are in hand, and yields each job's outcome as soon as its last chunk is decoded.

Each chunk is decoded exactly as faster-whisper's `BatchedInferencePipeline` decodes it (same features,
prompt, beam search and word alignment), with four additions. A chunk whose text is a repetition
loop or a guess is decoded again at faster-whisper's fallback temperatures (`guard`), the chunks of a
batch that need it together. Words that word alignment puts in no time at all (a run of three or
more, each under one 20 ms frame) are dropped: decoding without timestamps sometimes writes a
sentence twice where the speech repeats itself (jfk said 25 times), and alignment squeezes the copy
into an instant (`_squeezed`).
Speech the model skipped (a run of VAD speech spans that no aligned word touches, 3 s or more: a
batched pass sometimes stops early or jumps over a sentence) goes back in the queue as a chunk of its
own for a later batch; and a chunk the model calls silence (no-speech probability over 0.6 with a
log probability under -1) gives no text.
Times come back to the source through the chunk's pieces, as `restore_speech_timestamps` does, and
a segment whose words fall in different pieces is split there. A job's segments are put together by
`segments.assemble`: in order, never overlapping, never repeated, however its chunks were decoded.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy

from whisperdrop.engine import checkpoint, guard, language as languages
from whisperdrop.engine.chunks import SAMPLE_RATE, Chunk, ChunkSource
from whisperdrop.engine.guard import LOG_PROB_THRESHOLD, NO_SPEECH_THRESHOLD
from whisperdrop.engine.segments import assemble
from whisperdrop.shared.files import Cancelled
from whisperdrop.shared.spool import TranscribeOptions

MAX_PASSES = 3                  # a stretch of speech is decoded at most this often
MISSED_SPEECH = 3 * SAMPLE_RATE  # skipped speech this long (samples) is decoded again: a shorter stretch costs a whole
                                 # 30 s encoder pass and, alone, was decoded wrong (bench/README.md, issue 11 engine)
COVERED = 0.2                   # a span counts as transcribed when aligned words cover this share of it
SQUEEZED_WORDS = 3              # a run of this many words or more that word alignment gives less than
SQUEEZED_SECONDS = 0.02         # this each (one feature frame) is text written twice: the words hold no audio
Progress = Callable[[float, float], None]


@dataclass
class AudioJob:
    """One audio file to transcribe: `tag` is the caller's (a job id), `progress` gets (done, total) seconds."""

    audio_path: Any
    tag: Any = None
    progress: Progress | None = None
    checkpoint: Any = None   # a checkpoint.Checkpoint: finished chunks are kept there, and reused after a restart


@dataclass
class Transcript:
    """What decoding one job gave: segments in source time, sorted, and the figures of its audio."""

    segments: list[dict]
    language: str
    language_probability: float
    duration: float
    duration_after_vad: float
    chunks: int


@dataclass
class _Decoded:
    segments: list[dict]
    missed: list[tuple[int, int]]   # (start, end) chunk positions of speech no word was aligned to


class BatchDecoder:
    """Decodes batches of chunks with one model, one language and one set of options.

    Times are kept on a private clock that advances by each chunk's length, as faster-whisper's
    pipeline advances its chunk offsets, so that its word-timing heuristics see the same times.
    """

    def __init__(self, model: Any, options: TranscribeOptions, language: str):
        from faster_whisper import BatchedInferencePipeline
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import TranscriptionOptions, get_suppressed_tokens

        self.model = model
        self.pipeline = BatchedInferencePipeline(model=model)
        self.tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task=options.task, language=language)
        self.options = TranscriptionOptions(  # BatchedInferencePipeline.transcribe's
            beam_size=options.beam_size, best_of=5, patience=1, length_penalty=1, repetition_penalty=1,
            no_repeat_ngram_size=0, log_prob_threshold=LOG_PROB_THRESHOLD, no_speech_threshold=NO_SPEECH_THRESHOLD,
            compression_ratio_threshold=guard.COMPRESSION_RATIO_THRESHOLD, temperatures=[0.0],
            initial_prompt=options.initial_prompt, prefix=None,
            suppress_blank=True, suppress_tokens=get_suppressed_tokens(self.tokenizer, [-1]),
            prepend_punctuations="\"'“¿([{-", append_punctuations="\"'.。,，!！?？:：”)]}、", max_new_tokens=None,
            hotwords=options.hotwords, word_timestamps=options.word_timestamps, hallucination_silence_threshold=None,
            condition_on_previous_text=False, clip_timestamps=None, prompt_reset_on_temperature=0.5,
            multilingual=False, without_timestamps=True, max_initial_timestamp=0.0,
        )
        self.frames = 0              # the private clock, in feature frames
        self.last_speech = 0.0

    def decode(self, chunks: list[Chunk]) -> list[_Decoded]:
        """Decode one batch: per chunk its segments (source time) and the speech it missed.

        Raises what CTranslate2 raises (out of memory among others).
        """
        from faster_whisper.audio import pad_or_trim

        model, tokenizer = self.model, self.tokenizer
        features = numpy.stack([pad_or_trim(model.feature_extractor(chunk.audio)[..., :-1]) for chunk in chunks])
        encoder_output, outputs = self.pipeline.generate_segment_batched(features, tokenizer, self.options)
        flagged = {}
        for index, (chunk, output) in enumerate(zip(chunks, outputs)):
            output["temperature"] = 0.0
            output["compression_ratio"] = guard.compression_ratio(tokenizer.decode(output["tokens"]))
            seconds = guard.speech_seconds(chunk)
            if guard.needs_fallback(output, seconds):
                flagged[index] = (output, seconds)
        if flagged:
            for index, output in guard.decode_again(model, tokenizer, self.options, encoder_output, flagged).items():
                outputs[index] = output
        segmented, sizes, offsets = [], [], []
        for chunk, output in zip(chunks, outputs):
            size = int(math.ceil(chunk.duration) * model.frames_per_second)
            seek = self.frames
            self.frames += size
            offset = seek / model.frames_per_second
            pieces, _, _ = model._split_segments_by_timestamps(
                tokenizer=tokenizer, tokens=output["tokens"], time_offset=offset, segment_size=size,
                segment_duration=chunk.duration, seek=seek)
            segmented.append([dict(piece, text=tokenizer.decode(piece["tokens"]), seek=seek) for piece in pieces])
            sizes.append(size)
            offsets.append(offset)
        if self.options.word_timestamps:
            self.last_speech = model.add_word_timestamps(
                segmented, tokenizer, encoder_output, sizes, self.options.prepend_punctuations,
                self.options.append_punctuations, self.last_speech)
        return [self._to_source(chunk, output, pieces, offset)
                for chunk, output, pieces, offset in zip(chunks, outputs, segmented, offsets)]

    def _to_source(self, chunk: Chunk, output: dict, pieces: list[dict], offset: float) -> _Decoded:
        if output["no_speech_prob"] > NO_SPEECH_THRESHOLD and output["avg_logprob"] < LOG_PROB_THRESHOLD:
            return _Decoded([], [])
        base = {"seek": round(chunk.source_time(0.0) * self.model.frames_per_second),  # where its window begins
                "temperature": float(output["temperature"]), "avg_logprob": round(float(output["avg_logprob"]), 4),
                "compression_ratio": round(float(output["compression_ratio"]), 4),
                "no_speech_prob": round(float(output["no_speech_prob"]), 4)}
        segments, spoken = [], []
        squeezed = _squeezed([word for piece in pieces for word in piece.get("words") or []])
        counter = 0
        for piece in pieces:
            text = piece["text"]
            words = piece.get("words") or []
            kept = [word for index, word in enumerate(words, start=counter) if index not in squeezed]
            counter += len(words)
            if len(kept) < len(words):
                if not kept:
                    continue
                text = "".join(word["word"] for word in kept)
                piece = dict(piece, tokens=self.tokenizer.encode(text))
            if not text.strip():
                continue
            runs: list[tuple[int, list[dict]]] = []   # words by the piece of the chunk they fall in
            for word in kept:
                word_start, word_end = word["start"] - offset, word["end"] - offset
                spoken.append((word_start, word_end))
                index = chunk.piece_index((word_start + word_end) / 2)
                mapped = {"start": round(chunk.source_time(word_start, index), 3),
                          "end": round(chunk.source_time(word_end, index), 3),
                          "word": word["word"], "probability": round(float(word["probability"]), 4)}
                if runs and runs[-1][0] == index:
                    runs[-1][1].append(mapped)
                else:
                    runs.append((index, [mapped]))
            tokens = [int(token) for token in piece["tokens"]]
            if len(runs) > 1:  # one segment per stretch of source audio: never one across a left-out pause
                for _, words in runs:
                    said = "".join(word["word"] for word in words)
                    segments.append({"start": words[0]["start"], "end": words[-1]["end"], "text": said,
                                     "tokens": self.tokenizer.encode(said), **base, "words": words})
            elif runs:
                words = runs[0][1]
                segments.append({"start": words[0]["start"], "end": words[-1]["end"], "text": text,
                                 "tokens": tokens, **base, "words": words})
            else:
                start, end = piece["start"] - offset, piece["end"] - offset
                segments.append({"start": round(chunk.source_time(start), 3),
                                 "end": round(chunk.source_time(end, is_end=True), 3), "text": text,
                                 "tokens": tokens, **base, "words": []})
        missed = _missed(chunk, spoken) if self.options.word_timestamps else []
        missed = [(start, end) for start, end in missed if chunk.part(start, end).pieces != chunk.pieces]  # the same audio
        # at temperature 0 reads the same again: decoding the whole chunk again would only repeat its segments
        return _Decoded(segments, missed)


def _squeezed(words: list[dict]) -> set[int]:
    """Indexes of the `words` in runs of SQUEEZED_WORDS or more that alignment gives under SQUEEZED_SECONDS each."""
    found: set[int] = set()
    start = 0
    while start < len(words):
        end = start
        while end < len(words) and words[end]["end"] - words[end]["start"] < SQUEEZED_SECONDS:
            end += 1
        if SQUEEZED_WORDS and end - start >= SQUEEZED_WORDS:
            found.update(range(start, end))
            if 0 < start and end < len(words) and _bare(words[start - 1]["word"]) == _bare(words[end]["word"]):
                # the repeated stretch began or ended with a word that kept some time: one of the two goes too
                before, after = words[start - 1], words[end]
                found.add(start - 1 if before["end"] - before["start"] < after["end"] - after["start"] else end)
        start = max(end, start + 1)
    return found


def _bare(word: str) -> str:
    return "".join(character for character in word.lower() if character.isalnum())


def _missed(chunk: Chunk, spoken: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """Runs of the chunk's speech spans that aligned words hardly touch (less than COVERED of each
    span), MISSED_SPEECH long at least, as (start, end) chunk positions."""
    runs: list[list[int]] = []
    for start, end in chunk.speech:
        low, high = start / SAMPLE_RATE, end / SAMPLE_RATE
        covered = sum(max(0.0, min(high, word_end) - max(low, word_start)) for word_start, word_end in spoken)
        if covered >= COVERED * (high - low):
            runs.append([])
        elif runs and runs[-1]:
            runs[-1][1] = end
        else:
            runs.append([start, end])
    return [(start, end) for start, end in (run for run in runs if run) if end - start >= MISSED_SPEECH]


@dataclass
class _Run:
    """One job in hand: its chunk stream, what is queued again, and what it has given so far."""

    job: AudioJob
    chunks: Iterator[Chunk]
    source: ChunkSource
    total: float
    language: str | None = None
    language_probability: float = 0.0
    detected: bool = False   # its language is known (asked, or detected on its first chunks: `ahead`)
    ahead: list[Chunk] = field(default_factory=list)   # chunks read for the detection, not taken yet
    queued: list[tuple[Chunk, int]] = field(default_factory=list)   # missed speech, with its pass number
    segments: list[dict] = field(default_factory=list)
    in_flight: int = 0
    count: int = 0
    read_all: bool = False
    error: BaseException | None = None
    done: float = 0.0

    @property
    def finished(self) -> bool:
        return (self.read_all or self.error is not None) and not self.queued and self.in_flight == 0

    def report(self, done: float) -> None:
        self.done = max(self.done, done)
        if self.job.progress is not None:
            total = max(self.total, self.source.samples / SAMPLE_RATE)
            self.job.progress(min(self.done, total), total)


def transcribe_batched(
    model: Any,
    jobs: Iterable[AudioJob],
    options: TranscribeOptions,
    *,
    batch_size: int,
    cancel: threading.Event | None = None,
    more: Callable[[int], list[AudioJob]] | None = None,
    duration_hint: Callable[[Any], float] = lambda path: 0.0,
    keep_gap: float | None = None,
) -> Iterator[tuple[AudioJob, Transcript | BaseException]]:
    """Transcribe `jobs` (and those `more(n)` hands over, n at most) in shared batches of `batch_size`.

    Yields (job, Transcript) as each job completes, or (job, the exception its audio raised) for a
    job whose audio cannot be decoded: that job fails alone. `keep_gap` is passed to ChunkSource
    (None: every sample, the VAD filter off). Raises Cancelled when `cancel` is set (between batches
    and between decoded blocks), and what the model raises for a batch (out of memory...): then the
    jobs not yielded yet are unfinished.
    """
    runs = [_start(job, keep_gap, cancel, duration_hint) for job in jobs]
    decoders: dict[str, BatchDecoder] = {}
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        if more is not None and len(runs) < batch_size:  # each job in hand gives a chunk per batch at least
            runs += [_start(job, keep_gap, cancel, duration_hint) for job in more(batch_size - len(runs))]
        batch, language = _fill(model, runs, options, batch_size)
        yield from _finish(runs, options, model)
        if not batch:
            if runs:
                continue
            if more is None:
                return
            new = more(batch_size)
            if not new:
                return
            runs += [_start(job, keep_gap, cancel, duration_hint) for job in new]
            continue
        if language not in decoders:
            decoders[language] = BatchDecoder(model, options, language)
            checkpoint.resume_decoder(decoders[language], language, [run.job for run, _, _ in batch])
        decoded = decoders[language].decode([chunk for _, chunk, _ in batch])
        checkpoint.save_batch(batch, decoded, language, decoders[language])
        for (run, chunk, passes), result in zip(batch, decoded):
            run.in_flight -= 1
            run.segments += result.segments
            if passes < MAX_PASSES:
                run.queued += [(chunk.part(start, end), passes + 1) for start, end in result.missed]
            run.report(chunk.source_end)
        yield from _finish(runs, options, model)


def _finish(runs: list[_Run], options: TranscribeOptions, model: Any) -> Iterator[tuple[AudioJob, Transcript | BaseException]]:
    """Yield the outcome of each run that is finished (in the order they came), and drop it."""
    for run in [run for run in runs if run.finished]:
        runs.remove(run)
        if run.error is not None:
            yield run.job, run.error
            continue
        transcript = _transcript(run, options, model)
        run.total = transcript.duration
        run.report(transcript.duration)
        yield run.job, transcript


def _start(job: AudioJob, keep_gap: float | None, cancel: threading.Event | None,
           duration_hint: Callable[[Any], float]) -> _Run:
    source = ChunkSource(job.audio_path, keep_gap=keep_gap, cancel=cancel)
    run = _Run(job, iter(source), source, 0.0)
    source.on_block = lambda position: run.report(run.done)  # a long silence still shows life
    try:
        run.total = duration_hint(job.audio_path)
    except Exception as error:  # noqa: BLE001  PyAV raises many types; the job fails alone, with its error
        run.error = error
    return run


def _fill(model: Any, runs: list[_Run], options: TranscribeOptions, batch_size: int) -> tuple[list, str | None]:
    """Take chunks from the runs in turn (missed speech first) until the batch is full or nothing is left;
    one language per batch. Returns [(run, chunk, pass number)] and the batch's language."""
    batch: list[tuple[_Run, Chunk, int]] = []
    language = None
    moved = True
    while len(batch) < batch_size and moved:
        moved = False
        for run in runs:
            if len(batch) >= batch_size:
                break
            if language is not None and run.language is not None and run.language != language:
                continue
            taken = _take(model, run, options)
            if taken is None:
                continue
            if language is None:
                language = run.language
            elif run.language != language:  # its first chunk told another language: keep it for later
                run.queued.insert(0, taken)
                continue
            run.in_flight += 1
            batch.append((run, *taken))
            moved = True
    return batch, language


def _take(model: Any, run: _Run, options: TranscribeOptions) -> tuple[Chunk, int] | None:
    if run.queued:
        return run.queued.pop(0)
    if run.read_all or run.error is not None:
        return None
    try:
        if not run.detected:
            _detect(model, run, options)
        chunk = run.ahead.pop(0) if run.ahead else next(run.chunks)
    except StopIteration:
        run.read_all = True
        if run.job.checkpoint is not None:  # speech that chunks reused from a checkpoint missed
            run.queued += run.job.checkpoint.pending()
        return run.queued.pop(0) if run.queued else None
    except Cancelled:
        raise
    except Exception as error:  # noqa: BLE001  undecodable audio: this job fails alone, with its error
        run.error = error
        return None
    run.count += 1
    if run.job.checkpoint is not None:
        return _resumed(run, chunk)
    return chunk, 1


def _resumed(run: _Run, chunk: Chunk) -> tuple[Chunk, int] | None:
    """A chunk of a job with a checkpoint: reused when it was decoded before a restart (None: take the
    next), else decoded after the missed speech of the reused ones, as the interrupted run queued it."""
    segments = run.job.checkpoint.reuse(chunk, MAX_PASSES)
    if segments is not None:
        run.segments += segments
        run.report(chunk.source_end)
        return None
    run.queued += run.job.checkpoint.pending() + [(chunk, 1)]
    return run.queued.pop(0)


def _detect(model: Any, run: _Run, options: TranscribeOptions) -> None:
    """Set the run's language: the one asked for, or detected (`language.detect`) on its first chunks,
    which are kept in `run.ahead` to be decoded after. Raises what reading the audio raises."""
    detection = languages.asked(model, options.language)
    if detection is None:
        def speech():
            for chunk in run.chunks:
                run.ahead.append(chunk)
                yield chunk.audio

        detection = languages.detect(model, speech())
    run.detected = True
    run.language, run.language_probability = detection.code, detection.probability


def _transcript(run: _Run, options: TranscribeOptions, model: Any) -> Transcript:
    segments = assemble(run.segments, lambda text: model.hf_tokenizer.encode(text, add_special_tokens=False).ids)
    for index, segment in enumerate(segments):
        segment["id"] = index + 1
    language, probability = run.language, run.language_probability
    if language is None:  # no speech at all
        language = options.language or "en"
        probability = 1.0 if options.language or not model.model.is_multilingual else 0.0
    return Transcript(
        segments=[{"id": segment.pop("id"), **segment} for segment in segments],
        language=language, language_probability=probability,
        duration=run.source.samples / SAMPLE_RATE, duration_after_vad=run.source.speech_samples / SAMPLE_RATE,
        chunks=run.count,
    )
