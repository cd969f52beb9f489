"""A job's language: the one asked for, or detected once, the same way on every route.

Every route (the daemon's local engine, the GPU runner, batched or sequential, the one-shot CLI and
whisper-cli, and the API's `/detect-language`) calls `detect` on the same audio: the first speech
chunks of the file as `chunks.ChunkSource` cuts them for the job (the VAD's speech spans when the VAD
filter is on, every sample when it is off), up to DETECTION_SEGMENTS windows of 30 s. The detection
is faster-whisper's own multi-segment one (`WhisperModel.detect_language` with
`language_detection_segments`): one encoder pass per 30 s window, stopping at the first window whose
top language is over DETECTION_THRESHOLD; when none is, the language most windows put first, with
its best probability. So sure speech costs one encoder pass, and one file gets one answer whether it
is transcribed batched, sequentially, on a GPU host or only asked about.

Why this and not what each path did before: faster-whisper's sequential `transcribe` detects on the
VAD-joined audio of the window it is given and its batched pipeline on the first batch's features,
so the same clip could get two answers (French heard as `fr` by one and `th` by the other, issue 25).
Detecting before decoding, on chunks every route cuts alike, removes that difference.

A detection under `outputs.result.DOUBTFUL_PROBABILITY` is doubtful: `outputs.result.detection_warning`
says so in the Result and the log, with the hint to set `language`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterable

import numpy

from whisperdrop.engine.chunks import CHUNK_SECONDS, KEEP_GAP_SECONDS, SAMPLE_RATE, ChunkSource

DETECTION_SEGMENTS = 3        # at most this many 30 s windows of speech are looked at (fewer when the first is sure)
DETECTION_THRESHOLD = 0.5     # faster-whisper's: a window whose top language is over this decides
DETECTION_SAMPLES = int(DETECTION_SEGMENTS * CHUNK_SECONDS * SAMPLE_RATE)


@dataclass(frozen=True)
class Detection:
    """A job's language: `code`, how sure the model was (`probability`, 1.0 when asked for or when
    the model is English-only), whether it was `detected`, and the `seconds` of speech looked at."""

    code: str | None          # None: no speech at all to detect on
    probability: float
    detected: bool
    seconds: float = 0.0


def asked(model: Any, language: str | None) -> Detection | None:
    """The Detection that needs no audio: the language `language` asked for (English for an
    English-only `model`, which knows no other), or English for an English-only model; None when
    the language must be detected."""
    if language:
        return Detection(language if model.model.is_multilingual else "en", 1.0, False)
    if not model.model.is_multilingual:
        return Detection("en", 1.0, False)
    return None


def detect(model: Any, speech: Iterable[numpy.ndarray]) -> Detection:
    """Detect the language of the audio pieces `speech` yields (16 kHz float32, the job's chunks in
    order) with the multilingual faster-whisper `model`; reads no more of `speech` than the first
    DETECTION_SAMPLES. Raises what the iterator raises (PyAV errors, Cancelled)."""
    pieces, count = [], 0
    for piece in speech:
        pieces.append(piece[:DETECTION_SAMPLES - count])
        count += len(pieces[-1])
        if count >= DETECTION_SAMPLES:
            break
    if not count:
        return Detection(None, 0.0, True)
    audio = numpy.concatenate(pieces)
    features = model.feature_extractor(audio)[..., :-1]   # as the batched pipeline makes a chunk's features
    code, probability, _ = model.detect_language(
        features=features, language_detection_segments=DETECTION_SEGMENTS,
        language_detection_threshold=DETECTION_THRESHOLD)
    return Detection(code, float(probability), True, round(count / SAMPLE_RATE, 3))


def speech_chunks(audio_path: Any, vad_filter: bool, cancel: threading.Event | None = None) -> Iterable[numpy.ndarray]:
    """The audio of a file's chunks as a job with `vad_filter` gets them (what `detect` reads), lazily."""
    source = ChunkSource(audio_path, keep_gap=KEEP_GAP_SECONDS if vad_filter else None, cancel=cancel)
    return (chunk.audio for chunk in source)


def detect_file(model: Any, audio_path: Any, *, language: str | None = None, vad_filter: bool = True,
                cancel: threading.Event | None = None) -> Detection:
    """The language of the audio file `audio_path` as a job with `language` and `vad_filter` gets it
    (see `asked` and `detect`); decodes only as much of the file as the first DETECTION_SEGMENTS
    windows of speech need. Raises PyAV's errors for undecodable audio, and Cancelled."""
    return asked(model, language) or detect(model, speech_chunks(audio_path, vad_filter, cancel))
