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

from whisperdrop.spool import RESULT_SCHEMA

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
                timings: dict, transfer: dict, handbacks: list | None = None) -> dict:
    """The Result of a job once transcribed, from `made` (the engine's or the runner's Result).

    `timings` (the daemon's stage figures) go over the ones in `made`; `transfer` replaces its own.
    `handbacks` (a fallback's hand-backs to a GPU host, see daemon.handback) are kept with their
    sentence, `returned_to`; both are there only for a job that had one. `language_warning` is added
    when an English-only model seems to have heard another language (see `language_warning`).
    Returns a new dict; `made` is not changed.
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
    if handbacks:
        document["returned_to"] = returned_to(handbacks)
        document["handbacks"] = [dict(entry) for entry in handbacks]
    warning = language_warning(made)
    if warning:
        document["language_warning"] = warning
    return document


def returned_to(handbacks: list[dict]) -> str | None:
    """The `returned_to` sentence of a Result from its hand-back entries (see daemon.handback), e.g.
    `gpu1 after 340 s local, 18% done`; None for none."""
    parts = []
    for entry in handbacks or []:
        duration = entry.get("duration_s") or 0.0
        percent = 100.0 * (entry.get("done_s") or 0.0) / duration if duration else 0.0
        text = f"{entry.get('host')} after {entry.get('local_s') or 0.0:.0f} s local, {percent:.0f}% done"
        outcome = entry.get("outcome") or ""
        if outcome.startswith("failed"):
            text += f"; it failed there, resumed locally from {percent:.0f}% ({outcome.removeprefix('failed: ')})"
        parts.append(text)
    return "; then ".join(parts) or None


# An English-only model labels every transcript `en` with probability 1: it cannot detect a language.
# What it does show, cheaply and already computed, is how sure it was of its own words: on speech in
# another language its segments' average log-probability falls far below what English gets
# (measured with tiny.en: German -2.4, English -0.3); faster-whisper itself treats a window below
# -1.0 as failed decoding. Weighted by segment length, so one hard sentence does not trip it.
NOT_ENGLISH_LOGPROB = -1.0
MULTILINGUAL_MODELS = "tiny, base, small, medium, large-v3"


def english_only(model: str | None) -> bool:
    """Whether `model` (a name, `bundled:tiny.en` or a folder) is one of Whisper's English-only models."""
    name = (model or "").rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1].lower()
    return name.endswith(".en") or name.startswith("distil-")  # distil-whisper's models are English-only


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
