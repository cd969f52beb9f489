"""The route: decide where a job is transcribed, and do it there, one step at a time.

`transcription.provider`: `local` (this machine), `remote` (a GPU host, waiting for one), `auto`
(a GPU host, falling back to the local engine). The Result says which rung served the job
(`executed_on`) and why it got there (`fallback_reason`).

The route's input is a `Work` value: the job's audio, options and how far a remote attempt got.
The daemon makes it from a ledger Job (`Work.of`); the one-shot CLI from the audio it extracted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from whisperdrop.daemon.local import LocalTranscriber
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.shared.spool import TranscribeOptions

Progress = Callable[[float, float], None]  # (seconds done, seconds in all) of a job's audio
Mark = Callable[..., None]  # mark(**fields): progress within a remote step (upload, Slurm queue), for the ledger

REMOTE_STAGES = ("uploaded", "submitted", "ready")  # how far a remote attempt got; "extracted" is not started


@dataclass(frozen=True)
class Work:
    """One job's audio on its way to a transcript: what the route stage needs, nothing more.

    `stage` is `extracted` (nothing sent yet), `uploaded`, `submitted` or `ready` (on `host` already,
    so a restart resumes there); `transfer` and `timings` are the figures so far.
    """

    job_id: str
    audio: Path
    options: TranscribeOptions
    audio_size: int
    audio_sha256: str
    duration: float
    stage: str = "extracted"
    host: str | None = None
    transfer: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @classmethod
    def of(cls, job: Any, audio: Path) -> "Work":
        """The Work of a ledger Job whose extracted audio is at `audio`."""
        return cls(
            job_id=job.job_id, audio=Path(audio), options=TranscribeOptions(**job.options),
            audio_size=job.audio_size or 0, audio_sha256=job.audio_sha256 or "", duration=job.duration or 0.0,
            stage=job.stage if job.stage in REMOTE_STAGES else "extracted", host=job.host,
            transfer=dict(job.transfer or {}), timings=dict(job.timings or {}),
        )


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
        self.remote = remote  # a RemotePool; None when no hosts are configured

    def planned_options(self, options: TranscribeOptions) -> TranscribeOptions:
        """The options a job is planned with (and its id hashed over): the configured ones for a GPU
        host, or with the local model where every job runs here (provider `local`, or no hosts)."""
        if self.remote is None or self.provider == "local":
            return self.local.options_for(options)
        return options

    async def step(self, work: Work, *, shutdown: Shutdown, progress: Progress | None = None,
                   mark: Mark | None = None) -> Work | Routed:
        """One step of `work` on its route: on a GPU host, the next remote step (returns the job's
        next Work, or the Routed result once fetched); locally, the whole transcription (Routed).
        Raises EngineError or Cancelled (a host's failures become a fallback reason)."""
        fallback_reason = None  # without hosts, local is the plan, not a fallback
        if self.remote is not None and self.provider in ("auto", "remote"):
            outcome = await self.remote.step(work, cancel=shutdown, progress=progress, mark=mark)
            if isinstance(outcome, (Work, Routed)):
                return outcome
            fallback_reason = outcome.reason
        result = await self.local.transcribe(work.audio, work.options, cancel=shutdown.threads, progress=progress,
                                             job_id=work.job_id, audio_sha256=work.audio_sha256 or None,
                                             duration=work.duration or None)
        return Routed(
            result=result,
            route="local",
            host=None,
            fallback_reason=fallback_reason,
            timings={"queue_s": 0.0, **result["timings"]},
        )

    async def transcribe(self, work: Work, *, shutdown: Shutdown, progress: Progress | None = None) -> Routed:
        """Every step of `work` in one go, for a caller that keeps no ledger (the one-shot CLI)."""
        while True:
            outcome = await self.step(work, shutdown=shutdown, progress=progress)
            if isinstance(outcome, Routed):
                return outcome
            work = outcome
