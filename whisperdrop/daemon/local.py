"""The local route: the shared engine on this machine's CPU (or GPU), in a worker thread.

One transcription at a time: the engine already uses every core it is given, and two at once would
only make both slower.

Given a `checkpoints` folder (the daemon's state_dir/partial), each job's finished batches (or
windows) are kept in `<job_id>.jsonl` as they finish (see whisperdrop.engine.checkpoint), so a job stopped
part way (SIGTERM, kill -9, a power cut) goes on from there at the next start instead of from zero.
The stage that commits the Result removes the file.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from whisperdrop.engine import checkpoint as checkpoints
from whisperdrop.engine.chunks import CHUNK_SECONDS, KEEP_GAP_SECONDS
from whisperdrop.engine.engine import WINDOW_SECONDS, Engine
from whisperdrop.shared import log as logging
from whisperdrop.shared.spool import TranscribeOptions


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
    ) -> dict:
        """Transcribe `audio` here; returns the engine's Result. With a `checkpoints` folder and a
        `job_id`, what an interrupted run of the same audio (`audio_sha256`, computed when not given)
        and options finished is reused (logged as `transcribe.resumed`; `timings.resumed_s` in the
        Result) and what this run finishes is kept. Raises EngineError or Cancelled."""
        local_options = self.options_for(options)
        batch_size = self.local.get("batch_size", 1)
        loop = asyncio.get_running_loop()
        async with self._slot:
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
