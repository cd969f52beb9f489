"""Engine (issue 11): whisperdrop's transcription against bare faster-whisper, on the CPU and on CUDA.

The speech is bench/corpus.py's, extracted to Opus as the daemon extracts it (every method reads that
same file): an 8-minute file (jfk.flac, then Harvard sentences read by espeak-ng in five voices; the
text is known), 16 distinct clips of 12 s or more, and a one-minute file. Options are the shipped
defaults (word timestamps, VAD, beam 5). On the CPU: the bundled tiny.en, int8.

- Long file: bare faster-whisper sequential (`WhisperModel.transcribe`), bare
  `BatchedInferencePipeline(batch_size=B)` and whisperdrop, B being whisperdrop's batch size. On the
  CPU whisperdrop is the daemon's local route: `Engine.transcribe` with the config's `local` section
  (device, compute type, threads, batch_size 8). On CUDA it is the runner's engine call (runner
  batch_size 16). One loaded model serves all three (loaded, and each path run once, before the
  clock); each round runs the three in a rotating order; figures are medians of the rounds, ratios
  the median of the rounds' ratios. Goals: <= 1.10x bare batched, <= 0.60x bare sequential, word
  error rate (jiwer, normalised) within 1 point of bare sequential.
- Across jobs: the clips queued in a spool and done by the runner's `Worker.step` (runner defaults:
  batch_size 16, max_jobs_per_batch 16, so one step batches them all), against the sum of the clips'
  bare sequential times and of their bare batched times.
- Runner overhead: `Worker.step()` on the one-minute job (claim, sha256 check, engine, progress and
  Result files) against `Engine.transcribe` with the same settings. Goal: <= 5 %.
- Repetition guard (issue 21, `engine_guard.py`): whisperdrop with and without the guard that decodes
  a looping chunk again, on the long file, jfk said 25 times (speech that merely repeats: goal, no
  chunk decoded again) and the tests' German sentence (where it fires).
- GPU: the same three comparisons on CUDA (float16) when CTranslate2 sees a device, with the model
  WHISPERDROP_BENCH_GPU_MODEL names, else the first of GPU_MODELS in the local Hugging Face cache,
  else the bundled tiny.en. A child process transcribes jfk on CUDA first, so missing CUDA libraries
  (CTranslate2 4.x loads CUDA 12 cuBLAS and cuDNN 9) give a "not measured" row with the error instead
  of ending the benchmark. Without a device, "not measured" rows say so.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import JFK, Context, Row, paired, rounds, same_text, skipped, wer
from corpus import Speech, speech_clips, speech_file
from spool_jobs import drain, submit
from engine_guard import guard_rows
from whisperdrop.daemon.extract import extract
from whisperdrop.engine.engine import Engine, ModelKey, cuda_device_count, resolve_compute_type
from whisperdrop.shared import config, log
from whisperdrop.shared.spool import TranscribeOptions

SECTION = "engine"
GPU_MODELS = ("large-v3", "large-v3-turbo", "distil-large-v3", "medium", "medium.en", "small", "small.en", "base",
              "base.en", "tiny", "tiny.en")
CUDA_LIBRARIES_HINT = ("CTranslate2 4.x needs CUDA 12 cuBLAS and cuDNN 9: pip install nvidia-cublas-cu12 "
                       "'nvidia-cudnn-cu12==9.*' and put their lib folders on LD_LIBRARY_PATH (bench/README.md)")


@dataclass
class Setup:
    """One device's comparison: the loaded model every method shares, and whisperdrop's settings."""

    label: str                  # "tiny.en int8 CPU"
    device: str
    compute_type: str
    threads: int
    batch_size: int             # whisperdrop's on this device: local.batch_size (CPU), runner.batch_size (CUDA)
    route: str                  # what whisperdrop's call stands for
    options: TranscribeOptions
    engine: Engine
    model: Any = None

    def load(self) -> "Setup":
        self.model = self.engine.load(ModelKey(self.options.model, self.device, self.compute_type, 0, self.threads))
        return self


def _options_kwargs(options: TranscribeOptions) -> dict:
    return dict(language=options.language, initial_prompt=options.initial_prompt, hotwords=options.hotwords,
                word_timestamps=options.word_timestamps, vad_filter=options.vad_filter, beam_size=options.beam_size)


def bare_sequential(setup: Setup, audio: Path) -> tuple[float, str]:
    """Seconds and text of `WhisperModel.transcribe` on `audio`, its segments consumed."""
    started = time.perf_counter()
    segments, _ = setup.model.transcribe(str(audio), **_options_kwargs(setup.options))
    text = "".join(segment.text for segment in segments)
    return time.perf_counter() - started, text


def bare_batched(setup: Setup, audio: Path, batch_size: int) -> tuple[float, str]:
    """Seconds and text of `BatchedInferencePipeline(model).transcribe(batch_size=...)` on `audio`."""
    from faster_whisper import BatchedInferencePipeline

    started = time.perf_counter()
    segments, _ = BatchedInferencePipeline(model=setup.model).transcribe(
        str(audio), batch_size=batch_size, **_options_kwargs(setup.options))
    text = "".join(segment.text for segment in segments)
    return time.perf_counter() - started, text


def whisperdrop_call(setup: Setup, audio: Path, batch_size: int | None = None) -> tuple[float, str]:
    """Seconds and text of `Engine.transcribe` with the setup's device, compute type, threads and batch size."""
    started = time.perf_counter()
    result = setup.engine.transcribe(audio, setup.options, device=setup.device, compute_type=setup.compute_type,
                                     threads=setup.threads, batch_size=batch_size or setup.batch_size)
    return time.perf_counter() - started, result["text"]


