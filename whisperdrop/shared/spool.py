"""The spool protocol shared by the daemon and the GPU runner: layout, job ids, documents.

The daemon talks to a GPU host only through files in a spool directory over SFTP; it never runs a
remote command. Layout (paths relative to the spool):

    incoming/<job>.opus.part   upload in progress (resumed by offset)
    incoming/<job>.opus        complete audio (renamed from .part once fsynced)
    jobs/<job>.json            job document; its appearance submits the job
    work/<job>.json            claimed by a runner (rename from jobs/)
    progress/<job>.json        {"done_s", "duration_s"} while transcribing
    results/<job>.json         the Result
    failed/<job>.json          {"kind", "message", "retryable"}
    runners/<name>.json        heartbeat

Job and result documents are data from another machine: `parse_job` and `check_result` reject
anything that could name a path outside the spool or the outbox.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

JOB_SCHEMA = "whisperdrop.job/1"
RESULT_SCHEMA = "whisperdrop.result/1"

DIRECTORIES = ("incoming", "jobs", "work", "progress", "results", "failed", "runners")

_JOB_ID = re.compile(r"[0-9a-f]{64}")  # used with fullmatch: "$" would let a trailing newline through
_RUNNER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ProtocolError(ValueError):
    """A spool document that breaks the protocol (bad id, unsafe path, wrong schema)."""


TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class TranscribeOptions:
    """Everything that changes a transcript. Part of the job id: same audio + same options = same job."""

    model: str = "bundled:tiny.en"
    language: str | None = None
    initial_prompt: str | None = None
    hotwords: str | None = None
    word_timestamps: bool = True
    vad_filter: bool = True
    beam_size: int = 5
    task: str = "transcribe"  # or "translate" (to English)
    temperature: float | None = None  # sample at this temperature (0 < t <= 1, decoded sequentially); None: beam search at 0

    @classmethod
    def from_config(cls, transcription: dict) -> "TranscribeOptions":
        return cls(**{field.name: transcription[field.name] for field in fields(cls) if field.name in transcription})

    @classmethod
    def from_dict(cls, data: Any) -> "TranscribeOptions":
        """Parse options from a job document. Raises ProtocolError on unknown keys or wrong types."""
        if not isinstance(data, dict):
            raise ProtocolError("options must be a mapping")
        known = {field.name: field for field in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ProtocolError(f"unknown option(s): {', '.join(unknown)}")
        options = cls(**data)
        if not isinstance(options.model, str) or not isinstance(options.beam_size, int) or options.beam_size < 1:
            raise ProtocolError("options.model must be a string and options.beam_size a positive integer")
        for name in ("word_timestamps", "vad_filter"):
            if not isinstance(getattr(options, name), bool):
                raise ProtocolError(f"options.{name} must be true or false")
        for name in ("language", "initial_prompt", "hotwords"):
            if getattr(options, name) is not None and not isinstance(getattr(options, name), str):
                raise ProtocolError(f"options.{name} must be a string or null")
        if options.task not in TASKS:
            raise ProtocolError(f"options.task must be one of {', '.join(TASKS)}")
        if temperature_problem(options.temperature):
            raise ProtocolError(f"options.{temperature_problem(options.temperature)}, or null")
        return options

    def to_dict(self) -> dict:
        """The options as a job document holds them. `task` appears only when it is `translate`, and
        `temperature` only when set, so a job keeps the id (and the spool document) it had before
        either option existed."""
        data = asdict(self)
        if data["task"] == "transcribe":
            del data["task"]
        if data["temperature"] is None:
            del data["temperature"]
        return data


def temperature_problem(value: Any) -> str | None:
    """Why `value` is no sampling temperature (a number above 0, at most 1), or None when it is one
    or None (beam search)."""
    if value is None or (not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= 1):
        return None
    return f"temperature must be a number above 0 and at most 1, not {value!r}"


def job_id(source_sha256: str, options: TranscribeOptions) -> str:
    """The job id: sha256 over the source's sha256 and the canonical JSON of the options."""
    canonical = json.dumps(options.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{source_sha256}\n{canonical}".encode()).hexdigest()


def check_job_id(value: Any) -> str:
    """Return `value` if it is a job id (64 lowercase hex digits); raise ProtocolError otherwise."""
    if not isinstance(value, str) or not _JOB_ID.fullmatch(value):
        raise ProtocolError(f"not a job id: {value!r}")
    return value


def check_runner_name(value: Any) -> str:
    """Return `value` if it is usable as a runner name in a file name; raise ProtocolError otherwise."""
    if not isinstance(value, str) or not _RUNNER_NAME.fullmatch(value):
        raise ProtocolError(f"runner name {value!r}: use letters, digits, '.', '_' and '-' (64 at most)")
    return value


def check_relative_path(value: Any) -> str:
    """Return `value` if it is a relative path that stays below its base; raise ProtocolError otherwise."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise ProtocolError(f"not a relative path: {value!r}")
    parts = value.split("/")
    if value.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ProtocolError(f"unsafe path {value!r}: absolute, empty or with '..' components")
    return value


class Layout:
    """Paths of one job's files inside a spool, joined with '/' (SFTP and POSIX alike)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") or "/"

    def _join(self, *parts: str) -> str:
        return "/".join((self.root, *parts)) if self.root != "/" else "/" + "/".join(parts)

    def directory(self, name: str) -> str:
        return self._join(name)

    def audio_part(self, job: str) -> str:
        return self._join("incoming", f"{check_job_id(job)}.opus.part")

    def audio(self, job: str) -> str:
        return self._join("incoming", f"{check_job_id(job)}.opus")

    def job(self, job: str, state: str = "jobs") -> str:
        return self._join(state, f"{check_job_id(job)}.json")

    def progress(self, job: str) -> str:
        return self._join("progress", f"{check_job_id(job)}.json")

    def result(self, job: str) -> str:
        return self._join("results", f"{check_job_id(job)}.json")

    def failure(self, job: str) -> str:
        return self._join("failed", f"{check_job_id(job)}.json")

    def heartbeat(self, name: str) -> str:
        return self._join("runners", f"{check_runner_name(name)}.json")

    def job_files(self, job: str) -> list[str]:
        """Every file a job may leave in the spool (for cleanup)."""
        return [
            self.audio_part(job), self.audio(job), self.job(job, "jobs"), self.job(job, "work"),
            self.job(job, "jobs") + ".tmp", self.progress(job), self.result(job), self.failure(job),
        ]


def make_job_document(job: str, options: TranscribeOptions, audio_size: int, audio_sha256: str,
                      duration: float, source_name: str, submitted_at: float) -> dict:
    """The job document the daemon writes to jobs/<job>.json."""
    return {
        "schema": JOB_SCHEMA,
        "job_id": check_job_id(job),
        "audio": {"size": audio_size, "sha256": audio_sha256, "duration": duration},
        "options": options.to_dict(),
        "source_name": source_name,
        "submitted_at": submitted_at,
    }


@dataclass(frozen=True)
class JobDocument:
    """A parsed, checked job document."""

    job_id: str
    audio_size: int
    audio_sha256: str
    duration: float
    options: TranscribeOptions
    source_name: str
    submitted_at: float


def parse_job(data: Any, expected_id: str | None = None) -> JobDocument:
    """Check a job document read from the spool; raise ProtocolError naming what is wrong."""
    if not isinstance(data, dict) or data.get("schema") != JOB_SCHEMA:
        raise ProtocolError(f"not a {JOB_SCHEMA} document")
    job = check_job_id(data.get("job_id"))
    if expected_id is not None and job != expected_id:
        raise ProtocolError(f"job document for {job} found under the name of {expected_id}")
    audio = data.get("audio")
    if not isinstance(audio, dict):
        raise ProtocolError("audio must be a mapping")
    size, sha, duration = audio.get("size"), audio.get("sha256"), audio.get("duration", 0.0)
    if not isinstance(size, int) or size < 0 or not isinstance(sha, str) or not _JOB_ID.fullmatch(sha):
        raise ProtocolError("audio.size must be a non-negative integer and audio.sha256 64 hex digits")
    source_name = data.get("source_name", "")
    if not isinstance(source_name, str) or "/" in source_name or "\x00" in source_name:
        raise ProtocolError("source_name must be a bare file name")
    return JobDocument(
        job_id=job, audio_size=size, audio_sha256=sha, duration=float(duration or 0.0),
        options=TranscribeOptions.from_dict(data.get("options", {})), source_name=source_name,
        submitted_at=float(data.get("submitted_at") or 0.0),
    )


def check_result(data: Any, expected_id: str | None = None) -> dict:
    """Check a Result read from a spool or a file; raise ProtocolError naming what is wrong.

    Returns the same dict. A `source.path` must be relative and stay below the inbox.
    """
    if not isinstance(data, dict):
        raise ProtocolError("a Result must be a mapping")
    if not isinstance(data.get("text"), str) or not isinstance(data.get("segments"), list):
        raise ProtocolError("a Result needs 'text' (a string) and 'segments' (a list)")
    if expected_id is not None and data.get("job_id") not in (None, expected_id):
        raise ProtocolError(f"Result for job {data.get('job_id')!r} where {expected_id} was expected")
    for segment in data["segments"]:
        if not isinstance(segment, dict) or not all(
            isinstance(segment.get(key), (int, float)) for key in ("start", "end")
        ) or not isinstance(segment.get("text"), str):
            raise ProtocolError("every segment needs numeric 'start' and 'end' and a string 'text'")
    source = data.get("source")
    if isinstance(source, dict) and source.get("path") is not None:
        check_relative_path(source["path"])
    return data


def dumps(document: dict) -> bytes:
    """Serialise a spool document (UTF-8 JSON)."""
    return json.dumps(document, ensure_ascii=False, indent=1, default=str).encode()
