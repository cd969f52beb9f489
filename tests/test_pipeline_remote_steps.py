"""The remote route as rows of the stage table, driven by hand: one `advance(job, now)` per step on a
fake clock, against a real OpenSSH sshd and a real runner process (CPU, tiny.en)."""

from __future__ import annotations

import asyncio
import json

import yaml

from daemon_helpers import write_speech_wav
from test_remote import FAST_REMOTE, gpu_host  # noqa: F401  (a fixture: a real sshd and a runner behind it)
from test_pipeline_units import FakeClock


def remote_pipeline(root, host: dict, clock):
    """A Pipeline (provider remote) over folders in `root`, its RemotePool on the same fake clock."""
    from whisperdrop.daemon.pipeline import Pipeline
    from whisperdrop.daemon.remote import RemotePool
    from whisperdrop.shared import config as config_module

    for name in ("inbox", "outbox", "archive", "failed", "state"):
        (root / name).mkdir(exist_ok=True)
    config_file = root / "config.yaml"
    config_file.write_text(yaml.safe_dump({"transcription": {"provider": "remote"},
                                           "remote": {**FAST_REMOTE, "hosts": [host]}}))
    config = config_module.load(config_file)
    return Pipeline(config, remote=RemotePool(config, clock=clock), clock=clock)


def test_each_remote_step_is_one_advance_committed_before_the_next(gpu_host, tmp_path, monkeypatch):  # noqa: F811
    """new -> extracted -> uploaded -> submitted -> ready -> transcribed -> done: one stage per
    advance, each committed and stamped with the fake clock. The spool shows each step's work and
    nothing of the next: the audio alone after the upload, the job document after the submit, the
    Result after the wait. A restart at `ready` fetches at once, without polling the job again."""
    server, runner = gpu_host
    clock = FakeClock(2_000_000.0)
    root = tmp_path / "daemon"
    root.mkdir()
    pipeline = remote_pipeline(root, server.host_settings(), clock)
    scheduled: list[str] = []
    pipeline.intake.schedule = scheduled.append  # no background task: this test is the loop
    source = write_speech_wav(root / "inbox" / "steps.wav", 3, 4.0)
    spool = server.spool

    def in_spool(folder: str, job_id: str) -> list[str]:
        return sorted(path.name for path in (spool / folder).glob(f"{job_id}*"))

    async def drive(pipeline, job, until: str, seen: list) -> object:
        while job.stage != until:
            clock.now += 60.0
            job = await pipeline.advance(job, clock.now)
            seen.append((job.stage, job.updated_at, job.host))
            if job.stage == "uploaded":  # uploaded, not submitted: the runner cannot see it yet
                assert in_spool("incoming", job.job_id)
                assert not in_spool("jobs", job.job_id) and not in_spool("work", job.job_id)
            if job.stage == "submitted":
                assert job.timings["submitted_at"] == clock.now
        return job

    async def first_run():
        try:
            await pipeline.take(source)
            job = pipeline.ledger.job(scheduled[0])
            seen = [(job.stage, job.updated_at, job.host)]
            job = await drive(pipeline, job, "ready", seen)
            assert seen == [("new", 2_000_000.0, None), ("extracted", 2_000_060.0, None),
                            ("uploaded", 2_000_120.0, "testhost"), ("submitted", 2_000_180.0, "testhost"),
                            ("ready", 2_000_240.0, "testhost")]
            assert in_spool("results", job.job_id)  # published there, not fetched yet
            assert not pipeline.result_path(job.job_id).exists()
            return job.job_id
        finally:
            await pipeline.drain(5.0)
            pipeline.close()
            await pipeline.router.remote.close()

    job_id = asyncio.run(first_run())
    restarted = remote_pipeline(root, server.host_settings(), clock)

    async def after_restart():
        from whisperdrop.daemon.transfer import Host

        polls: list[str] = []
        original = Host.state

        async def counted(self, job_id):
            polls.append(job_id)
            return await original(self, job_id)

        monkeypatch.setattr(Host, "state", counted)
        try:
            job = restarted.ledger.job(job_id)
            seen = [(job.stage, job.updated_at, job.host)]
            job = await drive(restarted, job, "done", seen)
            assert [stage for stage, _at, _host in seen] == ["ready", "transcribed", "done"]
            assert polls == []  # `ready` was committed: the fetch needs no wait
            assert job.route == "remote" and job.host == "testhost" and job.finished_at == clock.now
        finally:
            monkeypatch.undo()
            await restarted.drain(5.0)
            restarted.close()
            await restarted.router.remote.close()

    asyncio.run(after_restart())
    result = json.loads((root / "outbox" / "steps.json").read_text())
    assert result["executed_on"]["route"] == "remote" and result["fallback_reason"] is None
    assert result["transfer"]["bytes"] == result["transfer"]["audio_bytes"] > 0
    for key in ("upload_s", "queue_s", "transcribe_s", "fetch_s"):
        assert key in result["timings"], key
    assert "submitted_at" not in result["timings"]
    assert not in_spool("incoming", job_id) and not in_spool("results", job_id)  # cleaned once safe here
    assert len(runner.events("runner.job_done")) == 1
