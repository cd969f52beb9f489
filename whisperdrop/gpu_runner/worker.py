"""The runner's worker step: claim queued jobs from the spool store and do them in shared batches.

`Worker.step(now)` (huey's `loop(now)`, the clock passed in) claims the oldest job, checks the audio's
size and sha256 against the job document, and transcribes it with the shared engine. While the
engine has room in its batches it claims more: the next queued jobs with the same model and options,
in queue order (a job with other options stops the refill, so nothing overtakes it), up to
`max_jobs_per_batch` in one step, each checked the same way. Each job's Result, or its failure record,
is published as soon as that job is done: a job whose audio fails its check fails alone. On
out-of-memory the step halves the batch down to 1, then tries int8, for every job not done yet.
Stopped, it puts every job in hand back in jobs/; killed, it leaves its claims for `reclaim_stale`
at the next start. It never raises for a bad job. Threads, signals and the heartbeat timer belong to
`service`; the worker only keeps the state its heartbeat document reports.

One thing over 400 lines: a claim's way through one step (claim, check, refill, decode, OOM ladder,
publish or fail) and the state a heartbeat reports of it; the spool's files are `store`'s and a
claim's checks and Result `claim`'s.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any, Callable

from whisperdrop import __version__
from whisperdrop.engine.engine import AudioJob, Cancelled, Engine, EngineError, ModelKey, resolve_compute_type, resolve_device
from whisperdrop.gpu_runner.claim import (HINTS, Claim, Failure, open_checked_audio, published_result,
                                          rounded as _round)
from whisperdrop.gpu_runner.device import default_name, gpu_name
from whisperdrop.gpu_runner.store import HOSTNAME, SpoolStore
from whisperdrop.shared import log
from whisperdrop.shared.config import defaults as config_defaults
from whisperdrop.shared.spool import ProtocolError, TranscribeOptions, check_job_id, check_runner_name, parse_job

PROGRESS_SECONDS = 1.0      # progress/<id>.json is rewritten at most this often
INT8_TYPES = ("int8", "int8_float16", "int8_float32", "int8_bfloat16")


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
        self.max_jobs = max(1, int(merged["max_jobs_per_batch"]))
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
        self._current: dict[str, dict] = {}   # the jobs in hand, in claim order: what the heartbeat reports
        self._loading: ModelKey | None = None  # the model the engine is asked for right now
        self.placement: dict = {}           # merged into executed_on (where a batch backend's task ran)
        self.jobs_done = 0
        self.jobs_failed = 0
        self._audio_seconds_done = 0.0
        self._transcribe_seconds_done = 0.0
        self.store.create()

    # ----------------------------------------------------------------------------------- the step

    def step(self, now: float | None = None) -> bool:
        """Claim the oldest queued job and do it, with the jobs that join its batches; True if a job was
        claimed (done, failed or parked).

        `now` (wall-clock seconds, default `clock()`) is the first claim's time. Never raises for a bad
        job: every failure ends in failed/<id>.json and a log event. Raises OSError when the spool
        cannot be listed.
        """
        now = self.clock() if now is None else now
        self.alive()
        try:
            claim = self._claim_next(now)
        except Cancelled:
            return True  # stopped while checking its audio: the claim went back to jobs/
        if claim is None:
            return False
        self.alive()
        if isinstance(claim, Claim):
            self._run([claim], claim.job.options, refill=self.max_jobs > 1, park=True)
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
        try:
            claim = self._prepare(job_id, token, claimed_at, original=document)
        except Cancelled:
            return False
        if claim is None:
            return True
        return self._run([claim], claim.job.options, refill=False, park=False)

    # --------------------------------------------------------------------------------- claiming

    def _claim_next(self, now: float, options: TranscribeOptions | None = None) -> Claim | bool | None:
        """Claim the oldest queued job, checked and ready: a Claim; True when a job was claimed but
        ended at once (failed, rejected, already done); None when none is queued. With `options`, only
        a job whose document asks for exactly those options, and only the oldest (None otherwise).

        Raises Cancelled when stopped while hashing (its claim is back in jobs/), OSError when the
        spool cannot be listed.
        """
        if options is None:
            file_name = self.store.take()
        else:
            queued = self.store.queued()
            if not queued:
                return None
            try:
                document = self.store.peek(queued[0])
                same = TranscribeOptions.from_dict(document.get("options")) == options
            except (OSError, ValueError, TypeError, AttributeError):  # gone, or broken: it fails alone later
                same = False
            file_name = self.store.take(queued[0]) if same else None
            if file_name is None:
                return None
        if file_name is None:
            return None
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
        try:
            claim = self._prepare(job_id, token, now)
        except Cancelled:
            if self.store.return_claim(job_id, token):
                self.log.info("runner.job_parked", job_id=job_id)
            raise
        return True if claim is None else claim

    def _prepare(self, job_id: str, token: str, claimed_at: float, original: dict | None = None) -> Claim | None:
        """Stamp the claim (unless `original` is given), parse the job and check its audio: a Claim,
        or None when the job ended here (its failure recorded, or its Result there already).
        Raises Cancelled when stopped while hashing."""
        try:
            try:
                if original is None:
                    original = self.store.stamp(job_id, token, claimed_at)
            except ProtocolError as error:
                raise Failure("protocol", str(error), False) from error
            if self.store.has_result(job_id):
                self.log.info("runner.job_already_done", job_id=job_id)
                self.store.release(job_id, token)
                return None
            try:
                job = parse_job(original, job_id)
            except ProtocolError as error:
                raise Failure("protocol", str(error), False) from error
            descriptor = open_checked_audio(self.layout, job, self.cancel, self.log)
            self.alive()
        except Failure as failure:
            self._fail(job_id, token, failure)
            return None
        except Cancelled:
            raise
        except Exception as error:  # a bug or a disk error must not stop the other jobs
            self.log.exception("runner.job_crashed", job_id=job_id)
            self._fail(job_id, token, Failure("runner", f"{type(error).__name__}: {error}", True))
            return None
        proc_path = f"/proc/self/fd/{descriptor}"
        source = proc_path if os.path.exists(proc_path) else self.layout.audio(job_id)
        claim = Claim(job, token, claimed_at, descriptor, source, time.monotonic())
        with self._lock:
            self._current[job_id] = {"job_id": job_id, "token": token, "model": job.options.model,
                                     "started_at": claimed_at, "done_s": 0.0, "duration_s": job.duration}
        self._write_progress(job_id, 0.0, job.duration)
        return claim

    # ------------------------------------------------------------------------------- the batches

    def _run(self, claims: list[Claim], options: TranscribeOptions, *, refill: bool, park: bool) -> bool:
        """Transcribe `claims` (and, with `refill`, the jobs that join them) in shared batches with
        the out-of-memory ladder; publish or fail each job as it ends. False when stopped through
        `cancel`: with `park` the jobs not done go back to jobs/, else their claims stay. Never raises
        for a bad job."""
        in_hand = {claim.job.job_id: claim for claim in claims}
        batch_size, compute_type = self.batch_size, self.compute_type
        attempts: list[dict] = []
        claimed = [len(claims)]
        try:
            while in_hand:
                attempts.append({"batch_size": batch_size, "compute_type": compute_type})
                jobs = [AudioJob(claim.source, tag=claim, progress=self._progress(claim)) for claim in in_hand.values()]
                more = self._refill(options, in_hand, claimed) if refill and batch_size > 1 else None
                self._loading = ModelKey(options.model, self.device, compute_type, self.device_index)
                try:
                    for job, outcome in self.engine.transcribe_many(
                            jobs, options, device=self.device, compute_type=compute_type,
                            device_index=self.device_index, batch_size=batch_size, cancel=self.cancel, more=more):
                        self._loading = None
                        claim = in_hand.pop(job.tag.job.job_id)
                        self._finish(claim, outcome, attempts, claimed[0])
                    for claim in list(in_hand.values()):  # the engine gave no outcome for it: a bug, never a lost job
                        in_hand.pop(claim.job.job_id)
                        self._finish(claim, EngineError("the engine returned without this job's result", retryable=True),
                                     attempts, claimed[0])
                    return True
                except EngineError as error:
                    if error.kind != "oom":
                        raise
                    rung = self._next_rung(batch_size, compute_type)
                    self.log.warning("runner.out_of_memory", job_ids=sorted(in_hand), batch_size=batch_size,
                                     compute_type=compute_type, next=rung, error=str(error))
                    if rung is None:
                        tried = ", ".join(f"batch {attempt['batch_size']} {attempt['compute_type']}" for attempt in attempts)
                        raise EngineError(f"out of memory at every rung ({tried}): {error}", kind="oom",
                                          retryable=True) from error
                    batch_size, compute_type = rung
                finally:
                    self._loading = None
            return True
        except Cancelled:
            for claim in list(in_hand.values()):
                self._close(claim)
                if park and self.store.return_claim(claim.job.job_id, claim.token):
                    self.log.info("runner.job_parked", job_id=claim.job.job_id)
            in_hand.clear()
            return False
        except EngineError as error:  # the model, not one job's audio: every job in hand fails with it
            for claim in list(in_hand.values()):
                self._finish(claim, error, attempts, claimed[0])
            in_hand.clear()
            return True
        except Exception as error:  # a bug or a disk error must not stop the other jobs
            self.log.exception("runner.batch_crashed", job_ids=sorted(in_hand))
            for claim in list(in_hand.values()):
                self._close(claim)
                self._fail(claim.job.job_id, claim.token, Failure("runner", f"{type(error).__name__}: {error}", True))
            in_hand.clear()
            return True
        finally:
            for claim in in_hand.values():
                self._close(claim)

    def _refill(self, options: TranscribeOptions, in_hand: dict[str, Claim], claimed: list[int]) -> Callable[[int], list[AudioJob]]:
        """The engine's `more`: claim up to n further queued jobs with `options`, checked, while this
        step has claimed fewer than max_jobs_per_batch."""
        def more(count: int) -> list[AudioJob]:
            jobs: list[AudioJob] = []
            while len(jobs) < count and claimed[0] < self.max_jobs:
                try:
                    claim = self._claim_next(self.clock(), options)
                except OSError as error:  # the spool is unreachable now: carry on with the jobs in hand
                    self.log.error("runner.spool_error", action="refill", error=str(error))
                    break
                if claim is None:
                    break
                claimed[0] += 1
                if isinstance(claim, Claim):
                    self.alive()
                    in_hand[claim.job.job_id] = claim
                    jobs.append(AudioJob(claim.source, tag=claim, progress=self._progress(claim)))
            return jobs
        return more

    def _progress(self, claim: Claim) -> Callable[[float, float], None]:
        def progress(done: float, duration: float) -> None:
            self.alive()
            with self._lock:
                current = self._current.get(claim.job.job_id)
                if current is not None:
                    current.update(done_s=done, duration_s=duration)
            moment = time.monotonic()
            if moment - claim.last_write >= PROGRESS_SECONDS:
                claim.last_write = moment
                self._write_progress(claim.job.job_id, done, duration)
        return progress

    def _close(self, claim: Claim) -> None:
        with self._lock:
            self._current.pop(claim.job.job_id, None)
        if claim.descriptor >= 0:
            os.close(claim.descriptor)
            claim.descriptor = -1

    def _finish(self, claim: Claim, outcome: Any, attempts: list[dict], batched: int) -> None:
        """Publish `outcome` (the engine's Result) for `claim`, or record it as the job's failure (an
        EngineError); one job's trouble here never reaches the others."""
        job = claim.job
        elapsed = time.monotonic() - claim.started
        self._close(claim)
        audio_path = self.layout.audio(job.job_id)
        if isinstance(outcome, BaseException):
            kind, retryable = getattr(outcome, "kind", "engine"), getattr(outcome, "retryable", True)
            self._fail(job.job_id, claim.token, Failure(kind, str(outcome).replace(claim.source, audio_path),
                                                         retryable, getattr(outcome, "hint", None)))
            return
        final = attempts[-1]
        try:
            executed_on = {
                "route": "remote", "host": self.name, "hostname": HOSTNAME, "device": self.device, "gpu": self.gpu,
                "compute_type": final["compute_type"], "batch_size": final["batch_size"], "jobs_batched": batched,
                "oom_retries": len(attempts) - 1, **self.placement,
            }
            result = published_result(claim, outcome, executed_on, elapsed)
            timings = result["timings"]
            self.store.publish(job.job_id, result, claim.token)
        except (OSError, ProtocolError) as error:  # a disk error or a bad Result: this job fails, the rest go on
            self.log.exception("runner.job_crashed", job_id=job.job_id)
            self._fail(job.job_id, claim.token, Failure("runner", f"{type(error).__name__}: {error}", True))
            return
        audio_seconds = float(result.get("duration") or job.duration or 0.0)
        with self._lock:
            self.jobs_done += 1
            self._audio_seconds_done += audio_seconds
            self._transcribe_seconds_done += elapsed
        self.log.info(
            "runner.job_done", job_id=job.job_id, audio_s=_round(audio_seconds), transcribe_s=_round(elapsed),
            rtf=_round(elapsed / audio_seconds, 4) if audio_seconds else None, model=job.options.model,
            device=self.device, compute_type=final["compute_type"], batch_size=final["batch_size"],
            jobs_batched=batched, oom_retries=len(attempts) - 1, queue_s=timings["queue_s"],
        )

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

    def _fail(self, job_id: str, token: str | None, failure: Failure) -> None:
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
        """The id of the first job in hand now, or None."""
        with self._lock:
            return next(iter(self._current), None)

    def jobs_in_hand(self) -> list[str]:
        """The ids of every job in hand now (one step's batch), in claim order."""
        with self._lock:
            return list(self._current)

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
            in_hand = list(self._current)
            if in_hand:
                first = self._current[in_hand[0]]
                current = {key: first.get(key) for key in ("job_id", "model", "started_at", "done_s", "duration_s")}
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
            "max_jobs_per_batch": self.max_jobs, "queue_length": self.queue_length(), "current": current,
            "in_hand": in_hand, **figures,
            "started_at": self.started_at, "updated_at": now, "heartbeat_seconds": self.heartbeat_seconds,
            "version": __version__,
        }

    def heartbeat(self, now: float | None = None) -> None:
        """Write runners/<name>.json (tmp, fsync, rename); safe from any thread. Raises OSError."""
        document = self.heartbeat_document(self.clock() if now is None else now)
        with self._heartbeat_lock:
            self.store.write_heartbeat(document)
