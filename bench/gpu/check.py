"""The GPU check (issue 20): what loaded, then bare faster-whisper against whisperdrop's runner on one
device, same model and options; the figures printed and written as JSON (`--out`/`--json`).

It runs through `device.sh`, which unpacks prepare.py's pack into bench/gpu/work/, links CUDA 13
cuBLAS under the names CTranslate2 opens and passes the paths; see bench/README.md, "GPU check".
On this machine, after prepare.py, the same entry runs the CPU rows:

    WD_GPU_PYTHON=.venv/bin/python bash bench/gpu/device.sh a --device auto     # then b

1. What loaded: Python, CTranslate2, faster-whisper, PyAV (or the stand-in), the CUDA devices
   CTranslate2 sees, the GPU (nvidia-smi). With `--device cuda` a child process first transcribes
   jfk on CUDA in float16 (the runner's default there), and where that fails in float32, then
   int8_float16 (`--compute-types`): a CUDA library that aborts ends a child, not the check. The
   first type that works is measured, and each failure is reported with the child's last lines.
   When none works the check stops with one line saying why (exit 3) and still writes its JSON.
   With `auto` and no device it says CUDA is unavailable and runs the CPU rows. After the warm-up
   it lists the CUDA libraries the process mapped (/proc/self/maps: the file that served
   `libcublas.so.12`).
2. Warm-up: every method once on jfk before the clock (H100/H200 compile CTranslate2's PTX at first
   use: its wheel has no sm_90 code).
3. Rounds whose order rotates; times are medians, ratios the median of each round's own ratio:
   - the long file (prepare.py: the engine benchmark's corpus, 8 minutes of known text): bare
     `WhisperModel.transcribe` (sequential), bare `BatchedInferencePipeline` at the runner's batch
     size, and (`--rows all`) the runner's `Worker` doing it as one queued job;
   - (`--rows all`) the short clips (20 distinct 12 s files) queued at once for the `Worker`
     (batches across jobs), against the sums of their bare sequential and bare batched times.
   Same loaded model, device, compute type (float16 on CUDA unless the probe fell back, int8 on the
   CPU: the runner's `default`) and options (the runner's: word timestamps, VAD, beam 5)
   everywhere. `--rows all` reads the Opus files the daemon's extraction made (the runner's input;
   the bare methods read the same files); `--rows bare` (no PyAV) gives the bare methods numpy audio.
   jfk repeated is no long file: faster-whisper's sequential decoding sees its repeated text as a
   loop (compression ratio over 2.4) and decodes every window again at higher temperatures.
4. Real-time factors (seconds per audio second), word error rates against the known text, the
   ratios, peak GPU memory (NVML, else nvidia-smi; CTranslate2's caching allocator keeps what it took, so a
   phase's peak includes the phases before it) and the process's peak RSS.

Exit status: 0 done; 2 something the check needs is missing (the message names it); 3 CUDA cannot
be used with `--device cuda`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "bench"), str(REPO)]

import environment  # noqa: E402
from methods import Runner, Stop, bare_batched, bare_sequential, load_audio, model_path  # noqa: E402
from report import model_label, summary, table  # noqa: E402

PROBE_SECONDS = 180
DEFAULTS = {"cuda": {"repeats": 5, "budget_s": 360.0}, "cpu": {"repeats": 1, "budget_s": 600.0}}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cuda: stop when CUDA cannot be used; auto: the CPU rows where it cannot")
    parser.add_argument("--rows", choices=("bare", "all"), default="all",
                        help="bare: bare faster-whisper only, on numpy audio; all: with the runner's Worker (needs PyAV)")
    parser.add_argument("--no-av", action="store_true", help="use the PyAV stand-in even where PyAV is installed")
    parser.add_argument("--model", default="bundled:tiny.en", help="a CTranslate2 Whisper model folder or bundled:tiny.en")
    parser.add_argument("--audio", type=Path, default=HERE / "work" / "b" / "audio",
                        help="prepare.py's speech: texts.json with .npy (--rows bare) or .opus files (--rows all)")
    parser.add_argument("--work", type=Path, default=HERE / "work", help="scratch folder (spools, audio files)")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="where the JSON goes (default $OUT, else <work>/out)")
    parser.add_argument("--json", default="gpu-check.json", help="the JSON's file name")
    parser.add_argument("--repeats", type=int, help="rounds (cuda 5; cpu 1)")
    parser.add_argument("--budget-s", type=float, help="start no round that would end after this many seconds (cuda 360)")
    parser.add_argument("--compute-types", default="float16,float32,int8_float16",
                        help="on CUDA, the compute types to try in this order: the first that transcribes jfk is measured")
    parser.add_argument("--probe", nargs=2, metavar=("DEVICE", "COMPUTE_TYPE"), help=argparse.SUPPRESS)  # the child
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------- CUDA

def cuda_devices() -> tuple[int, str | None]:
    """How many CUDA devices CTranslate2 sees, and its error when asking failed."""
    import ctranslate2

    try:
        return ctranslate2.get_cuda_device_count(), None
    except RuntimeError as error:
        return 0, str(error)


def probe_child(args: argparse.Namespace, device: str, compute_type: str) -> dict:
    """In a child process: transcribe jfk on `device` with `compute_type`, sequential and batched; what it
    said and mapped. Raises Stop (3) with the child's last lines when it fails or crashes."""
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", device, compute_type, "--model", args.model,
               "--audio", str(args.audio)]
    command += ["--no-av"] if environment.pyav_is_stand_in() else []
    started = time.monotonic()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_SECONDS)
    except subprocess.TimeoutExpired as error:
        raise Stop(f"{compute_type}: transcribing jfk on {device} took over {PROBE_SECONDS} s", 3) from error
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        tail = " | ".join((completed.stderr or completed.stdout).strip().splitlines()[-6:])
        raise Stop(f"{compute_type}: transcribing jfk on {device} failed in a child process (exit {completed.returncode}): "
                   f"{tail or 'no output'}", 3)
    report = json.loads(lines[-1])
    report["seconds"] = round(time.monotonic() - started, 2)
    return report


