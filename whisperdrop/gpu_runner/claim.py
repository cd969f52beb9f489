"""One claimed job on the runner: the claim in hand, the check of its audio, its failure or its Result.

A claim is a job document moved to work/ and stamped with a token; before the engine reads a byte,
`open_checked_audio` opens the uploaded audio without following links and checks its size and
sha256 against the document, so a half-sent or tampered file is never transcribed. A job that ends
badly becomes a `Failure`: its kind and `retryable` go into failed/<id>.json, its hint (what a
person can do) into the runner's log.
"""

from __future__ import annotations

import math
import os
import stat
import threading
from dataclasses import dataclass
from typing import Any

from whisperdrop.shared.errors import WhisperdropError
from whisperdrop.shared.files import sha256_file
from whisperdrop.shared.spool import JobDocument, Layout, check_result

HINTS = {  # what a person can do about each kind of failure; the runner's log carries it
    "protocol": "the daemon and the runner disagree on the job document: run the same whisperdrop version on both",
    "checksum": "the audio was deleted; the daemon uploads it again from zero",
    "oom": "the job goes back to the daemon to retry; lower runner.batch_size or use a smaller model",
    "model": "check runner.model and that the GPU host has the model (or network to download it)",
    "audio": "the audio cannot be decoded; look at the source file and the daemon's extraction",
    "engine": "see the runner's log for the engine's error",
    "runner": "a bug or a disk error on the GPU host: see the runner's log for the traceback",
}


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class Failure(WhisperdropError):
    """A job that ends in failed/<id>.json: `kind` and `retryable` go into that document, `hint` (what
    a person can do) into the log."""

    def __init__(self, kind: str, message: str, retryable: bool, hint: str | None = None):
        super().__init__(message, kind=kind, retryable=retryable,
                         hint=hint if hint is not None else HINTS.get(kind, ""))


@dataclass
class Claim:
    """A job in hand: claimed, checked, its audio open. The engine reads `source`, the very file
    that was checked (/proc/self/fd/N), even if the name is replaced meanwhile."""

    job: JobDocument
    token: str
    claimed_at: float
    descriptor: int
    source: str
    started: float                  # monotonic seconds when it joined the batch
    last_write: float = -math.inf   # monotonic seconds of its last progress document


def open_checked_audio(layout: Layout, job: JobDocument, cancel: threading.Event, log: Any) -> int:
    """Open incoming/<id>.opus (no symlinks) and check its size and sha256 against the job.

    Returns the open descriptor. Raises Failure kind `checksum` (retryable) after deleting a bad
    file, so the daemon uploads again from zero; Cancelled when stopped while hashing.
    """
    path = layout.audio(job.job_id)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError as error:
        raise Failure("checksum", f"audio {path} is missing", True) from error
    except OSError as error:  # a symlink (ELOOP) or unreadable: never read through it
        delete_bad_audio(path, log)
        raise Failure("checksum", f"audio {path} cannot be opened safely: {error}", True) from error
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            problem = "is not a regular file"
        elif status.st_size != job.audio_size:
            problem = f"has {status.st_size} bytes where the job says {job.audio_size}"
        else:
            digest = sha256_file(descriptor, cancel)
            problem = None if digest == job.audio_sha256 else f"has sha256 {digest} where the job says {job.audio_sha256}"
    except BaseException:
        os.close(descriptor)
        raise
    if problem:
        os.close(descriptor)
        delete_bad_audio(path, log)
        raise Failure("checksum", f"audio {path} {problem}; deleted, upload it again", True)
    return descriptor


def delete_bad_audio(path: str, log: Any) -> None:
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:  # the failure record matters more than this cleanup
        log.warning("runner.audio_delete_failed", path=path, error=str(error))


def published_result(claim: Claim, outcome: dict, executed_on: dict, elapsed: float) -> dict:
    """The Result the runner publishes for `claim`: the engine's `outcome` with the job id, where it
    ran, and the queue and runner times. Raises ProtocolError when it breaks the Result schema."""
    job = claim.job
    result = dict(outcome)
    result["job_id"] = job.job_id
    result["executed_on"] = executed_on
    timings = dict(result.get("timings") or {})
    timings["queue_s"] = rounded(claim.claimed_at - job.submitted_at) if job.submitted_at else None
    timings["runner_s"] = rounded(elapsed)
    result["timings"] = timings
    check_result(result, job.job_id)
    return result
