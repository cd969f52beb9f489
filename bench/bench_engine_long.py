"""Engine on a 10-hour file on the CPU (issue 11): bounded memory, monotonic timestamps, speech in place.

The file is bench/corpus.py's `write_long_opus`: a quiet noise floor with jfk.flac spoken at five known
moments (one across a 30 s decoding block boundary), encoded straight to 16 kHz Opus a minute at a
time (about 100 MB for 10 hours; it never exists as WAV). A child process transcribes it as the
daemon's local route does (`Engine.transcribe` with the config's `local` section: tiny.en int8,
batch_size 8) and reports its own peak RSS (VmHWM) and its RSS once the model is loaded, so the
figures are the engine's and not the benchmark's. Goals: peak RSS under 600 MB; segment and word
start times never go back; each jfk transcribed where it was spoken (word error rate <= 10 % over
the words starting in its 12 s); no words in the noise. A few minutes (the audio is decoded and goes
through the VAD at about 180x real time); `--quick` uses 15 minutes and says so. Run alone with
`bench/run.py --only engine_long`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from common import Context, Row, wer
from corpus import jfk, write_long_opus

SECTION = "engine_long"
PEAK_RSS_GOAL_MB = 600
PLACEMENT_WER_GOAL = 10.0

CHILD = """
import json, sys, time
from whisperdrop.engine.engine import Engine, ModelKey, resolve_compute_type
from whisperdrop.shared import config
from whisperdrop.shared.spool import TranscribeOptions

def status(field):  # MB (10**6 bytes); /proc counts kB of 1024 bytes
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6

local = config.defaults()["local"]
options = TranscribeOptions(model=local["model"])
engine = Engine(max_models=1)
engine.load(ModelKey(local["model"], local["device"], resolve_compute_type(local["compute_type"], local["device"]), 0,
                     local["threads"]))
loaded = status("VmRSS")
started = time.perf_counter()
result = engine.transcribe(sys.argv[1], options, device=local["device"], compute_type=local["compute_type"],
                           threads=local["threads"], batch_size=local["batch_size"])
elapsed = time.perf_counter() - started
json.dump({"result": result, "peak_rss_mb": status("VmHWM"), "loaded_rss_mb": loaded, "elapsed_s": elapsed,
           "batch_size": local["batch_size"]}, open(sys.argv[2], "w"))
"""


def placements_for(seconds: float) -> list[float]:
    """Where jfk starts: near the start and the end, at a quarter (across a 30 s block boundary), half and
    three quarters (as tests/test_engine_long.py places it)."""
    placements = [10.0, seconds * 0.25 - 5.0, seconds * 0.5 + 17.0, seconds * 0.75, seconds - 20.0]
    placements[1] = (placements[1] // 30) * 30 + 25.0
    return placements


def run(context: Context) -> list[Row]:
    hours = 0.25 if context.quick else 10.0
    seconds = hours * 3600
    scratch = context.scratch / SECTION
    scratch.mkdir()
    placements = placements_for(seconds)
    print(f"#   writing {hours:g} h of Opus ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    audio = write_long_opus(scratch / "long.opus", seconds, placements)
    written_s = time.perf_counter() - started
    size_mb = audio.stat().st_size / 1e6
    print(f"#   transcribing {hours:g} h in a child process ...", file=sys.stderr, flush=True)
    out = scratch / "out.json"
    completed = subprocess.run([sys.executable, "-c", CHILD, str(audio), str(out)], capture_output=True, text=True,
                               timeout=max(900, seconds / 5))
    if completed.returncode != 0:
        raise RuntimeError(f"the engine's child process failed (exit {completed.returncode}): {completed.stderr[-2000:]}")
    report = json.loads(out.read_text())
    result, peak, loaded = report["result"], report["peak_rss_mb"], report["loaded_rss_mb"]
    label = f"{hours:g} h file on the CPU ({result['engine']['compute_type']}, batch_size {report['batch_size']})"
    quick = " [quick: 15 min instead of 10 h]" if context.quick else ""
    what = (f"noise floor with jfk at {len(placements)} places, one across a 30 s block boundary; Opus 24 kbit/s, "
            f"{size_mb:.0f} MB, written in {written_s:.0f} s")

    segments = result["segments"]
    words = [word for segment in segments for word in segment["words"]]
    starts = [segment["start"] for segment in segments]
    word_starts = [word["start"] for word in words]
    backwards = (sum(1 for a, b in zip(starts, starts[1:]) if b < a) + sum(1 for a, b in zip(word_starts, word_starts[1:]) if b < a)
                 + sum(1 for segment in segments if segment["end"] < segment["start"]))
    reference = jfk()[1]
    per_place = []
    for start in placements:
        spoken = "".join(word["word"] for word in words if start - 1.0 <= word["start"] <= start + 12.0)
        per_place.append(wer(reference, spoken))
    stray = [word["word"] for word in words if not any(start - 1.0 <= word["start"] <= start + 12.0 for start in placements)]
    worst = max(per_place)
    return [
        Row(SECTION, f"{label}: peak RSS of the engine's process{quick}", round(peak), "MB", round(loaded), "after loading the model",
            peak / loaded, f"< {PEAK_RSS_GOAL_MB} MB", peak < PEAK_RSS_GOAL_MB,
            note=f"(VmHWM of a child that only transcribes; {what})"),
        Row(SECTION, f"{label}: timestamps going back{quick}", backwards, "", None, "", None, "0", backwards == 0,
            note=f"(segment starts, word starts, segment ends before starts; {len(segments)} segments, {len(words)} words)"),
        Row(SECTION, f"{label}: worst word error rate of one jfk, words where it was spoken{quick}", round(worst, 1), "%",
            None, "", None, f"<= {PLACEMENT_WER_GOAL:g} % each", worst <= PLACEMENT_WER_GOAL,
            note=f"(words starting from 1 s before to 12 s after each placement; per placement: "
                 f"{', '.join(f'{value:.0f}' for value in per_place)} %)", runs=[round(value, 2) for value in per_place]),
        Row(SECTION, f"{label}: words outside the speech{quick}", len(stray), "words", None, "", None, "0", not stray,
            note=f"({' '.join(stray[:12])}{' ...' if len(stray) > 12 else ''})" if stray else "(none heard in the noise)"),
        Row(SECTION, f"{label}: transcription time{quick}", round(report["elapsed_s"], 1), "s", round(seconds), "audio s",
            report["elapsed_s"] / seconds, note=f"({seconds / report['elapsed_s']:.0f}x real time; mostly decoding and the "
                                                 "VAD over silence; shared machine)"),
    ]
