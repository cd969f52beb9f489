"""`whisperdrop status`, `stats` and `doctor`, and the Prometheus textfile the daemon writes.

`status` and `stats` read the ledger read-only (SQLite allows that beside the running daemon) and
the host snapshot `state_dir/hosts.json` the daemon rewrites; they need no socket and change
nothing. `doctor` checks the set-up step by step, each network step under a timeout, prints the
fix for every failure and exits 1 when anything is wrong. `render_metrics` and `write_textfile`
are called by the daemon's loop (service.py) for `logging.metrics_textfile`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import socket
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from whisperdrop import config as config_module
from whisperdrop import log
from whisperdrop.daemon.ledger import JOB_STAGES, Job, Ledger

STAGE_TIMINGS = ("extract_s", "upload_s", "queue_s", "load_s", "transcribe_s", "fetch_s")
LEDGER_NAME = "ledger.sqlite3"
DOCTOR_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------------------- shared


class NoLedger(Exception):
    """The daemon has not run with this state_dir yet (no ledger file)."""


def open_ledger(config: Any) -> Ledger:
    """The ledger opened read-only; raises NoLedger when it does not exist."""
    path = config.path("state_dir") / LEDGER_NAME
    if not path.is_file():
        raise NoLedger(f"no ledger at {path}: the daemon has not run with this config yet")
    return Ledger(path, readonly=True)


def read_hosts(path: Any) -> dict | None:
    """The daemon's host snapshot (state_dir/hosts.json), or None when absent or unreadable."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def parse_duration(text: str) -> float:
    """'90s', '15m', '24h', '7d' or a number of seconds -> seconds. Raises argparse.ArgumentTypeError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration like 90s, 15m, 24h or 7d")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * unit


def percentile(values: list[float], fraction: float) -> float | None:
    """The `fraction` percentile (0..1) of `values` by linear interpolation; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


_REASON_CLASSES = (
    ("short_audio", re.compile(r"short audio")),
    ("no_host_configured", re.compile(r"no GPU host is configured")),
    ("job_timeout", re.compile(r"job_timeout")),
    ("runner_failed_job", re.compile(r"runner failed the job|arrived damaged")),
    ("no_runner", re.compile(r"no fresh runner heartbeat")),
    ("host_key", re.compile(r"host key|known_hosts", re.I)),
    ("auth", re.compile(r"authorized_keys|PermissionDenied|key file", re.I)),
    ("host_down", re.compile(r"down \(|connect failed|unreachable|timeout|no answer", re.I)),
)


def reason_class(reason: str | None) -> str:
    """A short, stable label for a fallback reason (the full text names hosts and seconds)."""
    if not reason:
        return "none"
    for label, pattern in _REASON_CLASSES:
        if pattern.search(reason):
            return label
    return "other"


def _age(seconds: float | None) -> str:
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


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------------------- status


def _first_source(ledger: Ledger, job_id: str) -> str | None:
    row = ledger.db.execute("SELECT relpath FROM sources WHERE job_id = ? ORDER BY id LIMIT 1", (job_id,)).fetchone()
    return row[0] if row else None


def job_progress(job: Job) -> dict:
    """Upload and transcription progress of an unfinished job, as fractions (None: not known)."""
    progress = job.progress or {}
    upload = progress.get("upload")
    if upload is None and job.stage in ("uploaded", "submitted", "transcribed"):
        upload = 1.0
    if upload is None and job.route == "local":
        upload = None
    transcribe = progress.get("transcribe")
    if transcribe is None and job.stage == "transcribed":
        transcribe = 1.0
    return {"upload": upload, "transcribe": transcribe, "done_s": progress.get("done_s"),
            "duration_s": progress.get("duration_s") or job.duration}


