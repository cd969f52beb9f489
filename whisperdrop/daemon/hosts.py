"""What the daemon knows of its GPU hosts and how it looks at them: health, back-off, probes, and
the snapshot `status` reads (state_dir/hosts.json).

A look at a host (connect, read the runner heartbeats; see health.live_runners) is shared: every
caller at the same time awaits the one in flight, and a failure they all saw counts once. A host
that fails is marked down with a doubling back-off (`remote.retry_initial_seconds` up to
`remote.retry_max_seconds`). A host that is down is looked at through `probe`: one look at a time;
during its back-off (a job about to fall back, a hand-back watch: see daemon.handback) at most one
per `remote.probe_interval`; each caller waits at most `remote.connect_timeout`. A look at a host
that is down is a probe: counted, and logged as `host.probe`; one that finds it back logs `host.up`.

`Hosts` is the remote route's base (remote.RemotePool adds the jobs' steps); the clocks are
injected: `clock` (wall) stamps back-offs and the snapshot, `monotonic` judges heartbeats and paces
probes.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Callable

from whisperdrop.daemon.connection import HostError
from whisperdrop.daemon.health import HostState, RunnerWatch, backoff, live_runners
from whisperdrop.daemon.remote_steps import HostUnusable, sleep_unless
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.daemon.transfer import Host
from whisperdrop.shared import log
from whisperdrop.shared.files import write_atomic

HEALTH_CACHE_S = 3.0


class Hosts:
    """Every configured GPU host's state (`states`), and the looks at them."""

    def __init__(self, config: Any, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        remote = config.remote
        self.settings = remote
        self.clock = clock
        self.monotonic = monotonic
        self.states = [
            HostState(Host(dict(host), connect_timeout=remote.connect_timeout, keepalive_interval=remote.keepalive_interval),
                      RunnerWatch(remote.heartbeat_max_age))
            for host in remote.hosts
        ]
        self.health_file = Path(config.state_dir) / "hosts.json"
        self.log = log.get("remote")
        self.watching = 0  # jobs on the CPU as a fallback whose hand-back watch looks at the hosts

    def state(self, name: str | None) -> HostState | None:
        return next((state for state in self.states if state.name == name), None)

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
        """A job's hand-back watch ended (the job finished, went back to a host, or stopped)."""
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
