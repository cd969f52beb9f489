"""Engine: the runner's overhead against a bare faster-whisper call, and the CPU real-time factor.

- Runner overhead: `Runner.step()` on a job in a local spool (claim by rename, sha256 check, engine,
  progress files, Result written atomically, release), timed as a whole, against a bare
  `WhisperModel.transcribe()` with the same model files, device, compute type and options on the same
  Opus file, segments consumed. Both models are loaded before the clock starts; runs alternate.
  Goal: <= 5 %.
- Real-time factor (transcription seconds / audio seconds, lower is faster) of the bundled tiny.en on
  the CPU through a bare call, with word timestamps (the default) against without.
- GPU: measured only where a CUDA device is present.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path

from common import Context, Row, ratio, timed
from whisperdrop import log
from whisperdrop.daemon.extract import extract
from whisperdrop.engine import Engine, cuda_device_count, resolve_compute_type, resolve_model_path
from whisperdrop.spool import TranscribeOptions, make_job_document

SECTION = "engine"


def _bare(model, audio: Path, options: TranscribeOptions) -> float:
    def work() -> None:
        segments, _ = model.transcribe(
            str(audio), language=options.language, initial_prompt=options.initial_prompt, hotwords=options.hotwords,
            word_timestamps=options.word_timestamps, vad_filter=options.vad_filter, beam_size=options.beam_size)
        for _ in segments:
            pass
    return timed(work)


def run(context: Context) -> list[Row]:
    from daemon_helpers import write_speech_wav
    from faster_whisper import WhisperModel

    from whisperdrop.gpu_runner import Runner

    log.configure(level="error")
    scratch = context.scratch / SECTION
    scratch.mkdir()
    seconds = 20.0 if context.quick else 60.0
    wav = write_speech_wav(scratch / "speech.wav", 3, seconds)
    audio = extract(wav, scratch / "speech.opus").path
    size, sha256 = audio.stat().st_size, hashlib.sha256(audio.read_bytes()).hexdigest()
    options = TranscribeOptions()  # the shipped defaults: bundled:tiny.en, word timestamps, VAD, beam 5
    compute_type = resolve_compute_type("default", "cpu")
    engine = Engine()
    runner = Runner({"spool": str(scratch / "spool"), "model": options.model, "device": "cpu",
                     "compute_type": "default", "name": "bench"}, engine=engine)
    bare = WhisperModel(resolve_model_path(options.model), device="cpu", compute_type=compute_type)
    engine.transcribe(audio, options, device="cpu")  # load the runner's model before the clock starts
    _bare(bare, audio, options)  # and warm the bare one the same way

    def runner_once(index: int) -> float:
        job = hashlib.sha256(f"engine-bench-{index}".encode()).hexdigest()
        shutil.copyfile(audio, runner.layout.audio(job))
        document = make_job_document(job, options, size, sha256, seconds, "speech.wav", time.time())
        Path(runner.layout.job(job)).write_text(json.dumps(document))
        elapsed = timed(lambda: runner.step())
        result_path = Path(runner.layout.result(job))
        if not result_path.exists():
            raise AssertionError(f"runner did not write a result for {job}: {list(Path(runner.layout.directory('failed')).iterdir())}")
        bookkeeping.append(elapsed - json.loads(result_path.read_text())["timings"]["transcribe_s"])
        return elapsed

    runner_times, bare_times, bookkeeping = [], [], []
    pairs = context.repeats if context.quick else max(5, context.repeats)  # a small difference in a noisy figure
    for index in range(pairs):
        runner_times.append(runner_once(index))
        bare_times.append(_bare(bare, audio, options))
    value, baseline = statistics.median(runner_times), statistics.median(bare_times)
    paired = statistics.median(a / b for a, b in zip(runner_times, bare_times))
    overhead = 100 * (paired - 1)
    rows = [Row(SECTION, f"runner: Runner.step() on a {seconds:.0f} s job vs bare faster-whisper", round(value, 3), "s",
                round(baseline, 3), "bare WhisperModel.transcribe", paired, "<= 5% overhead",
                overhead <= 5, note=f"({overhead:+.1f}%, median of {pairs} alternating pairs' ratios; tiny.en CPU "
                                    f"{compute_type}, word timestamps, VAD, beam 5; step = claim, sha256 check, engine, "
                                    f"progress and Result files; outside the engine's own timer: "
                                    f"{statistics.median(bookkeeping) * 1000:.0f} ms)",
                runs=[round(a / b, 3) for a, b in zip(runner_times, bare_times)])]

    plain = TranscribeOptions(word_timestamps=False)
    with_words, without = [], []
    for _ in range(context.repeats):
        with_words.append(_bare(bare, audio, options) / seconds)
        without.append(_bare(bare, audio, plain) / seconds)
    value, baseline = statistics.median(with_words), statistics.median(without)
    rows.append(Row(SECTION, "CPU real-time factor, tiny.en, with word timestamps", round(value, 4), "RTF",
                    round(baseline, 4), "without word timestamps", ratio(value, baseline),
                    note=f"(transcribe s / audio s, lower is faster: {1 / value:.0f}x and {1 / baseline:.0f}x real time; "
                         "all cores, shared with other work)",
                    runs=[round(v, 4) for v in with_words]))
    if cuda_device_count() == 0:
        rows.append(Row(SECTION, "GPU real-time factor", "not measured", note="(no GPU lent to this task)"))
    else:
        gpu = WhisperModel(resolve_model_path(options.model), device="cuda", compute_type="float16")
        _bare(gpu, audio, options)
        gpu_times = [_bare(gpu, audio, options) / seconds for _ in range(context.repeats)]
        rows.append(Row(SECTION, "GPU real-time factor, tiny.en float16, word timestamps",
                        round(statistics.median(gpu_times), 4), "RTF", round(value, 4), "CPU", ratio(statistics.median(gpu_times), value),
                        runs=[round(v, 4) for v in gpu_times]))
    return rows