def collect_status(config: Any, now: float | None = None, errors: int = 5) -> dict:
    """Everything `status` shows, as one JSON-ready dict. Raises NoLedger."""
    now = time.time() if now is None else now
    ledger = open_ledger(config)
    try:
        stages = dict.fromkeys(JOB_STAGES, 0)
        for stage, count in ledger.db.execute("SELECT stage, count(*) FROM jobs GROUP BY stage"):
            stages[stage] = count
        active = []
        for job in ledger.unfinished_jobs():
            active.append({
                "job_id": job.job_id, "source": _first_source(ledger, job.job_id), "stage": job.stage,
                "host": job.host, "attempts": job.attempts, "duration_s": job.duration,
                "progress": job_progress(job), "last_error": job.last_error,
                "retry_in_s": _round(job.retry_at - now, 1) if job.retry_at and job.retry_at > now else None,
                "age_s": round(now - job.created_at, 1),
            })
        pending_sources = ledger.db.execute("SELECT count(*) FROM sources WHERE state = 'pending'").fetchone()[0]
        recent = []
        for row in ledger.db.execute(
                "SELECT job_id, stage, last_error, updated_at FROM jobs WHERE last_error IS NOT NULL"
                " ORDER BY updated_at DESC LIMIT ?", (errors,)):
            recent.append({"job_id": row["job_id"], "stage": row["stage"], "error": row["last_error"],
                           "source": _first_source(ledger, row["job_id"]), "at": row["updated_at"]})
        last_change = ledger.db.execute("SELECT max(updated_at) FROM jobs").fetchone()[0]
    finally:
        ledger.close()
    hosts_doc = read_hosts(config.path("state_dir") / "hosts.json")
    hosts = []
    configured = [host["name"] for host in config.remote.hosts]
    snapshot = {host.get("name"): host for host in (hosts_doc or {}).get("hosts", [])}
    for name in configured:
        host = snapshot.get(name)
        if host is None:
            hosts.append({"name": name, "up": None, "note": "not contacted yet (no job has needed it)"})
            continue
        runners = []
        for beat in host.get("runners") or []:
            updated = beat.get("updated_at")
            current = beat.get("current") or None
            runners.append({
                "name": beat.get("name"), "device": beat.get("device"), "gpu": beat.get("gpu"),
                "model": beat.get("model"), "queue_length": beat.get("queue_length"),
                "current": current, "jobs_done": beat.get("jobs_done"),
                "heartbeat_age_s": _round(now - updated, 1) if isinstance(updated, (int, float)) else None,
            })
        hosts.append({"name": name, "up": bool(host.get("up")), "failures": host.get("failures", 0),
                      "last_error": host.get("last_error"), "in_flight": host.get("in_flight", 0),
                      "runners": runners,
                      "queue_length": sum(runner["queue_length"] or 0 for runner in runners)})
    return {
        "now": now, "provider": config.transcription.provider, "stages": stages,
        "queue_length": len(active), "pending_sources": pending_sources, "active": active,
        "hosts": hosts, "hosts_snapshot_age_s": _round(now - hosts_doc["updated_at"], 1)
        if hosts_doc and isinstance(hosts_doc.get("updated_at"), (int, float)) else None,
        "recent_errors": recent, "ledger_updated_age_s": _round(now - last_change, 1) if last_change else None,
    }


def print_status(data: dict, out=sys.stdout) -> None:
    stages = "  ".join(f"{stage} {count}" for stage, count in data["stages"].items())
    print(f"jobs by stage: {stages}", file=out)
    print(f"queue: {data['queue_length']} unfinished job(s), {data['pending_sources']} source file(s) waiting; "
          f"provider {data['provider']}; last ledger change {_age(data['ledger_updated_age_s'])} ago", file=out)
    if data["active"]:
        print("\nin progress:", file=out)
        for job in data["active"]:
            progress = job["progress"]
            where = f" on {job['host']}" if job["host"] else ""
            line = (f"  {job['job_id'][:12]}  {job['stage']:<10} upload {_percent(progress['upload']):>4}  "
                    f"transcribe {_percent(progress['transcribe']):>4}{where}  {job['source'] or ''}")
            if job["retry_in_s"] is not None:
                line += f"  (attempt {job['attempts']}, retry in {job['retry_in_s']:.0f} s)"
            print(line, file=out)
    if data["hosts"]:
        print("\nGPU hosts:", file=out)
        for host in data["hosts"]:
            if host["up"] is None:
                print(f"  {host['name']}: {host['note']}", file=out)
                continue
            state = "up" if host["up"] else f"DOWN after {host['failures']} failure(s): {host['last_error']}"
            print(f"  {host['name']}: {state}; queue {host['queue_length']}, {host['in_flight']} in flight from here",
                  file=out)
            for runner in host["runners"]:
                current = runner["current"] or {}
                doing = f", working on {str(current.get('job_id'))[:12]}" if current.get("job_id") else ", idle"
                print(f"    runner {runner['name']}: {runner['device']} {runner['gpu'] or ''}, model {runner['model']}, "
                      f"queue {runner['queue_length']}{doing}, heartbeat {_age(runner['heartbeat_age_s'])} ago",
                      file=out)
    if data["recent_errors"]:
        print("\nlast errors:", file=out)
        for error in data["recent_errors"]:
            print(f"  {error['job_id'][:12]} ({error['stage']}, {error['source'] or '?'}): {error['error']}", file=out)


