"""Batched decoding: chunks of speech from one or several audio files share each batch of the model.

`transcribe_batched(model, jobs, options, ...)` reads each job's chunks lazily (`chunks.ChunkSource`:
bounded memory), fills every batch with up to `batch_size` chunks, taken in turn from the jobs in
hand so that a short job finishes within a batch or two, asks `more` for further jobs whenever fewer
jobs than `batch_size` are in hand, and yields each job's outcome as soon as its last chunk is decoded.

Each chunk is decoded exactly as faster-whisper's `BatchedInferencePipeline` decodes it (same features,
prompt, beam search and word alignment), with three additions. A chunk whose text is a repetition
loop or a guess (`needs_fallback`) is decoded again, alone, at faster-whisper's fallback temperatures,
as its sequential decoding does (the batched pipeline decodes at temperature 0 only); unlike
faster-whisper, text that repeats itself is taken for a loop only when the model is unsure of it or
it comes faster than speech can, so speech that really repeats is not decoded again.
Speech the model skipped (a run of VAD speech spans that no aligned word touches, 3 s or more: a
batched pass sometimes stops early or jumps over a sentence) goes back in the queue as a chunk of its
own for a later batch; and a chunk the model calls silence (no-speech probability over 0.6 with a
log probability under -1) gives no text.
Times come back to the source through the chunk's pieces, as `restore_speech_timestamps` does, and
a segment whose words fall in different pieces is split there.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

import numpy

from whisperdrop.engine import checkpoint, language as languages
from whisperdrop.engine.chunks import SAMPLE_RATE, Chunk, ChunkSource
from whisperdrop.shared.files import Cancelled
from whisperdrop.shared.spool import TranscribeOptions

MAX_PASSES = 3                  # a stretch of speech is decoded at most this often
MISSED_SPEECH = 3 * SAMPLE_RATE  # skipped speech this long (samples) is decoded again: a shorter stretch costs a whole
                                 # 30 s encoder pass and, alone, was decoded wrong (bench/README.md, issue 11 engine)
COVERED = 0.2                   # a span counts as transcribed when aligned words cover this share of it
NO_SPEECH_THRESHOLD = 0.6
LOG_PROB_THRESHOLD = -1.0
COMPRESSION_RATIO_THRESHOLD = 2.4  # text that zlib shrinks more than this repeats itself (faster-whisper's threshold)
LOOP_LOG_PROB = -0.5            # ...and is a loop when the model is unsure of it, or when it comes faster than
LOOP_TOKENS_PER_SECOND = 4.0    # this many tokens a second of the chunk's speech. Measured with tiny.en (docs/models.md):
                                # jfk 25 times over, ratio 3.3-3.8 at -0.05 to -0.08 and 2.2-2.4 tokens/s, is speech that
                                # repeats; loops on other languages ran at -0.99 or at 6.5-21 tokens/s
FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)  # faster-whisper's after 0.0, sampling best_of 5

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
            compression_ratio_threshold=COMPRESSION_RATIO_THRESHOLD, temperatures=[0.0],
            initial_prompt=options.initial_prompt, prefix=None,
            suppress_blank=True, suppress_tokens=get_suppressed_tokens(self.tokenizer, [-1]),
            prepend_punctuations="\"'“¿([{-", append_punctuations="\"'.。,，!！?？:：”)]}、", max_new_tokens=None,
            hotwords=options.hotwords, word_timestamps=options.word_timestamps, hallucination_silence_threshold=None,
            condition_on_previous_text=False, clip_timestamps=None, prompt_reset_on_temperature=0.5,
            multilingual=False, without_timestamps=True, max_initial_timestamp=0.0,
        )
        self.fallback_options = replace(self.options, temperatures=list(FALLBACK_TEMPERATURES))
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
        for index, (chunk, output) in enumerate(zip(chunks, outputs)):
            output["temperature"] = 0.0
            output["compression_ratio"] = compression_ratio(tokenizer.decode(output["tokens"]))
            speech_seconds = _speech_seconds(chunk)
            if needs_fallback(output, speech_seconds):
                outputs[index] = self._fallback(features[index:index + 1], output, speech_seconds)
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

    def _fallback(self, features: numpy.ndarray, first: dict, speech_seconds: float) -> dict:
        """Decode one chunk's features again, alone, at FALLBACK_TEMPERATURES (faster-whisper's
        `generate_with_fallback`: it stops at the first temperature whose text passes its checks).
        Returns the output that passes, else the best of all tries with `first` (temperature 0)
        among them: those under the compression ratio threshold first, then the highest average log
        probability, as faster-whisper chooses. Sampling is random (CTranslate2 seeds each thread once):
        such a chunk may read differently from one run to the next, as with sequential decoding."""
        model, tokenizer, initial_prompt = self.model, self.tokenizer, self.options.initial_prompt
        prompt = model.get_prompt(  # the prompt generate_segment_batched gave the whole batch
            tokenizer, previous_tokens=tokenizer.encode(initial_prompt) if initial_prompt else [],
            without_timestamps=True, hotwords=self.options.hotwords)
        result, avg_logprob, temperature, ratio = model.generate_with_fallback(
            model.encode(features), prompt, tokenizer, self.fallback_options)
        again = {"tokens": result.sequences_ids[0], "avg_logprob": avg_logprob, "no_speech_prob": result.no_speech_prob,
                 "temperature": temperature, "compression_ratio": ratio}
        if not needs_fallback(again, speech_seconds):
            return again
        tries = [first, again]
        return max([output for output in tries if output["compression_ratio"] <= COMPRESSION_RATIO_THRESHOLD] or tries,
                   key=lambda output: output["avg_logprob"])

    def _to_source(self, chunk: Chunk, output: dict, pieces: list[dict], offset: float) -> _Decoded:
        if output["no_speech_prob"] > NO_SPEECH_THRESHOLD and output["avg_logprob"] < LOG_PROB_THRESHOLD:
            return _Decoded([], [])
        base = {"seek": round(chunk.source_time(0.0) * self.model.frames_per_second),  # where its window begins
                "temperature": float(output["temperature"]), "avg_logprob": round(float(output["avg_logprob"]), 4),
                "compression_ratio": round(float(output["compression_ratio"]), 4),
                "no_speech_prob": round(float(output["no_speech_prob"]), 4)}
        segments, spoken = [], []
        for piece in pieces:
            text = piece["text"]
            if not text.strip():
                continue
            runs: list[tuple[int, list[dict]]] = []   # words by the piece of the chunk they fall in
            for word in piece.get("words") or []:
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
        return _Decoded(segments, missed)


def compression_ratio(text: str) -> float:
    """How much zlib shrinks `text` (stripped, UTF-8): faster-whisper's measure of a repetition loop."""
    from faster_whisper.transcribe import get_compression_ratio

    text = text.strip()
    return float(get_compression_ratio(text)) if text else 0.0


