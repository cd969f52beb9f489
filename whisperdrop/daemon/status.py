"""What `whisperdrop status` and `stats` show, collected as JSON-ready dicts (the CLI prints them).

Both read the ledger read-only (SQLite allows that beside the running daemon) through its query
methods, and the host snapshot `state_dir/hosts.json` the daemon rewrites; they need no socket
and change nothing. Whether the daemon runs is told by `state_dir/daemon.pid`: the running daemon
holds an flock on it, which the kernel releases however the process ends (kill -9 included).
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import time
from pathlib import Path
from typing import Any

from whisperdrop.daemon.ledger import Job, Ledger
from whisperdrop.daemon.metrics import STAGE_TIMINGS, read_hosts, reason_class

LEDGER_NAME = "ledger.sqlite3"
PID_NAME = "daemon.pid"
LOCK_WAIT_S = 2.0  # a lock held this long is a daemon's, not a `status` that looked at the same moment
INBOX_SCAN_LIMIT = 100_000  # inbox entries `status` looks at before it stops counting


class DaemonRunning(Exception):
    """Another daemon holds the state folder's lock."""


def hold_daemon_lock(state_dir: Path) -> int:
    """Take the daemon's lock, `state_dir/daemon.pid` (flock, exclusive), and write our pid and start
    time in it. Returns the descriptor: keep it open for the life of the process; the kernel drops
    the lock when the process ends, however it ends. Raises DaemonRunning when another process holds
    it (after LOCK_WAIT_S, so a `status` reading it at that moment is no obstacle), OSError."""
    path = Path(state_dir) / PID_NAME
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                holder = _read_pid_file(path).get("pid")
                os.close(descriptor)
                raise DaemonRunning(f"a daemon is already running with state_dir {state_dir}"
                                    f"{f' (pid {holder})' if holder else ''}; stop it first, or give this "
                                    "one a state_dir of its own") from None
            time.sleep(0.05)
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps({"pid": os.getpid(), "started_at": time.time()}).encode() + b"\n")
    return descriptor


def _read_pid_file(path: Path) -> dict:
    try:
        document = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def daemon_state(state_dir: Path, now: float | None = None) -> dict:
    """{"running", "pid", "started_at", "uptime_s"} of the daemon of `state_dir`: running when some
    process holds the flock on daemon.pid; pid and started_at are what the last daemon wrote there
    (None when none ever did). Takes a shared lock for an instant only; never raises."""
    now = time.time() if now is None else now
    path = Path(state_dir) / PID_NAME
    written = _read_pid_file(path)
    state = {"running": False, "pid": written.get("pid"), "started_at": written.get("started_at"), "uptime_s": None}
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return state
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        state["running"] = True
        if isinstance(state["started_at"], (int, float)):
            state["uptime_s"] = round(now - state["started_at"], 1)
    except OSError:
        pass
    finally:
        os.close(descriptor)  # also drops the shared lock, if we took it
    return state


def count_inbox_files(inbox: Path, ignore: list[str], recursive: bool) -> int | None:
    """Files in the inbox that the watcher would take (not matching `ignore`, no symlinks), up to
    INBOX_SCAN_LIMIT entries looked at; None when the inbox cannot be read."""
    count = seen = 0
    folders = [Path(inbox)]
    try:
        while folders and seen < INBOX_SCAN_LIMIT:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    seen += 1
                    if any(fnmatch.fnmatch(entry.name, pattern) for pattern in ignore):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        if recursive:
                            folders.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        count += 1
    except OSError:
        return None
    return count


class NoLedger(Exception):
    """The daemon has not run with this state_dir yet (no ledger file)."""


def open_ledger(config: Any) -> Ledger:
    """The ledger of `config`'s state_dir, opened read-only. Raises NoLedger when there is none, and
    sqlite3.Error when it cannot be opened."""
    path = config.path("state_dir") / LEDGER_NAME
    if not path.is_file():
        raise NoLedger(f"no ledger at {path}: the daemon has not run with this config yet")
    return Ledger(path, readonly=True)


