"""The runner's batches across jobs, over a real spool with the real engine and the bundled tiny.en model.

Jobs are submitted as the daemon submits them (tests/test_runner.py's `submit`). A spy on the engine's
batch decoder records how many chunks each batch held, so "one batch" is observed, not assumed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

from test_runner import (FAST, TINY, engine, events, in_hand, jfk_opus, long_opus, no_leaked_threads,  # noqa: F401
                         processes, read, settings, spool, submit, wait_for, words)

from whisperdrop.gpu_runner import Runner


def queue_in_order(spool: Path, jobs: list[str]) -> None:
    """Give the queued documents increasing mtimes, so the queue order is the list's."""
    base = time.time() - 100
    for index, job in enumerate(jobs):
        os.utime(spool / "jobs" / f"{job}.json", (base + index, base + index))


def test_one_step_batches_the_queued_jobs_and_a_bad_one_fails_alone(spool, engine, jfk_opus, batches):
    """Three queued jobs share one batch; a fourth whose audio fails its checksum fails alone; a job with other options waits."""
    good = [submit(spool, jfk_opus, tag=f"good-{index}") for index in range(3)]
    bad = submit(spool, jfk_opus, tag="bad")
    other = submit(spool, jfk_opus, tag="other", options=FAST)
    queue_in_order(spool, [good[0], bad, good[1], good[2], other])
    audio = spool / "incoming" / f"{bad}.opus"
    damaged = bytearray(audio.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    audio.write_bytes(bytes(damaged))
    runner = Runner(settings(spool, batch_size=8, max_jobs_per_batch=8), engine=engine)

    assert runner.step() is True
    assert batches == [3]
    for job in good:
        result = read(spool / "results" / f"{job}.json")
        assert "ask not what your country" in words(result["text"])
        assert result["executed_on"]["batch_size"] == 8 and result["executed_on"]["jobs_batched"] == 4
    failure = read(spool / "failed" / f"{bad}.json")
    assert failure["kind"] == "checksum" and failure["retryable"] is True
    assert not (spool / "results" / f"{bad}.json").exists()
    assert [path.name for path in (spool / "jobs").iterdir()] == [f"{other}.json"]
    assert list((spool / "work").iterdir()) == [] and list((spool / "progress").iterdir()) == []

    assert runner.step() is True  # the job with other options, in a batch of its own
    assert (spool / "results" / f"{other}.json").exists() and batches == [3, 1]
    assert runner.step() is False
    runner.heartbeat()
    beat = read(spool / "runners" / "runner-a.json")
    assert beat["jobs_done"] == 4 and beat["jobs_failed"] == 1 and beat["in_hand"] == [] and beat["current"] is None


def test_a_job_with_other_options_is_not_overtaken(spool, engine, jfk_opus, batches):
    """Queued A, B (other options), C: the first step does A alone, then B, then C; nothing jumps the queue."""
    first, second, third = (submit(spool, jfk_opus, tag=tag, options=options)
                            for tag, options in (("a", TINY), ("b", FAST), ("c", TINY)))
    queue_in_order(spool, [first, second, third])
    runner = Runner(settings(spool, batch_size=8, max_jobs_per_batch=8), engine=engine)
    for job, waiting in ((first, {second, third}), (second, {third}), (third, set())):
        assert runner.step() is True
        assert (spool / "results" / f"{job}.json").exists()
        assert {path.name[:-len(".json")] for path in (spool / "jobs").iterdir()} == waiting
    assert batches == [1, 1, 1]


def test_max_jobs_per_batch_caps_what_one_step_claims(spool, engine, jfk_opus, batches):
    """With max_jobs_per_batch 2, five queued jobs take three steps: 2, 2 and 1 jobs."""
    jobs = [submit(spool, jfk_opus, tag=f"job-{index}") for index in range(5)]
    queue_in_order(spool, jobs)
    runner = Runner(settings(spool, batch_size=8, max_jobs_per_batch=2), engine=engine)
    remaining = []
    while runner.step():
        remaining.append(len(list((spool / "jobs").iterdir())))
    assert remaining == [3, 1, 0] and batches == [2, 2, 1]
    assert all((spool / "results" / f"{job}.json").exists() for job in jobs)


def test_stop_mid_batch_puts_every_unfinished_job_back(spool, engine, long_opus):
    """Stopped between batches, the runner parks every job it holds unfinished, and none is left claimed."""
    jobs = [submit(spool, long_opus, tag=f"long-{index}", duration=66.0, options=FAST) for index in range(3)]
    queue_in_order(spool, jobs)
    runner = Runner(settings(spool, batch_size=3, max_jobs_per_batch=8), engine=engine)  # 3 chunks a batch: several batches
    stop = threading.Event()
    thread = threading.Thread(target=runner.serve, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: all(in_hand(spool / "progress" / f"{job}.json") for job in jobs), 120, "three jobs in hand")
        stop.set()
        thread.join(timeout=120)
        assert not thread.is_alive()
    finally:
        stop.set()
        thread.join()
    parked = [job for job in jobs if (spool / "jobs" / f"{job}.json").exists()]
    done = [job for job in jobs if (spool / "results" / f"{job}.json").exists()]
    assert sorted(parked + done) == sorted(jobs) and parked
    assert all("claim" not in read(spool / "jobs" / f"{job}.json") for job in parked)
    assert list((spool / "work").iterdir()) == [] and list((spool / "progress").iterdir()) == []


def test_a_runner_killed_mid_batch_returns_every_claim_and_each_job_completes_once(spool, long_opus, processes):
    """kill -9 while a batch of six jobs is in flight: the restarted runner returns all six claims and
    completes each job exactly once."""
    first, first_log = processes.start(spool, "gpu-a")
    wait_for(lambda: (spool / "runners" / "gpu-a.json").exists()
             and read(spool / "runners" / "gpu-a.json")["state"] == "idle", 60, "the runner to load its model")
    jobs = [submit(spool, long_opus, tag=f"kill-{index}", duration=66.0, options=FAST) for index in range(6)]
    wait_for(lambda: all(in_hand(spool / "progress" / f"{job}.json") for job in jobs), 120, "six jobs in hand")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    claimed = {path.name[:-len(".json")] for path in (spool / "work").iterdir()}
    finished = {job for job in jobs if (spool / "results" / f"{job}.json").exists()}
    assert claimed | finished == set(jobs) and len(claimed) >= 2, (len(claimed), len(finished))
    assert all(read(spool / "work" / f"{job}.json")["claim"]["claimed_by"] == "gpu-a" for job in claimed)

    second, second_log = processes.start(spool, "gpu-a")
    wait_for(lambda: all((spool / "results" / f"{job}.json").exists() for job in jobs), 300, "six results")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0
    done = Counter(event["job_id"] for path in (first_log, second_log) for event in events(path)
                   if event.get("event") == "runner.job_done")
    assert done == Counter({job: 1 for job in jobs})
    returned = {event["job_id"] for event in events(second_log) if event.get("event") == "runner.claim_returned"}
    assert returned == claimed
    for job in jobs:
        assert words(read(spool / "results" / f"{job}.json")["text"]).count("not what your country") >= 5
    assert list((spool / "work").iterdir()) == [] and not list((spool / "failed").iterdir())
