"""The local route: the shared engine on this machine's CPU (or GPU), in a worker thread.

One transcription at a time: the engine already uses every core it is given, and two at once would
only make both slower.

Given a `checkpoints` folder (the daemon's state_dir/partial), each job's finished batches (or
windows) are kept in `<job_id>.jsonl` as they finish (see whisperdrop.engine.checkpoint), so a job stopped
part way (SIGTERM, kill -9, a power cut) goes on from there at the next start instead of from zero.
The stage that commits the Result removes the file.

A `LocalRun` is one such transcription that a hand-back may stop (see daemon.handback): it is the
engine's cancel (a stop at once; a hand-back at the next checkpoint boundary, so no decoded work is
lost) and it measures the run's speed from the engine's progress.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from whisperdrop.engine import checkpoint as checkpoints
from whisperdrop.engine.chunks import CHUNK_SECONDS, KEEP_GAP_SECONDS
from whisperdrop.engine.engine import WINDOW_SECONDS, Cancelled, Engine
from whisperdrop.shared import log as logging
from whisperdrop.shared.spool import TranscribeOptions


class LocalRun:
    """One local transcription a hand-back may stop, and how fast it goes. Pure but for the clock.

    The engine polls `is_set()` as its cancel: true at once when `stop` (the daemon's stop, a
    threading.Event) is set; after `hand_back()`, true at the next checkpoint boundary: at once for
    batched decoding (it looks only between batches, after each is saved, and while reading audio),
    after the next saved window for sequential decoding. `started` (set by LocalTranscriber when the
    run has the engine and its checkpoint) and `report` (each progress report, from the engine's
    thread) give the measured speed.
    """

    def __init__(self, stop: threading.Event, duration: float, monotonic=time.monotonic):
        self.stop = stop
        self.duration = float(duration or 0.0)
        self.monotonic = monotonic
        self.holding = False  # it has the engine's slot: from now on only `hand_back` stops it, never a task cancel
        self.started_at: float | None = None  # monotonic time the engine started on it (None: queued)
        self.resumed_s = 0.0  # audio seconds its checkpoint held at the start
        self.done_s = 0.0
        self.reported_at: float | None = None
        self.requested = False
        self.checkpoint = None
        self.batched = True
        self._saved_at_request = 0

    def started(self, checkpoint, batched: bool) -> None:
        """The engine starts on it now, with `checkpoint` (None: nothing kept) and batched decoding or not."""
        self.checkpoint, self.batched = checkpoint, batched
        self.resumed_s = float(checkpoint.resumed_s) if checkpoint is not None else 0.0
        self.done_s = self.resumed_s
        self.started_at = self.monotonic()

    def report(self, done: float, total: float) -> None:
        """A progress report of the engine: `done` of `total` audio seconds."""
        if total:
            self.duration = float(total)
        self.done_s, self.reported_at = float(done), self.monotonic()

    def hand_back(self) -> None:
        """Stop at the next checkpoint boundary."""
        # before the engine started, nothing is in progress: stop at once
        self._saved_at_request = self.checkpoint.saved if self.checkpoint is not None else -1
        self.requested = True

    def is_set(self) -> bool:
        """The engine's cancel: a stop, or a hand-back that reached a checkpoint boundary."""
        if self.stop.is_set():
            return True
        if not self.requested:
            return False
        saved = self.checkpoint.saved if self.checkpoint is not None else 0
        return self.batched or saved > self._saved_at_request

    def real_time_factor(self) -> float | None:
        """Seconds per audio second measured over this run (None before its first progress)."""
        if self.started_at is None or self.reported_at is None or self.done_s <= self.resumed_s:
            return None
        return (self.reported_at - self.started_at) / (self.done_s - self.resumed_s)

    def remaining(self, now: float, real_time_factor: float | None) -> float | None:
        """Seconds the run still needs here at monotonic `now`: at its measured speed, else at
        `real_time_factor` (None: unknown). A queued run needs all of its audio."""
        measured = self.real_time_factor()
        rate = measured if measured is not None else real_time_factor
        if rate is None:
            return None
        left = max(0.0, self.duration - self.done_s) * rate
        since = self.reported_at if self.reported_at is not None else self.started_at
        return max(0.0, left - (now - since)) if since is not None and measured is not None else left

    def figures(self, now: float) -> dict:
        """What a hand-back records: seconds it ran here, audio seconds done and in all."""
        local_s = 0.0 if self.started_at is None else now - self.started_at
        return {"local_s": round(local_s, 1), "done_s": round(self.done_s, 1), "duration_s": round(self.duration, 1)}


