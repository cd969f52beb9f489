"""The daemon's asyncio pipeline: take settled files, advance each job one stage at a time.

    inbox -> intake (hash, job id, ledger) -> extract (Opus) -> transcribe (local, or remote: upload,
    submit, await, fetch) -> deliver (outbox) -> archive

`Pipeline.advance(job, now)` is the loop body: it runs the job's stage from the table in
`stages.py`, which commits the stage reached to the ledger, and returns the job as the ledger now
has it, so a restart (or a crash) resumes each job where it stopped. `run_job` repeats it until the
job is finished. CPU-heavy work (hashing, PyAV, the local engine) runs in executor threads. Errors:
permanent (the file is not usable media) fails the job and moves its source to `failed/`; any other
is retried with a capped back-off while the source stays in the inbox, up to `max_attempts` for an
error that is not the machine's own (see `_retry`).
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from whisperdrop.daemon.handback import Speeds
from whisperdrop.daemon import library
from whisperdrop.daemon.delivery import failure_hint
from whisperdrop.daemon.health import backoff
from whisperdrop.daemon.hooks import Hooks
from whisperdrop.daemon.intake import Intake
from whisperdrop.daemon.ledger import Job, Ledger
from whisperdrop.daemon.local import LocalTranscriber
from whisperdrop.daemon.prefetch import Prefetch
from whisperdrop.daemon.route import Router
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.daemon.stages import Context, Permanent, Stages
from whisperdrop.engine import checkpoint as checkpoints
from whisperdrop.engine.engine import Cancelled, Engine, EngineError
from whisperdrop.shared import log
from whisperdrop.shared.profiles import Plan, plan as plan_job

RETRY_INITIAL_S = 5.0
RETRY_MAX_S = 300.0
EXPIRE_EVERY_S = 3600.0  # how often cached Results older than `results_days` are looked for

__all__ = ["Pipeline", "Permanent"]


class Pipeline:
    """Owns the ledger, the executors, the routes and the jobs' tasks; `take(path)` is the watcher's
    callback. `clock` (wall time) stamps the ledger and schedules retries; tests pass a fake one.
    `shutdown` is the daemon's one stop request (the service's; a new one when not given)."""

    def __init__(self, config: Any, *, engine: Engine | None = None, remote: Any | None = None,
                 clock: Callable[[], float] = time.time, shutdown: Shutdown | None = None):
        self.config = config
        self.clock = clock
        self.inbox: Path = config.inbox
        self.outbox_root: Path = config.outbox
        self.state_dir = config.path("state_dir")
        self.work_dir = self.state_dir / "work"
        self.results_dir = self.state_dir / "results"
        self.audio_dir = self.state_dir / "audio"  # done jobs' audio, kept for the page's player
        for folder in (self.work_dir, self.results_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.state_dir / "ledger.sqlite3", clock=clock)
        self.formats = list(config.transcription.outputs)
        self.local = LocalTranscriber(config.local, engine, checkpoints=self.state_dir / "partial")
        self.router = Router(config, self.local, remote, history=lambda: Speeds.of(self.ledger.route_speeds()))
        self.options = self.plan().options  # `transcription`'s, as planned (no profile)
        self.shutdown = shutdown or Shutdown()
        self.log = log.get("pipeline")
        self._io = ThreadPoolExecutor(max_workers=max(2, (os.cpu_count() or 2)), thread_name_prefix="whisperdrop-io")
        self.context = Context(config, self.ledger, self.router, self._io, self.shutdown, self.formats, self.log)
        self.hooks = self.context.hooks = Hooks(config.notify)  # done notifications; started by start()
        extract_slots = asyncio.Semaphore(max(1, (os.cpu_count() or 2) // 2))
        self.prefetch = self.context.prefetch = Prefetch(
            self.state_dir / "prefetch", self._io, config.audio.bitrate_kbps, self.log, extract_slots)
        self.stages = Stages(self.context, extract_slots)
        self.intake = Intake(self.context, lambda relpath: self.plan(relpath=relpath), self.schedule, self.shutdown)
        self._tasks: dict[str, asyncio.Task] = {}
        self._last_progress = self.context.last_progress  # job id -> last progress report (pruned per job)
        self.current: dict[str, str] = {}  # job id -> stage being worked on (for status lines)
        self._expiry: asyncio.Task | None = None

    # intake

    def plan(self, *, relpath: str | None = None, profile: str | None = None, overrides: dict | None = None) -> Plan:
        """A job's Plan (options, formats, profile): `transcription`, then the profile named `profile`
        (else the first whose globs match the inbox-relative `relpath`), then `overrides` (a request's
        own options: TranscribeOptions field names and `outputs`), planned for the route (the local
        model where every job runs here). Raises profiles.ProfileError naming an unknown profile or option."""
        return plan_job(self.config, relpath=relpath, profile=profile, overrides=overrides,
                        planned=self.router.planned_options)

    def submit(self, relpath: str, sha256: str, size: int, mtime_ns: int, inode: int, options: Any) -> tuple[Job, Any]:
        """Record a file that is not in the inbox (an API upload, stored durably first: see
        daemon.api.uploads) as a source of the job for its bytes and `options`, as intake does for
        an inbox file: the same bytes and options are the same job, served once. Schedules the job;
        returns (the job, the source row), both committed."""
        return self.intake.record(relpath, sha256, size, mtime_ns, inode, options, api=True)

    async def settled(self, job_id: str, source_id: int, timeout: float) -> bool:
        """Wait up to `timeout` s until source `source_id` of job `job_id` is delivered or failed;
        True when it is. Waits on the job's task (no polling); False at the timeout, or when the job
        was parked (the daemon is stopping)."""
        deadline = time.monotonic() + timeout
        while True:
            source = self.ledger.source(source_id)
            if source is None or source.state != "pending":
                return source is not None
            task = self._tasks.get(job_id)
            left = deadline - time.monotonic()
            if task is None or task.done() or left <= 0 or self.shutdown.is_set():
                return False
            await asyncio.wait({task}, timeout=left)

    async def take(self, path: Path) -> bool:
        """The watcher's callback: see `Intake.take` (True: offer the file again at the next rescan).
        In library mode subtitles, artwork and the like (our own outputs among them) are never taken."""
        if self.config.library_mode and library.is_sidecar(path):
            self.log.debug("intake.skipped", path=self.intake.relpath(path),
                           reason="library mode: a subtitle, image or other file beside the media, not media")
            return False
        return await self.intake.take(path)

    def audio_path(self, job_id: str) -> Path:
        return self.context.audio_path(job_id)

    def result_path(self, job_id: str) -> Path:
        return self.context.result_path(job_id)

    def kept_audio_path(self, job_id: str) -> Path:
        return self.context.kept_audio_path(job_id)

    # scheduling

    def schedule(self, job_id: str) -> None:
        """Start the job's task unless it is already running."""
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            return
        self._tasks[job_id] = asyncio.get_running_loop().create_task(self.run_job(job_id), name=f"job-{job_id[:12]}")

    async def recover(self) -> int:
        """Schedule every unfinished job from the ledger (start-up after a stop or a crash); returns how many."""
        jobs = self.ledger.unfinished_jobs()
        finished_with_pending = self.ledger.finished_with_pending_sources()
        for job in jobs:
            self.schedule(job.job_id)
        for job_id in finished_with_pending:
            self.schedule(job_id)
        if jobs or finished_with_pending:
            self.log.info("ledger.recovered", jobs=len(jobs) + len(finished_with_pending),
                          stages={job.stage: sum(1 for other in jobs if other.stage == job.stage) for job in jobs})
        return len(jobs) + len(finished_with_pending)

    def busy(self) -> int:
        return sum(1 for task in self._tasks.values() if not task.done())

    async def run_job(self, job_id: str) -> None:
        """Advance a job until it is finished, retrying failures with back-off (see `_retry`)."""
        try:
            await self._run_job(job_id)
        finally:  # a finished job keeps no task and no progress entry: a long-running daemon stays small
            if self._tasks.get(job_id) is asyncio.current_task():
                del self._tasks[job_id]
            self._last_progress.pop(job_id, None)

    async def _run_job(self, job_id: str) -> None:
        job = self.ledger.job(job_id)
        while job is not None and not self.shutdown.is_set():
            if job.stage in ("done", "failed") and not self.ledger.sources_of(job_id):
                return
            try:
                job = await self.advance(job, self.clock())
                continue
            except (Cancelled, asyncio.CancelledError):
                self.log.info("job.parked", job_id=job_id, path=self.context.path_of(job_id), stage=job.stage)
                return
            except Permanent as error:
                self._fail(job, error)
                job = self.ledger.job(job_id)
                continue
            except Exception as error:  # network, disk, engine hiccups, or a bug; logged with evidence
                delay = self._retry(job, error, self.clock())
            job = self.ledger.job(job_id)
            if delay is None:
                continue
            await self.shutdown.wait(delay)
            job = self.ledger.job(job_id)

    async def advance(self, job: Job, now: float | None = None) -> Job | None:
        """Run the job's next stage at `now` (default: the clock); the stage commits what it reaches.
        Returns the job as the ledger now has it (None once it is forgotten). Raises Permanent,
        Cancelled, or any other error of the stage (retried by `run_job`)."""
        now = self.clock() if now is None else now
        self.current[job.job_id] = job.stage
        try:
            await self.stages.step(job, now)
        finally:
            self.current.pop(job.job_id, None)
        return self.ledger.job(job.job_id)

    def _retry(self, job: Job, error: Exception, now: float) -> float | None:
        """Record a failed attempt; return the seconds to wait before the next, or None when the job
        failed for good: an error other than the machine's own (file system, missing model), seen
        `max_attempts` times, fails the job with that error as its evidence."""
        attempts = job.attempts + 1
        message = f"{type(error).__name__}: {error}"
        until_fixed = _retried_until_fixed(error)
        if not until_fixed and attempts >= self.config.max_attempts:
            self.log.error("job.retry", job_id=job.job_id, path=self.context.path_of(job.job_id), stage=job.stage,
                           attempts=attempts, retry_in_s=None,
                           error=message, exc_info=True)
            self._fail(job, Permanent("error", f"{message} (after {attempts} attempts, at stage {job.stage})",
                                      failure_hint("error")))
            return None
        delay = backoff(attempts, RETRY_INITIAL_S, RETRY_MAX_S)
        self.ledger.update_job(job.job_id, attempts=attempts, last_error=message, retry_at=now + delay)
        self.log.error("job.retry", job_id=job.job_id, path=self.context.path_of(job.job_id), stage=job.stage,
                       attempts=attempts, retry_in_s=delay,
                       error=message, hint=getattr(error, "hint", None) or _hint_for(error),
                       attempts_left=None if until_fixed else self.config.max_attempts - attempts,
                       exc_info=not isinstance(error, (OSError, EngineError)))
        return delay

    def _fail(self, job: Job, error: Permanent) -> None:
        """Commit the failure with its hint; the deliver stage moves each source to failed/ and logs
        `job.failed` once per source, with the record's words (one error line per failure)."""
        self.ledger.update_job(job.job_id, stage="failed", last_error=f"{error.kind}: {error}", hint=error.hint)

    # housekeeping

    async def start(self) -> None:
        """Bind to the running loop and start the hourly expiry of cached Results."""
        await asyncio.get_running_loop().run_in_executor(self._io, self.prefetch.start)
        await self.sweep_checkpoints()
        self._expiry = asyncio.get_running_loop().create_task(self._expire_periodically(), name="results-expiry")
        self.hooks.start()

    async def sweep_checkpoints(self) -> int:
        """Remove the local route's checkpoints of jobs that are gone or past transcription (a job
        that failed, or a crash before the commit removed one). Returns how many; logs an OSError."""
        keep = {job.job_id for job in self.ledger.unfinished_jobs() if job.stage != "transcribed"}
        folder = self.state_dir / "partial"
        try:
            removed = await asyncio.get_running_loop().run_in_executor(self._io, checkpoints.sweep, folder,
                                                                       keep.__contains__)
        except OSError as error:  # housekeeping never stops the daemon
            self.log.warning("transcribe.checkpoint_failed", file=str(folder), error=str(error))
            return 0
        if removed:
            self.log.info("transcribe.checkpoints_swept", removed=removed)
        return removed

    def closed(self, path: Path) -> None:
        """The watcher's early callback: a writer closed `path`; start reading it while it settles
        (see `daemon.prefetch`). Library sidecars and files the pipeline would not take are left alone."""
        if self.shutdown.is_set() or (self.config.library_mode and library.is_sidecar(path)):
            return
        self.prefetch.closed(self.intake.relpath(path), path)

    async def _expire_periodically(self) -> None:
        while not self.shutdown.is_set():
            for expire, folder in ((self.expire_results, self.results_dir), (self.expire_audio, self.audio_dir)):
                try:
                    await expire()
                except OSError as error:  # housekeeping must never stop the daemon; say so and try later
                    self.log.warning("results.expire_failed", folder=str(folder), error=str(error))
            await self.shutdown.wait(EXPIRE_EVERY_S)

    async def expire_audio(self, now: float | None = None) -> int:
        """Remove kept audio (state/audio) older than `api.keep_audio_hours` at `now` (default: the
        clock); all of it when the page keeps none. Returns how many were removed; raises OSError."""
        if not self.audio_dir.is_dir():
            return 0
        hours = float(self.config.api.keep_audio_hours) if self.context.keeps_audio else 0.0
        cutoff = (self.clock() if now is None else now) - hours * 3600.0 if hours else float("inf")
        removed = await asyncio.get_running_loop().run_in_executor(
            self._io, _remove_older, self.audio_dir, cutoff, set(), ".opus")
        if removed:
            self.log.info("audio.expired", removed=removed, older_than_hours=hours)
        return removed

    async def expire_results(self, now: float | None = None) -> int:
        """Remove cached Results (state/results) older than `results_days` at `now` (default: the clock),
        except those of unfinished jobs. Returns how many were removed; raises OSError."""
        days = float(self.config.results_days)
        if days <= 0:
            return 0
        cutoff = (self.clock() if now is None else now) - days * 86400.0
        keep = {job.job_id for job in self.ledger.unfinished_jobs()}
        removed = await asyncio.get_running_loop().run_in_executor(
            self._io, _remove_older, self.results_dir, cutoff, keep)
        if removed:
            self.log.info("results.expired", removed=removed, older_than_days=days)
        return removed

    async def drain(self, timeout: float) -> bool:
        """Park every job now: request the stop (if the service has not yet), which worker threads see
        (so the engine and PyAV stop at their next look), then cancel the jobs' tasks at once, each
        logging `job.parked`, instead of waiting for a thread to look. Safe: a stage commits what it
        reached only when it ends, so a cut stage is done again from its start, as after a kill -9.
        Waits up to `timeout` s for the tasks to end, then stops the done notifications
        (`Hooks.close`); True if all tasks ended."""
        self.shutdown.request("drain")
        if self._expiry is not None:
            self._expiry.cancel()
        tasks = [task for task in self._tasks.values() if not task.done()]
        for task in tasks:
            task.cancel()
        pending = set()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
        await self.hooks.close()  # after the jobs: what they delivered meanwhile is counted as unsent
        await self.prefetch.close()
        return not pending

    def close(self) -> None:
        self.local.shutdown()
        self._io.shutdown(wait=False, cancel_futures=True)
        self.ledger.close()


