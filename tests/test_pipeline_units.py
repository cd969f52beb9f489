"""The daemon's pure parts, fast: the Result builder."""

from __future__ import annotations

import copy

from whisperdrop.outputs import result as results

ENGINE = {"schema": "whisperdrop.result/1", "text": "hi", "segments": [], "model": "bundled:tiny.en",
          "engine": {"device": "cpu", "compute_type": "int8", "batch_size": 1},
          "timings": {"load_s": 0.1, "transcribe_s": 1.0}}


def test_a_remote_result_keeps_the_runners_executed_on():
    """The runner's executed_on survives, its host (the runner's name) as `runner`, the daemon's route and host over it."""
    made = {**ENGINE, "executed_on": {"route": "remote", "host": "gpu0", "hostname": "box", "device": "cuda",
                                      "gpu": "H100", "compute_type": "float16", "batch_size": 8, "oom_retries": 1}}
    before = copy.deepcopy(made)
    result = results.transcribed(made, job_id="j", route="remote", host="lab", fallback_reason=None,
                                 timings={"upload_s": 2.0, "transcribe_s": 0.5}, transfer={"bytes": 10})
    assert result["executed_on"] == {"route": "remote", "host": "lab", "runner": "gpu0", "hostname": "box",
                                     "device": "cuda", "gpu": "H100", "compute_type": "float16", "batch_size": 8,
                                     "oom_retries": 1}
    assert result["timings"] == {"load_s": 0.1, "transcribe_s": 0.5, "upload_s": 2.0}
    assert (result["job_id"], result["transfer"], result["fallback_reason"]) == ("j", {"bytes": 10}, None)
    assert made == before


def test_a_local_result_says_where_and_how_it_ran():
    """A local Result names this machine, the engine's device and compute type, and the fallback reason."""
    result = results.transcribed(ENGINE, job_id="j", route="local", host=None, fallback_reason="lab: down",
                                 timings={}, transfer={})
    assert result["executed_on"] == {"route": "local", "host": None, "hostname": results.HOSTNAME,
                                     "compute_type": "int8", "batch_size": 1, "device": "cpu"}
    assert result["fallback_reason"] == "lab: down"


def test_a_result_for_a_source_adds_the_source_and_its_timings():
    """for_source adds the source's path, size and sha256 and its own timings over the job's."""
    done = results.transcribed(ENGINE, job_id="j", route="local", host=None, fallback_reason=None,
                               timings={"extract_s": 0.2}, transfer={})
    document = results.for_source(done, path="a/b.wav", size=3, sha256="f" * 64, timings={"settle_s": 2.0})
    assert document["source"] == {"path": "a/b.wav", "size": 3, "sha256": "f" * 64}
    assert document["timings"] == {"load_s": 0.1, "transcribe_s": 1.0, "extract_s": 0.2, "settle_s": 2.0}
    assert "source" not in done


# The pipeline itself, in this process: a real config, ledger, PyAV and engine (tiny.en), no daemon.


def pipeline_for(tmp_path, clock=None, **settings):
    """A Pipeline (provider local) over folders in tmp_path; `settings` override the config's top level."""
    import time

    import yaml

    from whisperdrop.daemon.pipeline import Pipeline
    from whisperdrop.shared import config as config_module

    for name in ("inbox", "outbox", "archive", "failed", "state"):
        (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"transcription": {"provider": "local"}, **settings}))
    return Pipeline(config_module.load(tmp_path / "config.yaml"), clock=clock or time.time)


async def until(predicate, what: str, timeout: float = 120.0) -> None:
    """Wait (on the loop) until `predicate()` holds; fail naming `what` after `timeout` s."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_finished_jobs_leave_no_task_or_progress_entry_behind(tmp_path):
    """Once a job is done, the pipeline holds no task and no progress timestamp for it (they were never pruned)."""
    import asyncio

    from daemon_helpers import write_speech_wav

    pipeline = pipeline_for(tmp_path)
    source = write_speech_wav(tmp_path / "inbox" / "short.wav", 1, 3.0)

    async def scenario():
        await pipeline.start()
        try:
            await pipeline.take(source)
            await until(lambda: (tmp_path / "archive" / "short.wav").exists(), "the source archived")
            await until(lambda: pipeline.busy() == 0, "the job's task to end")
            assert pipeline._tasks == {} and pipeline._last_progress == {}
        finally:
            await pipeline.drain(5.0)
            pipeline.close()

    asyncio.run(scenario())


def test_cached_results_expire_unless_their_job_is_unfinished(tmp_path):
    """Results in state/results older than results_days are removed, except an unfinished job's; newer ones stay."""
    import asyncio
    import os
    import time

    pipeline = pipeline_for(tmp_path, results_days=2)
    day = 86400.0
    now = time.time()
    files = {}
    for name, age_days, stage in (("old-done", 3, "done"), ("old-open", 3, "transcribed"), ("new-done", 1, "done"),
                                  ("orphan", 3, None)):
        job_id = name.ljust(64, "0")
        if stage is not None:
            pipeline.ledger.create_job(job_id, "f" * 64, 1, {})
            pipeline.ledger.update_job(job_id, stage=stage)
        path = pipeline.result_path(job_id)
        path.write_text("{}")
        os.utime(path, (now - age_days * day, now - age_days * day))
        files[name] = path

    async def scenario():  # not start(): its hourly expiry would race this call for the same files
        try:
            assert await pipeline.expire_results(now) == 2
        finally:
            await pipeline.drain(5.0)
            pipeline.close()

    asyncio.run(scenario())
    assert sorted(name for name, path in files.items() if path.exists()) == ["new-done", "old-open"]