# ---------------------------------------------------------------------------------------- stats


def collect_stats(config: Any, since_s: float, now: float | None = None) -> dict:
    """Throughput, errors, fallbacks, stage times, bytes, real-time factors and the GPU/CPU cost for
    jobs finished in the last `since_s` seconds. Raises NoLedger."""
    now = time.time() if now is None else now
    since = now - since_s
    ledger = open_ledger(config)
    try:
        finished = [Job(**_decode_row(row)) for row in ledger.db.execute(
            "SELECT * FROM jobs WHERE stage IN ('done', 'failed') AND finished_at >= ? ORDER BY finished_at", (since,))]
        # The local real-time factor comes from every local job ever measured, not only this window.
        local_all = ledger.db.execute(
            "SELECT sum(json_extract(timings, '$.transcribe_s')), sum(duration), count(*) FROM jobs"
            " WHERE stage = 'done' AND route = 'local' AND json_extract(timings, '$.transcribe_s') > 0"
            " AND duration > 0").fetchone()
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
    local_spent, local_audio, local_count = local_all
    local_rtf = local_spent / local_audio if local_audio else None
    gpu_seconds = routes["remote"]["transcribe_s"]
    cost: dict[str, Any] = {"gpu_seconds": gpu_seconds, "remote_audio_s": routes["remote"]["audio_s"],
                            "local_real_time_factor": _round(local_rtf, 4), "local_jobs_measured": local_count or 0,
                            "local_model": config.local.model}
    if local_rtf is None:
        cost.update(cpu_seconds_equivalent=None, saved_seconds=None, speedup=None, note="no local measurement yet")
    else:
        cpu = routes["remote"]["audio_s"] * local_rtf
        cost.update(cpu_seconds_equivalent=round(cpu, 3), saved_seconds=round(cpu - gpu_seconds, 3),
                    speedup=_round(cpu / gpu_seconds, 2) if gpu_seconds else None, note=None)
    return {
        "since_s": since_s, "now": now, "done": len(done), "failed": len(failed),
        "error_rate": _round(len(failed) / len(finished), 4) if finished else None,
        "fallbacks": fallbacks, "fallbacks_total": sum(entry["count"] for entry in fallbacks.values()),
        "stage_times": stage_times, "routes": routes,
        "bytes": {"sent": sent, "source": source, "ratio": _round(sent / source, 4) if source else None},
        "cost": cost,
    }


