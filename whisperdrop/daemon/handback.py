"""Hand a job running on the CPU as a fallback back to a GPU host that returned: the rule (pure) and the watch.

While a job runs on the local engine because no host served it (daemon.route), `watch` looks at the
hosts every `remote.probe_interval` (a shared probe per host, see RemotePool.probe) and returns the
host to hand the job to once one is healthy and `choose` says it finishes the job sooner:

    remaining local time  >  remote estimate x remote.hand_back_margin, and by MIN_GAIN_S at least
    remaining local time  =  audio left x this run's measured seconds per audio second (before its
                             first progress: the last measured local run's, else the done local jobs')
    remote estimate       =  upload (audio bytes over the link's measured speed) + REMOTE_OVERHEAD_S
                             + (audio queued there + this job's audio) x the host's real-time factor

The host's real-time factor comes from its runners' heartbeats (audio and transcription seconds
they did), else from the jobs done there (the ledger), else UNMEASURED_REAL_TIME_FACTOR; the link's
speed from the uploads done there, else UNMEASURED_LINK_BYTES_S. With a margin of 0 a job goes back
whenever a host is healthy. While no host could win even as last seen, the watch does not probe. A
job handed back MAX_HANDBACKS times stays on the CPU.

A hand-back is recorded as an entry of the job's `handbacks` (ledger and Result): the host, when, the
seconds it ran here, the audio done, and its `outcome` once known (`served`, or `failed: why`).

Imports nothing of the daemon: the pool (remote.RemotePool), the job (route.Work) and the run
(local.LocalRun) are passed in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from whisperdrop.engine.engine import Cancelled

UNMEASURED_REAL_TIME_FACTOR = 1.0  # a host never measured counts as transcribing in real time
UNMEASURED_LINK_BYTES_S = 1.25e6  # a link never measured counts as 10 Mbit/s
REMOTE_OVERHEAD_S = 2.0  # connect, submit, result polls and fetch of one job
MIN_GAIN_S = 10.0  # a hand-back must save at least this much (under a margin above 0)
MAX_HANDBACKS = 3


@dataclass(frozen=True)
class Speeds:
    """What the done jobs measured: seconds per audio second on the local route, and per GPU host
    (seconds per audio second, upload bytes per second), None where nothing was measured."""

    local: float | None = None
    hosts: dict = field(default_factory=dict)  # name -> (real-time factor or None, link bytes/s or None)

    @classmethod
    def of(cls, totals: list[tuple]) -> "Speeds":
        """From Ledger.route_speeds() rows: (route, host, transcribe_s, audio_s, upload_s, bytes_sent)."""
        local, hosts = None, {}
        for route, host, spent, audio, upload_s, sent in totals:
            rate = spent / audio if spent and audio else None
            if route == "local":
                local = rate
            elif route == "remote" and host:
                hosts[host] = (rate, sent / upload_s if sent and upload_s else None)
        return cls(local, hosts)


def host_real_time_factor(runners: list[dict], measured: float | None) -> float:
    """Seconds per audio second of a host: over what its live runners did (heartbeats), else
    `measured` (the jobs done there), else UNMEASURED_REAL_TIME_FACTOR."""
    audio = sum(beat.get("audio_seconds_done") or 0 for beat in runners)
    spent = sum(beat.get("transcribe_seconds_done") or 0 for beat in runners)
    if audio > 0 and spent > 0:
        return spent / audio
    return measured if measured else UNMEASURED_REAL_TIME_FACTOR


def queued_audio(runners: list[dict], in_flight: int, duration: float) -> float:
    """Audio seconds ahead of a new job on a host, per runner: what its current jobs have left, and
    its queue (the spool's, shared by its runners) at the average length of the jobs it did (this
    job's length when it did none). `in_flight`: this daemon's jobs there, a floor for the queue."""
    left, queue, audio, jobs = 0.0, 0, 0.0, 0
    for beat in runners:
        current = beat.get("current") or {}
        total, done = current.get("duration_s"), current.get("done_s") or 0.0
        if isinstance(total, (int, float)):
            left += max(0.0, float(total) - float(done))
        queue = max(queue, int(beat.get("queue_length") or 0))
        audio += beat.get("audio_seconds_done") or 0.0
        jobs += int(beat.get("jobs_done") or 0)
    average = audio / jobs if audio and jobs else duration
    return (left + max(queue, in_flight) * average) / max(1, len(runners))


def remote_estimate(duration: float, audio_bytes: int, runners: list[dict], in_flight: int,
                    measured: tuple[float | None, float | None] = (None, None)) -> float:
    """Seconds until a host returns the Result of a job of `duration` audio seconds and `audio_bytes`:
    upload, queue and transcription (see the module doc). `measured`: (real-time factor, link
    bytes/s) of the jobs done there."""
    rate = host_real_time_factor(runners, measured[0])
    link = measured[1] or UNMEASURED_LINK_BYTES_S
    return REMOTE_OVERHEAD_S + audio_bytes / link + (queued_audio(runners, in_flight, duration) + duration) * rate


def choose(remaining: float | None, estimates: dict[str, float], margin: float) -> str | None:
    """The host to hand a job back to, or None: the one with the lowest estimate, when the job's
    `remaining` local seconds (None: not known yet) exceed it `margin` times over and by MIN_GAIN_S;
    with margin 0, whenever there is one."""
    if not estimates:
        return None
    name = min(estimates, key=estimates.get)
    if margin <= 0:
        return name
    if remaining is None:
        return None
    best = estimates[name]
    return name if remaining > best * margin and remaining - best >= MIN_GAIN_S else None


def settle(handbacks: list[dict], outcome: str) -> list[dict]:
    """The entries with `outcome` given to the last one when it has none yet (a new list)."""
    if not handbacks or handbacks[-1].get("outcome"):
        return list(handbacks)
    return [*handbacks[:-1], {**handbacks[-1], "outcome": outcome}]


def estimate_for(work: Any, state: Any, speeds: Speeds) -> float:
    """remote_estimate of `work` (a route.Work) on the host `state` (a health.HostState), as last seen."""
    return remote_estimate(work.duration or 0.0, work.audio_size or 0, state.runners, state.in_flight,
                           speeds.hosts.get(state.name, (None, None)))


async def watch(pool: Any, work: Any, run: Any, speeds: Callable[[], Speeds], local_rate: Callable[[], float | None],
                cancel: Any, margin: float, monotonic: Callable[[], float] = time.monotonic) -> tuple[str, float | None, float]:
    """Look at the hosts every remote.probe_interval while `run` (a local.LocalRun of `work`) goes
    on; return (host, remaining local seconds, its estimate) once `choose` picks a host. Before each
    look, skip it when no host could win even as last seen (margin above 0). `speeds()` gives the
    measured speeds, `local_rate()` the local seconds per audio second measured by the runs here.
    Never returns on its own otherwise; raises Cancelled when a stop is requested on `cancel`."""
    interval = pool.settings.probe_interval
    pool.watch_started()
    try:
        while True:
            if await cancel.wait(interval):
                raise Cancelled()
            known = speeds()
            remaining = run.remaining(monotonic(), local_rate() or known.local)
            if margin > 0 and choose(remaining, {state.name: estimate_for(work, state, known)
                                                 for state in pool.states}, margin) is None:
                continue  # no host could win even as last seen: no probe
            healthy = await pool.look_all(cancel)
            estimates = {state.name: estimate_for(work, state, known) for state in healthy}
            remaining = run.remaining(monotonic(), local_rate() or known.local)
            name = choose(remaining, estimates, margin)
            if name is not None:
                return name, remaining, estimates[name]
    finally:
        pool.watch_ended()
