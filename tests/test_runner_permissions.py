"""Spool files the runner writes follow the process umask (the unit sets UMask=0002 so the SFTP account
and the runner share them), rather than a fixed mode.

A fake engine stands in for faster-whisper: the modes under test are the runner's, and the fake
looks at the progress and claim files while the job is in hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

import pytest

from whisperdrop.engine.engine import Engine, EngineError
from whisperdrop.gpu_runner import Runner
from whisperdrop.shared.spool import RESULT_SCHEMA, TranscribeOptions, dumps, make_job_document


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


class ModeRecordingEngine(Engine):
    """Transcribes nothing; records the modes of progress/<id>.json and work/<id>.json mid-job."""

    def __init__(self, spool: Path, fail: bool = False):
        super().__init__()
        self.spool, self.fail, self.modes = spool, fail, {}

    def transcribe(self, audio_path, options, *, progress=None, cancel=None, **ignored):
        for folder in ("progress", "work"):
            (entry,) = (self.spool / folder).iterdir()
            self.modes[folder] = stat.S_IMODE(entry.stat().st_mode)
        if self.fail:
            raise EngineError("cannot decode the fake audio", kind="audio")
        return {"schema": RESULT_SCHEMA, "text": "fake", "segments": [], "duration": 1.0, "model": options.model,
                "timings": {}}

    def transcribe_many(self, jobs, options, *, cancel=None, **ignored):
        """The runner's entry point (batches across jobs): each job through `transcribe`."""
        for job in jobs:
            try:
                yield job, self.transcribe(job.audio_path, options, progress=job.progress, cancel=cancel)
            except EngineError as error:
                yield job, error


def _submit(spool: Path, tag: str) -> str:
    audio = f"audio {tag}".encode() * 20
    job = hashlib.sha256(audio).hexdigest()
    for directory in ("incoming", "jobs"):
        (spool / directory).mkdir(parents=True, exist_ok=True)
    (spool / "incoming" / f"{job}.opus").write_bytes(audio)
    document = make_job_document(job, TranscribeOptions(model="bundled:tiny.en"), len(audio),
                                 hashlib.sha256(audio).hexdigest(), 1.0, "x.flac", time.time())
    (spool / "jobs" / f"{job}.json").write_bytes(dumps(document))
    return job


def _settings(spool: Path) -> dict:
    return {"spool": str(spool), "model": "bundled:tiny.en", "device": "cpu", "compute_type": "int8",
            "name": "runner-a", "heartbeat_seconds": 1.0}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o002, 0o027])
def test_spool_files_are_created_with_the_process_umask(tmp_path, umask, mask):
    """Results, failures, progress, claims, heartbeats and returned claims get 0o666 less the umask (0664 under UMask=0002)."""
    umask(mask)
    expected = 0o666 & ~mask
    spool = tmp_path / "spool"
    done, failed, dead = _submit(spool, "done"), _submit(spool, "failed"), _submit(spool, "dead")
    os.utime(spool / "jobs" / f"{done}.json", (1, 1))  # queue order: done, failed, then dead
    os.utime(spool / "jobs" / f"{failed}.json", (2, 2))

    engine = ModeRecordingEngine(spool)
    runner = Runner(_settings(spool), engine=engine)
    assert runner.step() is True
    assert _mode(spool / "results" / f"{done}.json") == expected
    assert engine.modes == {"progress": expected, "work": expected}

    engine.fail = True
    assert runner.step() is True
    assert _mode(spool / "failed" / f"{failed}.json") == expected

    runner.heartbeat()
    assert _mode(spool / "runners" / "runner-a.json") == expected

    # A claim by a runner that never beat: returned to jobs/ by whoever reclaims.
    os.rename(spool / "jobs" / f"{dead}.json", spool / "work" / f"{dead}.json")
    other = Runner({**_settings(spool), "name": "runner-b"}, engine=Engine())
    claimed = spool / "work" / f"{dead}.json"
    claimed.write_bytes(dumps({**json.loads(claimed.read_text()),
                               "claim": {"claimed_by": "ghost", "token": "t", "heartbeat_seconds": 1.0}}))
    os.utime(claimed, (1, 1))
    assert other.reclaim_stale(time.time()) == [dead]
    assert _mode(spool / "jobs" / f"{dead}.json") == expected
