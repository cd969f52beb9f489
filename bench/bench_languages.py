"""Languages (issues 25, 19): what the multilingual bundled:base costs against tiny.en on the CPU, the
runner's batches across jobs of several languages, and `/detect-language` on a long file.

- Models: tiny.en and base (int8, CPU), on the daemon's local route (`Engine.transcribe` with the
  config's `local` section: batch_size 8) and through the runner (`Worker.step` on one queued job,
  runner defaults), each in a child process of its own that reports its peak RSS (VmHWM): the
  real-time factor (seconds per audio second, median of `repeats` runs after one untimed run), the
  peak memory, and the word error rate on the project's recordings: jfk.flac (the one real
  recording) and a 2-minute English file (jfk, then Harvard sentences read by espeak-ng in five
  voices, bench/corpus.py). tiny.en is the baseline of each base row.
- Mixed languages across jobs (base, the runner): 8 clips, two each of German, Spanish, English and
  French (espeak-ng), queued at once (runner defaults: one step takes them all, and each batch holds
  one language) against the same clips one job at a time (max_jobs_per_batch 1); rounds alternate
  the two, figures are medians. Each Result must keep its own language.
- `/detect-language` (issue 19): `daemon.api.detect.detect_upload` (what the endpoint runs: the
  upload extracted to Opus as a job's source is, then base on its first speech only) on a 10-minute
  English WAV against `Engine.transcribe` of the same file (the local
  route; what the endpoint did before: it transcribed the whole upload). Detection: median of
  `repeats`; transcription: once (minutes on 2 cores), stated.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from common import JFK, JFK_TEXT, Context, Row, skipped, wer
from corpus import espeak, speech_file, write_wav

SECTION = "languages"
MODELS = ("bundled:tiny.en", "bundled:base")
MIXED = {
    "de": ("Guten Morgen. Heute sprechen wir über die Entwicklung der erneuerbaren Energien in Deutschland.",
           "Die Regierung hat einen Plan vorgelegt, der viele Milliarden Euro kostet."),
    "es": ("Buenos días. Hoy vamos a hablar del tiempo que hace en la ciudad.",
           "El tren de la mañana sale a las ocho y llega a Madrid antes del mediodía."),
    "en": ("Good morning. Today we will talk about the weather in the city and the plans for the weekend.",
           "The train leaves at eight in the morning and reaches the coast before noon."),
    "fr": ("Bonjour à tous. Aujourd'hui nous allons parler de la cuisine française et de ses traditions.",
           "Le train du matin part à huit heures et arrive à Paris avant midi."),
}

CHILD = r"""
import json, sys, time
from pathlib import Path
from whisperdrop.engine.engine import Engine
from whisperdrop.shared import config
from whisperdrop.shared.spool import TranscribeOptions

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
model, route, out, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
files = sys.argv[5:]
local = config.load(None).local
options = TranscribeOptions(model=model)
engine = Engine(max_models=1)
if route == "local":
    def transcribe(path):
        return engine.transcribe(path, options, device=local["device"], compute_type=local["compute_type"],
                                 threads=local["threads"], batch_size=local["batch_size"])
else:
    from whisperdrop.gpu_runner.worker import Worker
    from spool_jobs import drain, submit
    spool = Path(out).with_suffix(".spool")
    worker = Worker({"spool": str(spool), "model": model, "device": "cpu", "compute_type": "int8", "name": "bench"},
                    engine=engine)
    count = iter(range(1000))
    def transcribe(path):
        job = submit(worker, options, Path(path), str(next(count)), 0.0, time.time())
        return drain(worker, [job])[1][0]
started = time.perf_counter()
transcribe(files[0])  # untimed: loads the model, warms every path
load_s = time.perf_counter() - started
report = {"load_and_first_s": load_s, "loaded_rss_mb": status("VmRSS"), "files": {}}
for path in files:
    runs, text = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        made = transcribe(path)
        runs.append(time.perf_counter() - started)
        text = made["text"]
    report["files"][path] = {"runs": runs, "text": text, "duration": made["duration"]}