def test_a_done_jobs_audio_is_kept_for_the_page_then_expires(tmp_path):
    """With the API on, a done job's audio moves to state/audio (kept api.keep_audio_hours from then)
    instead of being removed; the hourly expiry removes what is older; with keep_audio_hours 0, or no
    API, nothing is kept and what was kept goes."""
    import asyncio
    import os
    import time

    from whisperdrop.daemon.stages import Stages

    pipeline = pipeline_for(tmp_path, api={"listen": "127.0.0.1:8765", "keep_audio_hours": 2})
    now = time.time()
    job_id = "c" * 64
    audio = pipeline.audio_path(job_id)
    audio.write_bytes(b"OggS")
    os.utime(audio, (now - 7200, now - 7200))  # extracted long ago: the hours count from done
    Stages._keep_or_remove_audio(pipeline.stages, job_id)
    kept = pipeline.kept_audio_path(job_id)
    assert not audio.exists() and kept.read_bytes() == b"OggS" and kept.stat().st_mtime >= now - 1
    old = kept.with_name("d" * 64 + ".opus")
    old.write_bytes(b"OggS")
    os.utime(old, (now - 3 * 3600, now - 3 * 3600))

    async def expire(which):
        try:
            return await which.expire_audio(now)
        finally:
            await which.drain(5.0)
            which.close()

    assert asyncio.run(expire(pipeline)) == 1 and kept.exists() and not old.exists()
    for settings in ({"api": {"listen": "127.0.0.1:8765", "keep_audio_hours": 0}}, {}):
        other = pipeline_for(tmp_path, **settings)
        other.audio_path(job_id).write_bytes(b"OggS")
        Stages._keep_or_remove_audio(other.stages, job_id)
        assert not other.audio_path(job_id).exists() and kept.exists()  # not kept: removed
        assert asyncio.run(expire(other)) == 1 and not kept.exists()  # and what was kept goes
        kept.write_bytes(b"OggS")


def test_checkpoints_of_jobs_gone_or_past_transcription_are_swept_at_start(tmp_path):
    """At start the daemon removes the local route's checkpoints (state/partial/<job>.jsonl) of jobs
    that are gone, failed or already transcribed, and a crashed writer's temporary; an unfinished
    job's checkpoint stays for it to resume from."""
    import asyncio

    pipeline = pipeline_for(tmp_path)
    folder = tmp_path / "state" / "partial"
    folder.mkdir(parents=True)
    files = {}
    for name, stage in (("open", "extracted"), ("done", "transcribed"), ("failed", "failed"), ("gone", None)):
        job_id = name.ljust(64, "0")
        if stage is not None:
            pipeline.ledger.create_job(job_id, "f" * 64, 1, {})
            pipeline.ledger.update_job(job_id, stage=stage)
        files[name] = folder / f"{job_id}.jsonl"
        files[name].write_text("{}\n")
    files["temporary"] = folder / f".{'open'.ljust(64, '0')}.jsonl.tmp"
    files["temporary"].write_text("{")

    async def scenario():
        await pipeline.start()
        await pipeline.drain(5.0)
        pipeline.close()

    asyncio.run(scenario())
    assert sorted(name for name, path in files.items() if path.exists()) == ["open"]


class FakeClock:
    """Wall time that moves only when a test moves it."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_stages_advance_one_step_at_a_time_on_a_fake_clock(tmp_path):
    """Driven by hand, a dropped file's job goes new -> extracted -> transcribed -> done, one stage per
    advance(job, now), each committed to the ledger and stamped with the fake clock's time."""
    import asyncio
    import dataclasses

    import pytest

    from daemon_helpers import write_speech_wav

    clock = FakeClock(1_000_000.0)
    pipeline = pipeline_for(tmp_path, clock=clock)
    scheduled: list[str] = []
    pipeline.intake.schedule = scheduled.append  # no background task: this test is the loop
    source = write_speech_wav(tmp_path / "inbox" / "step.wav", 2, 3.0)

    async def scenario():
        try:
            await pipeline.take(source)
            job = pipeline.ledger.job(scheduled[0])
            with pytest.raises(dataclasses.FrozenInstanceError):
                job.stage = "done"  # a Job is a value: only the ledger changes
            seen = [(job.stage, job.updated_at)]
            while job.stage != "done":
                clock.now += 60.0
                job = await pipeline.advance(job, clock.now)
                seen.append((job.stage, job.updated_at))
            assert seen == [("new", 1_000_000.0), ("extracted", 1_000_060.0), ("transcribed", 1_000_120.0),
                            ("done", 1_000_180.0)]
            assert job.finished_at == 1_000_180.0 and job.route == "local" and job.model == "bundled:tiny.en"
            assert (tmp_path / "archive" / "step.wav").exists() and (tmp_path / "outbox" / "step.json").exists()
            assert pipeline.ledger.sources_of(job.job_id) == []  # delivered: no pending source left
        finally:
            await pipeline.drain(5.0)
            pipeline.close()

    asyncio.run(scenario())