def _decode_row(row: sqlite3.Row) -> dict:
    data = dict(row)
    for key in ("timings", "transfer", "progress", "options"):
        if data.get(key) is not None:
            data[key] = json.loads(data[key])
    return data


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def print_stats(data: dict, out=sys.stdout) -> None:
    window = _age(data["since_s"])
    rate = "-" if data["error_rate"] is None else f"{100 * data['error_rate']:.1f}%"
    print(f"last {window}: {data['done']} done, {data['failed']} failed, error rate {rate}", file=out)
    if data["fallbacks"]:
        print(f"fallbacks to the local CPU: {data['fallbacks_total']}", file=out)
        for label, entry in sorted(data["fallbacks"].items(), key=lambda item: -item[1]["count"]):
            print(f"  {label}: {entry['count']}  (e.g. {entry['example'][:120]})", file=out)
    else:
        print("fallbacks to the local CPU: none", file=out)
    print("stage times (p50 / p95 over done jobs):", file=out)
    for stage, figures in data["stage_times"].items():
        if figures["count"]:
            print(f"  {stage:<11} {_seconds(figures['p50_s']):>10} / {_seconds(figures['p95_s']):>10}  "
                  f"({figures['count']} job(s))", file=out)
    for route, figures in data["routes"].items():
        rtf = "-" if figures["real_time_factor"] is None else f"{figures['real_time_factor']:.3f}"
        print(f"{route}: {figures['jobs']} job(s), {figures['audio_s']:.1f} s of audio in "
              f"{figures['transcribe_s']:.1f} s, real-time factor {rtf}", file=out)
    sent = data["bytes"]
    ratio = "-" if sent["ratio"] is None else f"{100 * sent['ratio']:.1f}% of the source"
    print(f"bytes sent to GPU hosts: {sent['sent']} for {sent['source']} source bytes ({ratio})", file=out)
    cost = data["cost"]
    if cost["note"]:
        print(f"cost: {cost['gpu_seconds']:.1f} GPU seconds; CPU equivalent: {cost['note']}", file=out)
    else:
        speedup = f", {cost['speedup']:.1f}x faster" if cost["speedup"] else ""
        print(f"cost: {cost['gpu_seconds']:.1f} GPU seconds for {cost['remote_audio_s']:.1f} s of audio; the local "
              f"CPU would have taken {cost['cpu_seconds_equivalent']:.1f} s (local real-time factor "
              f"{cost['local_real_time_factor']:.3f} with {cost['local_model']}, measured over "
              f"{cost['local_jobs_measured']} job(s)){speedup}", file=out)


# ---------------------------------------------------------------------------------------- metrics


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Exposition:
    """Collects metric families and renders the Prometheus text exposition format."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: list[tuple[dict, float]],
               suffixes: tuple[str, ...] = ("",)) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            suffix = labels.pop("__suffix__", "")
            text = ",".join(f'{key}="{_label(item)}"' for key, item in labels.items())
            self.lines.append(f"{name}{suffix}{{{text}}} {float(value)!r}" if text else f"{name}{suffix} {float(value)!r}")

    def render(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(ledger: Ledger, hosts: dict | None, now: float | None = None) -> str:
    """The daemon's figures in the Prometheus text format: jobs by stage, stage time sums and counts,
    audio and transcription seconds by route, bytes sent and source bytes, fallbacks by reason, and
    each host's health. Aggregates in SQL, so it stays cheap on a large ledger."""
    now = time.time() if now is None else now
    out = _Exposition()
    stages = dict.fromkeys(JOB_STAGES, 0)
    for stage, count in ledger.db.execute("SELECT stage, count(*) FROM jobs GROUP BY stage"):
        stages[stage] = count
    out.family("whisperdrop_jobs", "gauge", "Jobs in the ledger by stage.",
               [({"stage": stage}, count) for stage, count in stages.items()])
    summaries = []
    for key in STAGE_TIMINGS:
        total, count = ledger.db.execute(
            f"SELECT sum(json_extract(timings, '$.{key}')), count(json_extract(timings, '$.{key}')) FROM jobs"
            " WHERE stage = 'done'").fetchone()
        stage = key.removesuffix("_s")
        summaries += [({"__suffix__": "_sum", "stage": stage}, total or 0.0),
                      ({"__suffix__": "_count", "stage": stage}, count or 0)]
    out.family("whisperdrop_stage_seconds", "summary", "Seconds spent in each stage by done jobs.", summaries)
    audio, spent, jobs = [], [], []
    for route, count, seconds, transcribe in ledger.db.execute(
            "SELECT route, count(*), sum(duration), sum(json_extract(timings, '$.transcribe_s')) FROM jobs"
            " WHERE stage = 'done' AND route IS NOT NULL GROUP BY route"):
        jobs.append(({"route": route}, count))
        audio.append(({"route": route}, seconds or 0.0))
        spent.append(({"route": route}, transcribe or 0.0))
    out.family("whisperdrop_jobs_done_total", "counter", "Done jobs by the route that transcribed them.", jobs)
    out.family("whisperdrop_audio_seconds_total", "counter", "Seconds of audio transcribed, by route.", audio)
    out.family("whisperdrop_transcribe_seconds_total", "counter", "Seconds spent transcribing, by route.", spent)
    sent, source = ledger.db.execute(
        "SELECT sum(json_extract(transfer, '$.bytes')), sum(source_size) FROM jobs"
        " WHERE stage = 'done' AND route = 'remote'").fetchone()
    out.family("whisperdrop_bytes_sent_total", "counter", "Bytes uploaded to GPU hosts.", [({}, sent or 0)])
    out.family("whisperdrop_source_bytes_total", "counter", "Source bytes of the jobs that went to GPU hosts.",
               [({}, source or 0)])
    reasons: dict[str, int] = {}
    for (reason,) in ledger.db.execute(
            "SELECT fallback_reason FROM jobs WHERE stage = 'done' AND route = 'local' AND fallback_reason IS NOT NULL"):
        reasons[reason_class(reason)] = reasons.get(reason_class(reason), 0) + 1
    out.family("whisperdrop_fallbacks_total", "counter", "Jobs that fell back to the local CPU, by reason.",
               [({"reason": reason}, count) for reason, count in sorted(reasons.items())])
    up, failures, queue, age = [], [], [], []
    for host in (hosts or {}).get("hosts", []):
        name = host.get("name")
        up.append(({"host": name}, 1 if host.get("up") else 0))
        failures.append(({"host": name}, host.get("failures") or 0))
        for beat in host.get("runners") or []:
            labels = {"host": name, "runner": beat.get("name")}
            queue.append((dict(labels), beat.get("queue_length") or 0))
            if isinstance(beat.get("updated_at"), (int, float)):
                age.append((dict(labels), round(now - beat["updated_at"], 3)))
    out.family("whisperdrop_host_up", "gauge", "1 when the GPU host was healthy at its last check.", up)
    out.family("whisperdrop_host_failures", "gauge", "Consecutive failures of the GPU host.", failures)
    out.family("whisperdrop_runner_queue_length", "gauge", "Jobs waiting in the runner's spool.", queue)
    out.family("whisperdrop_runner_heartbeat_age_seconds", "gauge", "Age of the runner's last heartbeat.", age)
    out.family("whisperdrop_metrics_updated_timestamp_seconds", "gauge", "When this file was written.",
               [({}, round(now, 3))])
    return out.render()


