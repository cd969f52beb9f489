"""The ledger: SQLite (WAL) in `state_dir`, the daemon's memory across restarts.

Two tables. `jobs`: one row per job id (audio + options), with its stage, attempts, route and the
figures of each stage. `sources`: one row per file taken from the inbox, pointing at its job; one
job can serve several identical sources (the same file dropped twice is transcribed once).

Job stages, in order: new -> extracted -> (uploaded -> submitted -> ready, on a GPU host) -> transcribed
-> done, or failed.
Source states: pending -> done, or failed. Each change is committed before the next stage starts, so
a restart resumes every job at its last finished stage.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

JOB_STAGES = ("new", "extracted", "uploaded", "submitted", "ready", "transcribed", "done", "failed")
FINISHED = ("done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    source_sha256 TEXT NOT NULL,
    source_size INTEGER NOT NULL,
    options TEXT NOT NULL,
    duration REAL,
    audio_size INTEGER,
    audio_sha256 TEXT,
    route TEXT,
    host TEXT,
    fallback_reason TEXT,
    last_error TEXT,
    retry_at REAL,
    progress TEXT,
    timings TEXT NOT NULL DEFAULT '{}',
    transfer TEXT NOT NULL DEFAULT '{}',
    model TEXT,
    hint TEXT,
    handbacks TEXT
);
CREATE TABLE IF NOT EXISTS sources (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    relpath TEXT NOT NULL,
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL,
    settle_s REAL NOT NULL DEFAULT 0,
    taken_at REAL NOT NULL,
    finished_at REAL,
    outputs TEXT,
    last_error TEXT,
    inode INTEGER
);
CREATE INDEX IF NOT EXISTS sources_job ON sources(job_id);
CREATE INDEX IF NOT EXISTS sources_path ON sources(relpath, state);
CREATE INDEX IF NOT EXISTS jobs_stage ON jobs(stage);
"""

# Columns added after the first release: (table, column, type). Added to an older ledger on open.
_ADDED_COLUMNS = (("jobs", "model", "TEXT"), ("sources", "inode", "INTEGER"), ("jobs", "hint", "TEXT"),
                  ("jobs", "handbacks", "TEXT"))

_JSON_COLUMNS = ("timings", "transfer", "progress", "options", "outputs", "handbacks")


@dataclass(frozen=True)
class Job:
    """A row of `jobs`, as read: a value. Change the row with `Ledger.update_job` and read it again."""

    job_id: str
    stage: str  # new, extracted, uploaded, submitted, ready, transcribed, done or failed
    attempts: int  # tries that failed and may be retried
    created_at: float
    updated_at: float
    source_sha256: str  # the bytes the job transcribes (with options: its id)
    source_size: int
    options: dict  # TranscribeOptions.to_dict() as planned
    finished_at: float | None = None  # when it reached done or failed
    duration: float | None = None  # seconds of audio
    audio_size: int | None = None  # the extracted Opus file's bytes and sha256
    audio_sha256: str | None = None
    route: str | None = None
    host: str | None = None
    fallback_reason: str | None = None
    last_error: str | None = None
    retry_at: float | None = None
    progress: dict | None = None
    timings: dict = field(default_factory=dict)
    transfer: dict = field(default_factory=dict)
    model: str | None = None  # the model whose Result is cached (a fallback's may differ from options["model"])
    hint: str | None = None  # a failed job's what-to-do, as the error that failed it said it
    handbacks: list | None = None  # a fallback's hand-backs from the CPU to a GPU host (daemon.handback)


@dataclass(frozen=True)
class Source:
    """A row of `sources`: one file taken from the inbox, as read (a value)."""

    id: int
    relpath: str
    job_id: str
    size: int
    mtime_ns: int
    state: str
    settle_s: float
    taken_at: float
    finished_at: float | None = None
    outputs: dict | None = None
    last_error: str | None = None
    inode: int | None = None  # with size and mtime_ns: the version taken, told apart without reading it


def _decode(row: sqlite3.Row) -> dict:
    data = dict(row)
    for key in _JSON_COLUMNS:
        if key in data and data[key] is not None:
            data[key] = json.loads(data[key])
    return data


