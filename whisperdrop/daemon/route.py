"""The route: decide where a job is transcribed, and do it there, one step at a time.

`transcription.provider`: `local` (this machine), `remote` (a GPU host, waiting for one), `auto`
(a GPU host, falling back to the local engine). The Result says which rung served the job
(`executed_on`) and why it got there (`fallback_reason`).

The route's input is a `Work` value: the job's audio, options and how far a remote attempt got.
The daemon makes it from a ledger Job (`Work.of`); the one-shot CLI from the audio it extracted.

Under `auto` with `remote.hand_back`, a fallback runs on the local engine while `handback.watch`
looks for a host that returns; when it picks one, the local run stops at its next checkpoint
boundary and the step returns the job's Work (`extracted`, with a new `handbacks` entry) for the
stage table to commit: the next step places it on the host, and if the host fails the local engine
resumes from the checkpoint. The job is transcribed once: a local run that finishes first wins.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from whisperdrop.daemon import handback
from whisperdrop.daemon.handback import Speeds
from whisperdrop.daemon.local import LocalRun, LocalTranscriber
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.engine.engine import Cancelled
from whisperdrop.shared.spool import TranscribeOptions

Progress = Callable[[float, float], None]  # (seconds done, seconds in all) of a job's audio
Mark = Callable[..., None]  # mark(**fields): progress within a remote step (upload, Slurm queue), for the ledger

REMOTE_STAGES = ("uploaded", "submitted", "ready")  # how far a remote attempt got; "extracted" is not started
SPEEDS_CACHE_S = 60.0  # the done jobs' speeds (a scan of the ledger) are read again after this long


@dataclass(frozen=True)
class Work:
    """One job's audio on its way to a transcript: what the route stage needs, nothing more.

    `stage` is `extracted` (nothing sent yet), `uploaded`, `submitted` or `ready` (on `host` already,
    so a restart resumes there); `transfer` and `timings` are the figures so far. A job handed back
    from the CPU carries why it went there (`fallback_reason`) and its `handbacks` (daemon.handback).
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
    fallback_reason: str | None = None
    handbacks: list = field(default_factory=list)

    @classmethod
    def of(cls, job: Any, audio: Path) -> "Work":
        """The Work of a ledger Job whose extracted audio is at `audio`."""
        handbacks = list(getattr(job, "handbacks", None) or [])
        return cls(
            job_id=job.job_id, audio=Path(audio), options=TranscribeOptions(**job.options),
            audio_size=job.audio_size or 0, audio_sha256=job.audio_sha256 or "", duration=job.duration or 0.0,
            stage=job.stage if job.stage in REMOTE_STAGES else "extracted", host=job.host,
            transfer=dict(job.transfer or {}), timings=dict(job.timings or {}),
            fallback_reason=job.fallback_reason if handbacks else None, handbacks=handbacks,
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
    handbacks: list = field(default_factory=list)  # the job's hand-backs from the CPU (daemon.handback)


class Router:
    """Chooses the route for each job. Without remote hosts every job is local.

    `history()` gives the speeds the done jobs measured (handback.Speeds; the daemon reads them from
    its ledger, at most every SPEEDS_CACHE_S); without it nothing is known but what runs now."""

    def __init__(self, config: dict, local: LocalTranscriber, remote: Any | None = None,
                 history: Callable[[], Speeds] | None = None):
        self.provider = config["transcription"]["provider"]
        self.local = local
        self.remote = remote  # a RemotePool; None when no hosts are configured
        self.history = history or Speeds
        self._speeds: tuple[float, Speeds] | None = None
        self._runs: set[LocalRun] = set()  # the fallbacks on the local engine now (or waiting for it)

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
        handbacks = list(work.handbacks)
        if self.remote is not None and self.provider in ("auto", "remote"):
            outcome = await self.remote.step(work, cancel=shutdown, progress=progress, mark=mark)
            if isinstance(outcome, Work):
                return outcome
            if isinstance(outcome, Routed):
                if handbacks:  # handed back from the CPU: say why it was there, and that the host served
                    return replace(outcome, fallback_reason=work.fallback_reason,
                                   handbacks=handback.settle(handbacks, "served"))
                return outcome
            fallback_reason = outcome.reason
            handbacks = handback.settle(handbacks, f"failed: {outcome.reason}")
            if self._may_hand_back(outcome, work):
                return await self._fallback(replace(work, fallback_reason=fallback_reason, handbacks=handbacks),
                                            shutdown=shutdown, progress=progress)
        result = await self._local(work, shutdown.threads, progress)
        return self._routed_here(result, fallback_reason, handbacks)

    async def _local(self, work: Work, cancel: Any, progress: Progress | None, run: LocalRun | None = None) -> dict:
        return await self.local.transcribe(work.audio, work.options, cancel=cancel, progress=progress,
                                           job_id=work.job_id, audio_sha256=work.audio_sha256 or None,
                                           duration=work.duration or None, run=run)

    @staticmethod
    def _routed_here(result: dict, fallback_reason: str | None, handbacks: list) -> Routed:
        return Routed(result=result, route="local", host=None, fallback_reason=fallback_reason,
                      timings={"queue_s": 0.0, **result["timings"]}, handbacks=handbacks)

    def _may_hand_back(self, outcome: Any, work: Work) -> bool:
        """Whether a fallback of `work` is watched for a host's return: under `auto` with
        remote.hand_back, for want of a host (not short audio), with checkpoints to resume from,
        fewer than MAX_HANDBACKS times."""
        settings = self.remote.settings
        return (self.provider == "auto" and settings.hand_back and not outcome.planned
                and self.local.checkpoints is not None and bool(work.duration)
                and len(work.handbacks) < handback.MAX_HANDBACKS)

    def speeds(self) -> Speeds:
        """The done jobs' speeds, read again every SPEEDS_CACHE_S."""
        now = time.monotonic()
        if self._speeds is None or now - self._speeds[0] > SPEEDS_CACHE_S:
            self._speeds = (now, self.history())
        return self._speeds[1]

    def local_rate(self) -> float | None:
        """Local seconds per audio second measured by a run here now (None: none measured yet)."""
        return next((rate for rate in (run.real_time_factor() for run in self._runs) if rate is not None), None)

    async def _fallback(self, work: Work, *, shutdown: Shutdown, progress: Progress | None) -> Work | Routed:
        """`work` on the local engine as a fallback while `handback.watch` looks for a host. Returns the
        local Routed, or `work` at `extracted` with a new hand-back entry once the local run stopped at
        a checkpoint boundary for a host. Raises EngineError or Cancelled."""
        run = LocalRun(shutdown.threads, work.duration)
        self._runs.add(run)
        local = asyncio.ensure_future(self._local(work, shutdown.threads, progress, run=run))
        watching = asyncio.ensure_future(handback.watch(
            self.remote, work, run, self.speeds, self.local_rate, shutdown, self.remote.settings.hand_back_margin))
        try:
            await asyncio.wait({local, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not local.done():
                host, remaining, estimate = watching.result()  # raises Cancelled on a stop
                if run.holding:
                    run.hand_back()  # the engine stops at its next checkpoint boundary
                else:
                    local.cancel()  # still waiting for the engine: nothing started
                await asyncio.wait({local})
                if local.cancelled() or isinstance(local.exception(), Cancelled):
                    if shutdown.is_set():
                        raise Cancelled()
                    # what the run did, to the boundary it stopped at (kept in its checkpoint)
                    return self._handed_back(work, host, run.figures(time.monotonic()), remaining, estimate)
            return self._routed_here(local.result(), work.fallback_reason, work.handbacks)
        finally:
            self._runs.discard(run)
            if not watching.done():
                watching.cancel()
            if not local.done():
                if run.holding and not shutdown.is_set():  # never two engine runs at once: let it end
                    run.hand_back()
                    await asyncio.wait({local})
                else:
                    local.cancel()

    def _handed_back(self, work: Work, host: str, figures: dict, remaining: float | None, estimate: float) -> Work:
        """The job's next Work after its local run stopped for `host`: `extracted`, with the entry
        (the stage table commits it, then logs `route.handback`)."""
        entry = {"host": host, "at": round(time.time(), 3), **figures,
                 "local_remaining_s": None if remaining is None else round(remaining, 1),
                 "estimate_s": round(estimate, 1)}
        return replace(work, stage="extracted", host=None, handbacks=[*work.handbacks, entry])

    async def transcribe(self, work: Work, *, shutdown: Shutdown, progress: Progress | None = None) -> Routed:
        """Every step of `work` in one go, for a caller that keeps no ledger (the one-shot CLI)."""
        while True:
            outcome = await self.step(work, shutdown=shutdown, progress=progress)
            if isinstance(outcome, Routed):
                return outcome
            work = outcome