def write_textfile(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (a .tmp beside it, then rename), as node_exporter's textfile
    collector expects. Raises OSError."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------- doctor


@dataclass
class Check:
    """One doctor step: what was checked, whether it passed, what was seen, and how to fix it."""

    subject: str
    step: str
    ok: bool
    detail: str = ""
    fix: str = ""


def _check_local(config: Any) -> list[Check]:
    checks = []
    problems = config_module.check_directories(config)
    checks.append(Check("config", "valid", True, str(config.source or "embedded default")))
    if problems:
        for problem in problems:
            checks.append(Check("config", "directories", False, problem,
                                "create the folder and give it to the daemon's user (chown whisperdrop:)"))
    else:
        checks.append(Check("config", "directories", True, "inbox, outbox, archive, failed and state_dir are usable"))
    for key in ("file", "metrics_textfile"):
        target = config.logging[key]
        if target:
            folder = Path(target).parent
            ok = folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
            checks.append(Check("config", f"logging.{key}", ok, target,
                                "" if ok else f"create {folder} and let the daemon's user write it "
                                              "(and list it in ReadWritePaths= of the unit)"))
    if config.transcription.provider == "remote":
        checks.append(Check("local model", "load", True, "skipped: provider is remote, the local CPU is never used"))
        return checks
    from whisperdrop import engine

    started = time.monotonic()
    try:
        path = engine.resolve_model_path(config.local.model)
        from faster_whisper import WhisperModel

        device = engine.resolve_device(config.local.device)
        WhisperModel(path, device=device, compute_type=engine.resolve_compute_type(config.local.compute_type, device),
                     cpu_threads=config.local.threads)
    except engine.EngineError as error:
        checks.append(Check("local model", "load", False, str(error),
                            "set local.model to bundled:tiny.en or to a CTranslate2 model folder"))
    except (RuntimeError, ValueError, OSError) as error:
        checks.append(Check("local model", "load", False, f"{config.local.model}: {type(error).__name__}: {error}",
                            "check local.device and local.compute_type, or use bundled:tiny.en"))
    else:
        checks.append(Check("local model", "load", True,
                            f"{config.local.model} loaded in {time.monotonic() - started:.1f} s"))
    return checks


async def _check_host(settings: dict, remote: Any, timeout: float, now: float) -> list[Check]:
    """Every step for one GPU host, in order; stops at the first step the later ones depend on."""
    import asyncssh

    from whisperdrop.daemon.transfer import AuthError, Host, HostError, HostKeyError

    name, address, port = settings["name"], settings["host"], int(settings.get("port") or 22)
    subject = f"host {name}"
    checks: list[Check] = []
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(address, port, type=socket.SOCK_STREAM), timeout)
        resolved = sorted({info[4][0] for info in infos})
        checks.append(Check(subject, "resolve", True, f"{address} -> {', '.join(resolved)}"))
    except (OSError, asyncio.TimeoutError) as error:
        checks.append(Check(subject, "resolve", False, f"{address}: {str(error) or f'no answer within {timeout:g} s'}",
                            f"check remote.hosts[].host ({address!r}) and DNS; an ~/.ssh/config alias needs a "
                            "HostName that resolves"))
        return checks
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except (OSError, asyncio.TimeoutError) as error:
        checks.append(Check(subject, "tcp", False,
                            f"{address}:{port}: {str(error) or f'no connection within {timeout:g} s'}",
                            f"start sshd on {address}, or open port {port} in its firewall"))
        return checks
    try:
        banner = (await asyncio.wait_for(reader.readline(), timeout)).decode("ascii", "replace").strip()
    except (OSError, asyncio.TimeoutError) as error:
        banner = f"<{str(error) or f'no SSH banner within {timeout:g} s'}>"
    finally:
        writer.close()
    if not banner.startswith("SSH-"):
        checks.append(Check(subject, "tcp", False, f"{address}:{port} accepts, but answered {banner[:80]!r}",
                            f"check remote.hosts[].port ({port}): no SSH server answers there"))
        return checks
    checks.append(Check(subject, "tcp", True, f"{address}:{port} answers: {banner[:60]}"))
    host = Host(dict(settings), connect_timeout=timeout, keepalive_interval=remote.keepalive_interval,
                operation_timeout=timeout)
    try:
        try:
            await host.connect()
        except HostKeyError as error:
            checks.append(Check(subject, "host key", False, error.cause, error.hint))
            return checks
        except AuthError as error:
            if isinstance(error.__cause__, asyncssh.PermissionDenied):  # the host key was verified before auth
                checks.append(Check(subject, "host key", True, f"known in {host._known_hosts_path()} and matching"))
            checks.append(Check(subject, "auth", False, error.cause, error.hint))
            return checks
        except HostError as error:
            checks.append(Check(subject, "ssh", False, error.cause, error.hint))
            return checks
        checks.append(Check(subject, "host key", True, f"known in {host._known_hosts_path()} and matching"))
        checks.append(Check(subject, "auth", True, f"logged in as {host.user or 'the default user'}, SFTP works"))
        probe = f"{host.layout.directory('incoming')}/.doctor-{secrets.token_hex(6)}.tmp"
        try:
            await host.ensure_spool()
            sftp = host._sftp
            remote_file = await host._timed("spool write", sftp.open(probe, "wb"))
            await host._timed("spool write", remote_file.write(b"whisperdrop doctor\n"))
            await host._timed("spool write", remote_file.close())
            await host._timed("spool write", sftp.remove(probe))
            checks.append(Check(subject, "spool", True, f"{host.layout.root!r} is writable"))
        except HostError as error:
            checks.append(Check(subject, "spool", False, f"{host.layout.root!r}: {error.cause}",
                                error.hint or f"let the SSH user write {host.layout.root!r} on {address}; "
                                              "see the GPU host guide (spool group-writable for the SFTP user)"))
            return checks
        try:
            beats = await host.heartbeats()
        except HostError as error:
            checks.append(Check(subject, "runner", False, error.cause, error.hint))
            return checks
        fresh = [beat for beat in beats if isinstance(beat.get("updated_at"), (int, float))
                 and now - beat["updated_at"] <= remote.heartbeat_max_age and beat.get("state") != "stopped"]
        if not fresh:
            newest = max((beat["updated_at"] for beat in beats if isinstance(beat.get("updated_at"), (int, float))),
                         default=None)
            seen = f"newest heartbeat is {_age(now - newest)} old" if newest else "no runner heartbeat in runners/"
            checks.append(Check(subject, "runner", False, seen,
                                f"start the runner on {address}: `systemctl enable --now whisperdrop-runner`, then "
                                "`journalctl -u whisperdrop-runner`; its runner.spool must be this spool"))
            return checks
        for beat in fresh:
            note = "" if beat.get("device") == "cuda" else (
                " (not a GPU: check `python -c \"import ctranslate2; print(ctranslate2.get_cuda_device_count())\"` "
                "there and runner.device)")
            checks.append(Check(subject, f"runner {beat.get('name')}", True,
                                f"heartbeat {_age(now - beat['updated_at'])} old; device {beat.get('device')}, "
                                f"GPU {beat.get('gpu') or 'none'}, model {beat.get('model')}, "
                                f"queue {beat.get('queue_length')}{note}"))
    finally:
        try:
            await asyncio.wait_for(host.close(), timeout)
        except (HostError, asyncio.TimeoutError):
            pass
    return checks