def probe_ladder(args: argparse.Namespace, device: str, compute_types: list[str]) -> tuple[str, dict, dict]:
    """The first of `compute_types` that transcribes jfk on `device` in a child process: (that type, the
    child's report, {type: why} for those that failed before it). Raises Stop (3) when none works,
    naming each type's failure and LD_LIBRARY_PATH."""
    failures: dict[str, str] = {}
    for compute_type in compute_types:
        print(f"# a child process transcribes jfk on {device} ({compute_type}) ...", flush=True)
        try:
            return compute_type, probe_child(args, device, compute_type), failures
        except Stop as stop:
            failures[compute_type] = str(stop)
            print(f"# {stop}", flush=True)
    raise Stop(f"CUDA cannot be used: {'; '.join(failures.values())} "
               f"[LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')}]", 3)


def probe(args: argparse.Namespace) -> int:
    """The child's side: load on the device asked for, one sequential and one batched jfk; print a JSON line."""
    from faster_whisper import WhisperModel

    from whisperdrop.shared.spool import TranscribeOptions

    device, compute_type = args.probe
    audio = load_audio(args.audio, files=not environment.pyav_is_stand_in())["jfk"][0]
    options = TranscribeOptions(model=args.model)
    model = WhisperModel(model_path(args.model), device=device, compute_type=compute_type)
    _, sequential = bare_sequential(model, audio, options)
    _, batched = bare_batched(model, audio, options, 16)
    print(json.dumps({"sequential": sequential, "batched": batched, "libraries": environment.mapped_libraries()}), flush=True)
    return 0


# ------------------------------------------------------------------------------------------ the run