def needs_fallback(output: dict, speech_seconds: float) -> bool:
    """Whether a chunk's decoded `output` (tokens, avg_logprob, no_speech_prob, compression_ratio),
    from a chunk holding `speech_seconds` of speech, is a guess or a repetition loop to decode again
    at higher temperatures: an average log probability under LOG_PROB_THRESHOLD (faster-whisper's
    rule), or a compression ratio over COMPRESSION_RATIO_THRESHOLD with an average log probability
    under LOOP_LOG_PROB or more than LOOP_TOKENS_PER_SECOND tokens a second of speech. Never what the
    model calls silence (no-speech probability over NO_SPEECH_THRESHOLD with a low log probability,
    which gives no text)."""
    unsure = output["avg_logprob"] < LOG_PROB_THRESHOLD
    if unsure and output["no_speech_prob"] > NO_SPEECH_THRESHOLD:
        return False
    if output["compression_ratio"] <= COMPRESSION_RATIO_THRESHOLD:
        return unsure
    too_fast = len(output["tokens"]) > LOOP_TOKENS_PER_SECOND * speech_seconds
    return unsure or output["avg_logprob"] < LOOP_LOG_PROB or too_fast


def _speech_seconds(chunk: Chunk) -> float:
    """Seconds of `chunk` inside the VAD's speech spans (its whole length when it has none)."""
    return (sum(end - start for start, end in chunk.speech) or len(chunk.audio)) / SAMPLE_RATE


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
    segments = sorted(run.segments, key=lambda segment: (segment["start"], segment["end"]))
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
