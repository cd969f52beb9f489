"""What `whisperdrop status` and `stats` show, collected as JSON-ready dicts (the CLI prints them).

Both read the ledger read-only (SQLite allows that beside the running daemon) through its query
methods, and the host snapshot `state_dir/hosts.json` the daemon rewrites; they need no socket
and change nothing.
"""

from __future__ import annotations

import time
from typing import Any

from whisperdrop.daemon.ledger import Job, Ledger
from whisperdrop.daemon.metrics import STAGE_TIMINGS, read_hosts, reason_class

LEDGER_NAME = "ledger.sqlite3"


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
    "done_s" and "duration_s" of the transcription."""
    progress = job.progress or {}
    upload = progress.get("upload")
    if upload is None and job.stage in ("uploaded", "submitted", "transcribed"):
        upload = 1.0
    transcribe = progress.get("transcribe")
    if transcribe is None and job.stage == "transcribed":
        transcribe = 1.0
    return {"upload": upload, "transcribe": transcribe, "done_s": progress.get("done_s"),
            "duration_s": progress.get("duration_s") or job.duration}


def _host_status(name: str, host: dict | None, now: float) -> dict:
    """One configured host's entry of `status`, from its entry in the snapshot (None: not in it)."""
    if host is None:
        return {"name": name, "up": None, "note": "not contacted yet (no job has needed it)"}
    runners = []
    for beat in host.get("runners") or []:
        updated = beat.get("updated_at")
        runners.append({
            "name": beat.get("name"), "device": beat.get("device"), "gpu": beat.get("gpu"),
            "model": beat.get("model"), "queue_length": beat.get("queue_length"),
            "current": beat.get("current") or None, "jobs_done": beat.get("jobs_done"),
            "heartbeat_age_s": _round(now - updated, 1) if isinstance(updated, (int, float)) else None,
        })
    return {"name": name, "up": bool(host.get("up")), "failures": host.get("failures", 0),
            "last_error": host.get("last_error"), "in_flight": host.get("in_flight", 0), "runners": runners,
            "queue_length": sum(runner["queue_length"] or 0 for runner in runners)}


def collect_status(config: Any, now: float | None = None, errors: int = 5) -> dict:
    """Everything `status` shows for `config` at `now` (default: the time), as one JSON-ready dict:
    jobs by stage, the unfinished jobs with their progress, each configured host from the snapshot,
    and the last `errors` errors. Raises NoLedger, sqlite3.Error."""
    now = time.time() if now is None else now
    ledger = open_ledger(config)
    try:
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
    hosts_doc = read_hosts(config.path("state_dir") / "hosts.json")
    snapshot = {host.get("name"): host for host in (hosts_doc or {}).get("hosts", [])}
    hosts = [_host_status(host["name"], snapshot.get(host["name"]), now) for host in config.remote.hosts]
    return {
        "now": now, "provider": config.transcription.provider, "stages": stages,
        "queue_length": len(active), "pending_sources": pending_sources, "active": active,
        "hosts": hosts, "hosts_snapshot_age_s": _round(now - hosts_doc["updated_at"], 1)
        if hosts_doc and isinstance(hosts_doc.get("updated_at"), (int, float)) else None,
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
        "stage_times": stage_times, "routes": routes,
        "bytes": {"sent": sent, "source": source, "ratio": _round(sent / source, 4) if source else None},
        "cost": _cost(routes, local_speed, config.local.model),
    }