def long_file(setup: Setup, speech: Speech, audio: Path, repeats: int) -> list[Row]:
    """Sequential, batched and whisperdrop on one long file: times, ratios and word error rates."""
    batch = setup.batch_size
    runs = rounds({"sequential": lambda: bare_sequential(setup, audio),
                   "batched": lambda: bare_batched(setup, audio, batch),
                   "whisperdrop": lambda: whisperdrop_call(setup, audio)}, repeats)
    seconds = {name: [elapsed for elapsed, _ in values] for name, values in runs.items()}
    median = {name: statistics.median(values) for name, values in seconds.items()}
    what = f"{setup.label}, {speech.seconds / 60:.1f} min speech file"
    how = (f"median of {repeats} rounds, order rotating; ratio = median of the rounds' ratios; one loaded model; "
           f"word timestamps, VAD, beam 5; whisperdrop = {setup.route}")
    rows = []
    for baseline, name, goal, limit in (("batched", f"bare BatchedInferencePipeline(batch_size={batch})", "<= 1.10x", 1.10),
                                        ("sequential", "bare WhisperModel.transcribe, sequential", "<= 0.60x", 0.60)):
        ratios = paired(seconds["whisperdrop"], seconds[baseline])
        value = statistics.median(ratios)
        rows.append(Row(SECTION, f"{what}: whisperdrop (batch_size {batch}) vs {baseline}", round(median["whisperdrop"], 2),
                        "s", round(median[baseline], 2), name, value, goal, value <= limit, note=f"({how})",
                        runs=[round(item, 3) for item in ratios]))
    ratios = paired(seconds["batched"], seconds["sequential"])
    rows.append(Row(SECTION, f"{what}: bare batched (batch_size {batch}) vs bare sequential", round(median["batched"], 2),
                    "s", round(median["sequential"], 2), "bare sequential", statistics.median(ratios),
                    note=f"({speech.seconds / median['batched']:.0f}x and {speech.seconds / median['sequential']:.0f}x real time)",
                    runs=[round(item, 3) for item in ratios]))
    errors = {name: wer(speech.text, values[0][1]) for name, values in runs.items()}
    words = len(speech.text.split())
    for name in ("whisperdrop", "batched"):
        difference = errors[name] - errors["sequential"]
        goal = "<= sequential + 1 point" if name == "whisperdrop" else ""
        rows.append(Row(SECTION, f"{what}: word error rate, {name}", round(errors[name], 2), "%", round(errors["sequential"], 2),
                        "bare sequential", None, goal, (difference <= 1.0) if goal else None,
                        note=f"({difference:+.2f} points; {words} words; {same_text(runs[name])}; sequential "
                             f"{same_text(runs['sequential'])}; {speech.what})"))
    return rows


