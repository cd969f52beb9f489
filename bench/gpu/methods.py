"""The speech and the ways of transcribing it that the GPU check compares (bench/gpu/check.py).

- `load_audio(folder, files)`: prepare.py's speech (texts.json beside .npy or .opus files).
- `bare_sequential`, `bare_batched`: faster-whisper's `WhisperModel.transcribe` and
  `BatchedInferencePipeline`, with the runner's options; seconds and text.
- `Runner`: the runner's `Worker` on fresh spools, sharing the check's Engine (so its loaded model).
- `Stop`: the check cannot go on; its code is the exit status.

Imports from whisperdrop: `Worker` (gpu_runner/worker.py) and `resolve_model_path` (engine/engine.py), on use.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class Stop(Exception):
    """The check cannot go on: `code` is the exit status, the message the one line that says why."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------ audio

def load_audio(folder: Path, files: bool) -> dict:
    """The speech prepare.py made, from `folder`/texts.json: {"jfk", "long": (audio, text, seconds),
    "clips": [(audio, text, seconds)]}. With `files` the audio is the Opus files' paths (no clips
    without them), else float32 numpy from the .npy files (16 kHz int16). Raises Stop (2) naming what
    is missing."""
    import numpy

    texts_path = folder / "texts.json"
    if not texts_path.is_file():
        raise Stop(f"no texts.json in {folder}: the speech comes from bench/gpu/prepare.py (through device.sh)", 2)
    texts = json.loads(texts_path.read_text())

    def audio(name: str) -> Any:
        path = folder / f"{name}.{'opus' if files else 'npy'}"
        if not path.is_file():
            raise Stop(f"{path} is missing: run bench/gpu/prepare.py and carry its part", 2)
        return str(path) if files else numpy.load(path).astype(numpy.float32) / 32768.0

    speech = {name: (audio(name), texts[name]["text"], texts[name]["seconds"]) for name in ("jfk", "long")}
    speech["long_what"] = texts["long"].get("what", "")
    speech["clips"] = [(audio(clip["name"]), clip["text"], clip["seconds"]) for clip in texts["clips"]] if files else []
    return speech


# ------------------------------------------------------------------------------------ the methods

def decoding_options(options: Any) -> dict:
    """The runner's options as faster-whisper's keywords (what both bare methods get)."""
    return dict(language=options.language, initial_prompt=options.initial_prompt, hotwords=options.hotwords,
                word_timestamps=options.word_timestamps, vad_filter=options.vad_filter, beam_size=options.beam_size)


def bare_sequential(model: Any, audio: Any, options: Any) -> tuple[float, str]:
    """Seconds and text of `WhisperModel.transcribe` (segments consumed)."""
    started = time.perf_counter()
    segments, _ = model.transcribe(audio, **decoding_options(options))
    text = "".join(segment.text for segment in segments)
    return time.perf_counter() - started, text


def bare_batched(model: Any, audio: Any, options: Any, batch_size: int) -> tuple[float, str]:
    """Seconds and text of `BatchedInferencePipeline(model).transcribe(batch_size=...)`."""
    from faster_whisper import BatchedInferencePipeline

    started = time.perf_counter()
    segments, _ = BatchedInferencePipeline(model=model).transcribe(audio, batch_size=batch_size, **decoding_options(options))
    text = "".join(segment.text for segment in segments)
    return time.perf_counter() - started, text


class Runner:
    """Fresh spools for the runner's `Worker`, sharing one Engine (and so one loaded model) with the bare methods."""

    def __init__(self, engine: Any, options: Any, device: str, compute_type: str, spools: Path):
        self.engine, self.options, self.device, self.compute_type, self.spools = engine, options, device, compute_type, spools
        self.count = 0
        self.executed_on: list[dict] = []

    def worker(self) -> Any:
        from whisperdrop.gpu_runner.worker import Worker

        self.count += 1
        return Worker({"spool": str(self.spools / f"spool-{self.count}"), "model": self.options.model,
                       "device": self.device, "compute_type": self.compute_type, "name": "gpu-check"}, engine=self.engine)

    def queue(self, files: list[tuple[Path, float]]) -> tuple[float, list[str]]:
        """Queue `files` (audio, seconds) at once in a fresh spool and step a Worker until none is left;
        the seconds the steps took and the texts in queue order."""
        from spool_jobs import drain, submit

        worker = self.worker()
        base = time.time() - len(files)
        ids = [submit(worker, self.options, audio, f"{worker.spool}-{index}", seconds, base + index)
               for index, (audio, seconds) in enumerate(files)]
        elapsed, results = drain(worker, ids)
        self.executed_on += [result["executed_on"] for result in results]
        return elapsed, [result["text"] for result in results]


def model_path(model: str) -> str:
    from whisperdrop.engine.engine import resolve_model_path

    return resolve_model_path(model)
