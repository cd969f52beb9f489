"""The GPU runner: claims jobs from a spool directory, transcribes them with the shared engine, publishes Results.

The daemon reaches this process only through files in the spool (see `whisperdrop.spool`). The loop
body is `Runner.step(now)`: claim the oldest job by renaming jobs/<id>.json to work/<id>.json (only
one rename wins, so several runners share a spool safely), check the audio's size and sha256,
transcribe, write results/<id>.json or failed/<id>.json (tmp, fsync, rename), drop the claim.
`Runner.serve(stop)` wraps it: a heartbeat thread, a watchdog observer on jobs/ plus a rescan timer
(a missed event delays a job, never loses it), reclaiming dead runners' claims, expiring leftovers.
`main(config)` is the `whisperdrop runner` entry point.

No shell is ever run: every file name is joined by `spool.Layout`, which checks job ids and names.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import socket
import stat
import threading
import time
import uuid
from typing import Any, Callable

from whisperdrop import __version__, log
from whisperdrop.config import defaults as config_defaults
from whisperdrop.files import sha256_file, write_atomic
from whisperdrop.notify import Notifier
from whisperdrop.engine import (
    Cancelled, Engine, EngineError, ModelKey, resolve_compute_type, resolve_device,
)
from whisperdrop.spool import (
    DIRECTORIES, JobDocument, Layout, ProtocolError, check_job_id, check_result, check_runner_name,
    dumps, parse_job,
)

RESCAN_SECONDS = 2.0        # jobs/ is rescanned at least this often, whatever watchdog reports
IDLE_FIRST_SECONDS = 0.05   # first idle wait; doubles up to RESCAN_SECONDS
PROGRESS_SECONDS = 1.0      # progress/<id>.json is rewritten at most this often
STALE_HEARTBEATS = 3        # a claim is dead when its owner missed this many heartbeats
EXPIRE_EVERY_SECONDS = 3600.0
MAX_DOCUMENT_BYTES = 1 << 20
INT8_TYPES = ("int8", "int8_float16", "int8_float32", "int8_bfloat16")
EXPIRE_DIRECTORIES = ("incoming", "results", "failed", "progress", "work", "runners", "jobs")

HOSTNAME = socket.gethostname()


def default_name(device_index: int) -> str:
    """`<short hostname>-gpu<N>`, with characters a runner name may not hold replaced by '-'."""
    host = "".join(char if char.isascii() and (char.isalnum() or char in "_-") else "-"
                   for char in HOSTNAME.split(".")[0]).lstrip("_-")
    return check_runner_name(f"{host[:50] or 'runner'}-gpu{device_index}")


def gpu_name(device_index: int) -> str | None:
    """The CUDA device's name through the driver API (libcuda), or None without a driver or device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device = ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), device_index) != 0:
        return None
    if cuda.cuDeviceGetName(name, len(name), device) != 0:
        return None
    return name.value.decode(errors="replace") or None


def read_document(path: str) -> Any:
    """Read a small JSON document without following a symlink.

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


def _unlink_quietly(path: str) -> bool:
    """Remove a file; True if it was there. A missing file is fine; other errors propagate."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class _Failure(Exception):
    """A job that ends in failed/<id>.json; carries the fields of that document."""

    def __init__(self, kind: str, message: str, retryable: bool):
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable


