"""Engine (issue 21): what the repetition guard costs, measured by `bench_engine` beside its other rows.

Batched decoding decodes a chunk again at faster-whisper's fallback temperatures when its text
loops or is a guess (`whisperdrop.engine.guard.needs_fallback`; a batch's flagged chunks together).
This compares whisperdrop's default transcription with the guard and without it (`needs_fallback`
answering no), in rounds of rotating order on one loaded model, on three files:

- the engine benchmark's long English file (its word error rate with and without);
- jfk.flac said 25 times with 1 s between (5 minutes; 5 times in quick mode): speech that merely
  repeats, whose chunks compress past faster-whisper's 2.4 and which the guard must leave alone;
- the German sentence the tests speak (espeak-ng `de`) through the English-only model: the guard's
  work, and its cost, where it fires (no word error rate: an English-only model cannot transcribe it).

Each row counts the chunks decoded again per run.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
from pathlib import Path
from typing import Iterator

import numpy
from common import Row, paired, rounds, wer
from corpus import RATE, Speech, jfk
from daemon_helpers import write_wav

from whisperdrop.daemon.extract import extract
from whisperdrop.engine import guard as engine_guard

SECTION = "engine"


@contextlib.contextmanager
def guard(enabled: bool, decoded_again: list[int]) -> Iterator[None]:
    """Within it, batched decoding runs with the repetition guard or without; each chunk it decodes
    again appends 1 to `decoded_again`."""
    check, fallback = engine_guard.needs_fallback, engine_guard.decode_again

    def counted(model, tokenizer, options, encoder_output, flagged):
        decoded_again.extend([1] * len(flagged))
        return fallback(model, tokenizer, options, encoder_output, flagged)

    engine_guard.needs_fallback = check if enabled else (lambda output, speech_seconds: False)
    engine_guard.decode_again = counted
    try:
        yield
    finally:
        engine_guard.needs_fallback, engine_guard.decode_again = check, fallback


def repeated_jfk(folder: Path, times: int) -> Speech:
    """jfk.flac said `times` times with 1 s of silence after each, as a WAV in `folder`."""
    samples, text = jfk()
    audio = numpy.concatenate([numpy.concatenate([samples, numpy.zeros(RATE, dtype=numpy.int16)])] * times)
    return Speech(write_wav(folder / f"jfk-{times}.wav", audio), " ".join([text] * times), len(audio) / RATE,
                  f"jfk.flac {times} times, 1 s apart")


def german(folder: Path) -> Path:
    """The tests' German sentence (tests/test_daemon_first_day.GERMAN) read by espeak-ng's `de`, as they read it."""
    from test_daemon_first_day import GERMAN

    path = folder / "german.wav"
    subprocess.run(["espeak-ng", "-v", "de", "-w", str(path), GERMAN], check=True, capture_output=True, timeout=120)
    return path


def guard_rows(setup, long: tuple[Speech, Path], scratch: Path, repeats: int, quick: bool) -> list[Row]:
    """With and without the guard on the long file, jfk repeated and German: time, ratio, chunks
    decoded again, and word error rates where the text is known. `setup` is bench_engine's Setup."""
    from bench_engine import whisperdrop_call

    scratch.mkdir(parents=True, exist_ok=True)
    repeated = repeated_jfk(scratch, 5 if quick else 25)
    spoken = german(scratch)
    files = [("long", long[0], long[1]),
             ("repeated", repeated, extract(repeated.path, repeated.path.with_suffix(".opus")).path),
             ("german", None, extract(spoken, spoken.with_suffix(".opus")).path)]
    rows = []
    for kind, speech, audio in files:
        again: dict[str, list[int]] = {"with": [], "without": []}

        def call(name: str, audio: Path = audio) -> tuple[float, str, int]:
            counted: list[int] = []
            with guard(name == "with", counted):
                elapsed, text = whisperdrop_call(setup, audio)
            again[name].append(len(counted))
            return elapsed, text, len(counted)

        runs = rounds({"with": lambda: call("with"), "without": lambda: call("without")}, repeats)
        seconds = {name: [elapsed for elapsed, _, _ in values] for name, values in runs.items()}
        ratios = paired(seconds["with"], seconds["without"])
        if kind == "german":
            what = f"{setup.label}, German (espeak-ng de, the tests' sentence) through an English-only model"
            errors = "no word error rate: an English-only model cannot transcribe German"
        else:
            what = f"{setup.label}, {speech.what if kind == 'repeated' else f'{speech.seconds / 60:.1f} min speech file'}"
            with_error, without_error = (wer(speech.text, runs[name][0][1]) for name in ("with", "without"))
            errors = f"word error rate {with_error:.2f} % with, {without_error:.2f} % without"
        fired = again["with"]
        note = (f"(chunks decoded again per run: {', '.join(map(str, fired))}; {errors}; median of {repeats} rounds, "
                f"order rotating; ratio = median of the rounds' ratios)")
        goal, met = ("0 chunks decoded again", max(fired) == 0) if kind == "repeated" else ("", None)
        rows.append(Row(SECTION, f"{what}: whisperdrop with the repetition guard vs without",
                        round(statistics.median(seconds["with"]), 2), "s", round(statistics.median(seconds["without"]), 2),
                        "the same without the guard", statistics.median(ratios), goal, met, note=note,
                        runs=[round(item, 3) for item in ratios]))
    return rows
