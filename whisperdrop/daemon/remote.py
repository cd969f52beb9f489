"""The remote route: GPU hosts over SSH, chosen by health and load, with a fallback reason when none serves.

For one job: choose a host (fresh runner heartbeat, shortest queue), upload the audio (resumable),
submit the job document, wait for the result while surfacing the runner's progress, fetch it. Each
step is recorded in the ledger (`mark`), so a restart resumes an upload or goes back to waiting.
A host that fails is marked down with a doubling back-off and probed again later.

`transcribe` never raises for a host's failure: it returns an `Outcome` whose `reason` says why no
host served the job, and the router falls back to the local engine (provider `auto`) or waits
(provider `remote`).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from whisperdrop import log
from whisperdrop.daemon.health import HostState, RunnerWatch, load
from whisperdrop.daemon.route import Routed
from whisperdrop.daemon.transfer import Host, HostError
from whisperdrop.engine import Cancelled
from whisperdrop.spool import ProtocolError, TranscribeOptions, make_job_document

HEALTH_CACHE_S = 3.0
POLL_MAX_S = 5.0
RUNNING_POLL_S = 0.25
MAX_CHECKSUM_RETRIES = 3


@dataclass(frozen=True)
class Outcome:
    """`routed` when a host served the job; otherwise `reason` says why none did."""

    routed: Routed | None
    reason: str | None = None


class HostUnusable(Exception):
    """A host cannot take this job now; the message is the fallback reason."""


class RemotePool:
    """All configured GPU hosts; `transcribe(job, ...)` runs one job remotely or says why not."""

    def __init__(self, config: Any, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        """`clock` (wall) stamps back-offs and the health snapshot; `monotonic` judges runner heartbeats."""
        remote = config.remote
        self.provider = config.transcription.provider
        self.settings = remote
        self.clock = clock
        self.monotonic = monotonic
        self.states = [
            HostState(Host(dict(host), connect_timeout=remote.connect_timeout, keepalive_interval=remote.keepalive_interval),
                      RunnerWatch(remote.heartbeat_max_age))
            for host in remote.hosts
        ]
        self.uploads = asyncio.Semaphore(remote.parallel_uploads)
        self.health_file = Path(config.state_dir) / "hosts.json"
        self.log = log.get("remote")

    def state(self, name: str | None) -> HostState | None:
        return next((state for state in self.states if state.name == name), None)

    # health

    def _mark_down(self, state: HostState, error: BaseException | str) -> None:
        state.failures += 1
        delay = min(self.settings.retry_max_seconds, self.settings.retry_initial_seconds * 2 ** (state.failures - 1))
        state.down_until = self.clock() + delay
        state.last_error = str(error)
        self.log.warning("host.down", host=state.name, error=str(error), retry_in_s=delay, failures=state.failures,
                         hint=getattr(error, "hint", None))
        self._write_health()

    def _mark_up(self, state: HostState) -> None:
        if state.failures or state.last_error:
            self.log.info("host.up", host=state.name, after_failures=state.failures)
        state.failures = 0
        state.down_until = 0.0
        state.last_error = None

    async def _check(self, state: HostState, cancel: threading.Event | None = None) -> None:
        """Connect (if needed) and read the runner heartbeats. Raises HostError, or HostUnusable
        when no runner is alive there (see health.RunnerWatch: the daemon's clock decides)."""
        now = self.clock()
        if now - state.checked_at < HEALTH_CACHE_S and state.runners:
            return
        await state.host.connect()
        if not state.spool_ready:
            await state.host.ensure_spool()
            state.spool_ready = True
        state.watch.observe(await state.host.heartbeats(), self.monotonic(), self.clock())
        wait = state.watch.confirm_wait(self.monotonic())
        if wait:  # heartbeats seen once, with a clock that disagrees with ours: a second read tells
            await _sleep_unless(cancel, wait)
            state.watch.observe(await state.host.heartbeats(), self.monotonic(), self.clock())
        state.checked_at = self.clock()
        state.runners = state.watch.fresh(self.monotonic())
        self._write_health()
        if not state.runners:
            raise HostUnusable(f"{state.name}: {state.watch.why_none(self.monotonic())}; "
                               "start `whisperdrop runner` there")

    def _load(self, state: HostState) -> float:
        """Lower is better (health.load): the host's queue and this daemon's jobs there over its speed."""
        return load(state.runners, state.in_flight)

    async def _healthy_hosts(self, cancel: threading.Event | None = None) -> tuple[list[HostState], list[str]]:
        reasons, healthy = [], []
        for state in self.states:
            if state.down_until > self.clock():
                reasons.append(f"{state.name}: down ({state.last_error}); next try in "
                               f"{state.down_until - self.clock():.0f} s")
                continue
            try:
                await self._check(state, cancel)
            except (HostError, HostUnusable) as error:
                self._mark_down(state, error)
                reasons.append(str(error))
                continue
            self._mark_up(state)
            healthy.append(state)
        healthy.sort(key=self._load)
        return healthy, reasons

    def _write_health(self) -> None:
        """Snapshot of every host's health for `whisperdrop status` (read by another process)."""
        snapshot = {
            "updated_at": self.clock(),
            "hosts": [
                {"name": state.name, "up": state.down_until <= self.clock() and state.last_error is None,
                 "failures": state.failures, "last_error": state.last_error, "down_until": state.down_until,
                 "in_flight": state.in_flight, "runners": state.runners}
                for state in self.states
            ],
        }
        temporary = self.health_file.with_name(self.health_file.name + ".tmp")
        try:
            temporary.write_text(json.dumps(snapshot, default=str))
            os.replace(temporary, self.health_file)
        except OSError as error:  # a status snapshot must never break a job; say so and go on
            self.log.warning("host.health_snapshot_failed", error=str(error))

    # one job

    async def transcribe(
        self,
        job: Any,
        audio: Path,
        options: TranscribeOptions,
        *,
        cancel: threading.Event,
        progress: Callable[[float, float], None] | None = None,
        mark: Callable[..., None] | None = None,
    ) -> Outcome:
        """Run `job` on a GPU host; return its Routed result, or the reason no host served it."""
        mark = mark or (lambda *args, **kwargs: None)
        below = self.settings.local_below_seconds
        if self.provider == "auto" and below and (job.duration or 0) < below:
            return Outcome(None, f"short audio: {job.duration:.1f} s is below remote.local_below_seconds ({below:g} s)")
        transfer = dict(job.transfer or {})
        timings = dict(job.timings or {})
        waited_since = self.clock()
        while True:
            if cancel.is_set():
                raise Cancelled()
            resumed = self.state(job.host) if job.stage in ("uploaded", "submitted") else None
            if resumed is None and job.stage in ("uploaded", "submitted"):
                job.stage = "extracted"  # its host is no longer configured: start over elsewhere
            # A job already on a host stays with it: `_wait` keeps polling it until remote.job_timeout.
            candidates, reasons = ([resumed], []) if resumed else await self._healthy_hosts(cancel)
            held = False
            for state in candidates:
                try:
                    routed = await self._run_on(state, job, audio, options, cancel, progress, mark, transfer, timings)
                    return Outcome(routed)
                except (HostError, HostUnusable, ProtocolError) as error:
                    if isinstance(error, HostError):
                        self._mark_down(state, error)
                    reasons.append(f"{state.name}: {error}")
                    if isinstance(error, HostError) and error.transient and job.stage == "submitted":
                        # The job is queued or done on that host: wait for it there (until
                        # remote.job_timeout, which `_wait` enforces) instead of resending and
                        # resubmitting it, or falling back while the runner still does it.
                        job.host = state.name
                        held = True
                        break
                    job.stage = "extracted"  # the next host starts from the upload
                    job.transfer = transfer
            if held:
                self.log.warning("route.waiting_for_host", job_id=job.job_id, reason="; ".join(reasons),
                                 retry_in_s=self.settings.retry_initial_seconds,
                                 waited_s=round(self.clock() - waited_since, 1))
                await _sleep_unless(cancel, self.settings.retry_initial_seconds)
                continue
            reason = "; ".join(reasons) or "no GPU host is configured"
            if self.provider != "remote":
                self.log.warning("route.fallback", job_id=job.job_id, reason=reason)
                return Outcome(None, reason)
            wait = min(self.settings.retry_max_seconds, max(1.0, min(
                (state.down_until for state in self.states), default=self.clock() + 5) - self.clock()))
            self.log.warning("route.waiting_for_host", job_id=job.job_id, reason=reason, retry_in_s=round(wait, 1),
                             waited_s=round(self.clock() - waited_since, 1))
            await _sleep_unless(cancel, wait)

    async def _run_on(self, state: HostState, job: Any, audio: Path, options: TranscribeOptions,
                      cancel: threading.Event, progress, mark, transfer: dict, timings: dict) -> Routed:
        host = state.host
        state.in_flight += 1
        try:
            checksum_retries = 0
            while True:
                if job.stage not in ("uploaded", "submitted"):
                    async with self.uploads:
                        started = time.monotonic()
                        written_before = host.bytes_written
                        try:
                            stats = await host.upload(job.job_id, audio, size=job.audio_size,
                                                      sha256=job.audio_sha256, progress=_upload_progress(mark))
                        finally:  # bytes sent count over all attempts, the cut ones included
                            transfer["bytes"] = transfer.get("bytes", 0) + host.bytes_written - written_before
                    transfer["audio_bytes"] = stats.audio_bytes
                    transfer.setdefault("resumed_from", 0)
                    if stats.bytes_sent:  # a skipped upload (the audio was there whole) resumed nothing
                        transfer["resumed_from"] = max(transfer["resumed_from"], stats.resumed_from)
                    timings["upload_s"] = round(timings.get("upload_s", 0) + time.monotonic() - started, 3)
                    mark("uploaded", host=state.name, transfer=transfer, timings=timings)
                    self.log.info("stage.upload", job_id=job.job_id, host=state.name, bytes=stats.bytes_sent,
                                  audio_bytes=stats.audio_bytes, resumed_from=stats.resumed_from,
                                  seconds=round(stats.seconds, 3),
                                  mbit_s=round(stats.bytes_sent * 8 / stats.seconds / 1e6, 1) if stats.seconds else None)
                    job.stage = "uploaded"
                if job.stage == "uploaded":
                    document = make_job_document(job.job_id, options, job.audio_size, job.audio_sha256,
                                                 job.duration or 0.0, "audio.opus", self.clock())
                    await host.submit(document)
                    timings["submitted_at"] = self.clock()
                    mark("submitted", host=state.name, timings=timings)
                    job.stage = "submitted"
                outcome = await self._wait(state, job, cancel, progress, timings)
                if outcome == "checksum":
                    checksum_retries += 1
                    if checksum_retries > MAX_CHECKSUM_RETRIES:
                        raise HostUnusable(f"the audio arrived damaged {checksum_retries} times")
                    self.log.warning("stage.checksum_mismatch", job_id=job.job_id, host=state.name,
                                     action="uploading again from zero")
                    await host.cleanup(job.job_id)
                    job.stage = "extracted"
                    mark("extracted", timings=timings, transfer=transfer)
                    continue
                break
            fetch_started = time.monotonic()
            result_path = Path(audio).with_suffix(".remote.json")
            result = await host.fetch_result(job.job_id, result_path)
            result_path.unlink(missing_ok=True)
            timings["fetch_s"] = round(time.monotonic() - fetch_started, 3)
            runner_timings = result.get("timings", {})
            for key in ("queue_s", "transcribe_s", "load_s"):
                if key in runner_timings:
                    timings[key] = runner_timings[key]
            self._mark_up(state)
            return Routed(
                result=result, route="remote", host=state.name,
                timings={key: value for key, value in timings.items() if key != "submitted_at"},
                transfer=transfer,
            )
        finally:
            state.in_flight -= 1

    async def _wait(self, state: HostState, job: Any, cancel: threading.Event, progress, timings: dict) -> str:
        """Poll the job's state with back-off until done; "checksum" when the runner found bad audio.

        Raises HostUnusable when the job failed there, when the host's runners stopped or went
        silent (re-checked every HEALTH_CACHE_S; the job is removed there), or when `job_timeout`
        passed (a late result is cleaned up then); HostError when the host cannot be reached at all.
        """
        host = state.host
        submitted = timings.get("submitted_at", self.clock())
        interval = self.settings.poll_interval
        while True:
            if cancel.is_set():
                raise Cancelled()
            if self.clock() - submitted > self.settings.job_timeout:
                await self._abandon(state, job.job_id)
                raise HostUnusable(f"no result within remote.job_timeout ({self.settings.job_timeout:g} s)")
            try:
                status, document = await host.state(job.job_id)
            except HostError as error:
                if not error.transient:
                    raise
                self.log.warning("remote.poll_failed", job_id=job.job_id, host=state.name, error=str(error))
                await _sleep_unless(cancel, min(POLL_MAX_S, interval * 4))
                continue
            if status == "done":
                return "done"
            if status == "failed":
                document = document or {}
                if document.get("kind") == "checksum":
                    return "checksum"
                await host.cleanup(job.job_id)
                raise HostUnusable(f"the runner failed the job ({document.get('kind')}: {document.get('message')})")
            if status == "missing":
                raise HostUnusable("the job vanished from the spool (expired or removed)")
            gone = await self._runners_gone(state, cancel)
            if gone is not None:  # stopped or silent: the job would wait there until job_timeout
                await self._abandon(state, job.job_id)
                self._mark_down(state, f"{state.name}: {gone}")
                raise HostUnusable(f"{gone} while the job waited there")
            if status == "running" and document and progress is not None:
                done, duration = document.get("done_s"), document.get("duration_s")
                if isinstance(done, (int, float)) and isinstance(duration, (int, float)):
                    progress(float(done), float(duration))
            if status == "running":
                # The runner is on it: poll briskly so the result is fetched within a fraction of a
                # second of its publication (a backed-off 5 s poll cost ~2.5 s per job on average).
                await _sleep_unless(cancel, min(interval, RUNNING_POLL_S))
            else:
                await _sleep_unless(cancel, interval)
                interval = min(POLL_MAX_S, interval * 1.5)

    async def _runners_gone(self, state: HostState, cancel: threading.Event) -> str | None:
        """None while the host has a live runner (re-read every HEALTH_CACHE_S); otherwise why not.
        A host that cannot be reached now is not judged here: the poll's own errors decide that."""
        try:
            await self._check(state, cancel)
        except HostUnusable:
            return state.watch.why_none(self.monotonic())
        except HostError as error:
            if not error.transient:
                raise
        return None

    async def _abandon(self, state: HostState, job_id: str) -> None:
        """Give up on a remote job: remove its files now if the host answers (a late result is discarded)."""
        try:
            await asyncio.wait_for(state.host.cleanup(job_id), timeout=self.settings.connect_timeout)
            self.log.info("remote.abandoned", job_id=job_id, host=state.name, cleaned=True)
        except (HostError, asyncio.TimeoutError) as error:
            self.log.warning("remote.abandoned", job_id=job_id, host=state.name, cleaned=False, error=str(error),
                             note="the runner expires leftovers after runner.expire_days")

    async def cleanup(self, host_name: str | None, job_id: str) -> None:
        """Remove a finished job's remote files (after its Result is safely stored here)."""
        state = self.state(host_name)
        if state is None:
            return
        try:
            await state.host.cleanup(job_id)
        except HostError as error:
            self.log.warning("remote.cleanup_failed", job_id=job_id, host=host_name, error=str(error),
                             note="the runner expires leftovers after runner.expire_days")

    async def close(self) -> None:
        for state in self.states:
            try:
                await state.host.close()
            except HostError:
                pass


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


async def _sleep_unless(cancel: threading.Event | None, seconds: float) -> None:
    """Sleep up to `seconds`, waking early (raising Cancelled) when `cancel` is set."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