def make_worker(setup: Setup, spool: Path):
    """A runner Worker on `spool` sharing the setup's engine (runner defaults for batching)."""
    from whisperdrop.gpu_runner.worker import Worker

    return Worker({"spool": str(spool), "model": setup.options.model, "device": setup.device,
                   "compute_type": setup.compute_type, "name": "bench"}, engine=setup.engine)


def run_queue(setup: Setup, spool: Path, jobs: list[tuple[Path, float]]) -> tuple[float, list[dict]]:
    """Queue `jobs` (audio, duration) in a fresh spool, then step a Worker until the queue is empty;
    the seconds the steps took and the Results in queue order. Raises AssertionError for a job with
    no Result."""
    worker = make_worker(setup, spool)
    base = time.time() - len(jobs)
    ids = [submit(worker, setup.options, audio, f"{spool.name}-{index}", duration, base + index)
           for index, (audio, duration) in enumerate(jobs)]
    return drain(worker, ids)


def across_jobs(setup: Setup, clips: list[tuple[Speech, Path]], scratch: Path, repeats: int) -> list[Row]:
    """The clips queued for the runner's Worker, against the sums of their bare sequential and batched times."""
    counter = iter(range(10_000))
    probe = make_worker(setup, scratch / "probe-spool")
    batch = probe.batch_size

    def sequential() -> tuple[float, list[str]]:
        timed = [bare_sequential(setup, audio) for _, audio in clips]
        return sum(elapsed for elapsed, _ in timed), [text for _, text in timed]

    def batched() -> tuple[float, list[str]]:
        timed = [bare_batched(setup, audio, batch) for _, audio in clips]
        return sum(elapsed for elapsed, _ in timed), [text for _, text in timed]

    def runner() -> tuple[float, list[str]]:
        elapsed, results = run_queue(setup, scratch / f"spool-{next(counter)}", [(audio, speech.seconds) for speech, audio in clips])
        shared.append(max(result["executed_on"].get("jobs_batched", 1) for result in results))
        return elapsed, [result["text"] for result in results]

    shared: list[int] = []
    runs = rounds({"sequential": sequential, "batched": batched, "runner": runner}, repeats)
    seconds = {name: [elapsed for elapsed, _ in values] for name, values in runs.items()}
    audio_s = sum(speech.seconds for speech, _ in clips)
    what = f"{setup.label}, {len(clips)} clips ({audio_s:.0f} s) queued at once"
    how = (f"runner: Worker.step until the queue is empty, runner defaults batch_size {batch}, max_jobs_per_batch "
           f"{probe.max_jobs} (jobs sharing a step: {max(shared)}); bare: one call per clip, times summed; "
           f"median of {repeats} rounds' ratios")
    rows = []
    for baseline, name in (("sequential", "sum of bare sequential"), ("batched", f"sum of bare batched (batch_size {batch})")):
        ratios = paired(seconds["runner"], seconds[baseline])
        rows.append(Row(SECTION, f"{what}: runner across jobs vs {baseline}", round(statistics.median(seconds["runner"]), 2), "s",
                        round(statistics.median(seconds[baseline]), 2), name, statistics.median(ratios), note=f"({how})",
                        runs=[round(item, 3) for item in ratios]))
    references = [speech.text for speech, _ in clips]
    errors = {name: wer(references, values[0][1]) for name, values in runs.items()}
    rows.append(Row(SECTION, f"{what}: word error rate, runner", round(errors["runner"], 2), "%", round(errors["sequential"], 2),
                    "bare sequential", None, note=f"({errors['runner'] - errors['sequential']:+.2f} points; bare batched "
                                                  f"{errors['batched']:.2f} %; {sum(len(text.split()) for text in references)} words)"))
    return rows


