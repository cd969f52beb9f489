"""One job on one GPU host, as four steps, each one row of the daemon's stage table:

    extracted --upload--> uploaded --submit--> submitted --await result--> ready --fetch--> (Routed)

Each step does one thing over SFTP and returns the job's next `Work` (a new value: the stage it
reached, its host and figures), which the stage table commits to the ledger before the next step
runs; so a restart resumes after the last finished step: an upload resumes from the bytes already
there, a submitted job goes back to waiting, a published Result is fetched without waiting again.
The last step returns the `Routed` Result. A checksum failure found by the runner sends the job back
through the upload (at most MAX_CHECKSUM_RETRIES times).

`mark(**fields)` reports progress within a step (upload fraction, a Slurm runner's queue state) to
the ledger; it never changes a stage.

The steps run for a `Pool`: what they need of the pool of hosts (`remote.RemotePool`), which builds
a `JobOnHost` for each step; this module never imports that pool.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any, Callable, Protocol

from whisperdrop.daemon.connection import HostError
from whisperdrop.daemon.health import HostState
from whisperdrop.daemon.route import Routed, Work
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.engine.engine import Cancelled
from whisperdrop.shared.spool import make_job_document

POLL_MAX_S = 5.0
RUNNING_POLL_S = 0.25
SLURM_FIELDS = ("job_id", "state", "reason")  # what a Slurm runner's progress document says of a queued job
MAX_CHECKSUM_RETRIES = 3


class HostUnusable(Exception):
    """A host cannot take this job now; the message is the fallback reason."""


class Pool(Protocol):
    """What the steps need of the pool of hosts they run for (`remote.RemotePool`): the `remote`
    settings, a wall clock, a logger, the semaphore that bounds parallel uploads, and the hosts' health."""

    settings: Any
    clock: Callable[[], float]
    log: Any
    uploads: asyncio.Semaphore

    def mark_up(self, state: HostState) -> None: ...

    def mark_down(self, state: HostState, error: BaseException | str) -> None: ...

    async def runners_gone(self, state: HostState, cancel: Shutdown) -> str | None: ...