def measure(args: argparse.Namespace, report: dict) -> list:
    """Warm up, run the rounds, fill `report["figures"]`; the table's rows."""
    from common import paired, rounds, same_text, wer
    from whisperdrop.shared import log
    from whisperdrop.engine.engine import Engine, ModelKey
    from whisperdrop.shared.spool import TranscribeOptions

    log.configure(level="error")
    device = report["device"]
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value
                for key, value in DEFAULTS[device].items()}
    compute_type = report.get("compute_type") or "int8"     # the runner's default on the CPU
    options = TranscribeOptions(model=args.model)
    engine = Engine(max_models=1)
    scratch = args.work / "check"
    shutil.rmtree(scratch, ignore_errors=True)
    runner = Runner(engine, options, device, compute_type, scratch / "spools")
    batch_size = runner.worker().batch_size            # the runner's own default
    speech = load_audio(args.audio, files=args.rows == "all")
    jfk, long, clips = speech["jfk"], speech["long"], speech["clips"]
    report["long_what"] = speech["long_what"]

    memory = environment.MemorySampler() if device == "cuda" else None
    with memory if memory is not None else _Nothing():
        started = time.monotonic()
        model = engine.load(ModelKey(options.model, device, compute_type, 0, 0))
        report["load_s"] = round(time.monotonic() - started, 2)
        print(f"# model loaded in {report['load_s']} s; warming up every method on jfk ...", flush=True)
        _phase(memory, "warm-up")
        warm = {"sequential": bare_sequential(model, jfk[0], options)[1],
                "batched": bare_batched(model, jfk[0], options, batch_size)[1]}
        if args.rows == "all":
            warm["runner"] = runner.queue([(Path(jfk[0]), jfk[2])])[1][0]
        report["warm_up_wer"] = {name: round(wer(jfk[1], text), 2) for name, text in warm.items()}
        report["libraries_mapped"] = environment.mapped_libraries()

        methods = {
            "sequential": lambda: _in(memory, "sequential", lambda: bare_sequential(model, long[0], options)),
            "batched": lambda: _in(memory, "batched", lambda: bare_batched(model, long[0], options, batch_size)),
        }
        if args.rows == "all":
            def each(method) -> tuple[float, list[str]]:
                timed = [method(audio) for audio, _, _ in clips]
                return sum(elapsed for elapsed, _ in timed), [text for _, text in timed]

            def runner_long() -> tuple[float, str]:
                elapsed, texts = runner.queue([(Path(long[0]), long[2])])
                return elapsed, texts[0]

            methods["runner"] = lambda: _in(memory, "runner", runner_long)
            methods["short_sequential"] = lambda: _in(memory, "short_sequential", lambda: each(
                lambda audio: bare_sequential(model, audio, options)))
            methods["short_batched"] = lambda: _in(memory, "short_batched", lambda: each(
                lambda audio: bare_batched(model, audio, options, batch_size)))
            methods["across_jobs"] = lambda: _in(memory, "across_jobs", lambda: runner.queue(
                [(Path(audio), seconds) for audio, _, seconds in clips]))

        round_started = [time.monotonic()]
        clock_started = time.monotonic()

        def out_of_time() -> bool:
            now = time.monotonic()
            last, round_started[0] = now - round_started[0], now
            print(f"# round done in {last:.1f} s", flush=True)
            return now - clock_started + last > settings["budget_s"]

        print(f"# up to {settings['repeats']} round(s) of {', '.join(methods)} ...", flush=True)
        runs = rounds(methods, settings["repeats"], stop=out_of_time)
    seconds = {name: [elapsed for elapsed, _ in values] for name, values in runs.items()}
    median = {name: statistics.median(values) for name, values in seconds.items()}
    short_seconds = sum(seconds for _, _, seconds in clips)
    figures: dict[str, Any] = {"device": device, "compute_type": compute_type, "batch_size": batch_size,
                               "rounds": len(runs["sequential"]), "rounds_asked": settings["repeats"],
                               "long": {"audio_s": long[2], "words": len(long[1].split())},
                               "short": {"audio_s": round(short_seconds, 3), "files": len(clips),
                                         "words": sum(len(text.split()) for _, text, _ in clips)},
                               "ratios": {}}
    for name, values in runs.items():
        group = "short" if name.startswith("short_") or name == "across_jobs" else "long"
        audio_s = figures[group]["audio_s"]
        reference = long[1] if group == "long" else [text for _, text, _ in clips]
        figures[group][name.removeprefix("short_")] = {
            "seconds": round(median[name], 3), "runs": [round(value, 3) for value in seconds[name]],
            "rtf": round(median[name] / audio_s, 5), "x_real_time": round(audio_s / median[name], 1),
            "wer": round(wer(reference, values[0][1]), 2), "text": same_text(values)}
    pairs = [("long", "batched", "sequential")]
    if args.rows == "all":
        pairs += [("long", "runner", "sequential"), ("long", "runner", "batched"),
                  ("short", "across_jobs", "short_sequential"), ("short", "across_jobs", "short_batched")]
    for group, name, baseline in pairs:
        figures["ratios"][f"{group}_{name}_vs_{baseline.removeprefix('short_')}"] = round(
            statistics.median(paired(seconds[name], seconds[baseline])), 3)
    if runner.executed_on:
        last = runner.executed_on[-1]
        figures["runner"] = {key: last.get(key) for key in ("device", "gpu", "compute_type", "batch_size")}
        figures["runner"]["jobs_batched_max"] = max(item.get("jobs_batched", 1) for item in runner.executed_on)
        figures["runner"]["oom_retries_max"] = max(item.get("oom_retries", 0) for item in runner.executed_on)
    figures["memory"] = memory.figures() if memory is not None else {"source": None, "error": "no GPU: CPU run"}
    figures["memory"]["rss_peak_mib"] = environment.peak_rss_mib()
    report["figures"] = figures
    return table(report)


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None


