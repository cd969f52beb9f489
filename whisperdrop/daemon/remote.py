"""The remote route: GPU hosts over SSH, chosen by health and load, with a fallback reason when none serves.

A job's remote work is four rows of the daemon's stage table (remote_steps: upload, submit, await
the result, fetch), and `step(work)` runs the one its stage names. The first, `place`, checks the
hosts (a live runner, see health.RunnerWatch), chooses where to go (health.candidates, pure: the
healthy hosts by load) and uploads there. A job already on a host stays with it; a host that fails
is marked down with a doubling back-off and probed again later, and the job is placed again.

`step` never raises for a host's failure: when no host serves the job it returns an `Outcome` whose
`reason` says why, and the router falls back to the local engine (provider `auto`) or the job
waits (provider `remote`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from whisperdrop.daemon.connection import HostError
from whisperdrop.daemon.health import (HostState, RunnerWatch, backoff, candidates, live_runners, load,
                                       when_none_served)
from whisperdrop.daemon.remote_steps import HostUnusable, JobOnHost, sleep_unless
from whisperdrop.daemon.route import REMOTE_STAGES, Mark, Progress, Routed, Work
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.daemon.transfer import Host
from whisperdrop.engine.engine import Cancelled
from whisperdrop.shared import log
from whisperdrop.shared.files import write_atomic
from whisperdrop.shared.spool import ProtocolError

HEALTH_CACHE_S = 3.0


@dataclass(frozen=True)
class Outcome:
    """`routed` when a host served the job; otherwise `reason` says why none did."""

    routed: Routed | None
    reason: str | None = None


class RemotePool:
    """All configured GPU hosts; `step(work, ...)` runs a job's next remote step, or says why no host serves it."""

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

    def mark_down(self, state: HostState, error: BaseException | str) -> None:
        """Count a failure of the host: it is not tried again for a doubling back-off."""
        state.failures += 1
        delay = backoff(state.failures, self.settings.retry_initial_seconds, self.settings.retry_max_seconds)
        state.down_until = self.clock() + delay
        state.last_error = str(error)
        self.log.warning("host.down", host=state.name, error=str(error), retry_in_s=delay, failures=state.failures,
                         hint=getattr(error, "hint", None))
        self._write_health()

    def mark_up(self, state: HostState) -> None:
        """The host served: forget its failures."""
        if state.failures or state.last_error:
            self.log.info("host.up", host=state.name, after_failures=state.failures)
        state.failures = 0
        state.down_until = 0.0
        state.last_error = None

    async def _check(self, state: HostState, cancel: Shutdown | None = None) -> None:
        """Connect (if needed) and read the runner heartbeats. Raises HostError, or HostUnusable
        when no runner is alive there (see health.RunnerWatch: the daemon's clock decides)."""
        now = self.clock()
        if now - state.checked_at < HEALTH_CACHE_S and state.runners:
            return
        await state.host.connect()
        if not state.spool_ready:
            await state.host.ensure_spool()
            state.spool_ready = True
        state.runners = await live_runners(state.watch, state.host.heartbeats, monotonic=self.monotonic,
                                           clock=self.clock, sleep=lambda seconds: sleep_unless(cancel, seconds))
        state.checked_at = self.clock()
        self._write_health()
        if not state.runners:
            raise HostUnusable(f"{state.name}: {state.watch.why_none(self.monotonic())}; "
                               "start `whisperdrop runner` there")

    async def _healthy_hosts(self, cancel: Shutdown | None = None,
                             skip: str | None = None) -> tuple[list[HostState], list[str]]:
        """Check every host not in back-off (but `skip`); (the healthy ones, why each other one is not)."""
        reasons, healthy = [], []
        for state in self.states:
            if state.name == skip:
                continue
            if state.down_until > self.clock():
                reasons.append(f"{state.name}: down ({state.last_error}); next try in "
                               f"{state.down_until - self.clock():.0f} s")
                continue
            try:
                await self._check(state, cancel)
            except (HostError, HostUnusable) as error:
                self.mark_down(state, error)
                reasons.append(str(error))
                continue
            self.mark_up(state)
            healthy.append(state)
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
        try:  # a snapshot for another process to read whole, not a record to survive a power cut
            write_atomic(self.health_file, json.dumps(snapshot, default=str).encode(), durable=False)
        except OSError as error:  # a status snapshot must never break a job; say so and go on
            self.log.warning("host.health_snapshot_failed", error=str(error))

    # one job, one step at a time

    async def step(self, work: Work, *, cancel: Shutdown, progress: Progress | None = None,
                   mark: Mark | None = None) -> Work | Routed | Outcome:
        """Run the next remote step of `work` (see remote_steps): `extracted` is placed on a host
        and uploaded, `uploaded` submitted, `submitted` awaited, `ready` fetched. Returns the job's
        next Work, its Routed result after the fetch, or an Outcome saying why no host serves it.

        A job already on a host stays there: a host that cannot be reached while the job waits there
        is waited for (the step returns `work` unchanged after remote.retry_initial_seconds); any
        other failure of its host places the job again, on another host or nowhere (the Outcome).
        Raises Cancelled when a stop is requested on `cancel`."""
        mark = mark or (lambda **fields: None)
        if cancel.is_set():
            raise Cancelled()
        state = self.state(work.host) if work.stage in REMOTE_STAGES else None
        if state is None:  # nothing sent yet, or its host is no longer configured
            return await self.place(replace(work, stage="extracted"), cancel=cancel, progress=progress, mark=mark)
        on_host = JobOnHost(self, state, work, cancel=cancel, progress=progress, mark=mark)
        try:
            if work.stage == "uploaded":
                return await on_host.submit()
            if work.stage == "submitted":
                return await on_host.await_result()
            return await on_host.fetch()
        except (HostError, HostUnusable, ProtocolError) as error:
            if isinstance(error, HostError):
                self.mark_down(state, error)
                if error.transient and work.stage in ("submitted", "ready"):
                    # The job is queued or done on that host: wait for it there (until
                    # remote.job_timeout, which `await_result` enforces) instead of resending and
                    # resubmitting it, or falling back while the runner still does it.
                    submitted = work.timings.get("submitted_at")
                    self.log.warning("route.waiting_for_host", job_id=work.job_id, reason=f"{state.name}: {error}",
                                     retry_in_s=self.settings.retry_initial_seconds,
                                     waited_s=None if submitted is None else round(self.clock() - submitted, 1))
                    await sleep_unless(cancel, self.settings.retry_initial_seconds)
                    return work
            on_host.leave()
            return await self.place(replace(work, stage="extracted", host=None), cancel=cancel, progress=progress,
                                    mark=mark, failed=(state.name, f"{state.name}: {error}"))

    async def place(self, work: Work, *, cancel: Shutdown, progress: Progress | None, mark: Mark,
                    failed: tuple[str, str] | None = None) -> Work | Outcome:
        """extracted -> uploaded: choose a host (health.candidates: healthy hosts by load, short audio
        local under `auto`) and upload there; a host that fails gives way to the next. When none
        serves: an Outcome with the reasons under `auto`, a wait and another try under `remote`.
        `failed` is (host, reason) of a host this job just failed on: not tried again at once."""
        reasons = [failed[1]] if failed else []
        skip = failed[0] if failed else None
        waited_since = self.clock()
        while True:
            if cancel.is_set():
                raise Cancelled()
            healthy, unhealthy = await self._healthy_hosts(cancel, skip=skip)
            reasons += unhealthy
            names, local_reason = candidates(
                provider=self.provider, duration=work.duration, local_below=self.settings.local_below_seconds,
                resumed=None, healthy=[(state.name, load(state.runners, state.in_flight)) for state in healthy])
            if local_reason is not None:
                return Outcome(None, local_reason)
            for state in [self.state(name) for name in names]:
                on_host = JobOnHost(self, state, work, cancel=cancel, progress=progress, mark=mark)
                try:
                    return await on_host.upload()
                except (HostError, HostUnusable, ProtocolError) as error:
                    on_host.leave()
                    if isinstance(error, HostError):
                        self.mark_down(state, error)
                    reasons.append(f"{state.name}: {error}")
                except BaseException:
                    on_host.leave()
                    raise
            next_probe = min((state.down_until for state in self.states), default=None)
            action, value = when_none_served(
                provider=self.provider, reasons=reasons, retry_max=self.settings.retry_max_seconds,
                next_probe_s=None if next_probe is None else next_probe - self.clock())
            if action == "local":
                self.log.warning("route.fallback", job_id=work.job_id, reason=value)
                return Outcome(None, value)
            self.log.warning("route.waiting_for_host", job_id=work.job_id, reason="; ".join(reasons) or
                             "no GPU host is configured", retry_in_s=round(value, 1),
                             waited_s=round(self.clock() - waited_since, 1))
            await sleep_unless(cancel, value)
            reasons, skip = [], None  # after a wait, every host is a candidate again

    async def runners_gone(self, state: HostState, cancel: Shutdown) -> str | None:
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
        """Close every host's connection."""
        for state in self.states:
            try:
                await state.host.close()
            except HostError:
                pass
