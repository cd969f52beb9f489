"""The Result document (schema `whisperdrop.result/1`), built in one place for every route.

The engine makes the transcript part (text, language, segments, duration, model, options, engine);
on a GPU host the runner adds `executed_on` (its name, machine, device, GPU, compute type, batch
size, out-of-memory retries). `transcribed` adds what the daemon knows (its route and host name, the
fallback reason, the figures of its own stages) without dropping any of that; `for_source` adds the
source file a copy of the Result is written for. The daemon's local and remote routes and the
one-shot `whisperdrop transcribe` all go through these two functions, so their Results agree.
"""

from __future__ import annotations

import socket

from whisperdrop.shared.model_names import MULTILINGUAL_MODELS, english_only
from whisperdrop.shared.spool import RESULT_SCHEMA

HOSTNAME = socket.gethostname()


def executed_on(made: dict, route: str, host: str | None) -> dict:
    """Where a Result was made: the runner's own `executed_on` (its `host`, the runner's name, kept as
    `runner`), else the engine's device and compute type on this machine; then the daemon's `route`
    (`local` or `remote`) and `host` (the configured GPU host's name, None for local) over them."""
    engine = made.get("engine") or {}
    ran = dict(made.get("executed_on") or {})
    if "host" in ran:
        ran["runner"] = ran.pop("host")
    if not ran:  # made here, by the local engine
        ran = {"hostname": HOSTNAME, "compute_type": engine.get("compute_type"),
               "batch_size": engine.get("batch_size", 1)}
    ran.setdefault("device", engine.get("device", "unknown"))
    ran.pop("route", None)
    return {"route": route, "host": host, **ran}


def transcribed(made: dict, *, job_id: str, route: str, host: str | None, fallback_reason: str | None,
                timings: dict, transfer: dict) -> dict:
    """The Result of a job once transcribed, from `made` (the engine's or the runner's Result).

    `timings` (the daemon's stage figures) go over the ones in `made`; `transfer` replaces its own.
    `language_warning` is added when an English-only model seems to have heard another language (see
    `language_warning`), or when a detected language is doubtful (`detection_warning`). Returns a new
    dict; `made` is not changed.
    """
    document = {
        **made,
        "schema": RESULT_SCHEMA,
        "job_id": job_id,
        "executed_on": executed_on(made, route, host),
        "fallback_reason": fallback_reason,
        "timings": {**(made.get("timings") or {}), **timings},
        "transfer": dict(transfer),
    }
    warning = language_warning(made) or detection_warning(made)
    if warning:
        document["language_warning"] = warning
    return document


# An English-only model labels every transcript `en` with probability 1: it cannot detect a language.
# What it does show, cheaply and already computed, is how sure it was of its own words: on speech in
# another language its segments' average log-probability falls far below what English gets
# (measured with tiny.en: German -2.4, English -0.3); faster-whisper itself treats a window below
# -1.0 as failed decoding. Weighted by segment length, so one hard sentence does not trip it.
NOT_ENGLISH_LOGPROB = -1.0


def language_warning(made: dict) -> str | None:
    """A sentence for the Result and the log when an English-only model transcribed speech that
    seems not to be English (its segments' length-weighted average log-probability below
    NOT_ENGLISH_LOGPROB); None otherwise, or when the segments carry no log-probability."""
    if not english_only(made.get("model")):
        return None
    weighted = total = 0.0
    for segment in made.get("segments") or []:
        if segment.get("avg_logprob") is None:
            continue
        length = max(0.0, float(segment.get("end", 0.0)) - float(segment.get("start", 0.0))) or 0.01
        weighted += float(segment["avg_logprob"]) * length
        total += length
    if not total or weighted / total >= NOT_ENGLISH_LOGPROB:
        return None
    return (f"the speech is likely not English (average log-probability {weighted / total:.2f}), but "
            f"{made.get('model')} understands English only, so this transcript is likely nonsense: use a "
            f"multilingual model ({MULTILINGUAL_MODELS}) for other languages; see README, Models")


# A detected language whose probability is under this is doubtful: faster-whisper's own threshold for a
# sure detection (engine.language.DETECTION_THRESHOLD). Measured with bundled:base on espeak-ng speech:
# German, Spanish and English at 0.89 to 0.98; Portuguese at 0.28 (`en`, from the WAV) and 0.15 (`hu`,
# from its Opus), a French sentence at 0.34 (`th`).
DOUBTFUL_PROBABILITY = 0.5


def detection_warning(made: dict) -> str | None:
    """A sentence for the Result and the log when the language was detected (the options asked for
    none, and the model is multilingual) on speech (segments), with a probability under
    DOUBTFUL_PROBABILITY (see `doubtful_language`); None otherwise."""
    if (made.get("options") or {}).get("language") or english_only(made.get("model")) or not made.get("segments"):
        return None
    return doubtful_language(made.get("language"), made.get("language_probability"))


def doubtful_language(language: str | None, probability: float | None) -> str | None:
    """The warning for a detected `language` whose `probability` is under DOUBTFUL_PROBABILITY: the
    language, the probability and the fix (set `language` on the folder's profile); None when sure."""
    if probability is None or float(probability) >= DOUBTFUL_PROBABILITY:
        return None
    return (f"the language was detected as {language!r} with probability {float(probability):.2f} only "
            f"(under {DOUBTFUL_PROBABILITY}), so this transcript may be in the wrong language or nonsense: if you know "
            "the language, set `language` (e.g. pt) on the profile of this file's folder, or transcription.language, "
            "or send it with the request; see docs/models.md, Languages")


def for_source(result: dict, *, path: str, size: int, sha256: str, timings: dict,
               cached_from: dict | None = None) -> dict:
    """The Result as written beside one source file: `source` (relative path, size, sha256) added and
    `timings` (settle_s, total_s...) over the job's. Given `cached_from` (the earlier job's `job_id`
    and `at`, when it was done), the file was served from that job's cached Result: the timings are
    this delivery's only, and the earlier run's move into `cached_from.timings`. Returns a new dict."""
    document = {
        **result,
        "schema": RESULT_SCHEMA,
        "source": {"path": path, "size": size, "sha256": sha256},
        "timings": {**(result.get("timings") or {}), **timings},
    }
    if cached_from is not None:
        document["cached_from"] = {**cached_from, "timings": result.get("timings") or {}}
        document["timings"] = dict(timings)
    return document
