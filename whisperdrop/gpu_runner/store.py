"""The POSIX spool store: every file operation a worker does on a spool it can reach as a file system.

Claim the oldest job by renaming jobs/<id>.json to work/<id>.json (only one rename wins, so workers
on one spool never share a job), stamp the claim, publish a Result, record a failure, release or
return a claim, return dead workers' claims, expire leftovers, list the queue, read a capped
document. No engine and no threads: the runner's worker and service sit on top of it, and so can a
batch backend whose cluster file system holds the spool.

Every document is written with `files.write_atomic` (temporary, fsync, rename; mode 0o666 less the
umask, so UMask=0002 shares the files with the SFTP account). Every job file name is joined by
`spool.Layout`, which checks job ids and runner names; no shell is ever run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import stat
from typing import Any

from whisperdrop.shared import log
from whisperdrop.shared.files import write_atomic
from whisperdrop.shared.spool import DIRECTORIES, Layout, ProtocolError, check_job_id, check_runner_name, dumps

MAX_DOCUMENT_BYTES = 1 << 20
STALE_HEARTBEATS = 3        # a claim is dead when its owner missed this many heartbeats
EXPIRE_DIRECTORIES = ("incoming", "results", "failed", "progress", "work", "runners", "jobs")

HOSTNAME = socket.gethostname()


def read_document(path: str) -> Any:
    """Read a small JSON document (1 MiB at most) without following a symlink; the parsed value.

    Raises OSError (missing, a symlink) or ValueError (not a regular file, too big, not JSON).
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError(f"{path} is not a regular file")
        chunks, size = [], 0
        while chunk := os.read(descriptor, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_DOCUMENT_BYTES:
                raise ValueError(f"{path} is larger than {MAX_DOCUMENT_BYTES} bytes")
    finally:
        os.close(descriptor)
    return json.loads(b"".join(chunks).decode("utf-8"))


def unlink_quietly(path: str) -> bool:
    """Remove a file; True if it was there. A missing file is fine; other OSErrors propagate."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _claim_of(data: Any) -> dict | None:
    claim = data.get("claim") if isinstance(data, dict) else None
    return claim if isinstance(claim, dict) else None


class SpoolStore:
    """One worker's view of a spool directory at `root`: the worker's `name` signs its claims.

    `heartbeat_seconds` goes into each claim, so other workers know how long to wait for this one.
    Nothing is created until `create()`. Raises ProtocolError for a name unusable in a file name.
    """

    def __init__(self, root: str, name: str, *, heartbeat_seconds: float):
        self.root = os.path.abspath(root)
        self.layout = Layout(self.root)
        self.name = check_runner_name(name)
        self.heartbeat_seconds = float(heartbeat_seconds)
        self.log = log.get("runner", runner=self.name)

    def create(self) -> None:
        """Make the spool's folders (mode 0o777 less the umask) where missing. Raises OSError."""
        for directory in DIRECTORIES:
            os.makedirs(self.layout.directory(directory), exist_ok=True)

    def _write(self, path: str, document: dict, *, durable: bool = True) -> None:
        write_atomic(path, dumps(document), tag=self.name, durable=durable)

    # ------------------------------------------------------------------------------------ the queue

    def queued(self) -> list[str]:
        """Names in jobs/ that look like job documents, oldest first (folders are ignored). Raises OSError."""
        entries = []
        with os.scandir(self.layout.directory("jobs")) as scan:
            for entry in scan:
                if not entry.name.endswith(".json") or entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    entries.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
                except FileNotFoundError:
                    continue
        return [name for _, name in sorted(entries)]

    def queue_length(self) -> int:
        """How many job documents wait in jobs/. Raises OSError."""
        with os.scandir(self.layout.directory("jobs")) as scan:
            return sum(1 for entry in scan if entry.name.endswith(".json"))

    def take(self, file_name: str | None = None) -> str | None:
        """Claim the oldest queued job (or the queued `file_name`) by renaming it into work/; its file
        name, or None when none is left (or another worker took `file_name` first).

        The name is not checked yet: a name that is no job id goes to `reject`. Raises OSError.
        """
        for file_name in self.queued() if file_name is None else [file_name]:
            try:
                os.rename(os.path.join(self.layout.directory("jobs"), file_name),
                          os.path.join(self.layout.directory("work"), file_name))
            except FileNotFoundError:
                continue  # another worker's rename won
            return file_name
        return None

    def peek(self, file_name: str) -> Any:
        """The queued document jobs/<file_name>, read without claiming it (capped, no symlinks).

        Raises OSError (gone: another worker took it) or ValueError (not a small JSON document).
        """
        if "/" in file_name or file_name.startswith("."):
            raise ValueError(f"not a job document name: {file_name!r}")
        return read_document(os.path.join(self.layout.directory("jobs"), file_name))

    def reject(self, file_name: str) -> None:
        """Move work/<file_name>, whose name is no job id, to failed/<file_name>.rejected (logs an error)."""
        try:
            os.rename(os.path.join(self.layout.directory("work"), file_name),
                      os.path.join(self.layout.directory("failed"), file_name + ".rejected"))
        except OSError as error:
            self.log.error("runner.reject_failed", file=file_name, error=str(error))

    def stamp(self, job_id: str, token: str, claimed_at: float) -> dict:
        """Sign the claim on work/<id>.json with `token`; return the job document as it was queued.

        The stamp names this worker, its host, pid and heartbeat interval, and the document's queue
        time (so a returned claim gets its place back). Raises ProtocolError when the document is
        unreadable or no JSON object, OSError when the stamp cannot be written.
        """
        work = self.layout.job(job_id, "work")
        queued_mtime = os.lstat(work).st_mtime
        try:
            data = read_document(work)
        except (OSError, ValueError) as error:
            raise ProtocolError(f"job document unreadable: {error}") from error
        if not isinstance(data, dict):
            raise ProtocolError("job document is not a JSON object")
        original = {key: value for key, value in data.items() if key != "claim"}
        claim = {"claimed_by": self.name, "claimed_at": claimed_at, "pid": os.getpid(), "hostname": HOSTNAME,
                 "token": token, "heartbeat_seconds": self.heartbeat_seconds, "queued_mtime": queued_mtime}
        self._write(work, {**original, "claim": claim})
        return original

    # ------------------------------------------------------------------------------------- outcomes

    def has_result(self, job_id: str) -> bool:
        """Whether results/<id>.json exists (the job was done already)."""
        return os.path.exists(self.layout.result(job_id))

    def publish(self, job_id: str, result: dict, token: str | None) -> None:
        """Write results/<id>.json, remove an earlier failure record, release the claim. Raises OSError."""
        self._write(self.layout.result(job_id), result)
        unlink_quietly(self.layout.failure(job_id))  # a Result supersedes an earlier failure
        self.release(job_id, token)

    def write_progress(self, job_id: str, document: dict) -> None:
        """Rewrite progress/<id>.json (not fsynced into the folder: it is advisory). Raises OSError."""
        self._write(self.layout.progress(job_id), document, durable=False)

    def fail(self, job_id: str, token: str | None, document: dict) -> bool:
        """Write failed/<id>.json and release the claim; False (logged) when the record cannot be written.

        Then the claim stays in work/: after a restart this worker returns it to jobs/ and tries again.
        """
        try:
            self._write(self.layout.failure(job_id), document)
        except OSError as error:
            self.log.error("runner.failure_write_failed", job_id=job_id, kind=document.get("kind"),
                           message=document.get("message"), error=str(error))
            return False
        self.release(job_id, token)
        return True

    def write_heartbeat(self, document: dict) -> None:
        """Replace runners/<name>.json (not fsynced into the folder: the next one follows). Raises OSError.

        One writer at a time: concurrent calls share a temporary name, so callers serialise them.
        """
        self._write(self.layout.heartbeat(self.name), document, durable=False)

    # -------------------------------------------------------------------------------------- claims

    def owns(self, job_id: str, token: str) -> bool:
        """Whether work/<id>.json holds the claim `token` (False when missing or unreadable)."""
        try:
            data = read_document(self.layout.job(job_id, "work"))
        except (OSError, ValueError):
            return False
        claim = _claim_of(data)
        return claim is not None and claim.get("token") == token

    def release(self, job_id: str, token: str | None) -> None:
        """Drop the claim (work/<id>.json, unless another worker holds it now) and progress/<id>.json.

        `token` None drops the file whatever it holds. Errors are logged, never raised.
        """
        work = self.layout.job(job_id, "work")
        try:
            if token is None or self.owns(job_id, token) or _claim_of(self._read_quietly(work)) is None:
                unlink_quietly(work)
            unlink_quietly(self.layout.progress(job_id))
        except OSError as error:
            self.log.warning("runner.release_failed", job_id=job_id, error=str(error))

    @staticmethod
    def _read_quietly(path: str) -> Any:
        try:
            return read_document(path)
        except (OSError, ValueError):
            return None

    def return_claim(self, job_id: str, token: str | None) -> bool:
        """Move work/<id>.json back to jobs/ if it still holds the claim `token` (None: no claim).

        The file first moves to a private name, so of several workers returning it only one
        proceeds, and a fresh claim made meanwhile is put back untouched. The stamp is removed and
        the queue time restored. Returns True if moved. Raises OSError.
        """
        work = self.layout.job(job_id, "work")
        private = f"{work}.{self.name}.returning"
        try:
            os.rename(work, private)
        except FileNotFoundError:
            return False
        data = self._read_quietly(private)
        claim = _claim_of(data)
        current = claim.get("token") if claim is not None else None
        if current != token:
            os.rename(private, work)  # claimed afresh meanwhile: not ours to return
            return False
        if isinstance(data, dict):
            self._write(private, {key: value for key, value in data.items() if key != "claim"})
            queued = claim.get("queued_mtime") if claim is not None else None
            if isinstance(queued, (int, float)):
                os.utime(private, (queued, queued))  # back in its old place in the queue
        os.rename(private, self.layout.job(job_id, "jobs"))
        unlink_quietly(self.layout.progress(job_id))
        return True

    def reclaim_stale(self, now: float, in_hand: str | None = None) -> list[str]:
        """Return dead workers' claims in work/ to jobs/; the job ids returned (each one logged).

        A claim is dead when its owner's heartbeat is missing, says `stopped`, or is older than
        3 heartbeat intervals (and so is the claim itself); a claim in this worker's name that is
        not `in_hand` is dead too (it holds none after a restart). `now` is wall-clock seconds.
        Raises OSError.
        """
        returned = []
        with os.scandir(self.layout.directory("work")) as scan:
            names = [entry.name for entry in scan if entry.name.endswith(".json")]
        for file_name in names:
            job_id = file_name[: -len(".json")]
            try:
                check_job_id(job_id)
            except ProtocolError:
                continue
            if job_id == in_hand:
                continue
            path = self.layout.job(job_id, "work")
            try:
                status = os.lstat(path)
            except FileNotFoundError:
                continue
            claim = _claim_of(self._read_quietly(path))
            if claim is None:
                # Renamed in but not stamped yet (or by a worker that died at that instant): rename
                # sets ctime, so give its claimer the usual grace from then.
                stale = now - status.st_ctime > STALE_HEARTBEATS * self.heartbeat_seconds
                owner, token = None, None
            else:
                owner, token = claim.get("claimed_by"), claim.get("token")
                stale = self._claim_is_dead(owner, claim, status.st_mtime, now)
            if stale and self.return_claim(job_id, token):
                returned.append(job_id)
                self.log.warning("runner.claim_returned", job_id=job_id, owner=owner)
        return returned

    def _claim_is_dead(self, owner: Any, claim: dict, claim_mtime: float, now: float) -> bool:
        if owner == self.name:
            return True
        try:
            heartbeat = read_document(self.layout.heartbeat(owner))
        except (ProtocolError, OSError, ValueError):
            heartbeat = None
        if not isinstance(heartbeat, dict):
            heartbeat = {}
        if heartbeat.get("state") == "stopped":
            return True
        interval = heartbeat.get("heartbeat_seconds") or claim.get("heartbeat_seconds") or self.heartbeat_seconds
        updated = heartbeat.get("updated_at")
        last_sign = max(claim_mtime, updated if isinstance(updated, (int, float)) else -math.inf)
        return now - last_sign > STALE_HEARTBEATS * float(interval)

    # -------------------------------------------------------------------------------------- expiry

    def expire(self, now: float, older_than: float, in_hand: str | None = None) -> int:
        """Remove leftovers not modified for `older_than` seconds before `now`; how many files went.

        Covers incoming/ (audio and stale .part), results/, failed/, progress/, work/, other workers'
        heartbeats and stray .tmp files in jobs/. Keeps the audio of jobs still queued or claimed,
        the claim on `in_hand` and this worker's heartbeat. Folders are never removed. A file that
        cannot be removed is logged and skipped; listing a folder raises OSError.
        """
        cutoff = now - older_than
        active = set()
        for directory in ("jobs", "work"):
            with os.scandir(self.layout.directory(directory)) as scan:
                active.update(entry.name.split(".")[0] for entry in scan if entry.name.endswith(".json"))
        removed = 0
        for directory in EXPIRE_DIRECTORIES:
            with os.scandir(self.layout.directory(directory)) as scan:
                entries = list(scan)
            for entry in entries:
                stem = entry.name.split(".")[0]
                if directory == "jobs" and not entry.name.endswith(".tmp"):
                    continue
                if directory == "incoming" and stem in active and not entry.name.endswith(".part"):
                    continue
                if directory == "work" and stem == in_hand:
                    continue
                if directory == "runners" and entry.name == f"{self.name}.json":
                    continue
                try:
                    status = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(status.st_mode) or status.st_mtime >= cutoff:
                        continue
                    if unlink_quietly(entry.path):
                        removed += 1
                except OSError as error:
                    self.log.warning("runner.expire_failed", path=entry.path, error=str(error))
        if removed:
            self.log.info("runner.expired", files=removed, older_than_days=older_than / 86400.0)
        return removed