class Ledger:
    """The SQLite ledger. Used from one thread (the daemon's event loop); reads from others open their own."""

    def __init__(self, path: Path, *, readonly: bool = False, clock: Callable[[], float] = time.time):
        """Open (creating if needed) the ledger at `path`; `clock` stamps every change (injectable for tests)."""
        self.path = Path(path)
        self.clock = clock
        self._readonly = readonly
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self._add_missing_columns()
        self.db.row_factory = sqlite3.Row

    def _add_missing_columns(self) -> None:
        """Bring a ledger written by an older version up to _ADDED_COLUMNS (new columns are NULL)."""
        for table, column, kind in _ADDED_COLUMNS:
            present = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction around the block: its changes are committed together (or, if it raises,
        not at all), and its reads see one state (a reader never sees half of a writer's change)."""
        self.db.execute("BEGIN" if self._readonly else "BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # jobs

    def job(self, job_id: str) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return Job(**_decode(row)) if row else None

    def create_job(self, job_id: str, source_sha256: str, source_size: int, options: dict, now: float | None = None) -> Job:
        """Insert a new job at stage `new`, or return the existing one with that id."""
        now = self.clock() if now is None else now
        self.db.execute(
            "INSERT OR IGNORE INTO jobs (job_id, stage, created_at, updated_at, source_sha256, source_size, options)"
            " VALUES (?, 'new', ?, ?, ?, ?, ?)",
            (job_id, now, now, source_sha256, source_size, json.dumps(options, sort_keys=True)),
        )
        job = self.job(job_id)
        assert job is not None
        return job

    def update_job(self, job_id: str, now: float | None = None, **changes: Any) -> None:
        """Write `changes` (column=value) to a job and stamp updated_at; one committed transaction."""
        now = self.clock() if now is None else now
        changes["updated_at"] = now
        if changes.get("stage") in FINISHED:
            changes.setdefault("finished_at", now)
        columns = ", ".join(f"{key} = ?" for key in changes)
        values = [json.dumps(value) if key in _JSON_COLUMNS and value is not None else value
                  for key, value in changes.items()]
        self.db.execute(f"UPDATE jobs SET {columns} WHERE job_id = ?", (*values, job_id))

    def delete_job(self, job_id: str) -> None:
        """Forget a job and its sources (every source vanished before any work was kept)."""
        self.db.execute("DELETE FROM sources WHERE job_id = ?", (job_id,))
        self.db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    def unfinished_jobs(self, limit: int = -1) -> list[Job]:
        """Jobs not done or failed, oldest first; the first `limit` of them (-1: all)."""
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE stage NOT IN ('done', 'failed') ORDER BY created_at LIMIT ?", (limit,)
        ).fetchall()
        return [Job(**_decode(row)) for row in rows]

    def finished_with_pending_sources(self) -> list[str]:
        """Ids of done or failed jobs that still have a pending source (a crash between the job's last
        stage and its sources' delivery, or a file dropped again): they are delivered on start-up."""
        return [job_id for (job_id,) in self.db.execute(
            "SELECT DISTINCT s.job_id FROM sources s JOIN jobs j USING (job_id)"
            " WHERE s.state = 'pending' AND j.stage IN ('done', 'failed')"
        )]

    def jobs(self, since: float = 0.0) -> Iterator[Job]:
        for row in self.db.execute("SELECT * FROM jobs WHERE updated_at >= ? ORDER BY created_at", (since,)):
            yield Job(**_decode(row))

    # sources

    def add_source(self, relpath: str, job_id: str, size: int, mtime_ns: int, settle_s: float,
                   now: float | None = None, inode: int | None = None) -> Source:
        """Record an inbox file taken for `job_id`, pending. Returns the new row."""
        now = self.clock() if now is None else now
        cursor = self.db.execute(
            "INSERT INTO sources (relpath, job_id, size, mtime_ns, state, settle_s, taken_at, inode)"
            " VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
            (relpath, job_id, size, mtime_ns, settle_s, now, inode),
        )
        source = self.source(cursor.lastrowid)
        assert source is not None
        return source

    def source(self, source_id: int) -> Source | None:
        row = self.db.execute("SELECT * FROM sources WHERE id = ?", (source_id,)).fetchone()
        return Source(**_decode(row)) if row else None

    def pending_source(self, relpath: str) -> Source | None:
        """The pending row for an inbox path, if it is already taken."""
        row = self.db.execute(
            "SELECT * FROM sources WHERE relpath = ? AND state = 'pending' ORDER BY id DESC LIMIT 1", (relpath,)
        ).fetchone()
        return Source(**_decode(row)) if row else None

    def done_source(self, relpath: str, failed_too: bool = False) -> Source | None:
        """The latest finished (`done`, or with `failed_too` also `failed`) row for an inbox path: a kept
        file, when it is still there (library mode leaves failed files in place too)."""
        states = ("done", "failed") if failed_too else ("done", "done")
        row = self.db.execute(
            "SELECT * FROM sources WHERE relpath = ? AND state IN (?, ?) ORDER BY id DESC LIMIT 1", (relpath, *states)
        ).fetchone()
        return Source(**_decode(row)) if row else None

    def sources_of(self, job_id: str, state: str | None = "pending") -> list[Source]:
        if state is None:
            rows = self.db.execute("SELECT * FROM sources WHERE job_id = ? ORDER BY id", (job_id,))
        else:
            rows = self.db.execute("SELECT * FROM sources WHERE job_id = ? AND state = ? ORDER BY id", (job_id, state))
        return [Source(**_decode(row)) for row in rows.fetchall()]

    def update_source(self, source_id: int, **changes: Any) -> None:
        if changes.get("state") in FINISHED:
            changes.setdefault("finished_at", self.clock())
        columns = ", ".join(f"{key} = ?" for key in changes)
        values = [json.dumps(value) if key in _JSON_COLUMNS and value is not None else value
                  for key, value in changes.items()]
        self.db.execute(f"UPDATE sources SET {columns} WHERE id = ?", (*values, source_id))

    def sources(self, since: float = 0.0) -> Iterator[Source]:
        for row in self.db.execute("SELECT * FROM sources WHERE taken_at >= ? ORDER BY id", (since,)):
            yield Source(**_decode(row))

    # figures: what `status`, `stats` and the metrics file read (each a single read-only statement)

    def stage_counts(self) -> dict[str, int]:
        """Jobs per stage: every stage of JOB_STAGES, in that order, 0 where there are none."""
        counts = dict.fromkeys(JOB_STAGES, 0)
        for stage, count in self.db.execute("SELECT stage, count(*) FROM jobs GROUP BY stage"):
            counts[stage] = count
        return counts

    def first_source(self, job_id: str) -> str | None:
        """The inbox path of the first file taken for a job, or None when it has no source row."""
        row = self.db.execute("SELECT relpath FROM sources WHERE job_id = ? ORDER BY id LIMIT 1", (job_id,)).fetchone()
        return row[0] if row else None

    def pending_source_count(self) -> int:
        """How many files taken from the inbox wait for their job to finish."""
        return self.db.execute("SELECT count(*) FROM sources WHERE state = 'pending'").fetchone()[0]

    def jobs_with_errors(self, limit: int) -> list[Job]:
        """The `limit` most recently updated jobs that carry a last_error, newest first."""
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE last_error IS NOT NULL ORDER BY updated_at DESC LIMIT ?", (limit,)).fetchall()
        return [Job(**_decode(row)) for row in rows]

    def last_change(self) -> float | None:
        """When any job last changed (its updated_at), or None when the ledger has no job."""
        return self.db.execute("SELECT max(updated_at) FROM jobs").fetchone()[0]

    def finished_jobs(self, since: float) -> list[Job]:
        """Jobs done or failed at or after `since` (finished_at), in the order they finished."""
        rows = self.db.execute("SELECT * FROM jobs WHERE stage IN ('done', 'failed') AND finished_at >= ?"
                               " ORDER BY finished_at", (since,)).fetchall()
        return [Job(**_decode(row)) for row in rows]

    def recently_finished(self, since: float, limit: int) -> list[Job]:
        """The `limit` jobs done or failed most recently, at or after `since` (finished_at), newest first."""
        rows = self.db.execute("SELECT * FROM jobs WHERE stage IN ('done', 'failed') AND finished_at >= ?"
                               " ORDER BY finished_at DESC LIMIT ?", (since, limit)).fetchall()
        return [Job(**_decode(row)) for row in rows]

    def done_by_interval(self, since: float, seconds: float) -> list[tuple[int, str, int, float, float]]:
        """The done jobs that finished at or after `since`, summed per `seconds`-long interval from
        `since` and per route: (interval index, route, jobs, audio seconds, transcription seconds),
        in interval order. One statement: what the page's throughput plot reads."""
        return [(int(index), route, jobs, audio or 0.0, spent or 0.0) for index, route, jobs, audio, spent in self.db.execute(
            "SELECT CAST((finished_at - ?) / ? AS INTEGER) AS slot, route, count(*), sum(duration),"
            " sum(json_extract(timings, '$.transcribe_s')) FROM jobs"
            " WHERE stage = 'done' AND route IS NOT NULL AND finished_at >= ? GROUP BY slot, route ORDER BY slot, route",
            (since, seconds, since))]

    def local_speed(self) -> tuple[float, float, int]:
        """(transcription seconds, audio seconds, jobs) summed over every done local job that measured
        both; (0.0, 0.0, 0) when none did. The local real-time factor is their quotient."""
        spent, audio, count = self.db.execute(
            "SELECT sum(json_extract(timings, '$.transcribe_s')), sum(duration), count(*) FROM jobs"
            " WHERE stage = 'done' AND route = 'local' AND json_extract(timings, '$.transcribe_s') > 0"
            " AND duration > 0").fetchone()
        return spent or 0.0, audio or 0.0, count

    def done_timing_totals(self, keys: tuple[str, ...]) -> dict[str, tuple[float, int]]:
        """{key: (sum, count)} of each `timings` key over the done jobs that recorded it, in one scan."""
        if not keys:
            return {}
        columns = ", ".join("sum(json_extract(timings, ?)), count(json_extract(timings, ?))" for _ in keys)
        paths = [f"$.{key}" for key in keys for _ in (0, 1)]
        row = self.db.execute(f"SELECT {columns} FROM jobs WHERE stage = 'done'", paths).fetchone()
        return {key: (row[2 * index] or 0.0, row[2 * index + 1] or 0) for index, key in enumerate(keys)}

    def done_route_totals(self) -> dict[str, dict[str, float]]:
        """Per route of the done jobs, in route order: {"jobs", "audio_s", "transcribe_s",
        "bytes_sent" (transfer.bytes), "source_bytes"}, sums over the route's jobs (0 where none recorded)."""
        totals = {}
        for route, jobs, audio, spent, sent, source in self.db.execute(
                "SELECT route, count(*), sum(duration), sum(json_extract(timings, '$.transcribe_s')),"
                " sum(json_extract(transfer, '$.bytes')), sum(source_size) FROM jobs"
                " WHERE stage = 'done' AND route IS NOT NULL GROUP BY route ORDER BY route"):
            totals[route] = {"jobs": jobs, "audio_s": audio or 0.0, "transcribe_s": spent or 0.0,
                             "bytes_sent": sent or 0, "source_bytes": source or 0}
        return totals

    def route_speeds(self) -> list[tuple]:
        """(route, host, transcription seconds, audio seconds, upload seconds, bytes sent) summed over
        the done jobs of each route and host, for the hand-back estimate (daemon.handback.Speeds)."""
        return [tuple(row) for row in self.db.execute(
            "SELECT route, host, sum(json_extract(timings, '$.transcribe_s')), sum(duration),"
            " sum(json_extract(timings, '$.upload_s')), sum(json_extract(transfer, '$.bytes')) FROM jobs"
            " WHERE stage = 'done' AND route IS NOT NULL AND json_extract(timings, '$.transcribe_s') > 0"
            " AND duration > 0 GROUP BY route, host")]

    def handback_counts(self) -> dict[str, int]:
        """{outcome: count} of the hand-backs of done jobs: `served` (the host finished the job) or
        `failed` (the host failed it, the job finished on the CPU)."""
        counts = {"served": 0, "failed": 0}
        for outcome, count in self.db.execute(
                "SELECT json_extract(entry.value, '$.outcome'), count(*) FROM jobs, json_each(jobs.handbacks) AS entry"
                " WHERE jobs.stage = 'done' AND jobs.handbacks IS NOT NULL GROUP BY 1"):
            key = "served" if outcome == "served" else "failed"
            counts[key] = counts.get(key, 0) + count
        return counts

    def fallback_reasons(self) -> dict[str, int]:
        """{fallback reason text: done local jobs that gave it}, for the jobs that fell back."""
        return dict(self.db.execute(
            "SELECT fallback_reason, count(*) FROM jobs WHERE stage = 'done' AND route = 'local'"
            " AND fallback_reason IS NOT NULL GROUP BY fallback_reason").fetchall())
