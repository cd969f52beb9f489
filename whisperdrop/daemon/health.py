"""What the daemon knows of its GPU hosts' health, and the pure rules it judges them by.

A runner is alive when its heartbeat file keeps changing, as the daemon sees it over SFTP, measured
with the daemon's own monotonic clock: the GPU host's clock (the heartbeat's `updated_at`) never
decides, so clock skew between the hosts cannot make a dead runner look alive or a live one dead. A
heartbeat that says `state: "stopped"` is no runner, however recent.

`RunnerWatch` is the pure core (told what was read and when, it answers which runners are alive);
`live_runners` is the one way to judge a host with it, used by the routing and by `doctor` alike;
`HostState` holds one host's connection, back-off and watch; `load` ranks healthy hosts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

DEFAULT_HEARTBEAT_SECONDS = 5.0  # the runner's default `heartbeat_seconds`, for a heartbeat that omits it


@dataclass
class _Seen:
    """One runner's heartbeat as last read: what it said and when the daemon saw it change."""

    fingerprint: str
    document: dict
    changed_at: float | None  # daemon monotonic time of the last change seen; None: not yet seen to change


class RunnerWatch:
    """Which runners of one host are alive. Pure: every call is told the time.

    `observe(beats, now, wall_now)` records one read of runners/*.json. A heartbeat seen to change
    (any field: the runner rewrites `updated_at` each time) is alive for `max_age` seconds of the
    daemon's monotonic clock from that moment. One seen for the first time is given the benefit of
    the doubt when its own `updated_at` is not older than `max_age` by the daemon's wall clock
    (a clock ahead of ours is skew, not death); otherwise it is unconfirmed, dead until it changes,
    and `confirm_wait()` says how long to wait before a second read can tell.
    """

    def __init__(self, max_age: float):
        self.max_age = float(max_age)
        self._seen: dict[str, _Seen] = {}

    def observe(self, beats: list[dict], now: float, wall_now: float) -> None:
        """Record the heartbeats read at monotonic `now` (wall clock `wall_now`); vanished ones are forgotten."""
        current: dict[str, _Seen] = {}
        for index, beat in enumerate(beats):
            name = str(beat.get("name") or f"#{index}")
            fingerprint = json.dumps(beat, sort_keys=True, default=str)
            before = self._seen.get(name)
            if before is not None and before.fingerprint == fingerprint:
                current[name] = before
                continue
            if before is not None:
                changed_at: float | None = now
            else:
                updated = beat.get("updated_at")
                plausible = isinstance(updated, (int, float)) and wall_now - updated <= self.max_age
                changed_at = now if plausible else None
            current[name] = _Seen(fingerprint, beat, changed_at)
        self._seen = current

    def _alive(self, seen: _Seen, now: float) -> bool:
        return (seen.document.get("state") != "stopped" and seen.changed_at is not None
                and now - seen.changed_at <= self.max_age)

    def fresh(self, now: float) -> list[dict]:
        """The heartbeats of the runners alive at monotonic `now`."""
        return [seen.document for seen in self._seen.values() if self._alive(seen, now)]

    def confirm_wait(self, now: float) -> float:
        """Seconds to wait for a second read when no runner is alive but an unconfirmed one may be (else 0)."""
        if self.fresh(now):
            return 0.0
        waits = [min(self.max_age, 2.0 * _interval(seen.document)) for seen in self._seen.values()
                 if seen.changed_at is None and seen.document.get("state") != "stopped"]
        return max(waits, default=0.0)

    def why_none(self, now: float) -> str:
        """Why no runner is alive at `now`, naming each runner (for the fallback reason)."""
        if not self._seen:
            return "no runner has ever written a heartbeat"
        details = []
        for name, seen in sorted(self._seen.items()):
            if seen.document.get("state") == "stopped":
                details.append(f"{name} stopped")
            elif seen.changed_at is None:
                details.append(f"{name}'s heartbeat did not change while watched")
            else:
                details.append(f"{name}'s heartbeat unchanged for {now - seen.changed_at:.0f} s")
        return f"no live runner ({'; '.join(details)}; heartbeat_max_age is {self.max_age:g} s)"


