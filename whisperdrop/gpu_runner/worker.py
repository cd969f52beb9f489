"""The runner's worker step: claim one job from the spool store and do it.

`Worker.step(now)` (huey's `loop(now)`, the clock passed in) claims the oldest job, checks the audio's
size and sha256 against the job document, transcribes with the shared engine (on out-of-memory:
half the batch down to 1, then int8), writes progress while it runs, and publishes the Result or a
failure record. It never raises for a bad job. Threads, signals and the heartbeat timer belong to
`service`; the worker only keeps the state its heartbeat document reports.
"""

from __future__ import annotations

import ctypes
import math
import os
import stat
import threading
import time
import uuid
from typing import Callable

from whisperdrop import __version__, log
from whisperdrop.config import defaults as config_defaults
from whisperdrop.engine import Cancelled, Engine, EngineError, ModelKey, resolve_compute_type, resolve_device
from whisperdrop.errors import WhisperdropError
from whisperdrop.files import sha256_file
from whisperdrop.gpu_runner.store import HOSTNAME, SpoolStore
from whisperdrop.spool import JobDocument, ProtocolError, check_job_id, check_result, check_runner_name, parse_job

PROGRESS_SECONDS = 1.0      # progress/<id>.json is rewritten at most this often
INT8_TYPES = ("int8", "int8_float16", "int8_float32", "int8_bfloat16")

HINTS = {  # what a person can do about each kind of failure; the runner's log carries it
    "protocol": "the daemon and the runner disagree on the job document: run the same whisperdrop version on both",
    "checksum": "the audio was deleted; the daemon uploads it again from zero",
    "oom": "the job goes back to the daemon to retry; lower runner.batch_size or use a smaller model",
    "model": "check runner.model and that the GPU host has the model (or network to download it)",
    "audio": "the audio cannot be decoded; look at the source file and the daemon's extraction",
    "engine": "see the runner's log for the engine's error",
    "runner": "a bug or a disk error on the GPU host: see the runner's log for the traceback",
}


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


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class _Failure(WhisperdropError):
    """A job that ends in failed/<id>.json: `kind` and `retryable` go into that document, `hint` (what
    a person can do) into the log."""

    def __init__(self, kind: str, message: str, retryable: bool, hint: str | None = None):
        super().__init__(message, kind=kind, retryable=retryable,
                         hint=hint if hint is not None else HINTS.get(kind, ""))


