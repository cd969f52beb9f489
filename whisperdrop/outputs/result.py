"""The Result document (schema `whisperdrop.result/1`), built in one place for every route.

The engine makes the transcript part (text, language, segments, duration, model, options, engine);
on a GPU host the runner adds `executed_on` (its name, machine, device, GPU, compute type, batch
size, out-of-memory retries). `transcribed` adds what the daemon knows (its route and host name, the
fallback reason, the figures of its own stages) without dropping any of that; `for_source` adds the
source file a copy of the Result is written for. The daemon's local and remote routes and the
one-shot `whisperdrop transcribe` all go through these two functions, so their Results agree.
"""

from __future__ import annotations

import re
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
                timings: dict, transfer: dict, handbacks: list | None = None) -> dict:
    """The Result of a job once transcribed, from `made` (the engine's or the runner's Result).

    `timings` (the daemon's stage figures) go over the ones in `made`; `transfer` replaces its own.
    `handbacks` (a fallback's hand-backs to a GPU host, see daemon.handback) are kept with their
    sentence, `returned_to`; both are there only for a job that had one.
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
    if handbacks:
        document["returned_to"] = returned_to(handbacks)
        document["handbacks"] = [dict(entry) for entry in handbacks]
    warning = language_warning(made) or detection_warning(made)
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
# Given other speech it writes English-sounding words it is unsure of, loops on a phrase or a syllable,
# or leaves stretches of the speech without text. No one of these signs is safe alone (how sure the
# model is moves with the machine's numerics, and loops come and go with the temperature), so the
# warning adds up evidence, one point for each sign at full strength (docs/models.md):
UNSURE_LOGPROB = (-0.5, -1.0)    # segments' length-weighted average log-probability: 0 points at -0.5, 1 at -1.0
UNSURE_WORD = 0.5                # a word is unsure below this probability...
UNSURE_WORDS = (0.25, 0.75)      # ...0 points with 25 % of the words unsure, 1 with 75 %
UNCOVERED = (0.25, 0.75)         # share of the VAD's speech no segment covers: 0 points at 25 %, 1 at 75 %...
UNCOVERED_SECONDS = 5.0          # ...counted once that much speech is without text (a cough is not a language)
REPEATED_POINTS = 0.5            # words that repeat the words just before them (a loop, "di-di-di"): a share
REPEAT_WORDS = 10                # of all words, worth at most half a point (people repeat themselves too);
                                 # a repeat is of 1 to REPEAT_WORDS words
WARN_POINTS = 1.0                # a Result with this many points gets the warning
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def _scale(value: float, bounds: tuple[float, float]) -> float:
    """0 at bounds[0], 1 at bounds[1], on the same line beyond it; never below 0."""
    low, high = bounds
    return max(0.0, (value - low) / (high - low))


def repeated_share(text: str) -> float:
    """The share of `text`'s words that repeat the 1 to REPEAT_WORDS words just before them, as a
    decoder caught in a loop writes them ("going on. I'm going to see what's going on", "di-di-di")."""
    words = [word.lower() for word in _WORD.findall(text)]
    repeated = [False] * len(words)
    for size in range(1, REPEAT_WORDS + 1):
        run = 0  # words so far, each the same as the one `size` before it: a repeat once `size` of them
        for index in range(size, len(words) + 1):
            if index < len(words) and words[index] == words[index - size]:
                run += 1
                continue
            if run >= size:
                repeated[index - run:index] = [True] * run
            run = 0
    return sum(repeated) / len(words) if words else 0.0


def not_english_evidence(made: dict) -> dict | None:
    """The signs that an English-only model's Result `made` is of speech in another language: the
    figures `logprob` (the segments' avg_logprob, weighted by their length), `unsure_words` (the share
    of words under UNSURE_WORD probability; None without word timestamps), `uncovered` (the share of
    the speech the VAD found that no segment covers; None with the VAD filter off) and `repeated`
    (repeated_share of the text); `points`, what each figure is worth (see the constants above); and
    `total`, their sum. None when `made` has neither segments nor speech to judge by."""
    segments = made.get("segments") or []
    speech = float(made.get("duration_after_vad") or 0.0) if (made.get("options") or {}).get("vad_filter", True) else 0.0
    if not segments and not speech:
        return None
    evidence: dict = {"logprob": None, "unsure_words": None, "uncovered": None, "repeated": 0.0, "points": {}}
    scored = [segment for segment in segments if segment.get("avg_logprob") is not None]
    lengths = [max(0.01, float(segment["end"]) - float(segment["start"])) for segment in scored]
    if scored:
        evidence["logprob"] = sum(float(segment["avg_logprob"]) * length
                                  for segment, length in zip(scored, lengths)) / sum(lengths)
        evidence["points"]["logprob"] = _scale(evidence["logprob"], UNSURE_LOGPROB)
    probabilities = [float(word["probability"]) for segment in segments for word in segment.get("words") or []
                     if word.get("probability") is not None]
    if probabilities:
        evidence["unsure_words"] = sum(probability < UNSURE_WORD for probability in probabilities) / len(probabilities)
        evidence["points"]["unsure_words"] = _scale(evidence["unsure_words"], UNSURE_WORDS)
    if speech:
        covered, reached = 0.0, 0.0
        for start, end in sorted((float(segment["start"]), float(segment["end"])) for segment in segments):
            covered += max(0.0, end - max(start, reached))
            reached = max(reached, end)
        uncovered = max(0.0, speech - covered)
        evidence["uncovered"] = uncovered / speech
        evidence["points"]["uncovered"] = _scale(evidence["uncovered"], UNCOVERED) if uncovered >= UNCOVERED_SECONDS else 0.0
    evidence["repeated"] = repeated_share(" ".join(segment.get("text", "") for segment in segments))
    evidence["points"]["repeated"] = REPEATED_POINTS * evidence["repeated"]
    evidence["points"] = {name: round(value, 3) for name, value in evidence["points"].items()}
    evidence["total"] = round(sum(evidence["points"].values()), 3)
    return evidence


def language_warning(made: dict) -> str | None:
    """A sentence for the Result and the log when an English-only model transcribed speech that seems
    not to be English (not_english_evidence's total is WARN_POINTS or more), with the figures that
    say so; None otherwise, and for any other model."""
    if not english_only(made.get("model")):
        return None
    evidence = not_english_evidence(made)
    if evidence is None or evidence["total"] < WARN_POINTS:
        return None
    signs = []
    if evidence["logprob"] is not None:
        signs.append(f"average log-probability {evidence['logprob']:.2f}")
    if evidence["unsure_words"] is not None:
        signs.append(f"{evidence['unsure_words']:.0%} of the words unsure")
    if evidence["uncovered"] is not None:
        signs.append(f"{evidence['uncovered']:.0%} of the speech without text")
    signs.append(f"{evidence['repeated']:.0%} of the words repeated")
    return (f"the speech is likely not English, or too unclear for {made.get('model')}, which understands English "
            f"only ({', '.join(signs)}: {evidence['total']:.1f} points, {WARN_POINTS:.0f} warns): this transcript is "
            f"likely nonsense. For other languages use a multilingual model ({MULTILINGUAL_MODELS}); see docs/models.md")


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
