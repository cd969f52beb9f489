"""Pauses (issue 30): the word after a pause, before and after the fix, against bare faster-whisper.

Three files (every method reads the same file):

- jfk.flac said 25 times with 1 s of silence after each (5 minutes; 5 times in quick mode): the file
  on which batched decoding lost the "ask" after "my fellow Americans," from the sixth copy on. It is
  measured twice: as the 16 kHz WAV itself (as the issue measured it, and as `whisperdrop transcribe`
  and the runner read a WAV they are given) and extracted to Opus as the daemon sends it (there the
  encoder's smoothing lets the VAD hear the quiet "ask", and nothing is lost before the fix either);
- the engine benchmark's 8-minute speech file (jfk.flac, then Harvard sentences in five espeak-ng
  voices; 90 s in quick mode), extracted to Opus as there;
- the tests' espeak-ng sentences broken by a second of silence with the rest fading in
  (tests/media.py `espeak_with_pauses`), as a WAV.

Four methods on one loaded model (the bundled tiny.en, int8, the config's `local` section), each run
once before the clock, then in rounds of rotating order:

- whisperdrop default, after: `Engine.transcribe` as the daemon's local route calls it;
- whisperdrop default, before: the same with issue 30's three changes switched off (no onset pad
  before a span that ends a pause, squeezed words kept, segments sorted instead of assembled);
- bare `BatchedInferencePipeline(batch_size=8)`;
- bare `WhisperModel.transcribe`, sequential, temperature 0 (the baseline the issue names).

Each row gives the median time, its ratio to bare sequential (the median of the rounds' ratios),
the word error rate (median over the rounds) and, on the jfk file, how many of the copies kept
"ask not". Goal for whisperdrop after, on the jfk file: word error rate within 0.5 point of bare
sequential at 1.5x its speed or better (ratio <= 0.67).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

from bench_engine import Setup, _options_kwargs, bare_batched, whisperdrop_call
from common import JFK, Context, Row, normalise, paired, rounds, wer
from corpus import Speech, speech_file
from engine_guard import repeated_jfk

from whisperdrop.daemon.extract import extract
from whisperdrop.engine import batched, chunks
from whisperdrop.engine.engine import Engine, resolve_compute_type
from whisperdrop.shared import config, log
from whisperdrop.shared.spool import TranscribeOptions

SECTION = "pauses"
SPEED_GOAL = 1.5          # at least this many times bare sequential's speed
WER_MARGIN = 0.5          # and a word error rate at most this many points above it


@contextlib.contextmanager
def before_fix() -> Iterator[None]:
    """Within it, batched decoding runs as it did before issue 30: no onset pad, no squeezed words
    dropped, a job's segments only sorted."""
    saved = chunks.ONSET_PAD_SECONDS, batched.SQUEEZED_WORDS, batched.assemble
    chunks.ONSET_PAD_SECONDS = 0.0
    batched.SQUEEZED_WORDS = 0
    batched.assemble = lambda segments, encode: sorted(segments, key=lambda segment: (segment["start"], segment["end"]))
    try:
        yield
    finally:
        chunks.ONSET_PAD_SECONDS, batched.SQUEEZED_WORDS, batched.assemble = saved


def bare_sequential_t0(setup: Setup, audio: Path) -> tuple[float, str]:
    """Seconds and text of `WhisperModel.transcribe` at temperature 0 only, its segments consumed."""
    started = time.perf_counter()
    segments, _ = setup.model.transcribe(str(audio), temperature=0.0, **_options_kwargs(setup.options))
    text = "".join(segment.text for segment in segments)
    return time.perf_counter() - started, text


def before_call(setup: Setup, audio: Path) -> tuple[float, str]:
    with before_fix():
        return whisperdrop_call(setup, audio)


def _opus(speech: Speech) -> Path:
    return extract(speech.path, speech.path.with_suffix(".opus")).path


def ask_not(text: str) -> int:
    """How many times "ask not" is in `text` (lower case, punctuation dropped)."""
    return f" {normalise(text)} ".count(" ask not ")