class Worker:
    """Does jobs from one spool directory, one `step` at a time; keeps its models loaded between jobs.

    `settings` is the config's `runner` mapping (missing keys take the schema defaults). `engine` is
    shared with the caller when given (tests inject one); `clock` gives wall-clock seconds for
    documents and staleness; `name` overrides `settings["name"]`; `alive` is called whenever the
    work moves on (a claim, a transcribed segment), for a watchdog. Creates the spool folders.
    Raises ProtocolError for a name unusable in a file name, OSError when the spool cannot be made.
    """

    def __init__(self, settings: dict, *, engine: Engine | None = None, clock: Callable[[], float] = time.time,
                 name: str | None = None, alive: Callable[[], None] = lambda: None):
        merged = {**config_defaults()["runner"], **dict(settings)}
        self.settings = merged
        self.model = merged["model"]
        self.device = resolve_device(merged["device"])
        self.device_index = int(merged["device_index"])
        self.compute_type = resolve_compute_type(merged["compute_type"], self.device)
        self.batch_size = max(1, int(merged["batch_size"]))
        self.heartbeat_seconds = float(merged["heartbeat_seconds"])
        self.expire_seconds = float(merged["expire_days"]) * 86400.0
        self.name = check_runner_name(name or merged["name"] or default_name(self.device_index))
        self.store = SpoolStore(merged["spool"], self.name, heartbeat_seconds=self.heartbeat_seconds)
        self.spool = self.store.root
        self.layout = self.store.layout
        self.engine = engine if engine is not None else Engine(max_models=int(merged["max_models"]))
        self.clock = clock
        self.alive = alive
        self.gpu = gpu_name(self.device_index) if self.device == "cuda" else None
        self.log = log.get("runner", runner=self.name)
        self.started_at = clock()
        self.state = "created"              # set by the service: starting, loading, idle, stopped
        self.cancel = threading.Event()     # set on stop: the engine raises Cancelled between segments
        self._lock = threading.Lock()       # guards the counters and the current job
        self._heartbeat_lock = threading.Lock()
        self._current: dict | None = None
        self._loading: ModelKey | None = None  # the model the engine is asked for right now
        self.placement: dict = {}           # merged into executed_on (where a batch backend's task ran)
        self.jobs_done = 0
        self.jobs_failed = 0
        self._audio_seconds_done = 0.0
        self._transcribe_seconds_done = 0.0
        self.store.create()

    # ----------------------------------------------------------------------------------- the step

    def step(self, now: float | None = None) -> bool:
        """Claim the oldest queued job and do it; True if a job was claimed (done, failed or parked).

        `now` (wall-clock seconds, default `clock()`) is the claim's time. Never raises for a bad
        job: every failure ends in failed/<id>.json and a log event. Raises OSError when the spool
        cannot be listed.
        """
        now = self.clock() if now is None else now
        self.alive()
        file_name = self.store.take()
        if file_name is None:
            return False
        self.alive()
        job_id = file_name[: -len(".json")]
        try:
            check_job_id(job_id)
        except ProtocolError as error:
            self.store.reject(file_name)
            with self._lock:
                self.jobs_failed += 1
            self.log.warning("runner.job_failed", job_id=None, file=file_name, kind="protocol", message=str(error),
                             retryable=False, hint=HINTS["protocol"])
            return True
        token = uuid.uuid4().hex
        if not self._run(job_id, token, now):
            if self.store.return_claim(job_id, token):
                self.log.info("runner.job_parked", job_id=job_id)
        return True

    def do_claimed(self, job_id: str, token: str, document: dict, claimed_at: float,
                   placement: dict | None = None) -> bool:
        """Do a job another process claimed already (work/<id>.json holds `token`; a Slurm task's case)
        without stamping it again: verify, transcribe, publish or fail exactly as `step` does.

        `document` is the job document as queued; `placement` goes into the Result's executed_on.
        Returns False when stopped through `cancel` (the claim is left for its owner), else True.
        Never raises for a bad job.
        """
        self.placement = dict(placement or {})
        return self._run(job_id, token, claimed_at, original=document)

    def _run(self, job_id: str, token: str, claimed_at: float, original: dict | None = None) -> bool:
        """Do one claimed job as the current job: publish its Result, or record its failure (a bug or
        a disk error too: one job must not stop the others). False when stopped through `cancel`
        (the caller decides what becomes of the claim), else True."""
        with self._lock:
            self._current = {"job_id": job_id, "token": token, "started_at": claimed_at, "done_s": 0.0,
                             "duration_s": None}
        try:
            self._do(job_id, token, claimed_at, original=original)
        except Cancelled:
            return False
        except _Failure as failure:
            self._fail(job_id, token, failure)
        except Exception as error:
            self.log.exception("runner.job_crashed", job_id=job_id)
            self._fail(job_id, token, _Failure("runner", f"{type(error).__name__}: {error}", True))
        finally:
            with self._lock:
                self._current = None
        return True

    def _do(self, job_id: str, token: str, claimed_at: float, original: dict | None = None) -> None:
        try:
            if original is None:
                original = self.store.stamp(job_id, token, claimed_at)
        except ProtocolError as error:
            raise _Failure("protocol", str(error), False) from error
        if self.store.has_result(job_id):
            self.log.info("runner.job_already_done", job_id=job_id)
            self.store.release(job_id, token)
            return
        try:
            job = parse_job(original, job_id)
        except ProtocolError as error:
            raise _Failure("protocol", str(error), False) from error
        with self._lock:
            self._current.update(duration_s=job.duration, model=job.options.model)
        descriptor = self._open_checked_audio(job)
        try:
            self._transcribe_and_publish(job, token, claimed_at, descriptor)
        finally:
            os.close(descriptor)

    def _open_checked_audio(self, job: JobDocument) -> int:
        """Open incoming/<id>.opus (no symlinks) and check its size and sha256 against the job.

        Returns the open descriptor. Raises _Failure kind `checksum` (retryable) after deleting a bad
        file, so the daemon uploads again from zero; Cancelled when stopped while hashing.
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
                digest = sha256_file(descriptor, self.cancel)
                problem = None if digest == job.audio_sha256 else f"has sha256 {digest} where the job says {job.audio_sha256}"
        except BaseException:
            os.close(descriptor)
            raise
        if problem:
            os.close(descriptor)
            self._delete_bad_audio(path)
            raise _Failure("checksum", f"audio {path} {problem}; deleted, upload it again", True)
        self.alive()
        return descriptor

    def _delete_bad_audio(self, path: str) -> None:
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as error:  # the failure record matters more than this cleanup
            self.log.warning("runner.audio_delete_failed", path=path, error=str(error))

    def _transcribe_and_publish(self, job: JobDocument, token: str, claimed_at: float, descriptor: int) -> None:
        audio_path = self.layout.audio(job.job_id)
        # Transcribe the very file that was checked, even if the name is replaced meanwhile.
        proc_path = f"/proc/self/fd/{descriptor}"
        source = proc_path if os.path.exists(proc_path) else audio_path
        self._write_progress(job.job_id, 0.0, job.duration)
        started = time.monotonic()
        try:
            result, attempts = self._transcribe_with_ladder(job, source)
        except EngineError as error:
            raise _Failure(error.kind, str(error).replace(proc_path, audio_path), error.retryable,
                           getattr(error, "hint", None)) from error
        finally:
            elapsed = time.monotonic() - started
        final = attempts[-1]
        result = dict(result)
        result["job_id"] = job.job_id
        result["executed_on"] = {
            "route": "remote", "host": self.name, "hostname": HOSTNAME, "device": self.device, "gpu": self.gpu,
            "compute_type": final["compute_type"], "batch_size": final["batch_size"],
            "oom_retries": len(attempts) - 1, **self.placement,
        }
        timings = dict(result.get("timings") or {})
        timings["queue_s"] = _round(claimed_at - job.submitted_at) if job.submitted_at else None
        timings["runner_s"] = _round(elapsed)
        result["timings"] = timings
        check_result(result, job.job_id)
        self.store.publish(job.job_id, result, token)
        audio_seconds = float(result.get("duration") or job.duration or 0.0)
        with self._lock:
            self.jobs_done += 1
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
            self.alive()
            with self._lock:
                if self._current is not None:
                    self._current.update(done_s=done, duration_s=duration)
            moment = time.monotonic()
            if moment - last_write[0] >= PROGRESS_SECONDS:
                last_write[0] = moment
                self._write_progress(job.job_id, done, duration)

        while True:
            attempts.append({"batch_size": batch_size, "compute_type": compute_type})
            self._loading = ModelKey(job.options.model, self.device, compute_type, self.device_index)
            try:
                result = self.engine.transcribe(
                    source, job.options, device=self.device, compute_type=compute_type,
                    device_index=self.device_index, batch_size=batch_size, progress=progress, cancel=self.cancel,
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
            finally:
                self._loading = None

    def _next_rung(self, batch_size: int, compute_type: str) -> tuple[int, str] | None:
        if batch_size > 1:
            return max(1, batch_size // 2), compute_type
        if compute_type not in INT8_TYPES:
            return 1, "int8_float16" if self.device == "cuda" else "int8"
        return None

    def _write_progress(self, job_id: str, done: float, duration: float | None) -> None:
        document = {"done_s": _round(done), "duration_s": _round(duration), "updated_at": self.clock()}
        try:
            self.store.write_progress(job_id, document)
        except OSError as error:  # progress is advisory; never fail a job for it
            self.log.warning("runner.progress_write_failed", job_id=job_id, error=str(error))

    def _fail(self, job_id: str, token: str | None, failure: _Failure) -> None:
        document = {"job_id": job_id, "kind": failure.kind, "message": str(failure), "retryable": failure.retryable,
                    "runner": self.name, "at": self.clock()}
        if not self.store.fail(job_id, token, document):
            return
        with self._lock:
            self.jobs_failed += 1
        self.log.warning("runner.job_failed", job_id=job_id, kind=failure.kind, message=str(failure),
                         retryable=failure.retryable, hint=failure.hint)

    # ------------------------------------------------------------------ models, claims, heartbeat

    def preload(self) -> None:
        """Load the configured model now, so the first job does not wait for it. Logs a failure."""
        key = ModelKey(self.model, self.device, self.compute_type, self.device_index)
        started = time.monotonic()
        self._loading = key
        try:
            self.engine.load(key)
        except EngineError as error:  # jobs naming other models can still run; each job fails on its own
            self.log.error("runner.preload_failed", model=self.model, error=str(error), kind=error.kind)
            return
        finally:
            self._loading = None
        self.log.info("runner.model_loaded", model=self.model, device=self.device, compute_type=self.compute_type,
                      load_s=_round(time.monotonic() - started))

    def loading(self) -> bool:
        """Whether the worker waits on a model load (the model it asked the engine for is not cached yet).

        Safe to call from another thread: a load reports no progress, and may rightly take minutes.
        """
        key = self._loading
        return key is not None and key not in self.engine.loaded()

    def in_hand(self) -> str | None:
        """The id of the job being done now, or None."""
        with self._lock:
            return self._current["job_id"] if self._current else None

    def reclaim_stale(self, now: float | None = None) -> list[str]:
        """Return dead runners' claims in work/ to jobs/ (see `SpoolStore.reclaim_stale`); the ids returned.

        Call it from the thread that runs `step`. Raises OSError.
        """
        return self.store.reclaim_stale(self.clock() if now is None else now, self.in_hand())

    def expire(self, now: float | None = None) -> int:
        """Remove spool leftovers older than `expire_days` (see `SpoolStore.expire`); how many files went."""
        return self.store.expire(self.clock() if now is None else now, self.expire_seconds, self.in_hand())

    def queue_length(self) -> int:
        """How many job documents wait in jobs/. Raises OSError."""
        return self.store.queue_length()

    def heartbeat_document(self, now: float) -> dict:
        """runners/<name>.json's content at `now`: who we are, what we hold, what we did. Raises OSError."""
        with self._lock:
            current = None
            if self._current is not None:
                current = {key: self._current.get(key) for key in ("job_id", "model", "started_at", "done_s", "duration_s")}
            figures = {
                "jobs_done": self.jobs_done, "jobs_failed": self.jobs_failed,
                "audio_seconds_done": round(self._audio_seconds_done, 3),
                "transcribe_seconds_done": round(self._transcribe_seconds_done, 3),
            }
        return {
            "name": self.name, "host": HOSTNAME, "pid": os.getpid(),
            "state": "busy" if current is not None and self.state == "idle" else self.state,
            "device": self.device, "device_index": self.device_index, "gpu": self.gpu,
            "compute_type": self.compute_type, "batch_size": self.batch_size, "model": self.model,
            "models_loaded": [{"model": key.model, "device": key.device, "compute_type": key.compute_type}
                              for key in self.engine.loaded()],
            "queue_length": self.queue_length(), "current": current, **figures,
            "started_at": self.started_at, "updated_at": now, "heartbeat_seconds": self.heartbeat_seconds,
            "version": __version__,
        }

    def heartbeat(self, now: float | None = None) -> None:
        """Write runners/<name>.json (tmp, fsync, rename); safe from any thread. Raises OSError."""
        document = self.heartbeat_document(self.clock() if now is None else now)
        with self._heartbeat_lock:
            self.store.write_heartbeat(document)