class LocalTranscriber:
    """Runs `Engine.transcribe` with the `local` config section's model, device, threads and batch size."""

    def __init__(self, local: dict, engine: Engine | None = None, checkpoints: Path | None = None):
        self.local = local
        self.engine = engine or Engine(max_models=1)
        self.checkpoints = checkpoints  # folder of the jobs' checkpoints; None: nothing kept (one-shot CLI)
        self.log = logging.get("local")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whisperdrop-local")
        self._slot = asyncio.Semaphore(1)

    def options_for(self, options: TranscribeOptions) -> TranscribeOptions:
        """The job's options with the local model in place of the one asked of GPU hosts."""
        return TranscribeOptions(**{**options.to_dict(), "model": self.local["model"]})

    async def transcribe(
        self,
        audio: Path,
        options: TranscribeOptions,
        *,
        cancel: threading.Event,
        progress: Callable[[float, float], None] | None = None,
        job_id: str | None = None,
        audio_sha256: str | None = None,
        duration: float | None = None,
        run: LocalRun | None = None,
    ) -> dict:
        """Transcribe `audio` here; returns the engine's Result. With a `checkpoints` folder and a
        `job_id`, what an interrupted run of the same audio (`audio_sha256`, computed when not given)
        and options finished is reused (logged as `transcribe.resumed`; `timings.resumed_s` in the
        Result) and what this run finishes is kept. A `run` (see LocalRun) is told when the engine
        starts on it and of each progress report, and is the engine's cancel in place of `cancel`.
        Raises EngineError or Cancelled."""
        local_options = self.options_for(options)
        batch_size = self.local.get("batch_size", 1)
        loop = asyncio.get_running_loop()
        if run is not None:
            cancel = run
            progress = _both(run.report, progress)
        async with self._slot:
            if run is not None:
                run.holding = True
            checkpoint = None
            if self.checkpoints is not None and job_id:
                checkpoint = await loop.run_in_executor(self._executor, lambda: checkpoints.open_for(
                    self.checkpoints, job_id, audio, audio_sha256, local_options.to_dict(),
                    device=self.local["device"], compute_type=self.local["compute_type"], batch_size=batch_size,
                    chunking={"keep_gap": KEEP_GAP_SECONDS if local_options.vad_filter else None,
                              "chunk_s": CHUNK_SECONDS, "window_s": WINDOW_SECONDS}))
                if checkpoint.resumed_s:
                    self.log.info("transcribe.resumed", job_id=job_id, done_s=checkpoint.resumed_s,
                                  total_s=duration, chunks=checkpoint.finished())
            if run is not None:
                run.started(checkpoint, batch_size > 1)
                if run.is_set():  # handed back (or stopped) while its checkpoint was read
                    raise Cancelled()
            try:
                result = await loop.run_in_executor(
                    self._executor,
                    lambda: self.engine.transcribe(
                        audio, local_options, device=self.local["device"], compute_type=self.local["compute_type"],
                        threads=self.local["threads"], batch_size=batch_size, progress=progress,
                        cancel=cancel, checkpoint=checkpoint,
                    ),
                )
            finally:
                if checkpoint is not None and checkpoint.error is not None:  # the work goes on without it
                    self.log.warning("transcribe.checkpoint_failed", job_id=job_id, file=str(checkpoint.path),
                                     error=str(checkpoint.error))
        if checkpoint is not None and checkpoint.resumed_s:
            result["timings"]["resumed_s"] = checkpoint.resumed_s
        return result

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _both(first: Callable[[float, float], None],
          second: Callable[[float, float], None] | None) -> Callable[[float, float], None]:
    """A progress callback that calls `first`, then `second` (when there is one)."""
    def report(done: float, total: float) -> None:
        first(done, total)
        if second is not None:
            second(done, total)

    return report
