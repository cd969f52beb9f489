"""The local route: the shared engine on this machine's CPU (or GPU), in a worker thread.

One transcription at a time: the engine already uses every core it is given, and two at once would
only make both slower.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from whisperdrop.engine import Engine
from whisperdrop.spool import TranscribeOptions


class LocalTranscriber:
    """Runs `Engine.transcribe` with the `local` config section's model, device, threads and batch size."""

    def __init__(self, local: dict, engine: Engine | None = None):
        self.local = local
        self.engine = engine or Engine(max_models=1)
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
    ) -> dict:
        """Transcribe `audio` here; returns the engine's Result. Raises EngineError or Cancelled."""
        local_options = self.options_for(options)
        loop = asyncio.get_running_loop()
        async with self._slot:
            return await loop.run_in_executor(
                self._executor,
                lambda: self.engine.transcribe(
                    audio, local_options, device=self.local["device"], compute_type=self.local["compute_type"],
                    threads=self.local["threads"], batch_size=self.local.get("batch_size", 1), progress=progress,
                    cancel=cancel,
                ),
            )

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
