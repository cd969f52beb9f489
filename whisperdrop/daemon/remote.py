"""The remote route: GPU hosts over SSH, chosen by health and load, with a fallback reason when none serves.

A job's remote work is four rows of the daemon's stage table (remote_steps: upload, submit, await
the result, fetch), and `step(work)` runs the one its stage names. The first, `place`, checks the
hosts (a live runner, see health.RunnerWatch), chooses where to go (health.candidates, pure: the
healthy hosts by load) and uploads there. A job already on a host stays with it; a host that fails
is marked down with a doubling back-off and probed again later, and the job is placed again.

The hosts' health, back-off and probes are daemon.hosts (RemotePool's base). Under provider `auto`
with `remote.hand_back`, a job about to fall back probes the hosts in back-off once (shared with
every other job, see Hosts.probe), and goes to one that answers.

`step` never raises for a host's failure: when no host serves the job it returns an `Outcome` whose
`reason` says why, and the router falls back to the local engine (provider `auto`) or the job
waits (provider `remote`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from whisperdrop.daemon.connection import HostError
from whisperdrop.daemon.health import candidates, load, when_none_served
from whisperdrop.daemon.hosts import Hosts
from whisperdrop.daemon.remote_steps import HostUnusable, JobOnHost, sleep_unless
from whisperdrop.daemon.route import REMOTE_STAGES, Mark, Progress, Routed, Work
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.engine.engine import Cancelled
from whisperdrop.shared.spool import ProtocolError


@dataclass(frozen=True)
class Outcome:
    """`routed` when a host served the job; otherwise `reason` says why none did."""

    routed: Routed | None
    reason: str | None = None
    planned: bool = False  # local by policy (short audio), not for want of a host: nothing to hand back


class RemotePool(Hosts):
    """All configured GPU hosts (see daemon.hosts: their health and probes); `step(work, ...)` runs a
    job's next remote step, or says why no host serves it."""

    def __init__(self, config: Any, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        """`clock` (wall) stamps back-offs and the health snapshot; `monotonic` judges runner heartbeats."""
        super().__init__(config, clock=clock, monotonic=monotonic)
        self.provider = config.transcription.provider
        self.uploads = asyncio.Semaphore(config.remote.parallel_uploads)

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
        def fresh() -> dict[str, str]:  # host -> why it did not serve this job
            return {failed[0]: failed[1]} if failed else {}

        reasons = fresh()
        skip = failed[0] if failed else None
        waited_since = self.clock()
        may_probe = self.provider == "auto" and self.settings.hand_back
        while True:
            if cancel.is_set():
                raise Cancelled()
            healthy, unhealthy = await self._healthy_hosts(cancel, skip=skip)
            reasons.update(unhealthy)
            names, local_reason = candidates(
                provider=self.provider, duration=work.duration, local_below=self.settings.local_below_seconds,
                resumed=None, healthy=[(state.name, load(state.runners, state.in_flight)) for state in healthy])
            if local_reason is not None:
                return Outcome(None, local_reason, planned=True)
            for state in [self.state(name) for name in names]:
                on_host = JobOnHost(self, state, work, cancel=cancel, progress=progress, mark=mark)
                try:
                    return await on_host.upload()
                except (HostError, HostUnusable, ProtocolError) as error:
                    on_host.leave()
                    if isinstance(error, HostError):
                        self.mark_down(state, error)
                    reasons[state.name] = f"{state.name}: {error}"
                except BaseException:
                    on_host.leave()
                    raise
            if may_probe:  # about to fall back: probe the hosts in back-off once (shared); go to one that is back
                may_probe = False
                in_backoff = [state for state in self.states
                              if state.name != skip and self.is_down(state) and state.down_until > self.clock()]
                if await self.probe_down(skip, cancel):
                    reasons = fresh()
                    continue
                for state in in_backoff:  # say what the probe found
                    reasons[state.name] = self._why_down(state)
            next_probe = min((state.down_until for state in self.states), default=None)
            action, value = when_none_served(
                provider=self.provider, reasons=list(reasons.values()), retry_max=self.settings.retry_max_seconds,
                next_probe_s=None if next_probe is None else next_probe - self.clock())
            if action == "local":
                self.log.warning("route.fallback", job_id=work.job_id, reason=value)
                return Outcome(None, value)
            self.log.warning("route.waiting_for_host", job_id=work.job_id, reason="; ".join(reasons.values()) or
                             "no GPU host is configured", retry_in_s=round(value, 1),
                             waited_s=round(self.clock() - waited_since, 1))
            await sleep_unless(cancel, value)
            reasons, skip = {}, None  # after a wait, every host is a candidate again

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