async def _check_hosts(config: Any, timeout: float) -> list[Check]:
    now = time.time()
    results = []
    for settings in config.remote.hosts:
        try:
            # Each step has its own timeout; this bounds the whole host whatever happens inside.
            results += await asyncio.wait_for(_check_host(dict(settings), config.remote, timeout, now), timeout * 8)
        except asyncio.TimeoutError:
            results.append(Check(f"host {settings['name']}", "all steps", False,
                                 f"no verdict within {timeout * 8:g} s", f"check the network to {settings['host']}"))
    return results


def doctor(config: Any, timeout: float = DOCTOR_TIMEOUT_S) -> list[Check]:
    """Run every check; returns them in order (the caller prints them and sets the exit status)."""
    checks = _check_local(config)
    if config.remote.hosts:
        checks += asyncio.run(_check_hosts(config, timeout))
    elif config.transcription.provider != "local":
        checks.append(Check("remote", "hosts", True, "no GPU host configured: everything runs on the local CPU"))
    return checks


def print_doctor(checks: list[Check], out=sys.stdout) -> None:
    for check in checks:
        mark = "ok  " if check.ok else "FAIL"
        print(f"{mark}  {check.subject}: {check.step}: {check.detail}", file=out)
        if not check.ok and check.fix:
            print(f"      fix: {check.fix}", file=out)
    failed = [check for check in checks if not check.ok]
    print(f"\n{len(failed)} problem(s)" if failed else "\neverything looks right", file=out)