class Runner:
    """One worker over a spool directory; keeps its models loaded between jobs.

    `settings` is the config's `runner` mapping (missing keys take the schema defaults). `engine` is
    shared with the caller when given (tests inject one); `clock` gives wall-clock seconds for
    documents and staleness; `name` overrides `settings["name"]`. Creates the spool directories.
    Raises ProtocolError for a name unusable in a file name.
    """

    def __init__(self, settings: dict, *, engine: Engine | None = None, clock: Callable[[], float] = time.time,
                 name: str | None = None):
        merged = {**config_defaults()["runner"], **dict(settings)}
        self.settings = merged
        self.spool = os.path.abspath(merged["spool"])
        self.layout = Layout(self.spool)
        self.model = merged["model"]
        self.device = resolve_device(merged["device"])
        self.device_index = int(merged["device_index"])
        self.compute_type = resolve_compute_type(merged["compute_type"], self.device)
        self.batch_size = max(1, int(merged["batch_size"]))
        self.heartbeat_seconds = float(merged["heartbeat_seconds"])
        self.expire_seconds = float(merged["expire_days"]) * 86400.0
        self.name = check_runner_name(name or merged["name"] or default_name(self.device_index))
        self.engine = engine if engine is not None else Engine(max_models=int(merged["max_models"]))
        self.clock = clock
        self.gpu = gpu_name(self.device_index) if self.device == "cuda" else None
        self.log = log.get("runner", runner=self.name)
        self.started_at = clock()
        self._cancel = threading.Event()   # set on stop: the engine raises Cancelled between segments
        self._wake = threading.Event()     # set by watchdog events on jobs/ and by stop
        self._lock = threading.Lock()      # guards the counters and the current job
        self._heartbeat_lock = threading.Lock()
        self._state = "created"
        self._current: dict | None = None
        self._jobs_done = 0
        self._jobs_failed = 0
        self._audio_seconds_done = 0.0
        self._transcribe_seconds_done = 0.0
        for directory in DIRECTORIES:
            os.makedirs(self.layout.directory(directory), exist_ok=True)

    # ----------------------------------------------------------------------------------- the step

    def step(self, now: float | None = None) -> bool:
        """Claim the oldest queued job and do it; True if a job was claimed (done, failed or parked).

        Never raises for a bad job: every failure ends in failed/<id>.json and a log event.
        """
        now = self.clock() if now is None else now
        for file_name in self._queued():
            try:
                os.rename(os.path.join(self.layout.directory("jobs"), file_name),
                          os.path.join(self.layout.directory("work"), file_name))
            except FileNotFoundError:
                continue  # another runner's rename won
            self._handle(file_name, now)
            return True
        return False

    def _queued(self) -> list[str]:
        """Names in jobs/ that look like job documents, oldest first (directories are ignored)."""
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

    def _handle(self, file_name: str, now: float) -> None:
        job_id = file_name[: -len(".json")]
        try:
            check_job_id(job_id)
        except ProtocolError as error:
            self._reject(file_name, str(error))
            return
        token = uuid.uuid4().hex
        with self._lock:
            self._current = {"job_id": job_id, "token": token, "started_at": now, "done_s": 0.0, "duration_s": None}
        try:
            self._do(job_id, token, now)
        except Cancelled:
            self._unclaim(job_id, token)
        except _Failure as failure:
            self._fail(job_id, token, failure.kind, str(failure), failure.retryable)
        except Exception as error:  # a bug or a disk error must not stop the other jobs
            self.log.exception("runner.job_crashed", job_id=job_id)
            self._fail(job_id, token, "runner", f"{type(error).__name__}: {error}", True)
        finally:
            with self._lock:
                self._current = None

    def _do(self, job_id: str, token: str, claimed_at: float) -> None:
        work = self.layout.job(job_id, "work")
        queued_mtime = os.lstat(work).st_mtime
        try:
            data = read_document(work)
        except (OSError, ValueError) as error:
            raise _Failure("protocol", f"job document unreadable: {error}", False) from error
        if not isinstance(data, dict):
            raise _Failure("protocol", "job document is not a JSON object", False)
        original = {key: value for key, value in data.items() if key != "claim"}
        claim = {"claimed_by": self.name, "claimed_at": claimed_at, "pid": os.getpid(), "hostname": HOSTNAME,
                 "token": token, "heartbeat_seconds": self.heartbeat_seconds, "queued_mtime": queued_mtime}
        write_atomic(work, dumps({**original, "claim": claim}), tag=self.name)
        if os.path.exists(self.layout.result(job_id)):
            self.log.info("runner.job_already_done", job_id=job_id)
            self._release(job_id, token)
            return
        try:
            job = parse_job(original, job_id)
        except ProtocolError as error:
            raise _Failure("protocol", str(error), False) from error
        with self._lock:
            self._current.update(duration_s=job.duration, model=job.options.model)
        descriptor = self._open_checked_audio(job)
        try:
            self._transcribe_and_publish(job, token, claimed_at, descriptor, original)
        finally:
            os.close(descriptor)

    def _open_checked_audio(self, job: JobDocument) -> int:
        """Open incoming/<id>.opus (no symlinks) and check its size and sha256 against the job.

        Returns the open descriptor. Raises _Failure kind `checksum` (retryable) after deleting a bad
        file, so the daemon uploads again from zero.
        """
        path = self.layout.audio(job.job_id)
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError as error:
            raise _Failure("checksum", f"audio {path} is missing", True) from error
        except OSError as error:  # a symlink (ELOOP) or unreadable: never read through it
            self._delete_bad_audio(path)
            raise _Failure("checksum", f"audio {path} cannot be opened safely: {error}", True) from error
        try:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                problem = "is not a regular file"
            elif status.st_size != job.audio_size:
                problem = f"has {status.st_size} bytes where the job says {job.audio_size}"
            else:
                digest = sha256_file(descriptor)
                problem = None if digest == job.audio_sha256 else f"has sha256 {digest} where the job says {job.audio_sha256}"
        except BaseException:
            os.close(descriptor)
            raise
        if problem:
            os.close(descriptor)
            self._delete_bad_audio(path)
            raise _Failure("checksum", f"audio {path} {problem}; deleted, upload it again", True)
        return descriptor

    def _delete_bad_audio(self, path: str) -> None:
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as error:  # the failure record matters more than this cleanup
            self.log.warning("runner.audio_delete_failed", path=path, error=str(error))

    def _transcribe_and_publish(self, job: JobDocument, token: str, claimed_at: float, descriptor: int,
                                original: dict) -> None:
        audio_path = self.layout.audio(job.job_id)
        # Transcribe the very file that was checked, even if the name is replaced meanwhile.
        proc_path = f"/proc/self/fd/{descriptor}"
        source = proc_path if os.path.exists(proc_path) else audio_path
        self._write_progress(job.job_id, 0.0, job.duration)
        started = time.monotonic()
        try:
            result, attempts = self._transcribe_with_ladder(job, source)
        except EngineError as error:
            raise _Failure(error.kind, str(error).replace(proc_path, audio_path), error.retryable) from error
        finally:
            elapsed = time.monotonic() - started
        final = attempts[-1]
        result = dict(result)
        result["job_id"] = job.job_id
        result["executed_on"] = {
            "route": "remote", "host": self.name, "hostname": HOSTNAME, "device": self.device, "gpu": self.gpu,
            "compute_type": final["compute_type"], "batch_size": final["batch_size"],
            "oom_retries": len(attempts) - 1,
        }
        timings = dict(result.get("timings") or {})
        timings["queue_s"] = _round(claimed_at - job.submitted_at) if job.submitted_at else None
        timings["runner_s"] = _round(elapsed)
        result["timings"] = timings
        check_result(result, job.job_id)
        write_atomic(self.layout.result(job.job_id), dumps(result), tag=self.name)
        _unlink_quietly(self.layout.failure(job.job_id))  # a Result supersedes an earlier failure
        self._release(job.job_id, token)
        audio_seconds = float(result.get("duration") or job.duration or 0.0)
        with self._lock:
            self._jobs_done += 1
            self._audio_seconds_done += audio_seconds
            self._transcribe_seconds_done += elapsed
        self.log.info(
            "runner.job_done", job_id=job.job_id, audio_s=_round(audio_seconds), transcribe_s=_round(elapsed),
            rtf=_round(elapsed / audio_seconds, 4) if audio_seconds else None, model=job.options.model,
            device=self.device, compute_type=final["compute_type"], batch_size=final["batch_size"],
            oom_retries=len(attempts) - 1, queue_s=timings["queue_s"],
        )

    def _transcribe_with_ladder(self, job: JobDocument, source: str) -> tuple[dict, list[dict]]:
        """Run the engine; on out-of-memory halve the batch size down to 1, then try int8.

        Returns (engine result, attempts). Raises EngineError (kind `oom`, retryable, when every rung
        ran out of memory) or Cancelled.
        """
        batch_size, compute_type = self.batch_size, self.compute_type
        attempts: list[dict] = []
        last_write = [-math.inf]

        def progress(done: float, duration: float) -> None:
            with self._lock:
                if self._current is not None:
                    self._current.update(done_s=done, duration_s=duration)
            moment = time.monotonic()
            if moment - last_write[0] >= PROGRESS_SECONDS:
                last_write[0] = moment
                self._write_progress(job.job_id, done, duration)

        while True:
            attempts.append({"batch_size": batch_size, "compute_type": compute_type})
            try:
                result = self.engine.transcribe(
                    source, job.options, device=self.device, compute_type=compute_type,
                    device_index=self.device_index, batch_size=batch_size, progress=progress, cancel=self._cancel,
                )
                return result, attempts
            except EngineError as error:
                if error.kind != "oom":
                    raise
                rung = self._next_rung(batch_size, compute_type)
                self.log.warning("runner.out_of_memory", job_id=job.job_id, batch_size=batch_size,
                                 compute_type=compute_type, next=rung, error=str(error))
                if rung is None:
                    tried = ", ".join(f"batch {attempt['batch_size']} {attempt['compute_type']}" for attempt in attempts)
                    raise EngineError(f"out of memory at every rung ({tried}): {error}", kind="oom",
                                      retryable=True) from error
                batch_size, compute_type = rung

    def _next_rung(self, batch_size: int, compute_type: str) -> tuple[int, str] | None:
        if batch_size > 1:
            return max(1, batch_size // 2), compute_type
        if compute_type not in INT8_TYPES:
            return 1, "int8_float16" if self.device == "cuda" else "int8"
        return None

    def _write_progress(self, job_id: str, done: float, duration: float | None) -> None:
        document = {"done_s": _round(done), "duration_s": _round(duration), "updated_at": self.clock()}
        try:
            write_atomic(self.layout.progress(job_id), dumps(document), tag=self.name, durable=False)
        except OSError as error:  # progress is advisory; never fail a job for it
            self.log.warning("runner.progress_write_failed", job_id=job_id, error=str(error))

    # ------------------------------------------------------------------------ claims and failures

    def _owns(self, job_id: str, token: str) -> bool:
        try:
            data = read_document(self.layout.job(job_id, "work"))
        except (OSError, ValueError):
            return False
        claim = data.get("claim") if isinstance(data, dict) else None
        return isinstance(claim, dict) and claim.get("token") == token

    def _release(self, job_id: str, token: str | None) -> None:
        """Drop our claim (work/<id>.json, unless another runner holds it now) and the progress file."""
        work = self.layout.job(job_id, "work")
        try:
            if token is None or self._owns(job_id, token) or not self._stamped(work):
                _unlink_quietly(work)
            _unlink_quietly(self.layout.progress(job_id))
        except OSError as error:
            self.log.warning("runner.release_failed", job_id=job_id, error=str(error))

    @staticmethod
    def _stamped(path: str) -> bool:
        """Whether a work/ file carries a readable claim (an unreadable document carries none)."""
        try:
            data = read_document(path)
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and isinstance(data.get("claim"), dict)

    def _fail(self, job_id: str, token: str | None, kind: str, message: str, retryable: bool) -> None:
        document = {"job_id": job_id, "kind": kind, "message": message, "retryable": retryable,
                    "runner": self.name, "at": self.clock()}
        try:
            write_atomic(self.layout.failure(job_id), dumps(document), tag=self.name)
        except OSError as error:
            # Keep the claim: after a restart this runner returns it to jobs/ and tries again.
            self.log.error("runner.failure_write_failed", job_id=job_id, kind=kind, message=message, error=str(error))
            return
        self._release(job_id, token)
        with self._lock:
            self._jobs_failed += 1
        self.log.warning("runner.job_failed", job_id=job_id, kind=kind, message=message, retryable=retryable)

    def _reject(self, file_name: str, reason: str) -> None:
        """A file in jobs/ whose name is no job id: move it to failed/<name>.rejected and log it."""
        source = os.path.join(self.layout.directory("work"), file_name)
        try:
            os.rename(source, os.path.join(self.layout.directory("failed"), file_name + ".rejected"))
        except OSError as error:
            self.log.error("runner.reject_failed", file=file_name, error=str(error))
        with self._lock:
            self._jobs_failed += 1
        self.log.warning("runner.job_failed", job_id=None, file=file_name, kind="protocol", message=reason,
                         retryable=False)

    def _unclaim(self, job_id: str, token: str) -> None:
        """Put a job we were cancelled on back in jobs/ (its queue position kept), for any runner."""
        if self._return_claim(job_id, token):
            self.log.info("runner.job_parked", job_id=job_id)

    def _return_claim(self, job_id: str, token: str | None) -> bool:
        """Move work/<id>.json back to jobs/ if it still holds the claim `token` (None: no claim).

        The file first moves to a private name, so of several runners returning it only one
        proceeds, and a fresh claim made meanwhile is put back untouched. Returns True if moved.
        """
        work = self.layout.job(job_id, "work")
        private = f"{work}.{self.name}.returning"
        try:
            os.rename(work, private)
        except FileNotFoundError:
            return False
        try:
            data = read_document(private)
        except (OSError, ValueError):
            data = None
        claim = data.get("claim") if isinstance(data, dict) else None
        current = claim.get("token") if isinstance(claim, dict) else None
        if current != token:
            os.rename(private, work)  # claimed afresh meanwhile: not ours to return
            return False
        if isinstance(data, dict):
            write_atomic(private, dumps({key: value for key, value in data.items() if key != "claim"}), tag=self.name)
            queued = claim.get("queued_mtime") if isinstance(claim, dict) else None
            if isinstance(queued, (int, float)):
                os.utime(private, (queued, queued))  # back in its old place in the queue
        os.rename(private, self.layout.job(job_id, "jobs"))
        _unlink_quietly(self.layout.progress(job_id))
        return True

    def reclaim_stale(self, now: float | None = None) -> list[str]:
        """Return dead runners' claims in work/ to jobs/; the job ids returned.

        A claim is dead when its owner's heartbeat is missing, says `stopped`, or is older than
        3 heartbeat intervals (and so is the claim itself); a claim in this runner's name that is not
        the job in hand is dead too (we hold none after a restart). Call it from the thread that
        runs `step`.
        """
        now = self.clock() if now is None else now
        with self._lock:
            in_hand = self._current["job_id"] if self._current else None
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
            try:
                data = read_document(path)
            except (OSError, ValueError):
                data = None
            claim = data.get("claim") if isinstance(data, dict) else None
            if not isinstance(claim, dict):
                # Renamed in but not stamped yet (or by a runner that died at that instant): rename
                # sets ctime, so give its claimer the usual grace from then.
                stale = now - status.st_ctime > STALE_HEARTBEATS * self.heartbeat_seconds
                owner, token = None, None
            else:
                owner, token = claim.get("claimed_by"), claim.get("token")
                stale = self._claim_is_dead(owner, claim, status.st_mtime, now)
            if stale and self._return_claim(job_id, token):
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

    # ------------------------------------------------------------------------ heartbeat and expiry

    def queue_length(self) -> int:
        """How many job documents wait in jobs/."""
        with os.scandir(self.layout.directory("jobs")) as scan:
            return sum(1 for entry in scan if entry.name.endswith(".json"))

    def heartbeat(self, now: float | None = None) -> None:
        """Write runners/<name>.json (tmp, fsync, rename): who we are, what we hold, what we did."""
        now = self.clock() if now is None else now
        with self._lock:
            current = None
            if self._current is not None:
                current = {key: self._current.get(key) for key in ("job_id", "model", "started_at", "done_s", "duration_s")}
            figures = {
                "jobs_done": self._jobs_done, "jobs_failed": self._jobs_failed,
                "audio_seconds_done": round(self._audio_seconds_done, 3),
                "transcribe_seconds_done": round(self._transcribe_seconds_done, 3),
            }
        document = {
            "name": self.name, "host": HOSTNAME, "pid": os.getpid(),
            "state": "busy" if current is not None and self._state == "idle" else self._state,
            "device": self.device, "device_index": self.device_index, "gpu": self.gpu,
            "compute_type": self.compute_type, "batch_size": self.batch_size, "model": self.model,
            "models_loaded": [{"model": key.model, "device": key.device, "compute_type": key.compute_type}
                              for key in self.engine.loaded()],
            "queue_length": self.queue_length(), "current": current, **figures,
            "started_at": self.started_at, "updated_at": now, "heartbeat_seconds": self.heartbeat_seconds,
            "version": __version__,
        }
        with self._heartbeat_lock:
            write_atomic(self.layout.heartbeat(self.name), dumps(document), tag=self.name, durable=False)

    def expire(self, now: float | None = None) -> int:
        """Remove leftovers older than `expire_days`; how many files were removed.

        Covers incoming/ (audio and stale .part), results/, failed/, progress/, work/, other runners'
        heartbeats and stray .tmp files in jobs/. Keeps the audio of jobs still queued or claimed,
        the job in hand and our own heartbeat. Directories are never removed.
        """
        now = self.clock() if now is None else now
        cutoff = now - self.expire_seconds
        with self._lock:
            in_hand = self._current["job_id"] if self._current else None
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
                    if _unlink_quietly(entry.path):
                        removed += 1
                except OSError as error:
                    self.log.warning("runner.expire_failed", path=entry.path, error=str(error))
        if removed:
            self.log.info("runner.expired", files=removed, older_than_days=self.expire_seconds / 86400.0)
        return removed

    # ------------------------------------------------------------------------------------ serving

    def preload(self) -> None:
        """Load the configured model now, so the first job does not wait for it. Logs a failure."""
        key = ModelKey(self.model, self.device, self.compute_type, self.device_index)
        started = time.monotonic()
        try:
            self.engine.load(key)
        except EngineError as error:  # jobs naming other models can still run; each job fails on its own
            self.log.error("runner.preload_failed", model=self.model, error=str(error), kind=error.kind)
            return
        self.log.info("runner.model_loaded", model=self.model, device=self.device, compute_type=self.compute_type,
                      load_s=_round(time.monotonic() - started))

    def serve(self, stop: threading.Event) -> None:
        """Process jobs until `stop` is set; sets `stop` itself when it ends for another reason.

        On stop the job in hand is cancelled between segments and put back in jobs/. Returns within
        about one engine segment (or model load) of `stop.set()`.
        """
        self._cancel.clear()
        self._state = "starting"
        self.log.info("runner.start", spool=self.spool, model=self.model, device=self.device, gpu=self.gpu,
                      compute_type=self.compute_type, batch_size=self.batch_size, version=__version__)
        self.heartbeat()
        self.reclaim_stale()
        beat = threading.Thread(target=self._beat, args=(stop,), name=f"runner-heartbeat-{self.name}", daemon=True)
        beat.start()
        observer = self._watch_jobs()
        try:
            self._state = "loading"
            self.preload()
            self._state = "idle"
            self._loop(stop)
        finally:
            stop.set()
            self._wake.set()
            beat.join()
            if observer is not None:
                observer.stop()
                observer.join()
            self._state = "stopped"
            try:
                self.heartbeat()
            except OSError as error:
                self.log.warning("runner.heartbeat_failed", error=str(error))
            self.log.info("runner.stopped", jobs_done=self._jobs_done, jobs_failed=self._jobs_failed)

    def _loop(self, stop: threading.Event) -> None:
        idle = IDLE_FIRST_SECONDS
        last_reclaim = time.monotonic()
        last_expire = -math.inf
        while not stop.is_set():
            moment = time.monotonic()
            if moment - last_expire >= EXPIRE_EVERY_SECONDS:
                last_expire = moment
                self._guarded(self.expire)
            if moment - last_reclaim >= self.heartbeat_seconds:
                last_reclaim = moment
                self._guarded(self.reclaim_stale)
            worked = self._guarded(self.step)
            if worked or stop.is_set():
                idle = IDLE_FIRST_SECONDS
                continue
            self._wake.wait(min(idle, RESCAN_SECONDS))
            self._wake.clear()
            idle = min(idle * 2, RESCAN_SECONDS)

    def _guarded(self, action: Callable[[], Any]) -> Any:
        """Run one loop action; an OSError (spool unreachable, disk full) is logged and waited out."""
        try:
            return action()
        except OSError as error:
            self.log.error("runner.spool_error", action=action.__name__, error=str(error))
            return None

    def _beat(self, stop: threading.Event) -> None:
        deadline = time.monotonic() + self.heartbeat_seconds
        while not stop.wait(max(0.0, deadline - time.monotonic())):
            deadline += self.heartbeat_seconds
            try:
                self.heartbeat()
            except Exception:  # this thread must outlive any one bad beat, or others take our claims
                self.log.exception("runner.heartbeat_failed")
        self._cancel.set()
        self._wake.set()

    def _watch_jobs(self) -> Any:
        """A watchdog observer that wakes the loop on any change in jobs/; None if it cannot start."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        wake = self._wake

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                wake.set()

        observer = Observer()
        try:
            observer.schedule(Wake(), self.layout.directory("jobs"), recursive=False)
            observer.start()
        except OSError as error:  # inotify limits: the rescan timer still finds every job
            self.log.warning("runner.watch_failed", error=str(error))
            return None
        return observer


def main(config: Any) -> int:
    """Run the runner from a validated config until SIGTERM or SIGINT; 0 on a clean stop.

    The first signal sets a flag: the job in hand is put back in jobs/ and the runner exits. A second
    one exits at once (its claim goes back at the next start). SIGHUP reopens the log file.
    """
    stop = threading.Event()
    reopen = threading.Event()

    def on_stop(signum: int, frame: Any) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    def on_hangup(signum: int, frame: Any) -> None:
        reopen.set()

    previous = {number: signal.signal(number, handler)
                for number, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hangup))}
    logger = log.get("runner")
    try:
        try:
            runner = Runner(config["runner"])
        except (ProtocolError, EngineError, OSError) as error:
            logger.error("runner.cannot_start", error=str(error))
            return 2
        crashed: list[BaseException] = []

        def serve() -> None:
            try:
                runner.serve(stop)
            except BaseException as error:  # reported below, after the thread ends
                crashed.append(error)
                stop.set()

        # The loop runs in a thread so that the main thread stays free to run signal handlers at once.
        worker = threading.Thread(target=serve, name="runner-serve")
        worker.start()
        # READY before the model loads, so downloading large-v3 cannot hit systemd's start timeout.
        notifier = Notifier()
        notifier.ready(status=f"serving {runner.spool}")
        while worker.is_alive():
            notifier.tick(status=lambda: f"{runner._state}, queue {runner.queue_length()}")
            worker.join(0.5)
            if reopen.is_set():
                reopen.clear()
                log.reopen()
        if crashed:
            logger.error("runner.crashed", error=f"{type(crashed[0]).__name__}: {crashed[0]}",
                         exc_info=crashed[0])
            return 1
        return 0
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