def _phase(memory: Any, name: str) -> None:
    if memory is not None:
        memory.phase(name)


def _in(memory: Any, name: str, call: Any) -> Any:
    _phase(memory, name)
    return call()


def what_loaded(args: argparse.Namespace) -> dict:
    """The report's first part: interpreter, packages, GPUs, the CUDA library path; printed as it goes."""
    report = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.machine(),
              "packages": environment.packages(), "gpus": environment.gpus(),
              "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""), "rows": args.rows}
    for name, found in report["packages"].items():
        print(f"# {name}: {found['version'] if found else 'absent'}{'  ' + str(found.get('file')) if found else ''}", flush=True)
    for gpu in report["gpus"]:
        print(f"# GPU: {gpu['name']}, driver {gpu['driver']}, {gpu['memory_total_mib']:.0f} MiB", flush=True)
    print(f"# LD_LIBRARY_PATH={report['ld_library_path']}", flush=True)
    return report


def choose_device(args: argparse.Namespace, report: dict) -> None:
    """Set report["device"] (and the probe's findings); raises Stop (3) when --device cuda cannot be had."""
    if report["packages"].get("ctranslate2") is None:
        raise Stop("ctranslate2 is not importable: unpack bench/gpu/pack/a (run through bench/gpu/device.sh)", 2)
    count, error = cuda_devices() if args.device != "cpu" else (0, None)
    report["cuda_device_count"], report["cuda_error"] = count, error
    print(f"# CUDA devices CTranslate2 sees: {count}{' (' + error + ')' if error else ''}", flush=True)
    if args.device == "cpu" or (count == 0 and args.device == "auto"):
        report["device"] = "cpu"
        if args.device == "auto":
            print("CUDA unavailable here (CTranslate2 sees no CUDA device): running the CPU rows", flush=True)
        return
    if count == 0:
        raise Stop(f"CUDA cannot be used: CTranslate2 sees no CUDA device{' (' + error + ')' if error else ''}; "
                   "check nvidia-smi and the driver", 3)
    compute_type, report["probe"], report["probe_failures"] = probe_ladder(args, "cuda", args.compute_types.split(","))
    print(f"# the child transcribed jfk on CUDA ({compute_type}) in {report['probe']['seconds']} s; it mapped: "
          f"{', '.join(report['probe']['libraries'])}", flush=True)
    if report["probe_failures"]:
        print(f"# measuring with {compute_type}: {'; '.join(report['probe_failures'].values())}", flush=True)
    report["device"], report["compute_type"] = "cuda", compute_type


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.no_av or (args.rows == "bare" and importlib.util.find_spec("av") is None):
        environment.use_pyav_stand_in()
    if args.probe:
        return probe(args)
    out = args.out or args.work / "out"
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}
    rows: list = []
    code = 0
    try:
        if args.rows == "all" and environment.pyav_is_stand_in():
            raise Stop("the runner's rows need PyAV, and it is absent: carry bench/gpu/pack/b, or run --rows bare", 2)
        report.update(what_loaded(args))
        choose_device(args, report)
        report["model"] = args.model
        report["model_label"] = model_label(args.model)
        report["device_label"] = (report["gpus"][0]["name"] if report["device"] == "cuda" and report["gpus"]
                                  else report["device"].upper())
        rows = measure(args, report)
    except Stop as stop:
        report["stopped"] = str(stop)
        print(f"GPU CHECK STOPPED: {stop}", flush=True)
        code = stop.code
    except Exception as error:  # a one-shot run on a lent machine: keep what was found, and the evidence
        traceback.print_exc()
        report["stopped"] = f"{type(error).__name__}: {error}"
        report["traceback"] = traceback.format_exc()
        print(f"GPU CHECK STOPPED: {report['stopped']}", flush=True)
        code = 1
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["rows"] = [asdict(row) for row in rows]
    path = out / args.json
    path.write_text(json.dumps(report, indent=1, default=str))
    if rows:
        from common import markdown

        print(markdown(rows))
        print(summary(report), flush=True)
    print(f"JSON: {path}", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
