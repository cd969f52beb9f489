"""The Slurm backend: a runner on a cluster's login node that hands claimed jobs to `sbatch`.

The spool lies on the cluster's shared file system. `SlurmRunner.step(now)` claims queued jobs as
every runner does (rename into work/), writes into each claim the batch and array index it is about
to get (`claim.slurm`), writes one batch script and submits it with `sbatch` (a job array when several
jobs were claimed at once); slurm/<batch>.json then records the Slurm job id. It follows its jobs with
`squeue` (sacct needs slurmdbd), writes their state into progress/<id>.json (`{"slurm": {"job_id",
"state", "reason"}}`) and reports the cluster's queue in its heartbeat. A job that Slurm ended without
a Result or a failure record (cancelled from outside, node failure, preemption) is submitted again, up
to MAX_ATTEMPTS tries; a time limit or out-of-memory kill, or the last try, fails it with a kind that
says so. A job whose files the daemon removed is `scancel`ed. A restarted runner adopts its claims
from the spool and Slurm instead of submitting them again.

On the compute node `slurm_task.run_task` (`whisperdrop slurm-task`) does one claimed job through the
worker's own verify/transcribe/publish path (`Worker.do_claimed`), its `executed_on` naming the Slurm job.

No shell ever sees a job document or a file name: commands are argument lists; the batch script is
fixed text, checked job ids and quoted values (see `slurm_commands`).

Direction of imports: slurm_service -> slurm; slurm_task -> worker; slurm, slurm_task -> slurm_commands,
store -> shared (spool, files). `slurm_service` serves a SlurmRunner as a process (its loop, heartbeat
thread, signals and `main`). One thing over 400 lines: the login node's step over its Slurm jobs
(submit, follow, end, adopt); the process around it, the commands and the compute-node side are
their own modules.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from whisperdrop import __version__
from whisperdrop.gpu_runner.slurm_commands import (ACTIVE_STATES, Slurm, SlurmError, batch_script, claim_of,
                                                   sbatch_arguments, settings_of, strict_job_id)
from whisperdrop.gpu_runner.store import HOSTNAME, SpoolStore, read_document, unlink_quietly
from whisperdrop.shared import log
from whisperdrop.shared.files import write_atomic
from whisperdrop.shared.spool import ProtocolError, check_runner_name, dumps

MAX_ATTEMPTS = 3                 # Slurm runs of one job before it fails
GONE_GRACE_SECONDS = 30.0        # a running task whose claim is gone may be exiting after its publish
# How a job that Slurm ended without a Result or failure record is failed: kind, retried here, hint.
ENDINGS = {
    "TIMEOUT": ("slurm_timeout", False, "the job hit its time limit: raise runner.slurm.time_limit"),
    "DEADLINE": ("slurm_timeout", False, "the job reached its deadline before it could finish"),
    "OUT_OF_MEMORY": ("oom", False, "the job ran out of memory: ask for more (runner.slurm.extra_args: --mem=...)"),
    "CANCELLED": ("slurm_cancelled", True, "someone ran scancel on the job (or an admin did)"),
    "NODE_FAIL": ("slurm_node_fail", True, "the node running the job failed"),
    "BOOT_FAIL": ("slurm_node_fail", True, "the node could not boot for the job"),
    "PREEMPTED": ("slurm_preempted", True, "a higher-priority job preempted it"),
}
DEFAULT_ENDING = ("slurm", True, "the task ended without a Result: see its log in <spool>/slurm/")


@dataclass
class Tracked:
    """One job this runner has in Slurm: its claim token, Slurm id ("1234" or "1234_0"), try, last state."""

    job_id: str
    token: str  # the token this runner signed the claim on work/<job_id>.json with
    attempt: int  # 1 for the first submission; each requeue after a kill adds one
    batch: str  # the submission (a job array) this job went in with
    index: int  # its slice of that array
    slurm_id: str | None = None
    state: str | None = None  # Slurm's, as squeue/scontrol last said (PENDING, RUNNING...)
    reason: str | None = None  # why Slurm holds it pending (Resources, Priority...)
    gone_at: float | None = None     # monotonic time its claim was first seen gone while it ran


class SlurmRunner:
    """The Slurm backend over one spool: claims, submits, follows and finishes jobs, one `step` at a time.

    `settings` is the config's `runner` mapping; `config_path` is passed to the tasks (their model,
    device and batch size come from it); `slurm` runs the commands (tests pass one with their
    SLURM_CONF); `clock` gives wall-clock seconds. Creates the spool folders and slurm/. Raises
    ProtocolError for a bad runner name, OSError when the spool cannot be made.
    """

    def __init__(self, settings: dict, *, config_path: str | None = None, slurm: Slurm | None = None,
                 clock: Callable[[], float] = time.time, name: str | None = None):
        self.settings = settings_of(settings)
        self.options = self.settings["slurm"]
        self.heartbeat_seconds = float(self.settings["heartbeat_seconds"])
        self.expire_seconds = float(self.settings["expire_days"]) * 86400.0
        self.name = check_runner_name(name or self.settings["name"] or f"{HOSTNAME.split('.')[0]}-slurm")
        self.store = SpoolStore(self.settings["spool"], self.name, heartbeat_seconds=self.heartbeat_seconds)
        self.spool = self.store.root
        self.layout = self.store.layout
        self.folder = os.path.join(self.spool, "slurm")  # batch scripts, batch records, task logs
        self.config_path = os.path.abspath(config_path) if config_path else None
        self.slurm = slurm or Slurm(on_sbatch=self._log_sbatch)
        if slurm is not None and slurm.on_sbatch is not None:
            previous = slurm.on_sbatch
            slurm.on_sbatch = lambda argv: (self._log_sbatch(argv), previous(argv))
        self.clock = clock
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.log = log.get("runner", runner=self.name, backend="slurm")
        self.tracked: dict[str, Tracked] = {}
        self.cluster_pending = 0
        self.jobs_done = 0
        self.jobs_failed = 0
        self.state = "created"
        self.started_at = clock()
        self._lock = threading.Lock()
        self._heartbeat_lock = threading.Lock()
        self.store.create()
        os.makedirs(self.folder, exist_ok=True)

    def _log_sbatch(self, argv: list[str]) -> None:
        self.log.info("slurm.sbatch", argv=argv)

    # ------------------------------------------------------------------------------ the step

    def step(self, now: float | None = None) -> bool:
        """Submit what is queued (up to runner.slurm.max_array jobs per sbatch) and follow what is in
        Slurm; True if a job was claimed or finished. Raises OSError when the spool cannot be listed;
        a failing Slurm command is logged and tried again at the next step."""
        now = self.clock() if now is None else now
        moved = self._follow(now)
        claimed = self._claim_batch(now)
        if claimed:
            self._submit(claimed, now)
        return bool(claimed) or moved

    def _claim_batch(self, now: float) -> list[Tracked]:
        claimed: list[Tracked] = []
        limit = max(1, int(self.options["max_array"]))
        while len(claimed) < limit:
            file_name = self.store.take()
            if file_name is None:
                break
            job_id = file_name[: -len(".json")]
            try:
                strict_job_id(job_id)
            except ProtocolError as error:
                self.store.reject(file_name)
                self.log.warning("runner.job_failed", job_id=None, file=file_name, kind="protocol",
                                 message=str(error), retryable=False)
                continue
            token = uuid.uuid4().hex
            try:
                self.store.stamp(job_id, token, now)
            except ProtocolError as error:
                self._fail(job_id, token, "protocol", str(error), False)
                continue
            if self.store.has_result(job_id):
                self.log.info("runner.job_already_done", job_id=job_id)
                self.store.release(job_id, token)
                continue
            claimed.append(Tracked(job_id, token, attempt=1, batch="", index=len(claimed)))  # batch: at submit
        return claimed

    def _submit(self, jobs: list[Tracked], now: float) -> None:
        """Write each claim's batch and index, the script, sbatch it, record the Slurm id. A failed
        sbatch returns the claims to jobs/ (logged), so the next step tries again."""
        batch = uuid.uuid4().hex[:16]
        marked = []
        for job in jobs:
            job.batch, job.index = batch, len(marked)
            try:
                self._mark_claim(job, now)
            except (OSError, ValueError) as error:  # the daemon removed it meanwhile, or a disk error
                self.log.warning("slurm.mark_failed", job_id=job.job_id, error=str(error))
                continue
            marked.append(job)
        jobs = marked
        if not jobs:
            return
        script = os.path.join(self.folder, f"{batch}.sh")
        pattern = "%A_%a" if len(jobs) > 1 else "%j"
        try:
            text = batch_script(batch, [job.job_id for job in jobs], python=sys.executable, spool=self.spool,
                                config_path=self.config_path, setup=self.options["setup"] or "")
            write_atomic(script, text.encode(), tag=self.name)
            argv = sbatch_arguments(self.options, name=f"whisperdrop-{batch}",
                                    output=os.path.join(self.folder, f"task-{pattern}.out"), count=len(jobs),
                                    script=script)
            slurm_id = self.slurm.sbatch(argv)
        except (SlurmError, OSError) as error:
            self.log.error("slurm.submit_failed", batch=batch, jobs=[job.job_id for job in jobs], error=str(error))
            for job in jobs:
                self.store.return_claim(job.job_id, job.token)
            return
        ids = [f"{slurm_id}_{job.index}" if len(jobs) > 1 else slurm_id for job in jobs]
        record = {"batch": batch, "slurm_job_id": slurm_id, "jobs": [job.job_id for job in jobs], "slurm_ids": ids,
                  "submitted_at": now, "runner": self.name}
        try:
            write_atomic(os.path.join(self.folder, f"{batch}.json"), dumps(record), tag=self.name)
        except OSError as error:  # the job name still finds it after a restart
            self.log.warning("slurm.record_failed", batch=batch, error=str(error))
        with self._lock:
            for job, slurm_id_of_job in zip(jobs, ids):
                job.slurm_id, job.state, job.reason = slurm_id_of_job, "PENDING", None
                self.tracked[job.job_id] = job
        for job in jobs:
            self._write_state(job)
        self.log.info("slurm.submitted", batch=batch, slurm_job_id=slurm_id, jobs=len(jobs),
                      job_ids=[job.job_id for job in jobs], attempts=[job.attempt for job in jobs])

    def _mark_claim(self, job: Tracked, now: float) -> None:
        """Write the batch, index and try into work/<id>.json's claim, before anything is submitted."""
        path = self.layout.job(job.job_id, "work")
        data = read_document(path)
        claim = dict(claim_of(data) or {})
        claim["slurm"] = {"batch": job.batch, "index": job.index, "attempt": job.attempt, "marked_at": now}
        write_atomic(path, dumps({**data, "claim": claim}), tag=self.name)

    # ----------------------------------------------------------------------------- following

    def _follow(self, now: float) -> bool:
        """Ask Slurm about every tracked job and act on each change; True if one ended."""
        with self._lock:
            tracked = list(self.tracked.values())
        try:
            known = self.slurm.jobs(self.user)
            self.cluster_pending = self.slurm.pending_count(self.options["partition"])
        except SlurmError as error:
            self.log.error("slurm.query_failed", error=str(error))
            return False
        ended = False
        for job in tracked:
            try:
                ended |= self._follow_one(job, known, now)
            except (OSError, SlurmError) as error:  # one job's trouble never stops the others
                self.log.error("slurm.follow_failed", job_id=job.job_id, slurm_job_id=job.slurm_id, error=str(error))
        return ended

    def _follow_one(self, job: Tracked, known: dict[str, dict], now: float) -> bool:
        entry = known.get(job.slurm_id or "")
        state = entry["state"] if entry else self.slurm.state_of(job.slurm_id) if job.slurm_id else None
        reason = entry["reason"] if entry else None
        if not os.path.exists(self.layout.job(job.job_id, "work")) or not self.store.owns(job.job_id, job.token):
            return self._claim_gone(job, state)
        if state in ACTIVE_STATES:
            if (state, reason) != (job.state, job.reason):
                job.state, job.reason = state, reason
                self._write_state(job)
                self.log.info("slurm.state", job_id=job.job_id, slurm_job_id=job.slurm_id, state=state, reason=reason)
            return False
        self._ended_without_result(job, state or "UNKNOWN", now)
        return True

    def _claim_gone(self, job: Tracked, state: str | None) -> bool:
        """work/<id>.json is gone or not ours: the task published or failed it, or the daemon removed
        the job's files (then its Slurm job is cancelled). A task still running may be one that
        published and is exiting, its outcome fetched by the daemon already: it gets GONE_GRACE_SECONDS
        to end on its own before it is cancelled. True once the job is settled."""
        if self.store.has_result(job.job_id):
            outcome = "done"
        elif os.path.exists(self.layout.failure(job.job_id)):
            outcome = "failed"
        else:  # the daemon fetched the outcome and removed the files, or removed them unfinished
            outcome = "fetched" if state == "COMPLETED" else "removed"
        if outcome == "removed" and state in ACTIVE_STATES and state != "PENDING":
            moment = time.monotonic()
            if job.gone_at is None:
                job.gone_at = moment
            if moment - job.gone_at < GONE_GRACE_SECONDS:
                return False
        with self._lock:
            self.tracked.pop(job.job_id, None)
        if outcome == "removed" and state in ACTIVE_STATES:
            try:
                self.slurm.cancel(job.slurm_id)
            except SlurmError as error:
                self.log.error("slurm.cancel_failed", job_id=job.job_id, slurm_job_id=job.slurm_id, error=str(error))
            self.log.warning("slurm.cancelled_removed", job_id=job.job_id, slurm_job_id=job.slurm_id, state=state)
        with self._lock:
            if outcome == "done":
                self.jobs_done += 1
            elif outcome == "failed":
                self.jobs_failed += 1
        self.log.info("slurm.job_ended", job_id=job.job_id, slurm_job_id=job.slurm_id, outcome=outcome,
                      attempt=job.attempt)
        return True

    def _ended_without_result(self, job: Tracked, state: str, now: float) -> None:
        """Slurm ended the job and its claim is still here: submit it again or fail it (bounded)."""
        kind, retry, hint = ENDINGS.get(state.split()[0], DEFAULT_ENDING)
        with self._lock:
            self.tracked.pop(job.job_id, None)
        self.log.warning("slurm.job_killed", job_id=job.job_id, slurm_job_id=job.slurm_id, state=state,
                         attempt=job.attempt, kind=kind)
        if retry and job.attempt < MAX_ATTEMPTS:
            again = Tracked(job.job_id, job.token, attempt=job.attempt + 1, batch=job.batch, index=0)
            self._submit([again], now)
            return
        tries = f" after {job.attempt} tries" if retry else ""
        message = f"Slurm job {job.slurm_id} ended {state} without a Result{tries}: {hint}"
        self._fail(job.job_id, job.token, kind, message, True)

    def _fail(self, job_id: str, token: str | None, kind: str, message: str, retryable: bool) -> None:
        document = {"job_id": job_id, "kind": kind, "message": message, "retryable": retryable,
                    "runner": self.name, "at": self.clock()}
        if self.store.fail(job_id, token, document):
            with self._lock:
                self.jobs_failed += 1
            self.log.warning("runner.job_failed", job_id=job_id, kind=kind, message=message, retryable=retryable)

    def _write_state(self, job: Tracked) -> None:
        """progress/<id>.json: the Slurm state, kept beside the task's own progress figures."""
        path = self.layout.progress(job.job_id)
        try:
            current = read_document(path)
        except (OSError, ValueError):
            current = {}
        document = dict(current) if isinstance(current, dict) else {}
        document["slurm"] = {"job_id": job.slurm_id, "state": job.state, "reason": job.reason,
                             "attempt": job.attempt}
        document["updated_at"] = self.clock()
        if not os.path.exists(self.layout.job(job.job_id, "work")):
            return  # finished meanwhile: no progress file left behind
        try:
            self.store.write_progress(job.job_id, document)
        except OSError as error:  # advisory
            self.log.warning("runner.progress_write_failed", job_id=job.job_id, error=str(error))

    # ----------------------------------------------------------------------------- restart

    def adopt(self, now: float | None = None) -> list[str]:
        """After a start: take back this runner's claims in work/. A claim whose batch Slurm knows is
        followed again; one never submitted goes back to jobs/. The job ids adopted. Raises OSError."""
        now = self.clock() if now is None else now
        try:
            known = self.slurm.jobs(self.user)
        except SlurmError as error:
            raise OSError(f"cannot ask Slurm for its jobs: {error}") from error
        by_name: dict[str, list[str]] = {}
        for slurm_id, entry in known.items():
            by_name.setdefault(entry["name"], []).append(slurm_id)
        adopted = []
        with os.scandir(self.layout.directory("work")) as scan:
            names = sorted(entry.name for entry in scan if entry.name.endswith(".json"))
        for file_name in names:
            job_id = file_name[: -len(".json")]
            try:
                strict_job_id(job_id)
                data = read_document(self.layout.job(job_id, "work"))
            except (ProtocolError, OSError, ValueError):
                continue
            claim = claim_of(data)
            if claim is None or claim.get("claimed_by") != self.name:
                continue
            mark = claim.get("slurm") if isinstance(claim.get("slurm"), dict) else None
            token = claim.get("token")
            slurm_id = self._slurm_id_of(mark, by_name) if mark else None
            if slurm_id is None:
                if self.store.return_claim(job_id, token):
                    self.log.warning("slurm.claim_returned", job_id=job_id, reason="never submitted")
                continue
            job = Tracked(job_id, token, attempt=int(mark.get("attempt") or 1), batch=str(mark["batch"]),
                          index=int(mark.get("index") or 0), slurm_id=slurm_id)
            with self._lock:
                self.tracked[job_id] = job
            adopted.append(job_id)
            self.log.info("slurm.adopted", job_id=job_id, slurm_job_id=slurm_id, attempt=job.attempt)
        return adopted

    def _slurm_id_of(self, mark: dict, by_name: dict[str, list[str]]) -> str | None:
        batch, index = str(mark.get("batch", "")), int(mark.get("index") or 0)
        if not batch.isalnum():
            return None
        try:
            record = read_document(os.path.join(self.folder, f"{batch}.json"))
            return str(record["slurm_ids"][index])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            pass
        for slurm_id in by_name.get(f"whisperdrop-{batch}", []):  # submitted, not recorded: a crash between
            if slurm_id == slurm_id.split("_")[0] or slurm_id.endswith(f"_{index}"):
                return slurm_id
        return None

    # ------------------------------------------------------------------------ heartbeat, expiry

    def queue_length(self) -> int:
        """Jobs waiting here or in the cluster: jobs/ + jobs pending in the partition + ours running."""
        with self._lock:
            running = sum(1 for job in self.tracked.values() if job.state not in (None, "PENDING"))
        return self.store.queue_length() + self.cluster_pending + running

    def heartbeat_document(self, now: float) -> dict:
        """runners/<name>.json's content: the worker's fields, with the cluster's queue as queue_length."""
        with self._lock:
            jobs = {job.job_id: {"slurm_job_id": job.slurm_id, "state": job.state, "reason": job.reason,
                                 "attempt": job.attempt} for job in self.tracked.values()}
            figures = {"jobs_done": self.jobs_done, "jobs_failed": self.jobs_failed}
        return {
            "name": self.name, "host": HOSTNAME, "pid": os.getpid(), "backend": "slurm",
            "state": "busy" if jobs and self.state == "idle" else self.state,
            "device": "slurm", "device_index": None, "gpu": self.options["gres"], "model": self.settings["model"],
            "compute_type": self.settings["compute_type"], "batch_size": self.settings["batch_size"],
            "models_loaded": [], "queue_length": self.queue_length(), "current": None,
            "slurm": {"partition": self.options["partition"], "cluster_pending": self.cluster_pending, "jobs": jobs},
            **figures, "started_at": self.started_at, "updated_at": now, "heartbeat_seconds": self.heartbeat_seconds,
            "version": __version__,
        }

    def heartbeat(self, now: float | None = None) -> None:
        """Write runners/<name>.json; safe from any thread. Raises OSError."""
        document = self.heartbeat_document(self.clock() if now is None else now)
        with self._heartbeat_lock:
            self.store.write_heartbeat(document)

    def expire(self, now: float | None = None) -> int:
        """Remove spool leftovers (see SpoolStore.expire, sparing tracked claims) and old slurm/ files."""
        now = self.clock() if now is None else now
        removed = 0
        with self._lock:
            tracked = set(self.tracked)
        with os.scandir(self.folder) as scan:
            entries = list(scan)
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < now - self.expire_seconds:
                    removed += unlink_quietly(entry.path)
            except OSError as error:
                self.log.warning("runner.expire_failed", path=entry.path, error=str(error))
        for job_id in tracked:  # a claim long pending in Slurm is not a leftover
            try:
                os.utime(self.layout.job(job_id, "work"))
            except OSError:
                pass
        return removed + self.store.expire(now, self.expire_seconds)

    # ------------------------------------------------------------------------------ one per name

    def hold_lock(self) -> int | None:
        """Lock slurm/<name>.lock for as long as the returned descriptor stays open, so that two runners
        of one name never follow (and resubmit) the same jobs. Raises OSError when another holds it; a
        file system without locks is logged and served anyway (None)."""
        path = os.path.join(self.folder, f"{self.name}.lock")
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise OSError(f"another Slurm runner named {self.name} serves {self.spool} (it holds {path})") from None
        except OSError as error:
            os.close(descriptor)
            self.log.warning("slurm.lock_unavailable", path=path, error=str(error))
            return None
        return descriptor