def format_age(seconds: float | None) -> str:
    """An age for people: "42 s", "15 min", "3.5 h", "2.0 d"; "never" for None (negative counts as 0)."""
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def percentile(values: list[float], fraction: float) -> float | None:
    """The `fraction` percentile (0..1) of `values` by linear interpolation; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def job_progress(job: Job) -> dict:
    """An unfinished job -> {"upload", "transcribe"} as fractions 0..1 (None: not known), with
    "done_s" and "duration_s" of the transcription, and "slurm" ({"job_id", "state", "reason"}) while
    a Slurm runner has it queued or starting (None otherwise)."""
    progress = job.progress or {}
    upload = progress.get("upload")
    if upload is None and job.stage in ("uploaded", "submitted", "ready", "transcribed"):
        upload = 1.0
    transcribe = progress.get("transcribe")
    if transcribe is None and job.stage in ("ready", "transcribed"):
        transcribe = 1.0
    return {"upload": upload, "transcribe": transcribe, "done_s": progress.get("done_s"),
            "duration_s": progress.get("duration_s") or job.duration, "slurm": progress.get("slurm")}


def _relative(at: Any, now: float) -> float | None:
    """Seconds from `now` to the wall-clock time `at` (negative: past); None when `at` is not a time."""
    return round(at - now, 1) if isinstance(at, (int, float)) and not isinstance(at, bool) else None


def _down_status(host: dict, document: dict, now: float) -> dict:
    """A down host's back-off and probes, as `status` shows them: `backoff_s` (its length now),
    `retry_in_s` (when any job tries it again), `probed_ago_s` and `probe_ok` (the last probe),
    `next_probe_in_s` (from when a probe may look again) and `probe_when` (what makes it look)."""
    watching = document.get("watching") or 0
    next_in = _relative(host.get("next_probe_at"), now)
    if next_in is not None:
        next_in = max(0.0, next_in)
    if not document.get("hand_back", True):
        when = "when its back-off ends (remote.hand_back is off)"
    elif watching:
        when = f"by the hand-back watch of the {watching} job(s) on the CPU"
    else:
        when = "by the next job that would fall back to the CPU, or when its back-off ends"
    probed = _relative(host.get("probed_at"), now)
    retry = _relative(host.get("down_until"), now)
    return {"backoff_s": host.get("backoff_s"), "retry_in_s": max(0.0, retry) if retry is not None else None,
            "probes": host.get("probes", 0), "probed_ago_s": -probed if probed is not None else None,
            "probe_ok": host.get("probe_ok"), "next_probe_in_s": next_in, "probe_when": when}


def _host_status(name: str, host: dict | None, seen_at: float | None, document: dict | None = None,
                 now: float | None = None) -> dict:
    """One configured host's entry of `status`, from its entry in the snapshot (None: not in it)
    written at `seen_at` (`document`: the whole snapshot). A runner's heartbeat age is its age when
    the daemon read it: the snapshot is as old as the daemon's last look at the host, and the
    runner has beaten since. A down host also gets its back-off and probes (see `_down_status`)."""
    if host is None:
        return {"name": name, "up": None, "note": "not contacted yet (no job has needed it)"}
    runners = []
    for beat in host.get("runners") or []:
        updated = beat.get("updated_at")
        known = isinstance(updated, (int, float)) and seen_at is not None
        runners.append({
            "name": beat.get("name"), "device": beat.get("device"), "gpu": beat.get("gpu"),
            "model": beat.get("model"), "queue_length": beat.get("queue_length"),
            "current": beat.get("current") or None, "jobs_done": beat.get("jobs_done"),
            "heartbeat_age_s": _round(max(0.0, seen_at - updated), 1) if known else None,
        })
    status = {"name": name, "up": bool(host.get("up")), "failures": host.get("failures", 0),
              "last_error": host.get("last_error"), "in_flight": host.get("in_flight", 0), "runners": runners,
              "queue_length": sum(runner["queue_length"] or 0 for runner in runners)}
    if not status["up"]:
        status.update(_down_status(host, document or {}, time.time() if now is None else now))
    return status


def collect_status(config: Any, now: float | None = None, errors: int = 5) -> dict:
    """Everything `status` shows for `config` at `now` (default: the time), as one JSON-ready dict:
    jobs by stage, the unfinished jobs with their progress, each configured host from the snapshot,
    and the last `errors` errors; whether the daemon runs, and the files in the inbox. Raises
    NoLedger, sqlite3.Error."""
    now = time.time() if now is None else now
    daemon = daemon_state(config.path("state_dir"), now)
    ledger = open_ledger(config)
    try:
        with ledger.transaction():  # one state: a job is never seen without its source
            stages = ledger.stage_counts()
            active = [{
                "job_id": job.job_id, "source": ledger.first_source(job.job_id), "stage": job.stage,
                "host": job.host, "attempts": job.attempts, "duration_s": job.duration,
                "progress": job_progress(job), "last_error": job.last_error,
                "retry_in_s": _round(job.retry_at - now, 1) if job.retry_at and job.retry_at > now else None,
                "age_s": round(now - job.created_at, 1),
            } for job in ledger.unfinished_jobs()]
            pending_sources = ledger.pending_source_count()
            recent = [{"job_id": job.job_id, "stage": job.stage, "error": job.last_error,
                       "source": ledger.first_source(job.job_id), "at": job.updated_at}
                      for job in ledger.jobs_with_errors(errors)]
            last_change = ledger.last_change()
    finally:
        ledger.close()
    hosts_doc = read_hosts(config.path("state_dir") / "hosts.json") or {}
    snapshot = {host.get("name"): host for host in hosts_doc.get("hosts", [])}
    seen_at = hosts_doc.get("updated_at") if isinstance(hosts_doc.get("updated_at"), (int, float)) else None
    hosts = [_host_status(host["name"], snapshot.get(host["name"]), seen_at, hosts_doc, now)
             for host in config.remote.hosts]
    return {
        "now": now, "daemon": daemon, "provider": config.transcription.provider, "stages": stages,
        "queue_length": len(active), "pending_sources": pending_sources, "active": active,
        "inbox_files": count_inbox_files(config.inbox, list(config.watch.ignore), config.watch.recursive),
        "hosts": hosts, "hosts_snapshot_age_s": _round(now - seen_at, 1) if seen_at is not None else None,
        "recent_errors": recent, "ledger_updated_age_s": _round(now - last_change, 1) if last_change else None,
    }


def _cost(routes: dict, local_speed: tuple[float, float, int], local_model: str) -> dict:
    """GPU seconds spent against what the local CPU would have taken for the same audio, at the local
    real-time factor measured over every local job ever done (`local_speed`, see Ledger.local_speed)."""
    local_spent, local_audio, local_count = local_speed
    local_rtf = local_spent / local_audio if local_audio else None
    gpu_seconds = routes["remote"]["transcribe_s"]
    cost: dict[str, Any] = {"gpu_seconds": gpu_seconds, "remote_audio_s": routes["remote"]["audio_s"],
                            "local_real_time_factor": _round(local_rtf, 4), "local_jobs_measured": local_count,
                            "local_model": local_model}
    if local_rtf is None:
        cost.update(cpu_seconds_equivalent=None, saved_seconds=None, speedup=None, note="no local measurement yet")
    else:
        cpu = routes["remote"]["audio_s"] * local_rtf
        cost.update(cpu_seconds_equivalent=round(cpu, 3), saved_seconds=round(cpu - gpu_seconds, 3),
                    speedup=_round(cpu / gpu_seconds, 2) if gpu_seconds else None, note=None)
    return cost


def collect_stats(config: Any, since_s: float, now: float | None = None) -> dict:
    """Throughput, errors, fallbacks, stage times, bytes, real-time factors and the GPU/CPU cost of
    the jobs that finished in the `since_s` seconds before `now`, as one JSON-ready dict. Raises
    NoLedger, sqlite3.Error."""
    now = time.time() if now is None else now
    ledger = open_ledger(config)
    try:
        finished = ledger.finished_jobs(now - since_s)
        local_speed = ledger.local_speed()  # every local job ever measured, not only this window
    finally:
        ledger.close()
    done = [job for job in finished if job.stage == "done"]
    failed = [job for job in finished if job.stage == "failed"]
    handbacks = {"served": 0, "failed": 0}  # fallbacks handed from the CPU to a host that came back
    for job in done:
        for entry in job.handbacks or []:
            handbacks["served" if entry.get("outcome") == "served" else "failed"] += 1
    fallbacks: dict[str, dict] = {}
    for job in done:
        if job.route == "local" and job.fallback_reason:
            entry = fallbacks.setdefault(reason_class(job.fallback_reason), {"count": 0, "example": job.fallback_reason})
            entry["count"] += 1
    stage_times = {}
    for key in STAGE_TIMINGS:
        values = [float(job.timings[key]) for job in done if isinstance(job.timings.get(key), (int, float))]
        stage_times[key.removesuffix("_s")] = {"count": len(values), "p50_s": _round(percentile(values, 0.5)),
                                               "p95_s": _round(percentile(values, 0.95)),
                                               "total_s": _round(sum(values))}
    routes = {}
    for route in ("remote", "local"):
        jobs = [job for job in done if job.route == route]
        audio = sum(job.duration or 0 for job in jobs)
        spent = sum(float(job.timings.get("transcribe_s") or 0) for job in jobs)
        routes[route] = {"jobs": len(jobs), "audio_s": round(audio, 3), "transcribe_s": round(spent, 3),
                         "real_time_factor": _round(spent / audio, 4) if audio else None}
    remote_jobs = [job for job in done if job.route == "remote"]
    sent = sum(int(job.transfer.get("bytes") or 0) for job in remote_jobs)
    source = sum(job.source_size or 0 for job in remote_jobs)
    return {
        "since_s": since_s, "now": now, "done": len(done), "failed": len(failed),
        "error_rate": _round(len(failed) / len(finished), 4) if finished else None,
        "fallbacks": fallbacks, "fallbacks_total": sum(entry["count"] for entry in fallbacks.values()),
        "handbacks": handbacks,
        "stage_times": stage_times, "routes": routes,
        "bytes": {"sent": sent, "source": source, "ratio": _round(sent / source, 4) if source else None},
        "cost": _cost(routes, local_speed, config.local.model),
        # GPU hosts the daemon may send work to: none when none is configured or the provider is `local`.
        "gpu_hosts": 0 if config.transcription.provider == "local" else len(config.remote.hosts),
        "provider": config.transcription.provider,
    }
