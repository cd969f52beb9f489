"""What the page at `/` shows, as JSON-ready dicts: the jobs (queued, running with their step and
progress, finished in the last hours), each GPU host with its runners, and the throughput per hour.

Pure functions over values the routes hand in (ledger rows, the daemon's host states, the clock), so
each answer is tested without a daemon. Nothing here names a path of the daemon's own: a job is
named by its inbox-relative path (an upload by the name it was sent with), and errors and hints
arrive already scrubbed (`ApiService.scrubbed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from whisperdrop.daemon.api import uploads
from whisperdrop.daemon.status import job_progress

HOUR_S = 3600.0
RUNNER_FIELDS = ("name", "state", "device", "gpu", "model", "queue_length", "jobs_done", "jobs_failed")
# What a job is doing at each stage it has reached (the stage names the last one finished).
STEPS = {"new": "extracting the audio", "extracted": "transcribing", "uploaded": "submitting to {host}",
         "submitted": "transcribing on {host}", "ready": "fetching the transcript from {host}",
         "transcribed": "writing the outbox"}


def display_name(relpath: str | None) -> str:
    """A job's name for people: its inbox-relative path, or an upload's file name."""
    if not relpath:
        return "(no source)"
    return Path(relpath).name if uploads.is_upload(relpath) else relpath


def status_of(stage: str) -> str:
    """queued, running, done or failed: what `GET /v1/jobs/{id}` calls a job at `stage`."""
    return {"new": "queued", "done": "done", "failed": "failed"}.get(stage, "running")


def step_of(job: Any, working: bool, waiting_for_host: bool, now: float) -> str:
    """What a job is doing now, in words: queued, its stage's step, or waiting (for a retry, a host)."""
    if job.stage in ("done", "failed"):
        return job.stage
    if job.retry_at and job.retry_at > now:
        return f"waiting {job.retry_at - now:.0f} s to try again"
    if job.stage == "new" and not working:
        return "queued"
    progress = job.progress or {}
    if job.stage == "extracted":
        if progress.get("upload") is not None:
            return f"uploading to {job.host or 'a GPU host'}"
        if progress.get("transcribe") is None and waiting_for_host:
            return "waiting for a GPU host"
    return STEPS.get(job.stage, job.stage).format(host=job.host or "the GPU host")


def job_row(job: Any, relpath: str | None, *, working: bool, waiting_for_host: bool, now: float,
            scrub: Callable[[str | None, str | None], str | None]) -> dict:
    """One job as the page lists it. `relpath`: its first source; `working`: a stage of it is under
    way now; `scrub(text, name)`: the error text without the daemon's paths."""
    name = display_name(relpath)
    status = status_of(job.stage)
    if status == "queued" and working:
        status = "running"
    row = {"job_id": job.job_id, "name": name, "upload": bool(relpath and uploads.is_upload(relpath)),
           "status": status, "stage": job.stage, "step": step_of(job, working, waiting_for_host, now),
           "route": job.route, "host": job.host, "fallback_reason": scrub(job.fallback_reason, name),
           "duration": job.duration, "model": job.model or (job.options or {}).get("model"),
           "attempts": job.attempts, "created_at": job.created_at, "updated_at": job.updated_at,
           "finished_at": job.finished_at, "error": scrub(job.last_error, name),
           "hint": scrub(job.hint, name) if job.stage == "failed" else None}
    if status in ("queued", "running"):
        progress = job_progress(job)
        row["progress"] = {key: progress[key] for key in ("upload", "transcribe", "done_s", "duration_s")}
    else:
        seconds = (job.timings or {}).get("transcribe_s")
        row["real_time_factor"] = round(seconds / job.duration, 4) if seconds and job.duration else None
    return row


def host_state(state: Any, now: float) -> str:
    """up, down, or unchecked (no job has needed the host yet) for one of the daemon's HostStates."""
    if not (state.checked_at or state.failures):
        return "unchecked"
    return "up" if state.down_until <= now and state.last_error is None else "down"


def host_row(state: Any, now: float, scrub: Callable[[str | None, str | None], str | None]) -> dict:
    """One GPU host as the page shows it: up or down and why, its live runners and their queues."""
    runners = [{key: beat.get(key) for key in RUNNER_FIELDS} for beat in state.runners]
    return {"name": state.name, "state": host_state(state, now), "last_error": scrub(state.last_error, None),
            "failures": state.failures, "in_flight": state.in_flight,
            "retry_in_s": round(state.down_until - now, 1) if state.down_until > now else None,
            "checked_age_s": round(now - state.checked_at, 1) if state.checked_at else None,
            "runners": runners, "queue_length": sum(runner["queue_length"] or 0 for runner in runners)}


def throughput(rows: list[tuple[int, str, int, float, float]], since: float, hours: int) -> dict:
    """The page's plot from `Ledger.done_by_interval(since, HOUR_S)` rows: per hour since `since`,
    hours of audio transcribed and the real-time factor of each route (None where it did nothing)."""
    bins = [{"start": since + index * HOUR_S, "jobs": 0, "audio_hours": 0.0, "real_time_factor": {}}
            for index in range(hours)]
    for index, route, jobs, audio_s, transcribe_s in rows:
        if not 0 <= index < hours:
            continue
        entry = bins[index]
        entry["jobs"] += jobs
        entry["audio_hours"] = round(entry["audio_hours"] + audio_s / HOUR_S, 4)
        entry["real_time_factor"][route] = round(transcribe_s / audio_s, 4) if audio_s and transcribe_s else None
    return {"since": since, "hours": hours, "bins": bins,
            "routes": sorted({route for _, route, _, _, _ in rows if route})}