# ---------------------------------------------------------------------------------------- cli hook


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the options of subcommand `name` (status, stats or doctor)."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    if name == "stats":
        parser.add_argument("--since", type=parse_duration, default=parse_duration("24h"), metavar="DURATION",
                            help="window of finished jobs: 90s, 15m, 24h, 7d (default: 24h)")
    if name == "doctor":
        parser.add_argument("--timeout", type=float, default=DOCTOR_TIMEOUT_S, metavar="SECONDS",
                            help=f"timeout of each network step (default: {DOCTOR_TIMEOUT_S:g})")


def run(name: str, args: argparse.Namespace, config: Any) -> int:
    """Run subcommand `name`; returns the exit status (0 fine, 1 a problem found, 2 cannot tell)."""
    # SSH and engine events go to stderr, only when they matter; stdout is the report (or its JSON).
    log.configure(level="debug" if getattr(args, "verbose", False) else "error", fmt="console", stream=sys.stderr)
    if name == "doctor":
        checks = doctor(config, timeout=args.timeout)
        if args.json:
            print(json.dumps([asdict(check) for check in checks], indent=2))
        else:
            print_doctor(checks)
        return 0 if all(check.ok for check in checks) else 1
    try:
        data = collect_status(config) if name == "status" else collect_stats(config, args.since)
    except NoLedger as error:
        print(f"whisperdrop {name}: {error}", file=sys.stderr)
        return 2
    except sqlite3.Error as error:
        print(f"whisperdrop {name}: cannot read the ledger: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    elif name == "status":
        print_status(data)
    else:
        print_stats(data)
    return 0