class JobOnHost:
    """The steps of `work` on the host `state`, for `pool` (its settings, clock, log and health).
    While a job is between its upload and its fetch, the host counts it in `state.jobs` (its load)."""

    def __init__(self, pool: Pool, state: HostState, work: Work, *, cancel: Shutdown,
                 progress: Callable[[float, float], None] | None, mark: Callable[..., None]):
        self.pool, self.state, self.work = pool, state, work
        self.cancel, self.progress, self.mark = cancel, progress, mark
        self.log = pool.log
        state.jobs.add(work.job_id)

    def leave(self) -> None:
        """The job is no longer on this host (fetched, or given up here)."""
        self.state.jobs.discard(self.work.job_id)

    async def upload(self) -> Work:
        """extracted -> uploaded: send the audio (resuming a cut upload), with the transfer figures."""
        host, work = self.state.host, self.work
        transfer, timings = dict(work.transfer), dict(work.timings)
        async with self.pool.uploads:
            started = time.monotonic()
            written_before = host.bytes_written
            try:
                stats = await host.upload(work.job_id, work.audio, size=work.audio_size, sha256=work.audio_sha256,
                                          progress=_upload_progress(self.mark))
            finally:  # bytes sent count over all attempts, the cut ones included
                transfer["bytes"] = transfer.get("bytes", 0) + host.bytes_written - written_before
        transfer["audio_bytes"] = stats.audio_bytes
        transfer.setdefault("resumed_from", 0)
        if stats.bytes_sent:  # a skipped upload (the audio was there whole) resumed nothing
            transfer["resumed_from"] = max(transfer["resumed_from"], stats.resumed_from)
        timings["upload_s"] = round(timings.get("upload_s", 0) + time.monotonic() - started, 3)
        self.log.info("stage.upload", job_id=work.job_id, host=self.state.name, bytes=stats.bytes_sent,
                      audio_bytes=stats.audio_bytes, resumed_from=stats.resumed_from, seconds=round(stats.seconds, 3),
                      mbit_s=round(stats.bytes_sent * 8 / stats.seconds / 1e6, 1) if stats.seconds else None)
        return replace(work, stage="uploaded", host=self.state.name, transfer=transfer, timings=timings)

    async def submit(self) -> Work:
        """uploaded -> submitted: write the job document (its appearance submits the job)."""
        work = self.work
        document = make_job_document(work.job_id, work.options, work.audio_size, work.audio_sha256,
                                     work.duration or 0.0, "audio.opus", self.pool.clock())
        await self.state.host.submit(document)
        self.log.info("stage.submit", job_id=work.job_id, host=self.state.name)
        return replace(work, stage="submitted", timings={**work.timings, "submitted_at": self.pool.clock()})

    async def await_result(self) -> Work:
        """submitted -> ready: poll the job's state with back-off until the runner published its Result.
        Audio the runner found damaged is uploaded again (-> uploaded).

        Raises HostUnusable when the job failed there, when the host's runners stopped or went
        silent (re-checked every hosts.HEALTH_CACHE_S; the job is removed there), or when `job_timeout`
        passed (a late result is cleaned up then); HostError when the host cannot be reached at all.
        """
        pool, state, work = self.pool, self.state, self.work
        settings = pool.settings
        submitted = work.timings.get("submitted_at", pool.clock())
        interval = settings.poll_interval
        seen_slurm = None
        while True:
            if self.cancel.is_set():
                raise Cancelled()
            if pool.clock() - submitted > settings.job_timeout:
                await self.abandon()
                raise HostUnusable(f"no result within remote.job_timeout ({settings.job_timeout:g} s)")
            try:
                status, document = await state.host.state(work.job_id)
            except HostError as error:
                if not error.transient:
                    raise
                self.log.warning("remote.poll_failed", job_id=work.job_id, host=state.name, error=str(error))
                await sleep_unless(self.cancel, min(POLL_MAX_S, interval * 4))
                continue
            if status == "done":
                return replace(work, stage="ready")
            if status == "failed":
                document = document or {}
                if document.get("kind") == "checksum":
                    return await self._upload_again()
                await state.host.cleanup(work.job_id)
                raise HostUnusable(f"the runner failed the job ({document.get('kind')}: {document.get('message')})")
            if status == "missing":
                raise HostUnusable("the job vanished from the spool (expired or removed)")
            gone = await pool.runners_gone(state, self.cancel)
            if gone is not None:  # stopped or silent: the job would wait there until job_timeout
                await self.abandon()
                pool.mark_down(state, f"{state.name}: {gone}")
                raise HostUnusable(f"{gone} while the job waited there")
            slurm = (document or {}).get("slurm") if status == "running" else None
            if isinstance(slurm, dict) and slurm != seen_slurm:  # a Slurm runner: queued or starting there
                seen_slurm = slurm
                self.mark(progress={"upload": 1.0, "slurm": {key: slurm.get(key) for key in SLURM_FIELDS}})
            if status == "running" and document and self.progress is not None:
                done, duration = document.get("done_s"), document.get("duration_s")
                if isinstance(done, (int, float)) and isinstance(duration, (int, float)):
                    self.progress(float(done), float(duration))
            if status == "running":
                # The runner is on it: poll briskly so the result is fetched within a fraction of a
                # second of its publication (a backed-off 5 s poll cost ~2.5 s per job on average).
                await sleep_unless(self.cancel, min(interval, RUNNING_POLL_S))
            else:
                await sleep_unless(self.cancel, interval)
                interval = min(POLL_MAX_S, interval * 1.5)

    async def _upload_again(self) -> Work:
        """The runner found the audio damaged: remove it there and send it again from zero."""
        work = self.work
        retries = work.transfer.get("checksum_retries", 0) + 1
        if retries > MAX_CHECKSUM_RETRIES:
            raise HostUnusable(f"the audio arrived damaged {retries} times")
        self.log.warning("stage.checksum_mismatch", job_id=work.job_id, host=self.state.name,
                         action="uploading again from zero")
        await self.state.host.cleanup(work.job_id)
        again = replace(work, stage="extracted", transfer={**work.transfer, "checksum_retries": retries})
        return await JobOnHost(self.pool, self.state, again, cancel=self.cancel, progress=self.progress,
                               mark=self.mark).upload()

    async def fetch(self) -> Routed:
        """ready -> Routed: copy the Result here, with the route's figures (the runner's queue, load
        and transcription times among them)."""
        timings = dict(self.work.timings)
        started = time.monotonic()
        result = await self.state.host.fetch_result(self.work.job_id)  # the stage caches it in state/results
        timings["fetch_s"] = round(time.monotonic() - started, 3)
        runner_timings = result.get("timings", {})
        for key in ("queue_s", "transcribe_s", "load_s"):
            if key in runner_timings:
                timings[key] = runner_timings[key]
        self.leave()
        self.pool.mark_up(self.state)
        return Routed(result=result, route="remote", host=self.state.name,
                      timings={key: value for key, value in timings.items() if key != "submitted_at"},
                      transfer=dict(self.work.transfer))

    async def abandon(self) -> None:
        """Give up on the job here: remove its files now if the host answers (a late result is discarded)."""
        state, job_id = self.state, self.work.job_id
        self.leave()
        try:
            await asyncio.wait_for(state.host.cleanup(job_id), timeout=self.pool.settings.connect_timeout)
            self.log.info("remote.abandoned", job_id=job_id, host=state.name, cleaned=True)
        except (HostError, asyncio.TimeoutError) as error:
            self.log.warning("remote.abandoned", job_id=job_id, host=state.name, cleaned=False, error=str(error),
                             note="the runner expires leftovers after runner.expire_days")


def _upload_progress(mark: Callable[..., None]) -> Callable[[int, int], None]:
    """A progress callback for Host.upload that records `progress.upload` in the ledger, once a second."""
    last = 0.0

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 1.0 or done >= total:
            last = now
            mark(progress={"upload": round(done / total, 3) if total else 1.0})

    return report


async def sleep_unless(cancel: Shutdown | None, seconds: float) -> None:
    """Sleep `seconds`, or less: a stop requested on `cancel` wakes it at once and raises Cancelled."""
    if cancel is None:
        await asyncio.sleep(seconds)
    elif await cancel.wait(seconds):
        raise Cancelled()
