"""Jobs queued for the runner as the daemon queues them, and a `Worker` stepped until the queue is empty.

Shared by the engine benchmark (bench_engine.py) and the GPU check (gpu/check.py). It imports no PyAV,
so the GPU check can load it on a machine that has none yet.

- `submit(worker, options, audio, tag, duration, queued_at)`: copy `audio` into the worker's spool and
  write its job document by rename, as the daemon does; the job id.
- `drain(worker, job_ids)`: `worker.step()` until nothing is queued; the seconds the steps took and
  each job's Result in the order given.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from whisperdrop.shared.spool import make_job_document


def submit(worker: Any, options: Any, audio: Path, tag: str, duration: float, queued_at: float) -> str:
    """Queue `audio` in `worker`'s spool (audio, then the job document by rename; its mtime `queued_at`,
    so queue order is submission order); the job id, which `tag` makes distinct for the same audio."""
    data = Path(audio).read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    job = hashlib.sha256(f"{tag}\n{sha256}".encode()).hexdigest()
    shutil.copyfile(audio, worker.layout.audio(job))
    document = make_job_document(job, options, len(data), sha256, duration, Path(audio).name, queued_at)
    temporary = Path(worker.layout.job(job) + ".tmp")
    temporary.write_text(json.dumps(document))
    os.replace(temporary, worker.layout.job(job))
    os.utime(worker.layout.job(job), (queued_at, queued_at))
    return job


def drain(worker: Any, job_ids: list[str]) -> tuple[float, list[dict]]:
    """Step `worker` until its queue is empty; the seconds that took and the Results of `job_ids` in
    that order. Raises AssertionError naming the job (and what failed/ holds) when one has no Result."""
    started = time.perf_counter()
    while worker.step():
        pass
    elapsed = time.perf_counter() - started
    results = []
    for job in job_ids:
        path = Path(worker.layout.result(job))
        if not path.exists():
            failed = {item.name: item.read_text()[:500] for item in Path(worker.layout.directory("failed")).iterdir()}
            raise AssertionError(f"the runner wrote no Result for {job} (failed/: {failed})")
        results.append(json.loads(path.read_text()))
    return elapsed, results
