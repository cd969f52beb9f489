"""The daemon's asyncio pipeline: take settled files, advance each job one stage at a time.

    inbox -> take (hash, job id, ledger) -> extract (Opus) -> route (local or remote) -> outbox -> archive

`Pipeline.advance(job)` is the loop body: it runs the job's next stage and commits the new stage to
the ledger, so a restart (or a crash) resumes each job where it stopped. CPU-heavy work (hashing,
PyAV, the local engine) runs in executor threads. Errors are of two kinds: permanent (the file is
not usable media) moves the source to `failed/`; anything else is retried with a capped back-off
while the source stays in the inbox.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from whisperdrop import log, result as results
from whisperdrop.daemon import outbox
from whisperdrop.daemon.extract import MediaError, extract
from whisperdrop.daemon.ledger import Job, Ledger, Source
from whisperdrop.daemon.local import LocalTranscriber
from whisperdrop.daemon.route import Router
from whisperdrop.engine import Cancelled, Engine, EngineError
from whisperdrop.files import fsync_directory
from whisperdrop.spool import TranscribeOptions, job_id as make_job_id

RETRY_INITIAL_S = 5.0
RETRY_MAX_S = 300.0
EXPIRE_EVERY_S = 3600.0  # how often cached Results older than `results_days` are looked for
HASH_CHUNK = 1 << 20


class Permanent(Exception):
    """A failure that no retry fixes: the source goes to `failed/` with this message and hint."""

    def __init__(self, kind: str, message: str, hint: str):
        super().__init__(message)
        self.kind = kind
        self.hint = hint


def sha256_file(path: Path, cancel: threading.Event | None = None) -> str:
    """sha256 of a file, read in 1 MiB chunks. Raises Cancelled when `cancel` is set."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
            if cancel is not None and cancel.is_set():
                raise Cancelled()
    return digest.hexdigest()


