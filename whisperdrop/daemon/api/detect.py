"""`/detect-language`: the language of an upload, from its first speech only, never a confident
English for speech that is not English.

The upload is extracted to Opus first, as a job's source is (`detect_upload`), so the answer is the
one its job would get. Which model answers (`detector_model`): the local model when it is multilingual, else `bundled:base`
when its install extra is here, whatever model transcribes the jobs (an English-only model cannot
tell languages apart: it labels everything `en`). With one, `engine.language.detect_file` decodes the
upload's first speech (at most DETECTION_SEGMENTS windows of 30 s, one encoder pass when the first
is sure): the answer a job on that model gets. With none, the English-only local model transcribes
the first 30 s of speech and the answer is `en` only when `outputs.result.language_warning` stays
silent on it and the speech got some text (tiny.en writes nothing at all for some German); else
`Undetectable` (the API answers 422 naming the fix).

Runs in a worker thread (`detect` blocks); nothing here imports FastAPI.
"""

from __future__ import annotations

import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy

from whisperdrop.daemon.extract import extract
from whisperdrop.engine import engine as engines, language as languages
from whisperdrop.engine.chunks import CHUNK_SECONDS, SAMPLE_RATE
from whisperdrop.outputs.result import doubtful_language, language_warning
from whisperdrop.shared.model_names import bundled_install_hint, bundled_missing, english_only
from whisperdrop.shared.spool import TranscribeOptions

FALLBACK_SECONDS = CHUNK_SECONDS   # what an English-only model transcribes to judge whether the speech is English


class Undetectable(Exception):
    """Only an English-only model is here, and the upload's speech does not sound English."""


@dataclass(frozen=True)
class Answer:
    """What `/detect-language` says: the language `code`, its `probability` (None when judged by an
    English-only model), the `model` that judged it, and a `warning` when the answer is doubtful."""

    code: str
    probability: float | None
    model: str
    warning: str | None = None


def detector_model(local_model: str) -> str | None:
    """The multilingual model that detects languages here: `local_model` when it is multilingual,
    else `bundled:base` when its packages are installed, else None."""
    if not english_only(local_model):
        return local_model
    if bundled_missing("bundled:base") is None:
        return "bundled:base"
    return None


def detect_upload(engine: Any, upload: Path, local: Any, bitrate_kbps: int) -> Answer:
    """The language of the uploaded file `upload`, detected on the audio a job of it would get: its
    Opus extraction at `bitrate_kbps` (written beside it, removed after), so that `/detect-language`
    and the job's Result give one answer, doubtful ones included (measured: a Portuguese clip whose
    WAV reads as `en` p=0.28 reads as `hu` p=0.15 once extracted, as its job does). Raises MediaError
    for an upload that is not usable media, and what `detect` raises."""
    audio = upload.with_name(upload.name + ".detect.opus")
    try:
        extract(upload, audio, bitrate_kbps)
        return detect(engine, audio, local)
    finally:
        audio.unlink(missing_ok=True)


def detect(engine: Any, audio: Path, local: Any) -> Answer:
    """The language of the audio file `audio` (see the module's doc). `engine` (an engine.Engine)
    loads the model on the `local` section's device, compute type and threads. Raises Undetectable,
    EngineError (the model cannot load) and PyAV's errors (undecodable audio)."""
    model_name = detector_model(local.model)
    device = engines.resolve_device(local.device)
    if model_name is None:
        return _english_or_not(engine, audio, local, device)
    key = engines.ModelKey(model_name, device, engines.resolve_compute_type(local.compute_type, device),
                           threads=local.threads)
    detection = languages.detect_file(engine.load(key), audio, vad_filter=True)
    code = detection.code or "en"   # no speech at all: nothing says otherwise
    warning = doubtful_language(code, detection.probability) if detection.code else None
    return Answer(code, round(detection.probability, 4), model_name, warning)


def _english_or_not(engine: Any, audio: Path, local: Any, device: str) -> Answer:
    """With only the English-only local model: `en` when its transcript of the first speech draws no
    language_warning, else raises Undetectable naming the fix."""
    speech = []
    count = 0
    for piece in languages.speech_chunks(audio, vad_filter=True):
        speech.append(piece[:int(FALLBACK_SECONDS * SAMPLE_RATE) - count])
        count += len(speech[-1])
        if count >= FALLBACK_SECONDS * SAMPLE_RATE:
            break
    if not count:
        return Answer("en", None, local.model)
    with tempfile.TemporaryDirectory(prefix="whisperdrop-detect-") as folder:
        clip = Path(folder) / "speech.wav"
        with wave.open(str(clip), "wb") as writer:
            writer.setnchannels(1)
            writer.setsampwidth(2)
            writer.setframerate(SAMPLE_RATE)
            writer.writeframes((numpy.clip(numpy.concatenate(speech), -1, 1) * 32767).astype("<i2").tobytes())
        made = engine.transcribe(clip, TranscribeOptions(model=local.model), device=device,
                                 compute_type=local.compute_type, threads=local.threads, batch_size=1)
    if language_warning(made) or not made["text"].strip():   # speech it wrote nothing for is not English to it either
        raise Undetectable(
            f"the speech does not sound English, and the only model here, {local.model}, is English-only: it "
            f"cannot tell which language it is. Install a multilingual model for detection: "
            f"{bundled_install_hint('base', bare=True)} (bundled:base, used for /detect-language whatever model "
            f"transcribes), or set local.model to a multilingual model")
    return Answer("en", None, local.model)