async def live_runners(watch: RunnerWatch, read: Callable[[], Awaitable[list[dict]]], *,
                       monotonic: Callable[[], float], clock: Callable[[], float],
                       sleep: Callable[[float], Awaitable[None]]) -> list[dict]:
    """Judge one host's runners by `watch`'s rule: `read()` its heartbeats (runners/*.json) and
    record them at `monotonic()` (wall clock `clock()`); when no runner is alive yet but one may be
    (seen for the first time with a clock that disagrees with ours), `sleep(seconds)` for two of its
    beats and read again. Returns the heartbeats of the runners alive now (none: `watch.why_none`
    says why). Raises what `read` or `sleep` raise. The routing and `doctor` both call this."""
    watch.observe(await read(), monotonic(), clock())
    wait = watch.confirm_wait(monotonic())
    if wait:
        await sleep(wait)
        watch.observe(await read(), monotonic(), clock())
    return watch.fresh(monotonic())


def _interval(beat: dict) -> float:
    value = beat.get("heartbeat_seconds")
    return float(value) if isinstance(value, (int, float)) and value > 0 else DEFAULT_HEARTBEAT_SECONDS


@dataclass
class HostState:
    """What the daemon knows of one GPU host: its connection, health, back-off, runners and probes."""

    host: Any  # a transfer.Host
    watch: RunnerWatch
    failures: int = 0
    down_until: float = 0.0
    last_error: str | None = None
    runners: list = field(default_factory=list)  # the alive runners' heartbeats at the last check
    checked_at: float = 0.0
    jobs: set = field(default_factory=set)  # ids of this daemon's jobs between their upload and fetch there
    spool_ready: bool = False
    look: Any = None  # the asyncio.Task of the look (connect, heartbeats) in flight, shared by every caller
    looked_at: float | None = None  # daemon monotonic time the last look ended, whatever it found
    last_exception: BaseException | None = None  # the failure last counted (a shared look's is counted once)
    probes: int = 0  # looks at this host while it was down, since the daemon started
    probed_at: float | None = None  # wall clock of the last such look, and what it found
    probe_ok: bool | None = None
    probe_error: str | None = None

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def in_flight(self) -> int:
        return len(self.jobs)


def load(runners: list[dict], in_flight: int) -> float:
    """Lower is better: jobs queued on a host (plus this daemon's in flight there) over its speed.

    Speed is audio seconds per transcription second summed over its alive runners, from their
    heartbeats (1.0 for a runner that has not finished a job yet).
    """
    queue = sum(beat.get("queue_length", 0) or 0 for beat in runners)
    speed = 0.0
    for beat in runners:
        audio, busy = beat.get("audio_seconds_done") or 0, beat.get("transcribe_seconds_done") or 0
        speed += audio / busy if audio and busy else 1.0
    return (queue + in_flight) / max(speed, 1e-6)


def backoff(failures: int, initial: float, cap: float) -> float:
    """Seconds to wait after the `failures`-th failure in a row: doubling from `initial`, capped at `cap`.
    The one back-off for host probes and job retries."""
    return min(cap, initial * (2 ** max(0, failures - 1)))


def candidates(*, provider: str, duration: float, local_below: float, resumed: str | None,
               healthy: list[tuple[str, float]]) -> tuple[list[str], str | None]:
    """Which hosts to try for a job, best first, or why it goes local at once. Pure.

    `resumed` is the host a job was already uploaded or submitted to (it stays there); `healthy`
    the (name, load) of hosts checked healthy now. Returns (hosts, local_reason): short audio under
    provider `auto` goes local with a reason and no host; otherwise the resumed host alone, or the
    healthy hosts by load (lowest first).
    """
    if resumed is None and provider == "auto" and local_below and duration < local_below:
        return [], f"short audio: {duration:.1f} s is below remote.local_below_seconds ({local_below:g} s)"
    if resumed is not None:
        return [resumed], None
    return [name for name, _load in sorted(healthy, key=lambda item: item[1])], None


def when_none_served(*, provider: str, reasons: list[str], next_probe_s: float | None,
                     retry_max: float) -> tuple[str, str | float]:
    """What to do when no host served a job. Pure. Returns ("local", fallback reason) under provider
    `auto`, or ("wait", seconds) under `remote`: until the next host probe is due (`next_probe_s`,
    5 s when unknown), at least 1 s and at most `retry_max`."""
    reason = "; ".join(reasons) or "no GPU host is configured"
    if provider != "remote":
        return "local", reason
    return "wait", min(retry_max, max(1.0, 5.0 if next_probe_s is None else next_probe_s))