def same_version(path: Path, size: int, mtime_ns: int) -> bool:
    """True when `path` is still a regular file with this size and mtime (the version taken at intake)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and (info.st_size, info.st_mtime_ns) == (size, mtime_ns)


def backoff(attempts: int, initial: float = RETRY_INITIAL_S, cap: float = RETRY_MAX_S) -> float:
    """Seconds to wait before attempt `attempts + 1`: doubling from `initial`, capped at `cap`."""
    return min(cap, initial * (2 ** max(0, attempts - 1)))


class Pipeline:
    """Owns the ledger, the executors and the routes; `take(path)` is the watcher's callback."""

    def __init__(self, config: Any, *, engine: Engine | None = None, remote: Any | None = None):
        self.config = config
        self.inbox: Path = config.inbox
        self.outbox_root: Path = config.outbox
        self.state_dir = config.path("state_dir")
        self.work_dir = self.state_dir / "work"
        self.results_dir = self.state_dir / "results"
        for folder in (self.work_dir, self.results_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.state_dir / "ledger.sqlite3")
        self.formats = list(config.transcription.outputs)
        self.subtitles = outbox.Limits.from_config(config.subtitles)  # how SRT and VTT cues are cut
        self.local = LocalTranscriber(config.local, engine)
        self.router = Router(config, self.local, remote)
        self.options = self.router.planned_options(TranscribeOptions.from_config(config.transcription))
        self.cancel = threading.Event()
        self.stopping = asyncio.Event()
        self.log = log.get("pipeline")
        self._io = ThreadPoolExecutor(max_workers=max(2, (os.cpu_count() or 2)), thread_name_prefix="whisperdrop-io")
        self._extract_slots = asyncio.Semaphore(max(1, (os.cpu_count() or 2) // 2))
        self._taking: set[str] = set()
        self._tasks: dict[str, asyncio.Task] = {}
        self._last_progress: dict[str, float] = {}
        self.current: dict[str, str] = {}  # job id -> stage being worked on (for status lines)

    # intake

    def relpath(self, path: Path) -> str:
        return path.relative_to(self.inbox).as_posix()

    async def take(self, path: Path) -> None:
        """Take a settled inbox file: hash it, find or create its job, and schedule the job."""
        if self.stopping.is_set():
            return
        relpath = self.relpath(path)
        if relpath in self._taking:
            return
        self._taking.add(relpath)
        try:
            await self._take(path, relpath)
        finally:
            self._taking.discard(relpath)

    async def _take(self, path: Path, relpath: str) -> None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(info.st_mode):
            self.log.warning("intake.skipped", path=relpath, reason="not a regular file (symlinks are not followed)")
            return
        pending = self.ledger.pending_source(relpath)
        if pending and (pending.size, pending.mtime_ns) == (info.st_size, info.st_mtime_ns):
            self.schedule(pending.job_id)
            return
        if pending:
            self.ledger.update_source(pending.id, state="replaced", last_error="the file changed after it was taken")
        elif self.config.after_success == "keep" and self._already_done(relpath, info):
            return
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            digest = await loop.run_in_executor(self._io, sha256_file, path, self.cancel)
            after = os.lstat(path)
        except FileNotFoundError:
            return
        except Cancelled:
            return
        except OSError as error:
            self.log.error("intake.unreadable", path=relpath, error=str(error),
                           hint="check the file's permissions; it stays in the inbox")
            return
        if (after.st_size, after.st_mtime_ns) != (info.st_size, info.st_mtime_ns):
            self.log.info("intake.changed", path=relpath, reason="the file changed while it was read; waiting for it to settle")
            return
        job_id = make_job_id(digest, self.options)
        job = self.ledger.create_job(job_id, digest, info.st_size, self.options.to_dict())
        if job.stage == "failed":  # a person moved a failed file back: that is the signal to try again
            self.ledger.update_job(job_id, stage="new", attempts=0, last_error=None, finished_at=None)
        elif job.stage == "done" and job.model not in (None, job.options.get("model")):
            self._reopen_substitute(job)
        settle_s = max(0.0, time.time() - info.st_mtime)
        source = self.ledger.add_source(relpath, job_id, info.st_size, info.st_mtime_ns, settle_s, inode=info.st_ino)
        self.log.info(
            "stage.intake", path=relpath, job_id=job_id, bytes=info.st_size, settle_s=round(settle_s, 3),
            hash_s=round(time.monotonic() - started, 3), source_id=source.id,
            duplicate=job.stage != "new" or len(self.ledger.sources_of(job_id)) > 1,
        )
        self.schedule(job_id)

    def _already_done(self, relpath: str, info: os.stat_result) -> bool:
        """True when the file at `relpath` is the very version already done and kept (same size, mtime
        and inode): a restart's rescan finds every kept file, and none is hashed or delivered again."""
        kept = self.ledger.done_source(relpath)
        if kept is None or (kept.size, kept.mtime_ns, kept.inode) != (info.st_size, info.st_mtime_ns, info.st_ino):
            return False
        self.log.debug("intake.already_done", path=relpath, job_id=kept.job_id,
                       reason="kept after success and unchanged since")
        return True

    def _reopen_substitute(self, job: Job) -> None:
        """A finished job whose cached Result came from another model (the local fallback's) is not
        this job's transcript: forget that Result and transcribe the job again with its own model."""
        self.result_path(job.job_id).unlink(missing_ok=True)
        self.ledger.update_job(job.job_id, stage="new", model=None, route=None, host=None, fallback_reason=None,
                               timings={}, transfer={}, attempts=0, last_error=None, finished_at=None)
        self.log.info("job.reopened", job_id=job.job_id, cached_model=job.model, model=job.options.get("model"),
                      reason="its Result came from a fallback model; transcribing it with the job's own model")

    # scheduling

    def schedule(self, job_id: str) -> None:
        """Start the job's task unless it is already running."""
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            return
        self._tasks[job_id] = asyncio.get_running_loop().create_task(self.run_job(job_id), name=f"job-{job_id[:12]}")

    async def recover(self) -> int:
        """Schedule every unfinished job from the ledger (start-up after a stop or a crash)."""
        jobs = self.ledger.unfinished_jobs()
        finished_with_pending = [
            job_id for (job_id,) in self.ledger.db.execute(
                "SELECT DISTINCT s.job_id FROM sources s JOIN jobs j USING (job_id)"
                " WHERE s.state = 'pending' AND j.stage IN ('done', 'failed')"
            )
        ]
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
        while not self.stopping.is_set():
            job = self.ledger.job(job_id)
            if job is None:
                return
            if job.stage in ("done", "failed") and not self.ledger.sources_of(job_id):
                return
            try:
                await self.advance(job)
                continue
            except (Cancelled, asyncio.CancelledError):
                self.log.info("job.parked", job_id=job_id, stage=job.stage)
                return
            except Permanent as error:
                self._fail(job, error)
                continue
            except Exception as error:  # network, disk, engine hiccups, or a bug; logged with evidence
                delay = self._retry(job, error)
                if delay is None:
                    continue
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass

    def _retry(self, job: Job, error: Exception) -> float | None:
        """Record a failed attempt; return the seconds to wait before the next, or None when the job
        failed for good: an error other than the machine's own (file system, missing model), seen
        `max_attempts` times, fails the job with that error as its evidence."""
        attempts = job.attempts + 1
        message = f"{type(error).__name__}: {error}"
        until_fixed = _retried_until_fixed(error)
        if not until_fixed and attempts >= self.config.max_attempts:
            self.log.error("job.retry", job_id=job.job_id, stage=job.stage, attempts=attempts, retry_in_s=None,
                           error=message, exc_info=True)
            self._fail(job, Permanent("error", f"{message} (after {attempts} attempts, at stage {job.stage})",
                                      _failure_hint("error")))
            return None
        delay = backoff(attempts)
        self.ledger.update_job(job.job_id, attempts=attempts, last_error=message, retry_at=time.time() + delay)
        self.log.error("job.retry", job_id=job.job_id, stage=job.stage, attempts=attempts, retry_in_s=delay,
                       error=message, hint=getattr(error, "hint", None) or _hint_for(error),
                       attempts_left=None if until_fixed else self.config.max_attempts - attempts,
                       exc_info=not isinstance(error, (OSError, EngineError)))
        return delay

    def _fail(self, job: Job, error: Permanent) -> None:
        self.ledger.update_job(job.job_id, stage="failed", last_error=f"{error.kind}: {error}")
        self.log.error("job.failed", job_id=job.job_id, kind=error.kind, error=str(error), hint=error.hint)

    # stages

    async def advance(self, job: Job) -> None:
        """Run the job's next stage and commit the stage it reaches. Raises Permanent or transient errors."""
        self.current[job.job_id] = job.stage
        try:
            if job.stage == "new":
                await self._extract(job)
            elif job.stage in ("extracted", "uploaded", "submitted"):
                await self._transcribe(job)
            elif job.stage in ("transcribed", "done", "failed"):
                await self._deliver(job)
            else:
                raise RuntimeError(f"job {job.job_id} has an unknown stage {job.stage!r}")
        finally:
            self.current.pop(job.job_id, None)

    def audio_path(self, job_id: str) -> Path:
        return self.work_dir / f"{job_id}.opus"

    def result_path(self, job_id: str) -> Path:
        return self.results_dir / f"{job_id}.json"

    def _first_source(self, job: Job) -> tuple[Source, Path] | None:
        for source in self.ledger.sources_of(job.job_id):
            path = self.inbox / source.relpath
            if os.path.lexists(path):
                return source, path
            self.ledger.update_source(source.id, state="vanished", last_error="removed from the inbox before it was done")
            self.log.warning("intake.vanished", path=source.relpath, job_id=job.job_id)
        return None

    async def _extract(self, job: Job) -> None:
        found = self._first_source(job)
        if found is None:  # every source left the inbox before extraction: forget the job
            self.ledger.delete_job(job.job_id)
            return
        source, path = found
        loop = asyncio.get_running_loop()
        async with self._extract_slots:
            if not same_version(path, source.size, source.mtime_ns):
                self._replaced(job, source)
                return
            try:
                extracted = await loop.run_in_executor(
                    self._io, lambda: extract(path, self.audio_path(job.job_id),
                                              self.config.audio.bitrate_kbps, cancel=self.cancel)
                )
            except MediaError as error:
                if not same_version(path, source.size, source.mtime_ns):
                    self._replaced(job, source)
                    return
                raise Permanent("media", f"{error.reason}", error.hint) from error
            if not same_version(path, source.size, source.mtime_ns):  # changed while read: the audio may be a mix
                self.audio_path(job.job_id).unlink(missing_ok=True)
                self._replaced(job, source)
                return
        timings = {**job.timings, "extract_s": round(extracted.seconds, 3)}
        self.ledger.update_job(
            job.job_id, stage="extracted", duration=extracted.duration, audio_size=extracted.bytes_out,
            audio_sha256=extracted.sha256, timings=timings, attempts=0, last_error=None,
        )
        self.log.info(
            "stage.extract", job_id=job.job_id, path=source.relpath, bytes_in=extracted.bytes_in,
            bytes_out=extracted.bytes_out, duration_s=round(extracted.duration, 3), seconds=round(extracted.seconds, 3),
            speed=round(extracted.duration / extracted.seconds, 1) if extracted.seconds else None,
            codec=extracted.source_codec, container=extracted.source_container,
        )

    def _replaced(self, job: Job, source: Source) -> None:
        """The inbox file is no longer the version this job hashed: drop this source (the watcher
        takes the new version as a job of its own); a job left with no source is deleted next step."""
        self.ledger.update_source(source.id, state="replaced", last_error="the file changed after it was taken")
        self.log.info("intake.changed", path=source.relpath, job_id=job.job_id,
                      reason="the file was replaced or rewritten after it was taken; the new version is taken on its own")

    def _progress_callback(self, job_id: str):
        loop = asyncio.get_running_loop()
        every = float(self.config.logging.progress_seconds)
        logged = [time.monotonic()]  # a transcription shorter than `every` logs no progress

        def report(done: float, duration: float) -> None:
            now = time.monotonic()
            if now - self._last_progress.get(job_id, 0.0) < 1.0 and done < duration:
                return
            self._last_progress[job_id] = now
            progress = {"transcribe": round(done / duration, 3) if duration else 1.0, "done_s": round(done, 1),
                        "duration_s": round(duration, 1)}
            loop.call_soon_threadsafe(functools.partial(self.ledger.update_job, job_id, progress=progress))
            if now - logged[0] >= every and done < duration:  # now and then, for a person watching the log
                logged[0] = now
                loop.call_soon_threadsafe(functools.partial(
                    self.log.info, "job.progress", job_id=job_id, percent=round(100 * progress["transcribe"], 1),
                    done_s=progress["done_s"], duration_s=progress["duration_s"]))

        return report

    def _mark(self, job_id: str):
        def mark(stage: str | None = None, **fields: Any) -> None:
            changes = dict(fields)
            if stage:
                changes["stage"] = stage
            self.ledger.update_job(job_id, **changes)

        return mark

    async def _transcribe(self, job: Job) -> None:
        cached = self.result_path(job.job_id)
        if cached.exists():  # transcribed before a crash, ledger not yet updated: never transcribe twice
            await self._recover_cached(job, cached)
            return
        audio = self.audio_path(job.job_id)
        if not audio.exists():
            self.log.warning("job.audio_missing", job_id=job.job_id, action="extracting again")
            self.ledger.update_job(job.job_id, stage="new")
            return
        options = TranscribeOptions(**job.options)
        try:
            routed = await self.router.transcribe(
                job, audio, options, cancel=self.cancel, progress=self._progress_callback(job.job_id),
                mark=self._mark(job.job_id),
            )
        except EngineError as error:
            if error.kind == "audio":
                raise Permanent("audio", str(error), "the audio could not be decoded; check the source file") from error
            raise
        result = results.transcribed(
            routed.result, job_id=job.job_id, route=routed.route, host=routed.host,
            fallback_reason=routed.fallback_reason, timings={**job.timings, **routed.timings},
            transfer={**job.transfer, **routed.transfer},
        )
        await asyncio.get_running_loop().run_in_executor(
            self._io, outbox.write_atomic, cached, _json_bytes(result))
        await self._commit_transcribed(job, result)

    async def _recover_cached(self, job: Job, cached: Path) -> None:
        """A crash hit between caching a Result and committing it: finish the commit from the cache."""
        result = await asyncio.get_running_loop().run_in_executor(self._io, _read_json, cached)
        await self._commit_transcribed(job, result, recovered=True)

    async def _commit_transcribed(self, job: Job, result: dict, recovered: bool = False) -> None:
        """After the Result is cached here: remove the job's remote files, commit the stage with the
        route and figures, and log `stage.transcribe`. Everything comes from the cached Result, so a
        restart finishes this exactly as the first run would have."""
        executed = result.get("executed_on") or {}
        route, host = executed.get("route"), executed.get("host")
        timings, transfer = result.get("timings") or job.timings, result.get("transfer") or job.transfer
        if route == "remote" and self.router.remote is not None:
            await self.router.remote.cleanup(host, job.job_id)  # the Result is safe here now
        self.ledger.update_job(
            job.job_id, stage="transcribed", route=route, host=host, fallback_reason=result.get("fallback_reason"),
            model=result.get("model"), timings=timings, transfer=transfer, attempts=0, last_error=None, progress=None,
        )
        seconds = timings.get("transcribe_s") or 0.0
        duration = result.get("duration") or job.duration or 0.0
        self.log.info(
            "stage.transcribe", job_id=job.job_id, route=route, host=host, device=executed.get("device"),
            model=result.get("model"), duration_s=duration, seconds=seconds,
            rtf=round(seconds / duration, 4) if duration else None, fallback_reason=result.get("fallback_reason"),
            language=result.get("language"), bytes=transfer.get("bytes"), recovered=recovered,
        )

    async def _deliver(self, job: Job) -> None:
        """Write outputs for every pending source of a finished job, then archive each source."""
        loop = asyncio.get_running_loop()
        if job.stage == "failed":
            for source in self.ledger.sources_of(job.job_id):
                await loop.run_in_executor(self._io, self._fail_source, job, source)
            return
        cached = self.result_path(job.job_id)
        if not cached.exists():
            self.log.warning("job.result_missing", job_id=job.job_id, action="transcribing again")
            self.ledger.update_job(job.job_id, stage="new" if not self.audio_path(job.job_id).exists() else "extracted")
            return
        result = await loop.run_in_executor(self._io, _read_json, cached)
        for source in self.ledger.sources_of(job.job_id):
            await loop.run_in_executor(self._io, self._deliver_source, job, source, result)
        if job.stage != "done":
            self.ledger.update_job(job.job_id, stage="done")
            self.audio_path(job.job_id).unlink(missing_ok=True)

    def _deliver_source(self, job: Job, source: Source, result: dict) -> None:
        """Runs in a worker thread: outputs for one source, then the source leaves the inbox."""
        started = time.monotonic()
        path = self.inbox / source.relpath
        relative = Path(source.relpath)
        folder = self.outbox_root / relative.parent
        added = {"settle_s": round(source.settle_s, 3)}
        if os.path.lexists(path) and not same_version(path, source.size, source.mtime_ns):
            # another version sits at this path now: it gets its own job; this Result is not its transcript
            self._on_loop(self._replaced, job, source).result()
            return
        base, already = outbox.plan_outputs(folder, relative.stem, self.formats, job.job_id, result, self.subtitles)
        if not already:
            added["total_s"] = round(source.settle_s + (time.time() - source.taken_at), 3)
            document = results.for_source(result, path=source.relpath, size=source.size, sha256=job.source_sha256,
                                          timings=added)
            outbox.write_outputs(base, document, self.formats, self.subtitles)
        timings = {**(result.get("timings") or {}), **added}
        policy = self.config.after_success
        if os.path.lexists(path):
            if policy == "archive":
                outbox.move_without_overwrite(path, self.config.archive / source.relpath)
            elif policy == "delete":
                os.unlink(path)
                fsync_directory(path.parent)
        call = self._on_loop(self.ledger.update_source, source.id, state="done",
                             outputs={"base": str(base.relative_to(self.outbox_root))})
        call.result()
        self.log.info(
            "stage.outbox", job_id=job.job_id, path=source.relpath, output=str(base.relative_to(self.outbox_root)) + ".json",
            formats=self.formats, already_written=already, after_success=policy,
            seconds=round(time.monotonic() - started, 3),
        )
        self.log.info(
            "job.done", job_id=job.job_id, path=source.relpath, route=job.route, host=job.host,
            duration_s=job.duration, total_s=timings.get("total_s"), fallback_reason=job.fallback_reason,
            bytes_source=source.size, bytes_sent=(job.transfer or {}).get("bytes", 0), timings=timings,
        )

    def _fail_source(self, job: Job, source: Source) -> None:
        path = self.inbox / source.relpath
        kind, _, message = (job.last_error or "error: unknown").partition(": ")
        hint = _failure_hint(kind)
        record = {
            "path": source.relpath,
            "job_id": job.job_id,
            "kind": kind,
            "error": message,
            "what_to_do": hint,
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "retry": "move the file back into the inbox once it is fixed; it will be taken again",
        }
        moved = outbox.record_failure(path, self.config.failed, source.relpath, record)
        self._on_loop(self.ledger.update_source, source.id, state="failed", last_error=message).result()
        self.log.error("stage.failed", job_id=job.job_id, path=source.relpath, kind=kind, error=message,
                       hint=hint, moved_to=str(moved))

    def _on_loop(self, function, *args, **kwargs):
        """Run a ledger write on the event loop's thread from a worker thread; returns a Future."""
        return asyncio.run_coroutine_threadsafe(_call(function, *args, **kwargs), self._loop)

    async def start(self) -> None:
        """Bind to the running loop and start the hourly expiry of cached Results."""
        self._loop = asyncio.get_running_loop()
        self._expiry = self._loop.create_task(self._expire_periodically(), name="results-expiry")

    async def _expire_periodically(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.expire_results()
            except OSError as error:  # housekeeping must never stop the daemon; say so and try later
                self.log.warning("results.expire_failed", folder=str(self.results_dir), error=str(error))
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=EXPIRE_EVERY_S)
            except asyncio.TimeoutError:
                pass

    async def expire_results(self, now: float | None = None) -> int:
        """Remove cached Results (state/results) older than `results_days` at `now` (default: the time),
        except those of unfinished jobs. Returns how many were removed; raises OSError."""
        days = float(self.config.results_days)
        if days <= 0:
            return 0
        cutoff = (time.time() if now is None else now) - days * 86400.0
        keep = {job.job_id for job in self.ledger.unfinished_jobs()}
        removed = await asyncio.get_running_loop().run_in_executor(
            self._io, _remove_older, self.results_dir, cutoff, keep)
        if removed:
            self.log.info("results.expired", removed=removed, older_than_days=days)
        return removed

    async def drain(self, timeout: float) -> bool:
        """Stop starting stages, cancel cooperative work, wait up to `timeout` s. True if all parked."""
        self.stopping.set()
        self.cancel.set()
        expiry = getattr(self, "_expiry", None)
        if expiry is not None:
            expiry.cancel()
        tasks = [task for task in self._tasks.values() if not task.done()]
        if not tasks:
            return True
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        return not pending

    def close(self) -> None:
        self.local.shutdown()
        self._io.shutdown(wait=False, cancel_futures=True)
        self.ledger.close()


async def _call(function, *args, **kwargs):
    return function(*args, **kwargs)


def _json_bytes(document: dict) -> bytes:
    import json

    return json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8")


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _remove_older(folder: Path, cutoff: float, keep: set[str]) -> int:
    """Remove `<job>.json` files in `folder` last changed before `cutoff`, except jobs in `keep`."""
    removed = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if not name.endswith(".json") or name[:-5] in keep or not entry.is_file(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
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
        return "fix local.model (or transcription.model) in config.yaml; see README, Models"
    return "retried automatically with back-off; the source stays in the inbox"


def _failure_hint(kind: str) -> str:
    if kind in ("media", "audio"):
        return ("the file is not media with an audio stream that PyAV can decode; check it plays, re-export or "
                "re-download it, then move it back into the inbox")
    if kind == "error":
        return ("an unexpected error, the same at every attempt; the daemon's log has its traceback (job.retry); "
                "move the file back into the inbox to try again")
    return "see the error; move the file back into the inbox to try again"