def runner_overhead(setup: Setup, speech: Speech, audio: Path, scratch: Path, repeats: int) -> list[Row]:
    """Worker.step() on one job against Engine.transcribe with the runner's settings."""
    counter = iter(range(10_000))
    batch = make_worker(setup, scratch / "probe-spool").batch_size
    bookkeeping: list[float] = []

    def step() -> tuple[float, str]:
        elapsed, results = run_queue(setup, scratch / f"single-{next(counter)}", [(audio, speech.seconds)])
        bookkeeping.append(elapsed - results[0]["timings"]["transcribe_s"])
        return elapsed, results[0]["text"]

    step()  # one unmeasured pair first: spool folders, the worker's first claim, the engine at this batch size
    whisperdrop_call(setup, audio, batch)
    bookkeeping.clear()
    runs = rounds({"step": step, "engine": lambda: whisperdrop_call(setup, audio, batch)}, max(5, repeats))
    ratios = paired([elapsed for elapsed, _ in runs["step"]], [elapsed for elapsed, _ in runs["engine"]])
    overhead = 100 * (statistics.median(ratios) - 1)
    return [Row(SECTION, f"{setup.label}: runner Worker.step() on a {speech.seconds:.0f} s job vs Engine.transcribe",
                round(statistics.median(elapsed for elapsed, _ in runs["step"]), 3), "s",
                round(statistics.median(elapsed for elapsed, _ in runs["engine"]), 3), f"Engine.transcribe, batch_size {batch}",
                statistics.median(ratios), "<= 5% overhead", overhead <= 5,
                note=f"({overhead:+.1f}%, median of {len(ratios)} rotating pairs' ratios; step = claim, sha256 check, "
                     f"engine, progress and Result files; outside the engine's own timer: "
                     f"{statistics.median(bookkeeping) * 1000:.0f} ms)",
                runs=[round(item, 3) for item in ratios])]


def _opus(wav: Path) -> Path:
    return extract(wav, wav.with_suffix(".opus")).path


def compare(setup: Setup, scratch: Path, context: Context, files: dict) -> list[Row]:
    """Every comparison on one device: long file, across jobs, runner overhead."""
    setup.load()
    bare_sequential(setup, JFK)  # every path once before the clock: model, VAD, features
    bare_batched(setup, JFK, setup.batch_size)
    whisperdrop_call(setup, JFK)
    rows = []
    for name, work in (("long file", lambda: long_file(setup, files["long"][0], files["long"][1], context.repeats)),
                       ("across jobs", lambda: across_jobs(setup, files["clips"], scratch / setup.device, context.repeats)),
                       ("runner overhead", lambda: runner_overhead(setup, *files["minute"], scratch / setup.device, context.repeats)),
                       ("repetition guard", lambda: guard_rows(setup, files["long"], scratch / setup.device / "guard",
                                                               context.repeats, context.quick))):
        print(f"#   {setup.label}: {name} ...", file=sys.stderr, flush=True)
        rows += work()
    return rows


def gpu_model() -> str | None:
    """WHISPERDROP_BENCH_GPU_MODEL, or the first of GPU_MODELS in the local Hugging Face cache, or None."""
    if os.environ.get("WHISPERDROP_BENCH_GPU_MODEL"):
        return os.environ["WHISPERDROP_BENCH_GPU_MODEL"]
    from faster_whisper.utils import download_model

    for name in GPU_MODELS:
        try:
            download_model(name, local_files_only=True)
            return name
        except Exception:  # huggingface_hub raises several types for "not in the cache"; try the next
            continue
    return None


