"""One job on one GPU host, as four steps: upload, submit, await the result, fetch it.

Each step does one thing over SFTP and records the stage it reached with `mark(stage, **fields)`,
which the pipeline commits to the ledger, so a restart resumes after the last finished step: an
upload resumes from the bytes already there, a submitted job goes back to waiting. `JobOnHost.run`
chains them; a checksum failure found by the runner sends the job back to the upload.

`Attempt` is this module's private record of how far the job got (stage, host, figures); the
ledger's Job and the route's Work are never changed in place.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from whisperdrop.daemon.health import HostState
from whisperdrop.daemon.route import Routed, Work
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.daemon.transfer import HostError
from whisperdrop.engine import Cancelled
from whisperdrop.spool import make_job_document

if TYPE_CHECKING:
    from whisperdrop.daemon.remote import RemotePool

POLL_MAX_S = 5.0
RUNNING_POLL_S = 0.25
SLURM_FIELDS = ("job_id", "state", "reason")  # what a Slurm runner's progress document says of a queued job
MAX_CHECKSUM_RETRIES = 3


class HostUnusable(Exception):
    """A host cannot take this job now; the message is the fallback reason."""


@dataclass
class Attempt:
    """How far one job got on the GPU hosts: `stage` (extracted, uploaded, submitted), on `host`,
    with the transfer and timing figures so far. Starts from the job's Work; private to the route."""

    stage: str
    host: str | None
    transfer: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @classmethod
    def of(cls, work: Work) -> "Attempt":
        return cls(work.stage, work.host, dict(work.transfer), dict(work.timings))


class JobOnHost:
    """The steps of `work` on the host `state`, for `pool` (its settings, clock, log and health)."""

    def __init__(self, pool: "RemotePool", state: HostState, work: Work, attempt: Attempt, *,
                 cancel: Shutdown, progress: Callable[[float, float], None] | None,
                 mark: Callable[..., None]):
        self.pool, self.state, self.work, self.attempt = pool, state, work, attempt
        self.cancel, self.progress, self.mark = cancel, progress, mark
        self.log = pool.log

    async def run(self) -> Routed:
        """Upload (unless done), submit (unless done), await and fetch. Raises HostError, HostUnusable,
        ProtocolError or Cancelled; `attempt.stage` says how far it got."""
        self.state.in_flight += 1
        try:
            checksum_retries = 0
            while True:
                if self.attempt.stage not in ("uploaded", "submitted"):
                    await self.upload()
                if self.attempt.stage == "uploaded":
                    await self.submit()
                if await self.await_result() != "checksum":
                    break
                checksum_retries += 1
                if checksum_retries > MAX_CHECKSUM_RETRIES:
                    raise HostUnusable(f"the audio arrived damaged {checksum_retries} times")
                self.log.warning("stage.checksum_mismatch", job_id=self.work.job_id, host=self.state.name,
                                 action="uploading again from zero")
                await self.state.host.cleanup(self.work.job_id)
                self.attempt.stage = "extracted"
                self.mark("extracted", timings=self.attempt.timings, transfer=self.attempt.transfer)
            return await self.fetch()
        finally:
            self.state.in_flight -= 1

    async def upload(self) -> None:
        """Send the audio (resuming a cut upload), then mark `uploaded` with the transfer figures."""
        host, work, transfer, timings = self.state.host, self.work, self.attempt.transfer, self.attempt.timings
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
        self.attempt.stage, self.attempt.host = "uploaded", self.state.name
        self.mark("uploaded", host=self.state.name, transfer=transfer, timings=timings)
        self.log.info("stage.upload", job_id=work.job_id, host=self.state.name, bytes=stats.bytes_sent,
                      audio_bytes=stats.audio_bytes, resumed_from=stats.resumed_from, seconds=round(stats.seconds, 3),
                      mbit_s=round(stats.bytes_sent * 8 / stats.seconds / 1e6, 1) if stats.seconds else None)

    async def submit(self) -> None:
        """Write the job document (its appearance submits the job), then mark `submitted`."""
        work = self.work
        document = make_job_document(work.job_id, work.options, work.audio_size, work.audio_sha256,
                                     work.duration or 0.0, "audio.opus", self.pool.clock())
        await self.state.host.submit(document)
        self.attempt.timings["submitted_at"] = self.pool.clock()
        self.attempt.stage, self.attempt.host = "submitted", self.state.name
        self.mark("submitted", host=self.state.name, timings=self.attempt.timings)
        self.log.info("stage.submit", job_id=work.job_id, host=self.state.name)

    async def await_result(self) -> str:
        """Poll the job's state with back-off until done; "checksum" when the runner found bad audio.

        Raises HostUnusable when the job failed there, when the host's runners stopped or went
        silent (re-checked every HEALTH_CACHE_S; the job is removed there), or when `job_timeout`
        passed (a late result is cleaned up then); HostError when the host cannot be reached at all.
        """
        pool, state, job_id = self.pool, self.state, self.work.job_id
        settings = pool.settings
        submitted = self.attempt.timings.get("submitted_at", pool.clock())
        interval = settings.poll_interval
        seen_slurm = None
        while True:
            if self.cancel.is_set():
                raise Cancelled()
            if pool.clock() - submitted > settings.job_timeout:
                await self.abandon()
                raise HostUnusable(f"no result within remote.job_timeout ({settings.job_timeout:g} s)")
            try:
                status, document = await state.host.state(job_id)
            except HostError as error:
                if not error.transient:
                    raise
                self.log.warning("remote.poll_failed", job_id=job_id, host=state.name, error=str(error))
                await sleep_unless(self.cancel, min(POLL_MAX_S, interval * 4))
                continue
            if status == "done":
                return "done"
            if status == "failed":
                document = document or {}
                if document.get("kind") == "checksum":
                    return "checksum"
                await state.host.cleanup(job_id)
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
                self.mark(None, progress={"upload": 1.0, "slurm": {key: slurm.get(key) for key in SLURM_FIELDS}})
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

    async def fetch(self) -> Routed:
        """Copy the Result here and return it with the route's figures (the runner's queue, load and
        transcription times among them)."""
        timings = self.attempt.timings
        started = time.monotonic()
        result_path = Path(self.work.audio).with_suffix(".remote.json")
        result = await self.state.host.fetch_result(self.work.job_id, result_path)
        result_path.unlink(missing_ok=True)
        timings["fetch_s"] = round(time.monotonic() - started, 3)
        runner_timings = result.get("timings", {})
        for key in ("queue_s", "transcribe_s", "load_s"):
            if key in runner_timings:
                timings[key] = runner_timings[key]
        self.pool.mark_up(self.state)
        return Routed(result=result, route="remote", host=self.state.name,
                      timings={key: value for key, value in timings.items() if key != "submitted_at"},
                      transfer=self.attempt.transfer)

    async def abandon(self) -> None:
        """Give up on the job here: remove its files now if the host answers (a late result is discarded)."""
        state, job_id = self.state, self.work.job_id
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
            mark(None, progress={"upload": round(done / total, 3) if total else 1.0})

    return report


async def sleep_unless(cancel: Shutdown | None, seconds: float) -> None:
    """Sleep `seconds`, or less: a stop requested on `cancel` wakes it at once and raises Cancelled."""
    if cancel is None:
        await asyncio.sleep(seconds)
    elif await cancel.wait(seconds):
        raise Cancelled()