report["peak_rss_mb"] = status("VmHWM")
json.dump(report, open(out, "w"))
"""


def _child(model: str, route: str, files: list[Path], scratch: Path, repeats: int) -> dict:
    """Run CHILD for one model and route; its report. Raises RuntimeError with its stderr when it fails."""
    out = scratch / f"{model.split(':')[-1]}-{route}.json"
    bench = str(Path(__file__).resolve().parent)   # spool_jobs, for the runner route
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [bench, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", CHILD, model, route, str(out), str(repeats), *map(str, files)],
                          capture_output=True, text=True, timeout=3600, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"{model} {route}: {done.stderr[-2000:]}")
    return json.loads(out.read_text())


def models(context: Context, scratch: Path) -> list[Row]:
    """tiny.en against base on both routes: real-time factor, peak RSS, word error rate."""
    long = speech_file(scratch, 30 if context.quick else 120, "english")
    references = {str(JFK): " ".join(JFK_TEXT.read_text().split()), str(long.path): long.text}
    rows = []
    for route in ("local", "runner"):
        reports = {model: _child(model, route, [JFK, long.path], scratch, context.repeats) for model in MODELS}
        tiny, base = (reports[model] for model in MODELS)
        how = ("the daemon's local route: Engine.transcribe with the config's local section, batch_size 8"
               if route == "local" else "the runner: Worker.step on one queued job, runner defaults")
        label = f"base vs tiny.en, int8 CPU, {route}"
        for path in (str(long.path), str(JFK)):
            name = "jfk.flac (11 s, real recording)" if path == str(JFK) else f"{long.seconds / 60:.1f} min English file"
            rtf = {model: statistics.median(reports[model]["files"][path]["runs"]) / reports[model]["files"][path]["duration"]
                   for model in MODELS}
            errors = {model: wer(references[path], reports[model]["files"][path]["text"]) for model in MODELS}
            rows.append(Row(SECTION, f"{label}, {name}: real-time factor (seconds per audio second; median of "
                                     f"{context.repeats} runs after an untimed one; {how})",
                            round(rtf[MODELS[1]], 3), "s/s", round(rtf[MODELS[0]], 3), "tiny.en",
                            rtf[MODELS[1]] / rtf[MODELS[0]],
                            runs=[round(run, 2) for run in base["files"][path]["runs"]]))
            rows.append(Row(SECTION, f"{label}, {name}: word error rate ({len(references[path].split())} words; "
                                     f"{'; '.join(_detail(path, long))})",
                            round(errors[MODELS[1]], 1), "%", round(errors[MODELS[0]], 1), "tiny.en"))
        rows.append(Row(SECTION, f"{label}: peak RSS of a process that only transcribes (VmHWM; after loading: "
                                 f"base {base['loaded_rss_mb']:.0f} MB, tiny.en {tiny['loaded_rss_mb']:.0f} MB)",
                        round(base["peak_rss_mb"]), "MB", round(tiny["peak_rss_mb"]), "tiny.en",
                        base["peak_rss_mb"] / tiny["peak_rss_mb"]))
    return rows


def _detail(path: str, long) -> list[str]:
    return ["jfk.flac, the project's real recording"] if path == str(JFK) else [long.what]


def _mixed_clips(scratch: Path) -> list[tuple[str, Path, str, float]]:
    """(language, Opus path, text, seconds) of the MIXED clips, extracted as the daemon extracts."""
    from whisperdrop.daemon.extract import extract

    clips = []
    for code, texts in MIXED.items():
        for index, text in enumerate(texts):
            samples = espeak(code, 160, text)
            wav = write_wav(scratch / f"{code}-{index}.wav", samples)
            clips.append((code, extract(wav, wav.with_suffix(".opus")).path, text, len(samples) / 16000))
    return clips


def mixed(context: Context, scratch: Path) -> list[Row]:
    """The MIXED clips queued at once for the runner vs one job at a time, on base."""
    from spool_jobs import drain, submit
    from whisperdrop.engine.engine import Engine
    from whisperdrop.gpu_runner.worker import Worker
    from whisperdrop.shared.spool import TranscribeOptions

    clips = _mixed_clips(scratch)
    engine = Engine(max_models=1)
    options = TranscribeOptions(model=MODELS[1])
    counter = iter(range(10_000))

    def queue(max_jobs: int | None) -> tuple[float, list[dict]]:
        spool = scratch / f"spool-{next(counter)}"
        settings = {"spool": str(spool), "model": MODELS[1], "device": "cpu", "compute_type": "int8", "name": "bench"}
        if max_jobs is not None:
            settings["max_jobs_per_batch"] = max_jobs
        worker = Worker(settings, engine=engine)
        base = time.time() - len(clips)
        ids = [submit(worker, options, path, f"{spool.name}-{index}", seconds, base + index)
               for index, (_, path, _, seconds) in enumerate(clips)]
        return drain(worker, ids)

    queue(None)  # untimed: model, VAD, features
    together, apart, results = [], [], {}
    for index in range(context.repeats):
        for name in (("together", "apart") if index % 2 == 0 else ("apart", "together")):
            elapsed, made = queue(None if name == "together" else 1)
            (together if name == "together" else apart).append(elapsed)
            results[name] = made
    audio = sum(seconds for *_, seconds in clips)
    rows = []
    for name in ("together", "apart"):
        made = results[name]
        shared = max(result["executed_on"].get("jobs_batched", 1) for result in made)
        kept = sum(result["language"] == code for result, (code, *_) in zip(made, clips))
        wrong = [f"{code} as {result['language']} p={result['language_probability']}"
                 for result, (code, *_) in zip(made, clips) if result["language"] != code]
        error = wer([text for _, _, text, _ in clips], [result["text"] for result in made])
        rows.append(Row(SECTION, f"base int8 CPU, runner, 8 clips in 4 languages ({audio:.0f} s), {name}: word error "
                                 f"rate and languages kept ({kept} of 8 Results in their own language"
                                 f"{': ' + ', '.join(wrong) if wrong else ''}; at most {shared} jobs in one step)",
                        round(error, 1), "%"))
    rows.insert(0, Row(SECTION, f"base int8 CPU, runner, 8 clips of German, Spanish, English and French ({audio:.0f} s) "
                                "queued at once vs one job at a time (runner defaults: one step takes all 8, one "
                                f"language per batch; apart: max_jobs_per_batch 1; median of {context.repeats} "
                                "rounds, order alternating)",
                       round(statistics.median(together), 2), "s", round(statistics.median(apart), 2), "one at a time",
                       statistics.median(together) / statistics.median(apart),
                       runs=[round(item, 2) for item in together]))
    return rows


def detect_language(context: Context, scratch: Path) -> list[Row]:
    """`/detect-language`'s work on a 10-minute file against transcribing that file."""
    from whisperdrop.daemon.api import detect
    from whisperdrop.engine.engine import Engine
    from whisperdrop.shared import config
    from whisperdrop.shared.spool import TranscribeOptions

    speech = speech_file(scratch, 120 if context.quick else 600, "ten-minutes")
    local = config.load(None).local
    engine = Engine(max_models=1)
    settings = SimpleNamespace(model=MODELS[1], device=local["device"], compute_type=local["compute_type"],
                               threads=local["threads"])
    bitrate = config.load(None).audio.bitrate_kbps
    answer = detect.detect_upload(engine, speech.path, settings, bitrate)   # untimed: loads base
    runs = []
    for _ in range(context.repeats):
        started = time.perf_counter()
        answer = detect.detect_upload(engine, speech.path, settings, bitrate)
        runs.append(time.perf_counter() - started)
    started = time.perf_counter()
    made = engine.transcribe(speech.path, TranscribeOptions(model=MODELS[1]), device=local["device"],
                             compute_type=local["compute_type"], threads=local["threads"],
                             batch_size=local["batch_size"])
    transcribe_s = time.perf_counter() - started
    return [Row(SECTION, f"/detect-language on a {speech.seconds / 60:.1f} min WAV (base int8 CPU: the upload "
                         f"extracted to Opus as a job's is, then the first speech only, answered {answer.code} p={answer.probability}; median of {context.repeats}) vs "
                         "transcribing it (Engine.transcribe, local route, batch_size 8, once; what the endpoint did "
                         f"before; word error rate {wer(speech.text, made['text']):.1f} %)",
                round(statistics.median(runs), 2), "s", round(transcribe_s, 1), "transcribing the file",
                statistics.median(runs) / transcribe_s, runs=[round(run, 2) for run in runs])]


def run(context: Context) -> list[Row]:
    from whisperdrop.shared.model_names import bundled_missing

    missing = bundled_missing(MODELS[1])
    if missing:
        return [skipped(SECTION, "base vs tiny.en, mixed languages, /detect-language", missing)]
    scratch = context.scratch / SECTION
    scratch.mkdir()
    rows = []
    for name, work in (("models", models), ("mixed languages", mixed), ("detect-language", detect_language)):
        print(f"#   {name} ...", file=sys.stderr, flush=True)
        rows += work(context, scratch)
    return rows
