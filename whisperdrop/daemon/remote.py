"""The remote route: GPU hosts over SSH, chosen by health and load, with a fallback reason when none serves.

A job's remote work is four rows of the daemon's stage table (remote_steps: upload, submit, await
the result, fetch), and `step(work)` runs the one its stage names. The first, `place`, checks the
hosts (a live runner, see health.RunnerWatch), chooses where to go (health.candidates, pure: the
healthy hosts by load) and uploads there. A job already on a host stays with it; a host that fails
is marked down with a doubling back-off and probed again later, and the job is placed again.

A look at a host (connect, read the heartbeats) is shared: every caller at the same time awaits the
one in flight. A host that is down is looked at through `probe`: one look at a time, at most one
per `remote.probe_interval` (every job about to fall back and every hand-back watch share it), each
caller waiting at most `remote.connect_timeout`. Under provider `auto` with `remote.hand_back`, a
job about to fall back probes the hosts in back-off once, and goes to one that answers.

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

from whisperdrop import log
from whisperdrop.daemon.health import (HostState, RunnerWatch, backoff, candidates, live_runners, load,
                                       when_none_served)
from whisperdrop.daemon.remote_steps import HostUnusable, JobOnHost, sleep_unless
from whisperdrop.daemon.route import REMOTE_STAGES, Mark, Progress, Routed, Work
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.daemon.transfer import Host, HostError
from whisperdrop.engine import Cancelled
from whisperdrop.files import write_atomic
from whisperdrop.spool import ProtocolError

HEALTH_CACHE_S = 3.0


@dataclass(frozen=True)
class Outcome:
    """`routed` when a host served the job; otherwise `reason` says why none did."""

    routed: Routed | None
    reason: str | None = None
    planned: bool = False  # local by policy (short audio), not for want of a host: nothing to hand back


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
        self.watching = 0  # jobs on the CPU as a fallback whose hand-back watch looks at the hosts

    def state(self, name: str | None) -> HostState | None:
        return next((state for state in self.states if state.name == name), None)

    # health

    def mark_down(self, state: HostState, error: BaseException | str) -> None:
        """Count a failure of the host: it is not tried again for a doubling back-off, nor probed
        within remote.probe_interval. One failure that several callers saw (a shared look) counts once."""
        if isinstance(error, BaseException):
            if error is state.last_exception:
                return
            state.last_exception = error
        state.failures += 1
        delay = backoff(state.failures, self.settings.retry_initial_seconds, self.settings.retry_max_seconds)
        state.down_until = self.clock() + delay
        state.last_error = str(error)
        state.looked_at = self.monotonic()
        self.log.warning("host.down", host=state.name, error=str(error), retry_in_s=delay, failures=state.failures,
                         hint=getattr(error, "hint", None))
        self._write_health()

    def mark_up(self, state: HostState, found_by: str | None = None) -> None:
        """The host served (or a probe, `found_by`, found it back): forget its failures."""
        if state.failures or state.last_error:
            self.log.info("host.up", host=state.name, after_failures=state.failures, found_by=found_by)
        state.failures = 0
        state.down_until = 0.0
        state.last_error = None
        state.last_exception = None

    def watch_started(self) -> None:
        """A job on the CPU as a fallback starts watching for a host (see daemon.handback)."""
        self.watching += 1
        self._write_health()

    def watch_ended(self) -> None:
        self.watching -= 1
        self._write_health()

    def is_down(self, state: HostState) -> bool:
        """Whether the host failed and has not been seen healthy since."""
        return state.last_error is not None or state.down_until > self.clock()

    async def _check(self, state: HostState, cancel: Shutdown | None = None, *, fresh: bool = False) -> None:
        """Connect (if needed) and read the runner heartbeats, unless a look less than
        HEALTH_CACHE_S ago found a live runner (`fresh`: look anyway). Callers at the same time share
        one look. Raises HostError, or HostUnusable when no runner is alive there (see
        health.RunnerWatch: the daemon's clock decides)."""
        if not fresh and self.clock() - state.checked_at < HEALTH_CACHE_S and state.runners:
            return
        if state.look is None or state.look.done():
            state.look = asyncio.get_running_loop().create_task(self._look(state, cancel), name=f"look-{state.name}")
            state.look.add_done_callback(_retrieved)
        await asyncio.shield(state.look)

    async def _look(self, state: HostState, cancel: Shutdown | None) -> None:
        """One look at the host (see `_check`); a look at a host that is down is a probe, counted
        and logged as `host.probe` with what it found."""
        probing = state.last_error is not None
        started = self.monotonic()
        try:
            await state.host.connect()
            if not state.spool_ready:
                await state.host.ensure_spool()
                state.spool_ready = True
            state.runners = await live_runners(state.watch, state.host.heartbeats, monotonic=self.monotonic,
                                               clock=self.clock, sleep=lambda seconds: sleep_unless(cancel, seconds))
            state.checked_at = self.clock()
            if not state.runners:
                raise HostUnusable(f"{state.name}: {state.watch.why_none(self.monotonic())}; "
                                   "start `whisperdrop runner` there")
        except (HostError, HostUnusable) as error:
            self._looked(state, probing, started, error)
            raise
        self._looked(state, probing, started, None)

    def _looked(self, state: HostState, probing: bool, started: float, error: BaseException | None) -> None:
        """Record a look's end; a probe is counted, and logged at info when it finds something new
        (the host back, or another error than the last probe's), else at debug: a host down for an
        hour while a fallback watches is not 720 lines of the same."""
        state.looked_at = self.monotonic()
        if probing:
            text = None if error is None else str(error)
            news = error is None or state.probe_ok is not False or text != state.probe_error
            state.probes += 1
            state.probed_at, state.probe_ok, state.probe_error = self.clock(), error is None, text
            (self.log.info if news else self.log.debug)(
                "host.probe", host=state.name, ok=error is None, seconds=round(state.looked_at - started, 3),
                error=text, watching=self.watching)
        self._write_health()

    async def probe(self, state: HostState, cancel: Shutdown | None = None) -> bool:
        """Whether a host that is down is back: one look at a time, shared by every caller; during
        its back-off (a job about to fall back, a hand-back watch) at most one per
        remote.probe_interval (within it, the last look's answer). This caller waits at most
        remote.connect_timeout (a slower look goes on and counts when it ends). True: it is back and
        marked up (`host.up`). A failed probe after the back-off ended counts as a failure (the
        back-off doubles); an earlier one only updates the error."""
        idle = state.look is None or state.look.done()
        early = state.down_until > self.clock()
        if idle and early and state.looked_at is not None \
                and self.monotonic() - state.looked_at < self.settings.probe_interval:
            return not self.is_down(state)
        try:
            await asyncio.wait_for(self._check(state, cancel, fresh=True), self.settings.connect_timeout)
        except asyncio.TimeoutError:
            return False
        except (HostError, HostUnusable) as error:
            if state.down_until <= self.clock():
                self.mark_down(state, error)
            elif error is not state.last_exception:
                state.last_exception, state.last_error = error, str(error)
                self._write_health()
            return False
        self.mark_up(state, found_by="probe")
        self._write_health()
        return True

    async def probe_down(self, skip: str | None = None, cancel: Shutdown | None = None) -> list[HostState]:
        """Probe every host that is down but `skip`, together; the ones that are back."""
        down = [state for state in self.states if state.name != skip and self.is_down(state)]
        back = await asyncio.gather(*(self.probe(state, cancel) for state in down))
        return [state for state, ok in zip(down, back) if ok]

    async def look_all(self, cancel: Shutdown | None = None) -> list[HostState]:
        """Look at every host, together: a probe for one that is down, a health check (cached
        HEALTH_CACHE_S) for one that is up. Returns the healthy ones."""
        async def one(state: HostState) -> bool:
            if self.is_down(state):
                return await self.probe(state, cancel)
            try:
                await self._check(state, cancel)
            except (HostError, HostUnusable) as error:
                self.mark_down(state, error)
                return False
            self.mark_up(state)
            return True

        healthy = await asyncio.gather(*(one(state) for state in self.states))
        return [state for state, ok in zip(self.states, healthy) if ok]

    def _why_down(self, state: HostState) -> str:
        """A down host's part of a fallback reason."""
        now = self.clock()
        text = f"{state.name}: down ({state.last_error})"
        if state.down_until > now:
            text += f"; next try in {state.down_until - now:.0f} s"
        if state.probed_at is not None and now - state.probed_at < max(self.settings.probe_interval, 60.0):
            text += f"; probed {now - state.probed_at:.0f} s ago"
        return text

    async def _healthy_hosts(self, cancel: Shutdown | None = None,
                             skip: str | None = None) -> tuple[list[HostState], dict[str, str]]:
        """Check every host not in back-off (but `skip`): a host whose back-off ended is probed
        (shared, see `probe`). Returns the healthy ones, and why each other one is not (by name)."""
        reasons, healthy = {}, []
        for state in self.states:
            if state.name == skip:
                continue
            if self.is_down(state):
                if state.down_until > self.clock() or not await self.probe(state, cancel):
                    reasons[state.name] = self._why_down(state)
                    continue
                healthy.append(state)
                continue
            try:
                await self._check(state, cancel)
            except (HostError, HostUnusable) as error:
                self.mark_down(state, error)
                reasons[state.name] = str(error)
                continue
            self.mark_up(state)
            healthy.append(state)
        return healthy, reasons

    def _next_probe_at(self, state: HostState) -> float | None:
        """Wall clock from which the host may be probed again (None: it is up)."""
        if not self.is_down(state):
            return None
        wait = 0.0 if state.looked_at is None else state.looked_at + self.settings.probe_interval - self.monotonic()
        return min(self.clock() + max(0.0, wait), max(state.down_until, self.clock()))

    def _write_health(self) -> None:
        """Snapshot of every host's health for `whisperdrop status` (read by another process):
        each host's back-off and probes, and how many jobs on the CPU watch for a host (`watching`)."""
        settings = self.settings
        snapshot = {
            "updated_at": self.clock(),
            "probe_interval": settings.probe_interval, "hand_back": settings.hand_back, "watching": self.watching,
            "hosts": [
                {"name": state.name, "up": not self.is_down(state),
                 "failures": state.failures, "last_error": state.last_error, "down_until": state.down_until,
                 "backoff_s": backoff(state.failures, settings.retry_initial_seconds, settings.retry_max_seconds)
                 if state.failures else 0.0,
                 "probes": state.probes, "probed_at": state.probed_at, "probe_ok": state.probe_ok,
                 "next_probe_at": self._next_probe_at(state),
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
        """Stop the looks in flight and close every host's connection."""
        for state in self.states:
            if state.look is not None and not state.look.done():
                state.look.cancel()
        for state in self.states:
            try:
                await state.host.close()
            except HostError:
                pass


def _retrieved(task: asyncio.Task) -> None:
    """A shared look's outcome is read by its callers; one whose callers all left is read here, so
    asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()
