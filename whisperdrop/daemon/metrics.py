"""The Prometheus textfile (`logging.metrics_textfile`) and the figures it shares with `stats`.

`render_metrics` turns the ledger's aggregates (every SQL statement is in ledger.py) and the host
snapshot into the text exposition format. `MetricsWriter` rewrites the file for the daemon: the
aggregates scan the whole jobs table, so they run in the writer's own thread on its own read-only
connection, never on the event loop; the loop only decides when a rewrite is due.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from whisperdrop.daemon.ledger import Ledger
from whisperdrop.shared import log
from whisperdrop.shared.files import write_atomic

STAGE_TIMINGS = ("extract_s", "upload_s", "queue_s", "load_s", "transcribe_s", "fetch_s")
METRICS_EVERY_S = 15.0
METRICS_MIN_S = 2.0  # after a ledger change, rewrite no more often than this (progress changes every second)
CLOSE_TIMEOUT_S = 1.0  # the last write at stop; the stop deadline (service.STOP_DEADLINE_S) bounds the rest

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
    """A fallback reason's full text (it names hosts and seconds) -> a short, stable label; "none" for
    no reason, "other" when no known pattern matches."""
    if not reason:
        return "none"
    for label, pattern in _REASON_CLASSES:
        if pattern.search(reason):
            return label
    return "other"


def read_hosts(path: str | os.PathLike) -> dict | None:
    """The daemon's host snapshot (state_dir/hosts.json) as a dict, or None when absent, unreadable
    or not a JSON object. Never raises."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Exposition:
    """Collects metric families and renders the Prometheus text exposition format."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        """Add a HELP and a TYPE line, then one line per (labels, value); a `__suffix__` label is
        appended to the name instead (a summary's _sum and _count)."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            suffix = labels.pop("__suffix__", "")
            text = ",".join(f'{key}="{_label(item)}"' for key, item in labels.items())
            self.lines.append(f"{name}{suffix}{{{text}}} {float(value)!r}" if text else f"{name}{suffix} {float(value)!r}")

    def render(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(ledger: Ledger, hosts: dict | None, now: float | None = None, api: dict | None = None) -> str:
    """The daemon's figures in the Prometheus text format: jobs by stage, stage time sums and counts,
    audio and transcription seconds by route, bytes sent and source bytes, fallbacks by reason,
    hand-backs by outcome, each host's health and probes from the `hosts` snapshot (None: no host
    figures), and the HTTP API's bounds from `api` (ApiServer.figures; None: no API). Aggregates in
    SQL (five scans of the jobs table), so keep it off the event loop. Raises sqlite3.Error."""
    now = time.time() if now is None else now
    out = _Exposition()
    out.family("whisperdrop_jobs", "gauge", "Jobs in the ledger by stage.",
               [({"stage": stage}, count) for stage, count in ledger.stage_counts().items()])
    summaries = []
    for key, (total, count) in ledger.done_timing_totals(STAGE_TIMINGS).items():
        stage = key.removesuffix("_s")
        summaries += [({"__suffix__": "_sum", "stage": stage}, total),
                      ({"__suffix__": "_count", "stage": stage}, count)]
    out.family("whisperdrop_stage_seconds", "summary", "Seconds spent in each stage by done jobs.", summaries)
    routes = ledger.done_route_totals()
    out.family("whisperdrop_jobs_done_total", "counter", "Done jobs by the route that transcribed them.",
               [({"route": route}, figures["jobs"]) for route, figures in routes.items()])
    out.family("whisperdrop_audio_seconds_total", "counter", "Seconds of audio transcribed, by route.",
               [({"route": route}, figures["audio_s"]) for route, figures in routes.items()])
    out.family("whisperdrop_transcribe_seconds_total", "counter", "Seconds spent transcribing, by route.",
               [({"route": route}, figures["transcribe_s"]) for route, figures in routes.items()])
    remote = routes.get("remote", {})
    out.family("whisperdrop_bytes_sent_total", "counter", "Bytes uploaded to GPU hosts.",
               [({}, remote.get("bytes_sent", 0))])
    out.family("whisperdrop_source_bytes_total", "counter", "Source bytes of the jobs that went to GPU hosts.",
               [({}, remote.get("source_bytes", 0))])
    reasons: dict[str, int] = {}
    for reason, count in ledger.fallback_reasons().items():
        reasons[reason_class(reason)] = reasons.get(reason_class(reason), 0) + count
    out.family("whisperdrop_fallbacks_total", "counter", "Jobs that fell back to the local CPU, by reason.",
               [({"reason": reason}, count) for reason, count in sorted(reasons.items())])
    out.family("whisperdrop_handbacks_total", "counter", "Fallbacks handed from the local CPU to a GPU host that "
               "came back, by outcome: served there, or failed there and finished on the CPU.",
               [({"outcome": outcome}, count) for outcome, count in sorted(ledger.handback_counts().items())])
    up, failures, probes, queue, age = [], [], [], [], []
    for host in (hosts or {}).get("hosts", []):
        name = host.get("name")
        up.append(({"host": name}, 1 if host.get("up") else 0))
        failures.append(({"host": name}, host.get("failures") or 0))
        probes.append(({"host": name}, host.get("probes") or 0))
        for beat in host.get("runners") or []:
            labels = {"host": name, "runner": beat.get("name")}
            queue.append((dict(labels), beat.get("queue_length") or 0))
            if isinstance(beat.get("updated_at"), (int, float)):
                age.append((dict(labels), round(now - beat["updated_at"], 3)))
    out.family("whisperdrop_host_up", "gauge", "1 when the GPU host was healthy at its last check.", up)
    out.family("whisperdrop_host_failures", "gauge", "Consecutive failures of the GPU host.", failures)
    out.family("whisperdrop_host_probes_total", "counter", "Looks at the GPU host while it was down, since the "
               "daemon started.", probes)
    out.family("whisperdrop_runner_queue_length", "gauge", "Jobs waiting in the runner's spool.", queue)
    out.family("whisperdrop_runner_heartbeat_age_seconds", "gauge", "Age of the runner's last heartbeat.", age)
    if api is not None:
        _api_families(out, api)
    out.family("whisperdrop_metrics_updated_timestamp_seconds", "gauge", "When this file was written.",
               [({}, round(now, 3))])
    return out.render()


def _api_families(out: _Exposition, api: dict) -> None:
    """The HTTP API's connections and uploads in flight against their bounds, and refusals by reason."""
    connections, uploads = api["connections"], api["uploads"]
    out.family("whisperdrop_api_connections", "gauge", "Open HTTP API connections.", [({}, connections["open"])])
    out.family("whisperdrop_api_connections_max", "gauge", "The bound on open HTTP API connections in force.",
               [({}, connections["max"])])
    out.family("whisperdrop_api_uploads_in_flight", "gauge", "API uploads arriving or stored, not yet transcribed.",
               [({}, uploads["in_flight"])])
    out.family("whisperdrop_api_uploads_in_flight_max", "gauge", "api.max_uploads_in_flight.", [({}, uploads["max"])])
    out.family("whisperdrop_api_upload_bytes_in_flight", "gauge", "Bytes of the API uploads in flight.",
               [({}, uploads["bytes"])])
    out.family("whisperdrop_api_upload_bytes_in_flight_max", "gauge", "api.max_uploads_in_flight_mb, in bytes.",
               [({}, uploads["max_bytes"])])
    out.family("whisperdrop_api_rejected_total", "counter", "API requests and connections refused, by reason.",
               [({"reason": reason}, count) for reason, count in sorted(api["rejected"].items())])


def write_textfile(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` atomically (a hidden .tmp beside it, then rename), as node_exporter's
    textfile collector expects; the mode follows the umask. Raises OSError."""
    write_atomic(path, text.encode("utf-8"), tag=str(os.getpid()), durable=False)


class MetricsWriter:
    """Rewrites `logging.metrics_textfile` every METRICS_EVERY_S, and at most every METRICS_MIN_S
    after the ledger changed, in a thread of its own. A failed write is logged and never stops the daemon.

    `path`: the textfile (None: do nothing). `ledger_path`: the ledger the writer opens read-only for
    each rewrite. `changes`: the live connection's change count (Ledger.db.total_changes), read on the
    caller's thread to tell whether the ledger changed. `health_file`: the hosts.json snapshot.
    """

    def __init__(self, path: str | None, ledger_path: str | os.PathLike, health_file: str | os.PathLike,
                 changes: Callable[[], int], clock: Callable[[], float] = time.monotonic,
                 api: Callable[[], dict] | None = None):
        self.path = path
        self.api = api  # the HTTP API's figures, read on the caller's thread at each step
        self._api_figures: dict | None = None
        self.ledger_path = Path(ledger_path)
        self.health_file = health_file
        self.changes = changes
        self.clock = clock
        self._written_at = float("-inf")
        self._changes = -1
        self._failing = False
        self._pending: concurrent.futures.Future | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics") \
            if path else None
        self.log = log.get("metrics")

    @property
    def in_flight(self) -> concurrent.futures.Future | None:
        """The rewrite running (or done) in the writer thread since the last step, or None before any."""
        return self._pending

    def step(self, force: bool = False) -> bool:
        """Start a rewrite in the writer thread if one is due (or `force`) and none is running; True
        when one was started. Never waits for the file or the ledger."""
        if self._executor is None or (self._pending is not None and not self._pending.done()):
            return False
        now = self.clock()
        changes = self.changes()
        due = now - self._written_at >= METRICS_EVERY_S
        changed = changes != self._changes and now - self._written_at >= METRICS_MIN_S
        if not (due or changed or force):
            return False
        self._written_at, self._changes = now, changes
        self._api_figures = self.api() if self.api else None
        self._pending = self._executor.submit(self.write)
        return True

    def write(self) -> bool:
        """Render the ledger, the host snapshot and the HTTP API's figures (as read at the last step)
        and replace the file now, on the calling thread; True when written. Failures (file system,
        ledger) are logged once per failing streak, not raised."""
        try:
            ledger = Ledger(self.ledger_path, readonly=True)
            try:
                text = render_metrics(ledger, read_hosts(self.health_file), api=self._api_figures)
            finally:
                ledger.close()
            write_textfile(self.path, text)
        except (OSError, sqlite3.Error) as error:
            if not self._failing:
                self.log.warning("metrics.write_failed", path=self.path, error=str(error),
                                 hint="let the daemon's user write that folder (ReadWritePaths= in the unit)")
            self._failing = True
            return False
        self._failing = False
        return True

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Write the last state (after any rewrite in flight) and stop the writer thread; waits at most
        `timeout` seconds. True when the last write landed; a slower one is left to finish on its own."""
        if self._executor is None:
            return False
        executor, self._executor = self._executor, None
        self._api_figures = self.api() if self.api else None
        last = executor.submit(self.write)
        try:
            written = await asyncio.wait_for(asyncio.wrap_future(last), timeout)
        except asyncio.TimeoutError:
            self.log.warning("metrics.last_write_late", path=self.path, seconds=timeout)
            executor.shutdown(wait=False)
            return False
        executor.shutdown(wait=True)  # idle by now: only joins the thread
        return written
