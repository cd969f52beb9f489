"""Issue 13, item 14, through a real daemon: a local job stopped part way (SIGTERM, or kill -9) goes on
from its checkpoint at the next start and writes the Result an uninterrupted run gives."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from daemon_helpers import Daemon, json_lines, write_speech_wav
from transcripts import assert_segments_in_order

from whisperdrop.engine.engine import Engine
from whisperdrop.shared.spool import TranscribeOptions


def _times(result: dict) -> list:
    """The Result's segments and words with their times (after checking the segments keep their order)."""
    assert_segments_in_order(result["segments"])
    return [(segment["start"], segment["end"], segment["text"],
             [(word["start"], word["end"], word["word"]) for word in segment["words"]])
            for segment in result["segments"]]


@pytest.mark.parametrize("stop", ["sigterm", "kill -9"])
def test_a_daemon_stopped_mid_job_resumes_it_at_the_next_start(stop, tmp_path):
    """SIGTERM (or kill -9) to a real daemon once the job's checkpoint holds a batch: the next start logs
    transcribe.resumed, decodes only the rest, writes the Result an uninterrupted run gives (with
    timings.resumed_s) and removes the checkpoint."""
    daemon = Daemon(tmp_path, local={"batch_size": 2, "threads": 2})
    daemon.start()
    write_speech_wav(tmp_path / "long.part", 1, 240)
    os.rename(tmp_path / "long.part", daemon.inbox / "long.wav")
    partial = tmp_path / "state" / "partial"

    def batches_kept() -> int:
        files = list(partial.glob("*.jsonl")) if partial.is_dir() else []
        return len(files[0].read_bytes().splitlines()) - 1 if files else 0

    try:
        daemon.wait_for(lambda: batches_kept() >= 1, timeout=300, what="a batch in the checkpoint")
        if stop == "sigterm":
            assert daemon.stop(timeout=60) == 0
        else:  # a power cut: the last line may be torn, the Result must still be the whole run's
            daemon.kill()
        assert not daemon.outputs()
        (kept,) = partial.glob("*.jsonl")
        job_id = kept.stem
        audio = shutil.copy(tmp_path / "state" / "work" / f"{job_id}.opus", tmp_path / "extracted.opus")
        chunks_kept = sum(1 for batch in json_lines(kept)[1:] for chunk in batch["chunks"] if chunk["pass"] == 1)

        daemon.start()
        daemon.wait_for(lambda: daemon.outputs(), timeout=300, what="the outbox JSON")
        daemon.wait_for(lambda: daemon.count("job.done") >= 1, timeout=60, what="job.done")
    finally:
        daemon.stop(timeout=60)
    (resumed,) = [event for event in daemon.events() if event["event"] == "transcribe.resumed"]
    assert resumed["job_id"] == job_id and resumed["chunks"] == chunks_kept and 0 < resumed["done_s"] < 240
    assert resumed["total_s"] == pytest.approx(240, abs=1)
    result = json.loads(daemon.outputs()[0].read_text())
    assert result["timings"]["resumed_s"] == resumed["done_s"]
    assert not kept.exists()

    whole = Engine(max_models=1).transcribe(audio, TranscribeOptions(**result["options"]), batch_size=2, threads=2)
    assert result["text"] == whole["text"]
    assert _times(result) == _times(whole)