def _remove_older(folder: Path, cutoff: float, keep: set[str], suffix: str = ".json") -> int:
    """Remove `<job><suffix>` files in `folder` last changed before `cutoff`, except jobs in `keep`."""
    removed = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if not name.endswith(suffix) or name[:-len(suffix)] in keep or not entry.is_file(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:  # removed meanwhile (by hand, or by another expiry): gone is gone
                    continue
                removed += 1
    return removed


def _retried_until_fixed(error: Exception) -> bool:
    """Errors of the machine, not of the job (a file system refusing, a model missing): retried with
    back-off until a person fixes them, however often, since every job would fail the same way."""
    return isinstance(error, OSError) or (isinstance(error, EngineError) and error.kind == "model")


def _hint_for(error: Exception) -> str:
    if isinstance(error, PermissionError):
        return f"whisperdrop cannot write {error.filename!r}: fix its owner or permissions; the source stays in the inbox"
    if isinstance(error, OSError) and error.errno == errno.EROFS:
        return f"{error.filename or 'a folder'} is on a read-only file system: remount it writable or change outbox/archive; the source stays in the inbox"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "the disk is full: free space; the source stays in the inbox and is retried"
    if isinstance(error, EngineError) and error.kind == "model":
        return "fix local.model (or transcription.model) in config.yaml; see docs/models.md"
    return "retried automatically with back-off; the source stays in the inbox"
