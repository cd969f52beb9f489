"""Extraction: audio seconds per CPU second of extract() on one core, against a plain PyAV decode and
against the earlier Opus settings; and what the Opus settings cost in word errors.

Speed. Each measurement runs in its own subprocess pinned to CPU 0 (`taskset -c 0`, and
sched_setaffinity in the worker), which times only the work (not the interpreter start), in CPU
seconds of the process (what one core spends; on a shared machine the wall clock also counts other
people's work on that core, so the wall figure is in the note). Baselines in the same run, the runs
interleaved (decode, chosen, earlier, decode, ...):

- PyAV decode alone: the same file decoded and nothing else, so chosen / decode is the cost of the
  conversion to 16 kHz mono, Opus encoding, writing, fsync and hashing on top of decoding;
- the earlier settings (voip at complexity 10, libopus's default, 60 ms), so chosen / earlier is the
  speed-up.

Then a sweep of Opus settings on one 5-minute mp3 (the choice, made by measurement: application,
complexity, packet length). Word error rate: jfk.flac and the generated speech of the bandwidth
section (espeak-ng, several voices, known sentences), extracted at the default bitrate with the
chosen settings, the earlier ones, and lowdelay (CELT only, as fast as the chosen), transcribed by
tiny.en on the CPU (beam 5).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import JFK, JFK_TEXT, Context, Row, ratio, skipped

SECTION = "extraction"
GOAL_X = 300.0  # audio seconds per CPU second on one core
# (label, container, with video): audio files, then video containers as phones and cameras write them.
FORMATS = (("flac", "flac", False), ("mp3", "mp3", False), ("wav", "wav", False),
           ("mp4 (h264 + aac)", "mp4", True), ("mkv (mpeg4 + mp3)", "mkv", True))
EARLIER = ("voip", 10, 60)  # (application, complexity, frame ms) before issue 11
LOWDELAY = ("lowdelay", 0, 60)  # as fast as the chosen settings (CELT only): its word error rate says why not
SWEEP = (("audio", 0, 60), ("audio", 0, 120), ("audio", 1, 60), ("audio", 3, 60), ("audio", 5, 60),
         ("audio", 10, 60), ("lowdelay", 0, 60), ("voip", 0, 60), ("voip", 10, 60), ("audio", 0, 20))


def _chosen() -> tuple[str, int, int]:
    from whisperdrop.daemon.extract import OPUS

    return OPUS.application, OPUS.complexity, OPUS.frame_ms


def _label(settings: tuple[str, int, int]) -> str:
    application, complexity, frame_ms = settings
    return f"{application}, complexity {complexity}, {frame_ms} ms"


def _measure(mode: str, source: Path, dest: Path) -> dict:
    """Run this file as a worker pinned to CPU 0; return its {"seconds", "cpu", "audio_s"}."""
    command = [sys.executable, __file__, mode, str(source), str(dest)]
    if shutil.which("taskset"):
        command = ["taskset", "-c", "0", *command]
    done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mode(settings: tuple[str, int, int]) -> str:
    return "extract:" + ":".join(map(str, settings))


def _rates(mode: str, source: Path, dest: Path, into: dict[str, list], key: str) -> None:
    """Measure once; append the CPU and wall rates (audio s per s) under `key`."""
    measured = _measure(mode, source, dest)
    into.setdefault(key, []).append(measured["audio_s"] / measured["cpu"])
    into.setdefault(key + " wall", []).append(measured["audio_s"] / measured["seconds"])
    dest.unlink(missing_ok=True)


def run(context: Context) -> list[Row]:
    from media import make_clip

    scratch = context.scratch / SECTION
    scratch.mkdir()
    seconds = 60.0 if context.quick else 300.0
    chosen = _chosen()
    rows = []
    for label, container, video in FORMATS:
        source = make_clip(scratch / f"clip.{container}", container, video=video, seconds=seconds)
        rates: dict[str, list] = {}
        for _ in range(context.repeats):
            _rates("decode", source, scratch / "unused", rates, "decode")
            _rates(_mode(chosen), source, scratch / "out.opus", rates, "chosen")
            _rates(_mode(EARLIER), source, scratch / "out.opus", rates, "earlier")
        value, decode, earlier = (statistics.median(rates[key]) for key in ("chosen", "decode", "earlier"))
        walls = {key: statistics.median(rates[key + " wall"]) for key in ("chosen", "decode", "earlier")}
        what = f"{label}, {seconds / 60:.0f} min clip, 1 core"
        rows.append(Row(SECTION, f"{what}, {_label(chosen)} vs PyAV decode", round(value, 1), "x real time (CPU)",
                        round(decode, 1), "PyAV decode only", ratio(value, decode), f">= {GOAL_X:.0f}x real time",
                        value >= GOAL_X,
                        note=f"(extract = decode + 16 kHz mono + Opus {_bitrate()} kbit/s + fsync + sha256; "
                             f"{source.stat().st_size / 1e6:.1f} MB source; wall clock on the pinned core "
                             f"{walls['chosen']:.0f}x, decode {walls['decode']:.0f}x)",
                        runs=[round(rate, 1) for rate in rates["chosen"]]))
        rows.append(Row(SECTION, f"{what}, {_label(chosen)} vs earlier {_label(EARLIER)}", round(value, 1),
                        "x real time (CPU)", round(earlier, 1), f"earlier: {_label(EARLIER)}", ratio(value, earlier),
                        note=f"(the same runs; earlier wall clock {walls['earlier']:.0f}x)",
                        runs=[round(rate, 1) for rate in rates["earlier"]]))
        source.unlink()
    rows.extend(_sweep(context, scratch, seconds))
    rows.extend(_word_error_rates(context, scratch, chosen))
    return rows


def _bitrate() -> int:
    from whisperdrop.shared import config

    return int(config.defaults()["audio"]["bitrate_kbps"])


def _sweep(context: Context, scratch: Path, seconds: float) -> list[Row]:
    """Speed of each candidate Opus setting on one mp3 clip, against PyAV decode in the same runs."""
    from media import make_clip

    source = make_clip(scratch / "sweep.mp3", "mp3", seconds=seconds)
    rates: dict[str, list] = {}
    for _ in range(context.repeats):
        _rates("decode", source, scratch / "unused", rates, "decode")
        for settings in SWEEP:
            _rates(_mode(settings), source, scratch / "sweep.opus", rates, _mode(settings))
    decode = statistics.median(rates["decode"])
    rows = []
    for settings in SWEEP:
        value = statistics.median(rates[_mode(settings)])
        rows.append(Row(SECTION, f"sweep, mp3 {seconds / 60:.0f} min, 1 core: {_label(settings)}", round(value, 1),
                        "x real time (CPU)", round(decode, 1), "PyAV decode only", ratio(value, decode),
                        runs=[round(rate, 1) for rate in rates[_mode(settings)]]))
    source.unlink()
    return rows


def _word_error_rates(context: Context, scratch: Path, chosen: tuple[str, int, int]) -> list[Row]:
    """Word error rate with the chosen settings against the earlier ones, per corpus, same engine."""
    from bench_bandwidth import _espeak_corpus, _wer
    from daemon_helpers import normalise
    from whisperdrop.daemon.extract import OpusSettings, extract
    from whisperdrop.engine.engine import Engine
    from whisperdrop.shared.spool import TranscribeOptions

    corpora = {"jfk.flac": [(JFK, JFK_TEXT.read_text().strip())]}
    rows = []
    if shutil.which("espeak-ng"):
        folder = scratch / "espeak"
        folder.mkdir()
        corpora["espeak-ng"] = _espeak_corpus(folder, context.quick)
    else:
        rows.append(skipped(SECTION, "word error rate, generated speech", "espeak-ng is not installed"))
    engine = Engine()
    options = TranscribeOptions(word_timestamps=False)  # words do not change the text
    kbps = _bitrate()
    for corpus, clips in corpora.items():
        references = [text for _, text in clips]
        wer = {}
        for settings in (chosen, EARLIER, LOWDELAY):
            hypotheses = []
            for path, _ in clips:
                encoded = extract(path, scratch / f"wer-{path.stem}.opus", kbps, opus=OpusSettings(*settings))
                hypotheses.append(engine.transcribe(encoded.path, options, device="cpu")["text"])
            wer[settings] = _wer(references, hypotheses)
        words = sum(len(normalise(text)) for text in references)
        for settings in (chosen, LOWDELAY):
            is_chosen = settings == chosen
            rows.append(Row(
                SECTION, f"word error rate, {corpus}, {_label(settings)}{' (chosen)' if is_chosen else ''} "
                         f"vs earlier {_label(EARLIER)}",
                round(wer[settings], 2), "%", round(wer[EARLIER], 2), f"earlier: {_label(EARLIER)}",
                ratio(wer[settings], wer[EARLIER]), "<= earlier" if is_chosen else "",
                wer[settings] <= wer[EARLIER] if is_chosen else None,
                note=f"({wer[settings] - wer[EARLIER]:+.2f} points; {len(references)} clip(s), {words} words; "
                     f"Opus {kbps} kbit/s; tiny.en CPU beam 5; 1 run: decoding is deterministic)"))
    return rows


def _worker(mode: str, source: str, dest: str) -> None:
    """Pinned to CPU 0: decode or extract `source` once and print what it took, as JSON."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    import av

    from whisperdrop.daemon.extract import OpusSettings, extract

    kbps = _bitrate()
    started, cpu = time.perf_counter(), time.process_time()
    if mode == "decode":
        samples, rate = 0, 1
        with av.open(source) as container:
            stream = container.streams.audio[0]
            rate = stream.rate
            for frame in container.decode(stream):
                samples += frame.samples
        audio_s = samples / rate
    else:
        application, complexity, frame_ms = mode.split(":")[1:]
        settings = OpusSettings(application, int(complexity), int(frame_ms))
        audio_s = extract(Path(source), Path(dest), kbps, opus=settings).duration
    print(json.dumps({"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu, "audio_s": audio_s}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _worker(*sys.argv[1:4])