def cuda_problem(model: str) -> str | None:
    """Why `model` cannot transcribe jfk on CUDA in a child process (its stderr's end), or None when it can."""
    from whisperdrop.engine.engine import resolve_model_path

    child = ("import sys; from faster_whisper import WhisperModel; "
             "model = WhisperModel(sys.argv[1], device='cuda', compute_type='float16'); "
             "segments, _ = model.transcribe(sys.argv[2], word_timestamps=True, vad_filter=True, beam_size=5); "
             "print(''.join(segment.text for segment in segments))")
    try:
        completed = subprocess.run([sys.executable, "-c", child, resolve_model_path(model), str(JFK)],
                                   capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return f"a CUDA transcription of jfk with {model} took over 900 s"
    except Exception as error:  # resolve_model_path's EngineError names the model and the fix
        return str(error)
    if completed.returncode != 0:
        tail = " ".join((completed.stderr or completed.stdout).strip().splitlines()[-3:])
        libraries = any(word in tail.lower() for word in ("libcublas", "libcudnn", "cannot be loaded", "unable to load"))
        hint = CUDA_LIBRARIES_HINT if libraries else "check that nvidia-smi works and the driver supports CUDA 12 (CTranslate2 4.x)"
        return f"transcribing jfk with {model} on CUDA failed (exit {completed.returncode}: {tail}); {hint}"
    return None


def run(context: Context) -> list[Row]:
    log.configure(level="error")
    scratch = context.scratch / SECTION
    scratch.mkdir()
    long_seconds = 90.0 if context.quick else 480.0
    clip_count, clip_seconds = (6, 6.0) if context.quick else (16, 12.0)
    print("#   building the speech corpus ...", file=sys.stderr, flush=True)
    speech = speech_file(scratch, long_seconds, "long")
    minute = speech_file(scratch, 20.0 if context.quick else 60.0, "minute")
    clips = speech_clips(scratch / "clips", clip_count, clip_seconds)
    files = {"long": (speech, _opus(speech.path)), "minute": (minute, _opus(minute.path)),
             "clips": [(clip, _opus(clip.path)) for clip in clips]}
    local = config.defaults()["local"]
    engine = Engine(max_models=2)
    cpu = Setup(f"{local['model'].removeprefix('bundled:')} {resolve_compute_type(local['compute_type'], 'cpu')} CPU",
                "cpu", resolve_compute_type(local["compute_type"], "cpu"), int(local["threads"]), int(local["batch_size"]),
                "the daemon's local route, Engine.transcribe with the config's local section",
                TranscribeOptions(model=local["model"]), engine)
    rows = compare(cpu, scratch, context, files)
    return rows + gpu_rows(context, scratch, files)


def gpu_rows(context: Context, scratch: Path, files: dict) -> list[Row]:
    """The comparisons on CUDA, or "not measured" rows that say why."""
    what = "GPU: sequential, batched, across jobs and runner overhead vs bare faster-whisper"
    if cuda_device_count() == 0:
        return [skipped(SECTION, what, "no CUDA device: CTranslate2 sees none here; run bench/run.py --only engine on a "
                                       "GPU host, see bench/README.md")]
    model = gpu_model()
    rows = []
    if model is None:
        model = "bundled:tiny.en"
        rows.append(Row(SECTION, "GPU model", model, note=f"(none of {', '.join(GPU_MODELS)} is in the local Hugging Face "
                                                          "cache and WHISPERDROP_BENCH_GPU_MODEL is unset)"))
    problem = cuda_problem(model)
    if problem:
        return rows + [skipped(SECTION, f"GPU comparisons with {model}", problem)]
    runner = config.defaults()["runner"]
    setup = Setup(f"{model.removeprefix('bundled:')} float16 CUDA", "cuda", "float16", 0, int(runner["batch_size"]),
                  "the runner's engine call (runner batch_size)", TranscribeOptions(model=model), Engine(max_models=1))
    return rows + compare(setup, scratch, context, files)