def paused_sentences(folder: Path) -> Speech:
    from media import espeak_with_pauses

    path, text = espeak_with_pauses(folder / "sentences-paused.wav")
    import av

    with av.open(str(path)) as container:
        seconds = float(container.duration or 0) / 1_000_000
    return Speech(path, text, seconds, "espeak-ng sentences, 1 s pause mid-sentence, the rest fading in")


METHODS = (("after", "whisperdrop default (after)"), ("before", "whisperdrop default (before issue 30)"),
           ("batched", "bare BatchedInferencePipeline(batch_size=8)"))


def file_rows(setup: Setup, speech: Speech, audio: Path, repeats: int, copies: int | None) -> list[Row]:
    runs = rounds({"after": lambda: whisperdrop_call(setup, audio), "before": lambda: before_call(setup, audio),
                   "batched": lambda: bare_batched(setup, audio, 8),
                   "sequential": lambda: bare_sequential_t0(setup, audio)}, repeats)
    seconds = {name: [elapsed for elapsed, _ in values] for name, values in runs.items()}
    errors = {name: statistics.median(wer(speech.text, text) for _, text in values) for name, values in runs.items()}
    heard = {name: [ask_not(text) for _, text in values] for name, values in runs.items()}
    base_seconds, base_error = statistics.median(seconds["sequential"]), errors["sequential"]
    form = "Opus, as the daemon extracts it" if audio.suffix == ".opus" else "16 kHz WAV"
    what = f"{setup.label}, {speech.what} ({speech.seconds / 60:.1f} min, {form})"
    how = f"median of {repeats} rounds, order rotating; ratio = median of the rounds' ratios; one loaded model"
    rows = []
    for name, label in METHODS:
        ratios = paired(seconds[name], seconds["sequential"])
        ratio = statistics.median(ratios)
        detail = f"word error rate {errors[name]:.2f} % (bare sequential {base_error:.2f} %)"
        if copies:
            detail += f"; 'ask not' heard {'/'.join(map(str, heard[name]))} of {copies} (bare sequential " \
                      f"{'/'.join(map(str, heard['sequential']))})"
        goal, met = "", None
        if name == "after" and copies:  # the goal is on the file (the sentences file is one chunk: too short to batch)
            goal = f"<= {1 / SPEED_GOAL:.2f}x, WER <= sequential + {WER_MARGIN}"
            met = ratio <= 1 / SPEED_GOAL and errors[name] <= base_error + WER_MARGIN
        rows.append(Row(SECTION, f"{what}: {label} vs bare sequential, temperature 0", round(statistics.median(seconds[name]), 2),
                        "s", round(base_seconds, 2), "bare WhisperModel.transcribe, temperature 0", ratio, goal, met,
                        note=f"({detail}; {how})", runs=[round(item, 3) for item in ratios]))
    return rows


def run(context: Context) -> list[Row]:
    log.configure(level="error")
    scratch = context.scratch / SECTION
    scratch.mkdir()
    print("#   building the files ...", file=sys.stderr, flush=True)
    copies = 5 if context.quick else 25
    repeated, long = repeated_jfk(scratch, copies), speech_file(scratch, 90.0 if context.quick else 480.0, "long")
    files = [(repeated, repeated.path, copies), (repeated, _opus(repeated), copies), (long, _opus(long), None),
             (paused_sentences(scratch), None, None)]
    local = config.defaults()["local"]
    compute_type = resolve_compute_type(local["compute_type"], "cpu")
    setup = Setup(f"{local['model'].removeprefix('bundled:')} {compute_type} CPU", "cpu", compute_type, int(local["threads"]),
                  int(local["batch_size"]), "the daemon's local route", TranscribeOptions(model=local["model"]),
                  Engine(max_models=1)).load()
    bare_sequential_t0(setup, JFK)  # every path once before the clock: model, VAD, features
    bare_batched(setup, JFK, 8)
    whisperdrop_call(setup, JFK)
    before_call(setup, JFK)
    rows = []
    for speech, audio, copies in files:
        audio = audio or speech.path
        print(f"#   {speech.what}, {audio.suffix[1:]} ...", file=sys.stderr, flush=True)
        rows += file_rows(setup, speech, audio, context.repeats, copies)
    return rows
