"""The job stages as a table: each entry takes a Job and the time, does one step, and commits the
stage it reaches to the ledger before it returns (huey's `loop(now)`, one job at a time).

    new -> extract -> extracted -> route: local transcription ---------------------------> transcribed
                                         or upload -> uploaded -> submit -> submitted -> await result
                                         -> ready -> fetch -------------------------------> transcribed
    transcribed -> deliver -> done;   permanent error -> failed -> deliver (to failed/)

A remote step whose host fails places the job again (another host, or the local fallback) in the
same step (see daemon.remote).

`Stages.step(job, now)` runs the entry for the job's stage. Errors: `Permanent` (the file can never
be transcribed; the job fails) or anything else (retried by the pipeline); `Cancelled` parks the job.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from whisperdrop.daemon import delivery
from whisperdrop.daemon.api import uploads
from whisperdrop.daemon.extract import MediaError, extract
from whisperdrop.daemon.ledger import Job, Ledger, Source
from whisperdrop.daemon.route import Router, Work
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.engine import checkpoint as checkpoints
from whisperdrop.engine.engine import EngineError
from whisperdrop.outputs import result as results
from whisperdrop.shared import log as logging, profiles
from whisperdrop.shared.errors import WhisperdropError
from whisperdrop.shared.files import write_atomic

PROGRESS_EVERY_S = 1.0  # progress reaches the ledger at most this often (and at the end)


class Permanent(WhisperdropError):
    """A failure that no retry fixes (never retryable): the source goes to `failed/` with this message and hint."""

    def __init__(self, kind: str, message: str, hint: str):
        super().__init__(message, kind=kind, retryable=False, hint=hint)


@dataclass
class Context:
    """What the stages work with: the config, the ledger, the route, the folders and the executors.
    Owned by the Pipeline; the ledger is used from the event loop's thread only."""

    config: Any
    ledger: Ledger
    router: Router
    io: ThreadPoolExecutor
    shutdown: Shutdown  # the daemon's one stop request
    formats: list[str]
    log: Any = field(default_factory=lambda: logging.get("pipeline"))
    last_progress: dict[str, float] = field(default_factory=dict)  # job id -> monotonic time of its last report
    hooks: Any = None  # daemon.hooks.Hooks, the done notifications (the Pipeline sets it)
    prefetch: Any = None  # daemon.prefetch.Prefetch: hashes and audio made while files settled (the Pipeline sets it)

    @property
    def inbox(self) -> Path:
        return Path(self.config.inbox)

    @property
    def work_dir(self) -> Path:
        return self.config.path("state_dir") / "work"

    @property
    def results_dir(self) -> Path:
        return self.config.path("state_dir") / "results"

    def audio_path(self, job_id: str) -> Path:
        return self.work_dir / f"{job_id}.opus"

    def kept_audio_path(self, job_id: str) -> Path:
        """Where a done job's audio stays for the page's player (`api.keep_audio_hours`)."""
        return self.config.path("state_dir") / "audio" / f"{job_id}.opus"

    @property
    def keeps_audio(self) -> bool:
        """Whether done jobs keep their audio: only where the API (and so the page) is served."""
        return bool(self.config.api.listen) and float(self.config.api.keep_audio_hours) > 0

    def source_path(self, relpath: str) -> Path:
        """Where a source is: an inbox file, or an API upload under state_dir (see api.uploads)."""
        if uploads.is_upload(relpath):
            return uploads.path_of(self.config.path("state_dir"), relpath)
        return self.inbox / relpath

    def path_of(self, job_id: str) -> str | None:
        """The inbox-relative path of the job's first pending source, for its log lines (None if none)."""
        sources = self.ledger.sources_of(job_id)
        return sources[0].relpath if sources else None

    def result_path(self, job_id: str) -> Path:
        return self.results_dir / f"{job_id}.json"

    @property
    def partial_dir(self) -> Path:
        """The local route's checkpoints: the finished part of each unfinished local transcription."""
        return self.config.path("state_dir") / "partial"


