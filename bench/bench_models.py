"""Models on the CPU (issue 22): what a bigger model than the bundled tiny.en costs in speed and memory,
and what it buys in accuracy, on the daemon's local route.

The models are `WHISPERDROP_BENCH_MODELS` (comma separated: faster-whisper names, CTranslate2 folders,
`bundled:...`; default `bundled:tiny.en`), the first one the baseline. Each runs in a child process of
its own, so its peak RSS (VmHWM) is its own, as the daemon's local route runs it: `Engine.transcribe`
with the config's `local` section (CPU, its compute type, threads and batch size), the model swapped.
It loads the model (timed), then transcribes jfk.flac (11 s) and a two-minute file (bench/corpus.py's
`speech_file`: jfk.flac then Harvard sentences read by espeak-ng, extracted to Opus as the daemon
extracts it) `repeats` times, after one untimed warm-up of each. Figures are medians; each speed row
carries its word error rate. `--quick`: a 40 s file.

    WHISPERDROP_BENCH_MODELS=bundled:tiny.en,/srv/models/faster-whisper-base .venv/bin/python bench/run.py --only models
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import JFK, JFK_TEXT, Context, Row, wer
from corpus import speech_file

SECTION = "models"
ENVIRONMENT = "WHISPERDROP_BENCH_MODELS"

CHILD = """
import json, sys, time
from whisperdrop.engine.engine import Engine, ModelKey, resolve_compute_type
from whisperdrop.shared import config
from whisperdrop.shared.spool import TranscribeOptions

def status(field):  # MB (10**6 bytes); /proc counts kB of 1024 bytes
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6

model, repeats, files, out = sys.argv[1], int(sys.argv[2]), sys.argv[3:-1], sys.argv[-1]
local = config.defaults()["local"]
compute_type = resolve_compute_type(local["compute_type"], local["device"])
options = TranscribeOptions(model=model)
engine = Engine(max_models=1)
started = time.perf_counter()
engine.load(ModelKey(model, local["device"], compute_type, 0, local["threads"]))
load_s = time.perf_counter() - started
loaded = status("VmRSS")

def transcribe(path):
    started = time.perf_counter()
    result = engine.transcribe(path, options, device=local["device"], compute_type=local["compute_type"],
                               threads=local["threads"], batch_size=local["batch_size"])
    return time.perf_counter() - started, result["text"]

report = {"load_s": load_s, "loaded_rss_mb": loaded, "compute_type": compute_type, "threads": local["threads"],
          "batch_size": local["batch_size"], "files": {}}
for path in files:
    transcribe(path)  # warm-up, untimed
    runs = [transcribe(path) for _ in range(repeats)]
    report["files"][path] = {"seconds": [seconds for seconds, _ in runs], "text": runs[-1][1]}
report["peak_rss_mb"] = status("VmHWM")
json.dump(report, open(out, "w"))
"""


def models() -> list[str]:
    """The models to compare, the baseline first."""
    named = [name.strip() for name in os.environ.get(ENVIRONMENT, "").split(",") if name.strip()]
    return named or ["bundled:tiny.en"]


def measure(model: str, files: list[Path], repeats: int, out: Path) -> dict:
    """The child's report for `model` (see CHILD). Raises RuntimeError with its stderr when it fails."""
    completed = subprocess.run([sys.executable, "-c", CHILD, model, str(repeats), *map(str, files), str(out)],
                               capture_output=True, text=True, timeout=3600)
    if completed.returncode != 0:
        raise RuntimeError(f"{model}: the child process failed (exit {completed.returncode}): {completed.stderr[-1500:]}")
    return json.loads(out.read_text())


def run(context: Context) -> list[Row]:
    from whisperdrop.daemon.extract import extract

    scratch = context.scratch / SECTION
    scratch.mkdir()
    speech = speech_file(scratch, 40.0 if context.quick else 120.0)
    clip = extract(speech.path, scratch / "speech.opus").path
    files = {"jfk.flac (11 s)": (JFK, " ".join(JFK_TEXT.read_text().split()), 11.0),
             f"speech ({speech.seconds / 60:.1f} min)": (clip, speech.text, speech.seconds)}
    reports = {}
    for index, model in enumerate(models()):
        print(f"#   {model} ...", file=sys.stderr, flush=True)
        reports[model] = measure(model, [path for path, _, _ in files.values()], context.repeats,
                                 scratch / f"report-{index}.json")
    rows: list[Row] = []
    baseline_name = models()[0]
    base = reports[baseline_name]
    for model, report in reports.items():
        setting = f"{report['compute_type']}, {report['threads'] or 'all'} threads, batch {report['batch_size']}"
        for label, (path, reference, seconds) in files.items():
            figures = report["files"][str(path)]
            median = statistics.median(figures["seconds"])
            base_median = statistics.median(base["files"][str(path)]["seconds"])
            rows.append(Row(SECTION, f"{model}: {label}, transcription time", round(median, 2), "s",
                            baseline=round(base_median, 2), baseline_name=baseline_name,
                            ratio=round(median / base_median, 2),
                            note=f"(real-time factor {median / seconds:.3f}; word error rate "
                                 f"{wer(reference, figures['text']):.1f} %, {baseline_name} "
                                 f"{wer(reference, base['files'][str(path)]['text']):.1f} %; {setting})",
                            runs=figures["seconds"]))
        rows.append(Row(SECTION, f"{model}: peak memory (RSS of the process)", round(report["peak_rss_mb"]), "MB",
                        baseline=round(base["peak_rss_mb"]), baseline_name=baseline_name,
                        ratio=round(report["peak_rss_mb"] / base["peak_rss_mb"], 2),
                        note=f"({round(report['loaded_rss_mb'])} MB once loaded)"))
        rows.append(Row(SECTION, f"{model}: model load time", round(report["load_s"], 2), "s",
                        baseline=round(base["load_s"], 2), baseline_name=baseline_name,
                        ratio=round(report["load_s"] / base["load_s"], 2)))
    return rows
