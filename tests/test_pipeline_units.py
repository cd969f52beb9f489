"""The daemon's pure parts, fast: the Result builder."""

from __future__ import annotations

import copy

from whisperdrop import result as results

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
