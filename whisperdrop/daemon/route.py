"""The route stage: decide where a job is transcribed, and do it there.

`transcription.provider`: `local` (this machine), `remote` (a GPU host, waiting for one), `auto`
(a GPU host, falling back to the local engine). The Result says which rung served the job
(`executed_on`) and why it got there (`fallback_reason`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from whisperdrop.daemon.local import LocalTranscriber
from whisperdrop.spool import TranscribeOptions


@dataclass(frozen=True)
class Routed:
    """What the route stage returns: the engine's (or the runner's) Result, the route and host that
    made it, why it got there, and the figures of the route's own stages."""

    result: dict
    route: str  # "local" or "remote"
    host: str | None
    fallback_reason: str | None = None
    timings: dict = field(default_factory=dict)
    transfer: dict = field(default_factory=dict)


class Router:
    """Chooses the route for each job. Without remote hosts every job is local."""

    def __init__(self, config: dict, local: LocalTranscriber, remote: Any | None = None):
        self.provider = config["transcription"]["provider"]
        self.local = local
        self.remote = remote  # a RemotePool (issue: remote GPU path); None when no hosts are configured

    def planned_options(self, options: TranscribeOptions) -> TranscribeOptions:
        """The options a job is planned with (and its id hashed over): the configured ones for a GPU
        host, or with the local model where every job runs here (provider `local`, or no hosts)."""
        if self.remote is None or self.provider == "local":
            return self.local.options_for(options)
        return options

    async def transcribe(
        self,
        job: Any,
        audio: Path,
        options: TranscribeOptions,
        *,
        cancel: threading.Event,
        progress: Callable[[float, float], None] | None = None,
        mark: Callable[..., None] | None = None,
    ) -> Routed:
        """Transcribe `audio` for `job` on the chosen route; `mark(stage, **fields)` records progress
        of remote stages in the ledger. Raises EngineError, Cancelled, or the remote route's errors
        when provider is `remote`."""
        fallback_reason = None  # without hosts, local is the plan, not a fallback
        if self.remote is not None and self.provider in ("auto", "remote"):
            outcome = await self.remote.transcribe(job, audio, options, cancel=cancel, progress=progress, mark=mark)
            if outcome.routed is not None:
                return outcome.routed
            fallback_reason = outcome.reason
        result = await self.local.transcribe(audio, options, cancel=cancel, progress=progress)
        return Routed(
            result=result,
            route="local",
            host=None,
            fallback_reason=fallback_reason,
            timings={"queue_s": 0.0, **result["timings"]},
        )
