"""The compute node's side of the Slurm backend: `whisperdrop slurm-task` does one claimed job.

`run_task` reads the claim the login node's runner wrote in work/<id>.json and does the job through
the worker's own path (`Worker.do_claimed`: size and sha256 checked, the out-of-memory ladder,
progress, Result or failure record), its `executed_on` naming the Slurm job (`placement_from`).
"""

from __future__ import annotations

import os

from whisperdrop.gpu_runner.slurm_commands import claim_of, settings_of, strict_job_id
from whisperdrop.gpu_runner.store import SpoolStore, read_document
from whisperdrop.shared import log
from whisperdrop.shared.spool import ProtocolError


def placement_from(environ: dict) -> dict:
    """executed_on's Slurm fields from the task's environment: the job id ("1234" or "1234_0" for an
    array task), the node and CUDA_VISIBLE_DEVICES."""
    array_job, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    job = environ.get("SLURM_JOB_ID")
    return {
        "slurm_job_id": f"{array_job}_{task}" if array_job and task is not None else job,
        "slurm": {"job_id": job, "array_job_id": array_job, "array_task_id": task,
                  "node": environ.get("SLURMD_NODENAME"), "cuda_visible_devices": environ.get("CUDA_VISIBLE_DEVICES")},
    }


def run_task(settings: dict, job_id: str, environ: dict | None = None) -> int:
    """Do one claimed job on a compute node (`whisperdrop slurm-task`): 0 when it ended in a Result or
    a failure record (or was done already), 1 when stopped, 2 for a job id or claim that is no use."""
    from whisperdrop.gpu_runner.worker import Worker

    environ = os.environ if environ is None else environ
    logger = log.get("runner", backend="slurm-task")
    try:
        strict_job_id(job_id)
    except ProtocolError as error:
        logger.error("slurm.task_bad_job", error=str(error))
        return 2
    merged = settings_of(settings)
    store = SpoolStore(merged["spool"], "slurm-task", heartbeat_seconds=float(merged["heartbeat_seconds"]))
    try:
        data = read_document(store.layout.job(job_id, "work"))
    except (OSError, ValueError) as error:
        done = store.has_result(job_id)
        (logger.info if done else logger.error)("slurm.task_no_claim", job_id=job_id, done=done, error=str(error))
        return 0 if done else 2
    claim = claim_of(data)
    if claim is None or not isinstance(claim.get("token"), str):
        logger.error("slurm.task_no_claim", job_id=job_id, error="work document has no claim")
        return 2
    document = {key: value for key, value in data.items() if key != "claim"}
    placement = placement_from(environ)
    if environ.get("CUDA_VISIBLE_DEVICES"):
        merged["device_index"] = 0  # Slurm's GPU is the first (only) one the task sees
    worker = Worker(merged, name=str(claim.get("claimed_by") or "slurm"))
    worker.log.info("slurm.task_start", job_id=job_id, **placement)
    finished = worker.do_claimed(job_id, claim["token"], document, float(claim.get("claimed_at") or 0.0), placement)
    return 0 if finished else 1
