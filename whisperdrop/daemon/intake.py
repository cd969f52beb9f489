"""The intake stage: a settled inbox file becomes a source of a job in the ledger.

`Intake.take(path)` is the watcher's callback. It stats the file, recognises cheaply what it has
seen (a pending source of the same version, a kept file already done: size, mtime and inode),
hashes anything else in a worker thread (or takes the hash `Context.prefetch` made while the file
settled, for exactly this version), finds or creates the job (same bytes and options: same
job) and records the source; the caller's `schedule(job_id)` starts the job's work. A file's options
are its Plan (`plan(relpath)`): `transcription`, with the first profile whose globs match its
inbox-relative path over it (see `whisperdrop.shared.profiles`).
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import time
from pathlib import Path
from typing import Callable

from whisperdrop.daemon.ledger import Job, Source
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.daemon.stages import Context
from whisperdrop.engine.engine import Cancelled
from whisperdrop.shared.files import sha256_file
from whisperdrop.shared.profiles import Plan
from whisperdrop.shared.spool import TranscribeOptions
from whisperdrop.shared.spool import job_id as make_job_id


TRANSIENT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})  # passing: try again


class Intake:
    """Takes inbox files for jobs planned by `plan(relpath)`; `schedule(job_id)` starts a job's work."""

    def __init__(self, context: Context, plan: Callable[[str], Plan], schedule: Callable[[str], None],
                 shutdown: Shutdown):
        self.context = context
        self.plan = plan
        self.schedule = schedule
        self.shutdown = shutdown  # the daemon's stop request: no file is taken once it is asked
        self._taking: set[str] = set()

    def relpath(self, path: Path) -> str:
        return path.relative_to(self.context.inbox).as_posix()

    async def take(self, path: Path) -> bool:
        """Take a settled inbox file: hash it, find or create its job, and schedule the job. Never
        raises for the file's sake: an unreadable or vanished file is logged or passed over. True when
        it could not be read for a passing reason (no file descriptor or memory left: EMFILE, ENFILE,
        EAGAIN, ENOMEM), so the watcher must offer it again at its next rescan."""
        if self.shutdown.is_set():
            return False
        relpath = self.relpath(path)
        if relpath in self._taking:
            return False
        self._taking.add(relpath)
        try:
            return await self._take(path, relpath)
        finally:
            self._taking.discard(relpath)

    async def _take(self, path: Path, relpath: str) -> bool:
        context, ledger, log = self.context, self.context.ledger, self.context.log
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(info.st_mode):
            log.warning("intake.skipped", path=relpath, reason="not a regular file (symlinks are not followed)")
            return False
        pending = ledger.pending_source(relpath)
        if pending and (pending.size, pending.mtime_ns) == (info.st_size, info.st_mtime_ns):
            self.schedule(pending.job_id)
            return False
        if pending:
            ledger.update_source(pending.id, state="replaced", last_error="the file changed after it was taken")
        elif (context.config.after_success == "keep" or context.config.library_mode) and self._already_done(relpath, info):
            return False
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            digest = None if context.prefetch is None else await context.prefetch.digest(relpath, info)
            if digest is None:
                digest = await loop.run_in_executor(context.io, sha256_file, path, self.shutdown.threads)
            after = os.lstat(path)
        except FileNotFoundError:
            return False
        except Cancelled:
            return False
        except OSError as error:
            if error.errno in TRANSIENT_ERRORS:
                log.error("intake.unreadable", path=relpath, error=str(error), retry="at the next rescan",
                          hint="the daemon ran short of file descriptors or memory; it stays in the inbox")
                return True
            log.error("intake.unreadable", path=relpath, error=str(error),
                      hint="check the file's permissions; it stays in the inbox")
            return False
        if (after.st_size, after.st_mtime_ns) != (info.st_size, info.st_mtime_ns):
            log.info("intake.changed", path=relpath, reason="the file changed while it was read; waiting for it to settle")
            return False
        settle_s = max(0.0, time.time() - info.st_mtime)
        self.record(relpath, digest, info.st_size, info.st_mtime_ns, info.st_ino, self.plan(relpath).options,
                    settle_s=round(settle_s, 3), hash_s=round(time.monotonic() - started, 3))
        return False

    def record(self, relpath: str, digest: str, size: int, mtime_ns: int, inode: int, options: TranscribeOptions,
               **fields: object) -> tuple[Job, Source]:
        """Record the file at `relpath` (digest, size, mtime, inode as read) as a source of the job for
        its bytes and `options`, creating the job or taking it up again (a failed job is tried again; a
        Result from another model is forgotten), in one ledger transaction: a job never exists without
        its source, even across a crash. Logs stage.intake with `fields` and schedules the job; returns
        (the job, the source row), both committed."""
        ledger = self.context.ledger
        job_id = make_job_id(digest, options)
        with ledger.transaction():
            job = ledger.create_job(job_id, digest, size, options.to_dict())
            if job.stage == "failed":  # a person moved a failed file back (or asked again): try again
                ledger.update_job(job_id, stage="new", attempts=0, last_error=None, finished_at=None, handbacks=None)
            elif job.stage == "done" and job.model not in (None, job.options.get("model")):
                self._reopen_substitute(job)
            source = ledger.add_source(relpath, job_id, size, mtime_ns, fields.get("settle_s") or 0.0, inode=inode)
            duplicate = job.stage != "new" or len(ledger.sources_of(job_id)) > 1
        self.context.log.info("stage.intake", path=relpath, job_id=job_id, bytes=size, source_id=source.id,
                              duplicate=duplicate, **fields)
        self.schedule(job_id)
        job = ledger.job(job_id)
        assert job is not None
        return job, source

    def _already_done(self, relpath: str, info: os.stat_result) -> bool:
        """True when the file at `relpath` is the very version already done and kept (same size, mtime
        and inode): a restart's rescan finds every kept file, and none is hashed or delivered again."""
        kept = self.context.ledger.done_source(relpath, failed_too=self.context.config.library_mode)  # left in place
        if kept is None or (kept.size, kept.mtime_ns, kept.inode) != (info.st_size, info.st_mtime_ns, info.st_ino):
            return False
        self.context.log.debug("intake.already_done", path=relpath, job_id=kept.job_id,
                               reason="kept after success and unchanged since")
        return True

    def _reopen_substitute(self, job: Job) -> None:
        """A finished job whose cached Result came from another model (the local fallback's) is not
        this job's transcript: forget that Result and transcribe the job again with its own model."""
        self.context.result_path(job.job_id).unlink(missing_ok=True)
        self.context.ledger.update_job(job.job_id, stage="new", model=None, route=None, host=None,
                                       fallback_reason=None, timings={}, transfer={}, attempts=0, last_error=None,
                                       finished_at=None, handbacks=None)
        self.context.log.info("job.reopened", job_id=job.job_id, cached_model=job.model,
                              model=job.options.get("model"),
                              reason="its Result came from a fallback model; transcribing it with the job's own model")