class Stages:
    """The stage table over one Context; `extract_slots` bounds concurrent PyAV work."""

    def __init__(self, context: Context, extract_slots: asyncio.Semaphore):
        self.context = context
        self.extract_slots = extract_slots
        self.table: dict[str, Callable[[Job, float], Any]] = {
            "new": self.extract,
            "extracted": self.transcribe, "uploaded": self.transcribe, "submitted": self.transcribe,
            "ready": self.transcribe,
            "transcribed": self.deliver, "done": self.deliver, "failed": self.deliver,
        }

    async def step(self, job: Job, now: float) -> None:
        """Run the table's entry for `job.stage` at `now`. Raises Permanent, Cancelled or another error."""
        entry = self.table.get(job.stage)
        if entry is None:
            raise RuntimeError(f"job {job.job_id} has an unknown stage {job.stage!r}")
        await entry(job, now)

    # extract

    def _first_source(self, job: Job, now: float) -> tuple[Source, Path] | None:
        context = self.context
        for source in context.ledger.sources_of(job.job_id):
            path = context.source_path(source.relpath)
            if os.path.lexists(path):
                return source, path
            context.ledger.update_source(source.id, state="vanished", last_error="removed from the inbox before it was done")
            context.log.warning("intake.vanished", path=source.relpath, job_id=job.job_id)
        return None

    async def extract(self, job: Job, now: float) -> None:
        """new -> extracted: the first source still in the inbox to 16 kHz mono Opus in state/work.
        Raises Permanent("media") for a file PyAV cannot use."""
        context = self.context
        found = self._first_source(job, now)
        if found is None:  # every source left the inbox before extraction: forget the job
            context.ledger.delete_job(job.job_id)
            return
        source, path = found
        loop = asyncio.get_running_loop()
        extracted = None
        if context.prefetch is not None and source.inode is not None:  # outside the slots: its work holds one
            extracted = await context.prefetch.take_audio(
                source.relpath, (source.size, source.mtime_ns, source.inode), job.source_sha256,
                context.audio_path(job.job_id))
        prefetched = extracted is not None
        async with self.extract_slots:
            if not delivery.same_version(path, source.size, source.mtime_ns):
                if prefetched:
                    context.audio_path(job.job_id).unlink(missing_ok=True)
                self.replaced(job, source)
                return
            try:
                if extracted is None:
                    extracted = await loop.run_in_executor(
                        context.io, lambda: extract(path, context.audio_path(job.job_id),
                                                    context.config.audio.bitrate_kbps, cancel=context.shutdown.threads))
            except MediaError as error:
                if not delivery.same_version(path, source.size, source.mtime_ns):
                    self.replaced(job, source)
                    return
                # PyAV names the file by the inbox path it is about to leave: name it as the record does
                reason = error.reason.replace(str(path), source.relpath)
                raise Permanent("media", reason, error.hint) from error
            if not delivery.same_version(path, source.size, source.mtime_ns):  # changed while read: a mix
                context.audio_path(job.job_id).unlink(missing_ok=True)
                self.replaced(job, source)
                return
        context.ledger.update_job(
            job.job_id, stage="extracted", duration=extracted.duration, audio_size=extracted.bytes_out,
            audio_sha256=extracted.sha256, timings={**job.timings, "extract_s": round(extracted.seconds, 3)},
            attempts=0, last_error=None,
        )
        context.log.info(
            "stage.extract", job_id=job.job_id, path=source.relpath, bytes_in=extracted.bytes_in,
            bytes_out=extracted.bytes_out, duration_s=round(extracted.duration, 3), seconds=round(extracted.seconds, 3),
            speed=round(extracted.duration / extracted.seconds, 1) if extracted.seconds else None,
            codec=extracted.source_codec, container=extracted.source_container, prefetched=prefetched,
        )

    def replaced(self, job: Job, source: Source) -> None:
        """The inbox file is no longer the version this job hashed: drop this source (the watcher
        takes the new version as a job of its own); a job left with no source is deleted next step."""
        self.context.ledger.update_source(source.id, state="replaced", last_error="the file changed after it was taken")
        self.context.log.info("intake.changed", path=source.relpath, job_id=job.job_id,
                              reason="the file was replaced or rewritten after it was taken; the new version is taken on its own")

    # transcribe

    def _progress_callback(self, job_id: str) -> Callable[[float, float], None]:
        """A progress report for the engine or the runner: the ledger's `progress`, once a second."""
        context = self.context
        path = context.path_of(job_id)
        loop = asyncio.get_running_loop()
        every = float(context.config.logging.progress_seconds)
        logged = [time.monotonic()]  # a transcription shorter than `every` logs no progress

        def report(done: float, duration: float) -> None:
            moment = time.monotonic()
            if moment - context.last_progress.get(job_id, 0.0) < PROGRESS_EVERY_S and done < duration:
                return
            context.last_progress[job_id] = moment
            progress = {"transcribe": round(done / duration, 3) if duration else 1.0, "done_s": round(done, 1),
                        "duration_s": round(duration, 1)}
            loop.call_soon_threadsafe(functools.partial(context.ledger.update_job, job_id, progress=progress))
            if moment - logged[0] >= every and done < duration:  # now and then, for a person watching the log
                logged[0] = moment
                loop.call_soon_threadsafe(functools.partial(
                    context.log.info, "job.progress", job_id=job_id, path=path, percent=round(100 * progress["transcribe"], 1),
                    done_s=progress["done_s"], duration_s=progress["duration_s"]))

        return report

    def _mark(self, job_id: str) -> Callable[..., None]:
        """`mark(**fields)`: progress within a remote step (upload fraction, Slurm queue) to the ledger."""
        def mark(**fields: Any) -> None:
            self.context.ledger.update_job(job_id, **fields)

        return mark

    async def transcribe(self, job: Job, now: float) -> None:
        """One step on the job's route: extracted -> transcribed (local), or the next remote step
        (extracted -> uploaded -> submitted -> ready -> transcribed), each committed as it ends. A
        transcript is cached in state/results before its commit. Raises Permanent("audio") for audio
        the engine cannot decode."""
        context = self.context
        cached = context.result_path(job.job_id)
        if cached.exists():  # transcribed before a crash, ledger not yet updated: never transcribe twice
            await self._recover_cached(job, cached, now)
            return
        audio = context.audio_path(job.job_id)
        if not audio.exists():
            context.log.warning("job.audio_missing", job_id=job.job_id, action="extracting again")
            context.ledger.update_job(job.job_id, stage="new")
            return
        work = Work.of(job, audio)
        try:
            routed = await context.router.step(
                work, shutdown=context.shutdown, progress=self._progress_callback(job.job_id),
                mark=self._mark(job.job_id))
        except EngineError as error:
            if error.kind == "audio":
                raise Permanent("audio", str(error), "the audio could not be decoded; check the source file") from error
            raise
        finally:
            context.last_progress.pop(job.job_id, None)
        if isinstance(routed, Work):  # one remote step ended (or a hand-back from the CPU): commit its stage
            if routed != work:
                handed_back = len(routed.handbacks) > len(work.handbacks)
                context.ledger.update_job(job.job_id, stage=routed.stage, host=routed.host, transfer=routed.transfer,
                                          timings=routed.timings, attempts=0, last_error=None,
                                          fallback_reason=routed.fallback_reason, handbacks=routed.handbacks or None,
                                          **({"progress": None} if handed_back else {}))
                if handed_back:
                    entry = routed.handbacks[-1]
                    context.log.info("route.handback", job_id=job.job_id, path=context.path_of(job.job_id),
                                     host=entry["host"], local_s=entry["local_s"], done_s=entry["done_s"],
                                     duration_s=entry["duration_s"], local_remaining_s=entry["local_remaining_s"],
                                     estimate_s=entry["estimate_s"], returned_to=results.returned_to([entry]),
                                     fallback_reason=routed.fallback_reason)
            return
        result = results.transcribed(
            routed.result, job_id=job.job_id, route=routed.route, host=routed.host,
            fallback_reason=routed.fallback_reason, timings={**_figures(job.timings), **routed.timings},
            transfer={**job.transfer, **routed.transfer}, handbacks=routed.handbacks,
        )
        await asyncio.get_running_loop().run_in_executor(context.io, write_atomic, cached, _json_bytes(result))
        await self._commit_transcribed(job, result, now)

    async def _recover_cached(self, job: Job, cached: Path, now: float) -> None:
        """A crash hit between caching a Result and committing it: finish the commit from the cache."""
        result = await asyncio.get_running_loop().run_in_executor(self.context.io, _read_json, cached)
        await self._commit_transcribed(job, result, now, recovered=True)

    async def _commit_transcribed(self, job: Job, result: dict, now: float, recovered: bool = False) -> None:
        """After the Result is cached here: remove the job's remote files, commit the stage with the
        route and figures, and log `stage.transcribe`. Everything comes from the cached Result, so a
        restart finishes this exactly as the first run would have."""
        context = self.context
        executed = result.get("executed_on") or {}
        route, host = executed.get("route"), executed.get("host")
        timings, transfer = result.get("timings") or job.timings, result.get("transfer") or job.transfer
        if route == "remote" and context.router.remote is not None:
            await context.router.remote.cleanup(host, job.job_id)  # the Result is safe here now
        context.ledger.update_job(
            job.job_id, stage="transcribed", route=route, host=host,
            fallback_reason=result.get("fallback_reason"), model=result.get("model"), timings=timings,
            transfer=transfer, attempts=0, last_error=None, progress=None, handbacks=result.get("handbacks") or None,
        )
        partial = checkpoints.path_of(context.partial_dir, job.job_id)
        try:  # the Result is safe in the cache now: the finished part is no longer needed
            await asyncio.get_running_loop().run_in_executor(context.io, checkpoints.remove, partial)
        except OSError as error:  # the start-up sweep removes it later; the job goes on
            context.log.warning("transcribe.checkpoint_failed", job_id=job.job_id, file=str(partial), error=str(error))
        seconds = timings.get("transcribe_s") or 0.0
        duration = result.get("duration") or job.duration or 0.0
        warning = result.get("language_warning")  # an English-only model on other speech: say so
        (context.log.warning if warning else context.log.info)(
            "stage.transcribe", job_id=job.job_id, path=context.path_of(job.job_id), route=route, host=host, device=executed.get("device"),
            model=result.get("model"), duration_s=duration, seconds=seconds,
            rtf=round(seconds / duration, 4) if duration else None, fallback_reason=result.get("fallback_reason"),
            language=result.get("language"), bytes=transfer.get("bytes"), recovered=recovered,
            language_warning=warning, returned_to=result.get("returned_to"),
        )

    # deliver

    async def deliver(self, job: Job, now: float) -> None:
        """transcribed (or done, failed) -> done: outputs for every pending source of the job, each
        source then leaving the inbox; a failed job's sources go to failed/ instead."""
        context = self.context
        loop = asyncio.get_running_loop()
        if job.stage == "failed":
            for source in context.ledger.sources_of(job.job_id):
                if uploads.is_upload(source.relpath):  # an API upload: its request gets the error
                    await loop.run_in_executor(context.io, uploads.remove, context.config.path("state_dir"),
                                               source.relpath)
                    kind, _, message = (job.last_error or "error: unknown").partition(": ")
                    context.ledger.update_source(source.id, state="failed", last_error=message)
                    context.log.error("job.failed", job_id=job.job_id, path=source.relpath, kind=kind, error=message,
                                      hint=job.hint)
                    if context.hooks is not None:
                        context.hooks.failed(job, source, {"kind": kind, "error": message, "what_to_do": job.hint},
                                             None)
                    continue
                record, moved = await loop.run_in_executor(context.io, delivery.fail_source, context.config, job, source)
                context.ledger.update_source(source.id, state="failed", last_error=record["error"])
                context.log.error("job.failed", job_id=job.job_id, path=source.relpath, kind=record["kind"],
                                  error=record["error"], hint=record["what_to_do"], moved_to=str(moved))
                if context.hooks is not None:
                    context.hooks.failed(job, source, record, moved)
            return
        cached = context.result_path(job.job_id)
        if not cached.exists():
            context.log.warning("job.result_missing", job_id=job.job_id, action="transcribing again")
            stage = "new" if not context.audio_path(job.job_id).exists() else "extracted"
            context.ledger.update_job(job.job_id, stage=stage, handbacks=None)
            return
        result = await loop.run_in_executor(context.io, _read_json, cached)
        for source in context.ledger.sources_of(job.job_id):
            started = time.monotonic()
            if uploads.is_upload(source.relpath):  # an API upload: outbox/api/ unless it said no, then removed
                done = await loop.run_in_executor(context.io, uploads.deliver, context.config, job, source, result)
                context.ledger.update_source(source.id, state="done", outputs={"base": done.base})
                context.log.info("stage.outbox", job_id=job.job_id, path=source.relpath,
                                 output=done.base + ".json" if done.base else None, already_written=done.already,
                                 seconds=round(time.monotonic() - started, 3))
                context.log.info("job.done", job_id=job.job_id, path=source.relpath, route=job.route, host=job.host,
                                 duration_s=job.duration, fallback_reason=job.fallback_reason, api=True)
                if context.hooks is not None:
                    context.hooks.done(job, source, done, done.language)
                continue
            profile = profiles.match(context.config, source.relpath)  # each source its own profile's outputs
            formats = list(profiles.formats_of(context.config, profile))
            named = {**result, "profile": profile["name"] if profile else result.get("profile")}
            done = await loop.run_in_executor(
                context.io, delivery.deliver_source, context.config, job, source, named, formats)
            if done.replaced:
                self.replaced(job, source)
                continue
            self._delivered(job, source, done, time.monotonic() - started, formats)
        if job.stage != "done":
            context.ledger.update_job(job.job_id, stage="done")
            self._keep_or_remove_audio(job.job_id)

    def _keep_or_remove_audio(self, job_id: str) -> None:
        """A done job's extracted audio: moved where the page plays it from, or removed."""
        context = self.context
        audio = context.audio_path(job_id)
        if context.keeps_audio and audio.exists():
            kept = context.kept_audio_path(job_id)
            try:
                kept.parent.mkdir(exist_ok=True)
                os.replace(audio, kept)
                os.utime(kept)  # kept for api.keep_audio_hours from now, not from its extraction
                return
            except OSError as error:  # the page then has no audio for it; the job is done all the same
                context.log.warning("audio.not_kept", job_id=job_id, error=str(error))
        audio.unlink(missing_ok=True)

    def _delivered(self, job: Job, source: Source, done: delivery.Delivered, seconds: float,
                   formats: list[str]) -> None:
        """Record one delivered source and log `stage.outbox` and `job.done`."""
        context = self.context
        context.ledger.update_source(source.id, state="done", outputs={"base": done.base})
        timings = done.timings or {}
        context.log.info(
            "stage.outbox", job_id=job.job_id, path=source.relpath, output=done.base + ".json",
            formats=formats, already_written=done.already, after_success=context.config.after_success,
            seconds=round(seconds, 3),
        )
        context.log.info(
            "job.done", job_id=job.job_id, path=source.relpath, route=job.route, host=job.host,
            duration_s=job.duration, total_s=timings.get("total_s"), fallback_reason=job.fallback_reason,
            bytes_source=source.size, bytes_sent=0 if done.cached_from else (job.transfer or {}).get("bytes", 0),
            timings=timings, cached_from=done.cached_from,
        )
        for other in done.kept:  # library mode never overwrites: someone else's subtitle stays
            context.log.warning("library.exists", job_id=job.job_id, path=source.relpath, output=other,
                                action="left alone; this format was not written beside the source")
        if context.hooks is not None:
            context.hooks.done(job, source, done, done.language)


def _figures(timings: dict) -> dict:
    """A job's timings without the remote steps' own bookkeeping (`submitted_at`, a time stamp)."""
    return {key: value for key, value in timings.items() if key != "submitted_at"}


def _json_bytes(document: dict) -> bytes:
    return json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
