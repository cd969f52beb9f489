"""Extraction: audio seconds per wall second on one core, extract() against a plain PyAV decode.

Each measurement runs in its own subprocess pinned to CPU 0 (`taskset -c 0`, and sched_setaffinity in
the worker), which times only the work (not the interpreter start). The baseline decodes the same file
with PyAV and does nothing else, so the ratio is the cost of resampling to 16 kHz mono, Opus encoding,
writing, fsync and hashing on top of decoding. Runs alternate (decode, extract, decode, ...).
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

from common import Context, Row, ratio

SECTION = "extraction"
# (label, container, with video): audio files, then video containers as phones and cameras write them.
FORMATS = (("flac", "flac", False), ("mp3", "mp3", False), ("wav", "wav", False),
           ("mp4 (h264 + aac)", "mp4", True), ("mkv (mpeg4 + mp3)", "mkv", True))


def _measure(mode: str, source: Path, dest: Path) -> dict:
    """Run this file as a worker pinned to CPU 0; return its {"seconds", "audio_s"}."""
    command = [sys.executable, __file__, mode, str(source), str(dest)]
    if shutil.which("taskset"):
        command = ["taskset", "-c", "0", *command]
    done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(context: Context) -> list[Row]:
    from media import make_clip

    scratch = context.scratch / SECTION
    scratch.mkdir()
    seconds = 60.0 if context.quick else 300.0
    rows = []
    for label, container, video in FORMATS:
        source = make_clip(scratch / f"clip.{container}", container, video=video, seconds=seconds)
        extract_rates, decode_rates = [], []
        for index in range(context.repeats):
            decoded = _measure("decode", source, scratch / "unused")
            decode_rates.append(decoded["audio_s"] / decoded["seconds"])
            extracted = _measure("extract", source, scratch / f"out-{index}.opus")
            extract_rates.append(extracted["audio_s"] / extracted["seconds"])
            (scratch / f"out-{index}.opus").unlink()
        value, baseline = statistics.median(extract_rates), statistics.median(decode_rates)
        rows.append(Row(SECTION, f"{label}, {seconds / 60:.0f} min clip, 1 core", round(value, 1), "x real time",
                        round(baseline, 1), "PyAV decode only", ratio(value, baseline),
                        note=f"(extract = decode + resample 16 kHz mono + Opus (default bitrate) + fsync + sha256; "
                             f"{source.stat().st_size / 1e6:.1f} MB source)",
                        runs=[round(rate, 1) for rate in extract_rates]))
        source.unlink()
    return rows


def _worker(mode: str, source: str, dest: str) -> None:
    """Pinned to CPU 0: decode or extract `source` once and print what it took, as JSON."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    import av

    from whisperdrop.daemon.extract import extract

    started = time.perf_counter()
    if mode == "decode":
        samples, rate = 0, 1
        with av.open(source) as container:
            stream = container.streams.audio[0]
            rate = stream.rate
            for frame in container.decode(stream):
                samples += frame.samples
        audio_s = samples / rate
    else:
        from whisperdrop import config

        audio_s = extract(Path(source), Path(dest), config.defaults()["audio"]["bitrate_kbps"]).duration
    print(json.dumps({"seconds": time.perf_counter() - started, "audio_s": audio_s}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _worker(*sys.argv[1:4])
