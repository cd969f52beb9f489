"""The GPU runner over a real spool directory, with the real engine and the bundled tiny.en model.

Jobs are submitted the way the daemon does it (audio in incoming/, then jobs/<id>.json by rename),
audio is jfk.flac made into Opus by the daemon's own extraction stage. Only the out-of-memory ladder
uses a fake engine: there is no GPU here to run out of.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import jiwer
import pytest
from daemon_helpers import json_lines
from media import JFK, JFK_TEXT, concat_speech, speech_with_pauses
from transcripts import assert_segments_in_order, missing_words
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from whisperdrop.daemon.extract import extract
from whisperdrop.engine.engine import Engine, EngineError
from whisperdrop.gpu_runner import Runner
from whisperdrop.shared import config
from whisperdrop.shared.spool import RESULT_SCHEMA, TranscribeOptions, dumps, make_job_document

TINY = TranscribeOptions(model="bundled:tiny.en")
FAST = TranscribeOptions(model="bundled:tiny.en", word_timestamps=False, beam_size=1)


# ------------------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves a thread running (observers, heartbeats, serve loops)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 60  # a generous bound for threads that are stopping to end
    while time.monotonic() < deadline:
        # tqdm's monitor is process-wide, started once by faster-whisper's first transcription.
        leaked = [thread for thread in threading.enumerate()
                  if thread not in before and thread.is_alive() and thread.name != "tqdm_monitor"]
        if not leaked:
            return
        time.sleep(0.05)
    pytest.fail(f"threads left running: {leaked}")


@pytest.fixture(scope="module")
def engine():
    """One engine for the module, so the model loads once."""
    return Engine(max_models=2)


@pytest.fixture(scope="module")
def jfk_opus(tmp_path_factory) -> bytes:
    """jfk.flac (11 s) as the daemon uploads it: 16 kHz mono Opus."""
    dest = tmp_path_factory.mktemp("audio") / "jfk.opus"
    return extract(JFK, dest).path.read_bytes()


@pytest.fixture(scope="module")
def long_opus(tmp_path_factory) -> bytes:
    """jfk repeated to 66 s, as Opus: long enough to interrupt a runner in the middle of it."""
    folder = tmp_path_factory.mktemp("long")
    flac = concat_speech(folder / "long.flac", 66.0)
    return extract(flac, folder / "long.opus").path.read_bytes()


@pytest.fixture
def spool(tmp_path) -> Path:
    return tmp_path / "spool"


def settings(spool: Path, name: str = "runner-a", **override) -> dict:
    return {"spool": str(spool), "model": "bundled:tiny.en", "device": "cpu", "compute_type": "int8",
            "batch_size": 1, "name": name, "heartbeat_seconds": 0.5, "expire_days": 7.0, "max_models": 2,
            **override}


def submit(spool: Path, audio: bytes, *, tag: str = "jfk", options: TranscribeOptions = TINY,
           duration: float = 11.0, submitted_at: float | None = None) -> str:
    """Put a job in the spool as the daemon does: audio first, then the job document by rename."""
    job = hashlib.sha256(f"{tag}\n{hashlib.sha256(audio).hexdigest()}".encode()).hexdigest()
    for directory in ("incoming", "jobs"):
        (spool / directory).mkdir(parents=True, exist_ok=True)
    (spool / "incoming" / f"{job}.opus").write_bytes(audio)
    document = make_job_document(job, options, len(audio), hashlib.sha256(audio).hexdigest(), duration,
                                 "jfk.flac", submitted_at if submitted_at is not None else time.time())
    temporary = spool / "jobs" / f"{job}.json.tmp"
    temporary.write_bytes(dumps(document))
    os.replace(temporary, spool / "jobs" / f"{job}.json")
    return job


def words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def progress_started(path: Path) -> bool:
    try:
        return read(path)["done_s"] > 0
    except (OSError, ValueError):
        return False


def in_hand(path: Path) -> bool:
    """The job's progress document is there: it is claimed, its audio checked, and its transcription under way."""
    try:
        return read(path)["done_s"] is not None
    except (OSError, ValueError, KeyError):
        return False


def events(log_path: Path) -> list[dict]:
    return json_lines(log_path)


class RunnerProcesses:
    """Starts real `python -m whisperdrop runner` processes, one config file each, and always reaps them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.started: list[subprocess.Popen] = []

    def start(self, spool: Path, name: str) -> tuple[subprocess.Popen, Path]:
        index = len(self.started)
        config_path = self.folder / f"{name}-{index}.yaml"
        config_path.write_text(json.dumps({"runner": {
            "spool": str(spool), "name": name, "model": "bundled:tiny.en", "device": "cpu", "compute_type": "int8",
            "heartbeat_seconds": 0.5}}))  # JSON is YAML
        log_path = self.folder / f"{name}-{index}.log"
        with open(log_path, "wb") as stdout:
            process = subprocess.Popen(
                [sys.executable, "-m", "whisperdrop", "runner", "-c", str(config_path), "--log-format", "json"],
                cwd=self.folder, stdout=stdout, stderr=subprocess.STDOUT)
        self.started.append(process)
        return process, log_path

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


@pytest.fixture
def processes(tmp_path):
    runners = RunnerProcesses(tmp_path)
    yield runners
    runners.close()


class Recorder(FileSystemEventHandler):
    """Records every path that watchdog reports in a folder (created, or renamed into place)."""

    def __init__(self):
        self.paths: list[str] = []

    def on_any_event(self, event) -> None:
        self.paths.append(getattr(event, "dest_path", "") or event.src_path)


# ----------------------------------------------------------------------------------------- tests

def test_step_transcribes_a_job_and_publishes_its_result(spool, engine, jfk_opus):
    """step() claims a submitted job, writes progress while it runs, publishes a Result and leaves nothing behind."""
    runner = Runner(settings(spool), engine=engine)
    job = submit(spool, jfk_opus, submitted_at=time.time() - 2)
    recorder, observer = Recorder(), Observer()
    observer.schedule(recorder, str(spool / "progress"), recursive=False)
    observer.start()
    progress = str(spool / "progress" / f"{job}.json")
    try:
        assert runner.step() is True
        # watchdog hands events over on its own thread: wait for them, do not assume they came already
        wait_for(lambda: progress in recorder.paths, 60, "the progress file's events")
    finally:
        observer.stop()
        observer.join()
    result = read(spool / "results" / f"{job}.json")
    assert result["schema"] == RESULT_SCHEMA and result["job_id"] == job
    assert jiwer.wer(words(JFK_TEXT.read_text()), words(result["text"])) <= 0.10
    assert result["executed_on"]["route"] == "remote"
    assert result["executed_on"]["host"] == "runner-a" and result["executed_on"]["device"] == "cpu"
    assert result["executed_on"]["compute_type"] == "int8" and result["executed_on"]["gpu"] is None
    assert result["timings"]["queue_s"] >= 2 and result["timings"]["transcribe_s"] > 0
    assert result["segments"] and result["segments"][0]["words"]
    assert_segments_in_order(result["segments"])
    assert progress in recorder.paths
    assert not (spool / "progress" / f"{job}.json").exists()
    assert list((spool / "work").iterdir()) == []
    assert list((spool / "jobs").iterdir()) == []
    assert runner.step() is False

    runner.heartbeat()
    beat = read(spool / "runners" / "runner-a.json")
    assert beat["jobs_done"] == 1 and beat["queue_length"] == 0 and beat["current"] is None
    assert 10.5 < beat["audio_seconds_done"] < 11.5 and beat["transcribe_seconds_done"] > 0
    assert beat["pid"] == os.getpid() and beat["device"] == "cpu" and beat["version"]
    assert {"model": "bundled:tiny.en", "device": "cpu", "compute_type": "int8"} in beat["models_loaded"]


def test_words_after_pauses_are_kept_on_the_runners_default_path(spool, engine, tmp_path):
    """Speech with mid-sentence pauses (jfk with its pause after "my fellow Americans," a second longer,
    said twice; espeak-ng sentences broken by a second of silence, the rest fading in), uploaded as the
    daemon uploads it and transcribed by a runner with its default batch size: every word said is in the
    Result, and its segments keep their order (issue 30: batched decoding lost the word after the pause)."""
    runner = Runner(settings(spool, batch_size=config.defaults()["runner"]["batch_size"]), engine=engine)
    jobs = {}
    for name, (path, text) in speech_with_pauses(tmp_path).items():
        audio = extract(path, path.with_suffix(".opus")).path.read_bytes()
        jobs[submit(spool, audio, tag=name)] = (name, text)
    while runner.step():
        pass
    for job, (name, text) in jobs.items():
        result = read(spool / "results" / f"{job}.json")
        assert missing_words(text, result["text"]) == [], (name, result["text"])
        assert_segments_in_order(result["segments"], name)


def test_a_job_already_done_is_not_transcribed_again(spool, engine, jfk_opus):
    """A claimed job whose Result already exists is dropped without running the engine."""
    job = submit(spool, jfk_opus)
    (spool / "results").mkdir(parents=True)
    (spool / "results" / f"{job}.json").write_text('{"text": "earlier", "segments": []}')
    runner = Runner(settings(spool), engine=Engine())  # no model loaded: transcribing would take seconds
    assert runner.step() is True
    assert read(spool / "results" / f"{job}.json")["text"] == "earlier"
    assert runner.engine.loaded() == [] and list((spool / "work").iterdir()) == []


@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing", "symlink"])
def test_audio_that_does_not_match_the_job_fails_as_checksum_and_is_deleted(spool, engine, jfk_opus, tmp_path, damage):
    """Audio whose bytes, size or presence differ from the job fails `checksum` (retryable) and is deleted."""
    job = submit(spool, jfk_opus)
    audio = spool / "incoming" / f"{job}.opus"
    secret = tmp_path / "secret.opus"
    secret.write_bytes(jfk_opus)
    if damage == "flipped":
        data = bytearray(jfk_opus)
        data[len(data) // 2] ^= 0xFF
        audio.write_bytes(bytes(data))
    elif damage == "truncated":
        audio.write_bytes(jfk_opus[:-100])
    elif damage == "missing":
        audio.unlink()
    else:
        audio.unlink()
        audio.symlink_to(secret)  # same bytes, but outside the spool: never read through a link
    runner = Runner(settings(spool), engine=engine)
    assert runner.step() is True
    failure = read(spool / "failed" / f"{job}.json")
    assert failure["kind"] == "checksum" and failure["retryable"] is True
    assert failure["job_id"] == job and failure["runner"] == "runner-a" and failure["message"]
    assert not audio.exists() and not audio.is_symlink()
    assert secret.read_bytes() == jfk_opus
    assert not (spool / "results" / f"{job}.json").exists()
    assert list((spool / "work").iterdir()) == [] and list((spool / "progress").iterdir()) == []


def _tree(folder: Path, skip: Path) -> dict:
    return {str(path): path.stat().st_mtime_ns for path in folder.rglob("*") if skip not in path.parents and path != skip}


@pytest.mark.parametrize("problem", ["traversal_id", "unknown_option", "not_json", "bad_file_name"])
def test_a_bad_job_document_fails_as_protocol_and_touches_nothing_outside_the_spool(spool, engine, jfk_opus,
                                                                                   tmp_path, problem):
    """A job document with a path in its id, an unknown option, no JSON, or a file name that is no id fails `protocol`."""
    job = submit(spool, jfk_opus)
    document_path = spool / "jobs" / f"{job}.json"
    document = read(document_path)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("keep")
    if problem == "traversal_id":
        document["job_id"] = "../../outside/keep.txt"
        document_path.write_bytes(dumps(document))
    elif problem == "unknown_option":
        document["options"]["command"] = "rm -rf /"
        document_path.write_bytes(dumps(document))
    elif problem == "not_json":
        document_path.write_text("{ not json")
    else:
        os.rename(document_path, spool / "jobs" / "..%2f..%2foutside%2fkeep.json")
    runner = Runner(settings(spool), engine=Engine())
    before = _tree(tmp_path, spool)
    assert runner.step() is True
    assert _tree(tmp_path, spool) == before
    assert (tmp_path / "outside" / "keep.txt").read_text() == "keep"
    if problem == "bad_file_name":
        assert (spool / "failed" / "..%2f..%2foutside%2fkeep.json.rejected").exists()
    else:
        failure = read(spool / "failed" / f"{job}.json")
        assert failure["kind"] == "protocol" and failure["retryable"] is False
    assert runner.engine.loaded() == []
    assert list((spool / "work").iterdir()) == [] and list((spool / "results").iterdir()) == []
    assert runner.step() is False


class OutOfMemoryEngine(Engine):
    """An engine that runs out of memory above `fits_batch` or in float16 (no GPU here to do it for real)."""

    def __init__(self, fits: bool):
        super().__init__()
        self.fits = fits
        self.calls: list[tuple[int, str, str]] = []

    def transcribe_many(self, jobs, options, *, device="cpu", compute_type="default", device_index=0,
                        threads=0, batch_size=1, cancel=None, more=None):
        self.calls.append((batch_size, compute_type, device))
        if batch_size > 1 or compute_type == "float16" or not self.fits:
            raise EngineError("CUDA failed with error out of memory", kind="oom", retryable=True)
        for job in jobs:
            yield job, {"schema": RESULT_SCHEMA, "text": "fits", "segments": [], "duration": 11.0,
                        "model": options.model, "timings": {"load_s": 0.0, "transcribe_s": 0.1}}


@pytest.mark.parametrize("fits", [True, False])
def test_out_of_memory_halves_the_batch_then_tries_int8_then_fails_retryable(spool, jfk_opus, fits):
    """On out-of-memory the runner retries at half the batch size down to 1, then int8_float16, then fails `oom` retryable."""
    fake = OutOfMemoryEngine(fits)
    runner = Runner(settings(spool, device="cuda", compute_type="float16", batch_size=8), engine=fake)
    job = submit(spool, jfk_opus)
    assert runner.step() is True
    assert fake.calls == [(8, "float16", "cuda"), (4, "float16", "cuda"), (2, "float16", "cuda"),
                          (1, "float16", "cuda"), (1, "int8_float16", "cuda")]
    if fits:
        executed = read(spool / "results" / f"{job}.json")["executed_on"]
        assert executed["compute_type"] == "int8_float16" and executed["batch_size"] == 1
        assert executed["oom_retries"] == 4 and executed["device"] == "cuda"
    else:
        failure = read(spool / "failed" / f"{job}.json")
        assert failure["kind"] == "oom" and failure["retryable"] is True
        assert "batch 8 float16" in failure["message"] and "batch 1 int8_float16" in failure["message"]
        assert not (spool / "results" / f"{job}.json").exists()
    assert list((spool / "work").iterdir()) == []


def _claim(spool: Path, job: str, owner: str, claimed: float, heartbeat_seconds: float = 1.0) -> Path:
    """Move a queued job to work/ as `owner` would have claimed it at `claimed`."""
    work = spool / "work" / f"{job}.json"
    os.rename(spool / "jobs" / f"{job}.json", work)
    document = read(work)
    document["claim"] = {"claimed_by": owner, "claimed_at": claimed, "token": owner + "-token",
                         "heartbeat_seconds": heartbeat_seconds, "queued_mtime": claimed - 50}
    work.write_bytes(dumps(document))
    os.utime(work, (claimed, claimed))
    return work


def test_reclaim_returns_only_claims_whose_owner_stopped_beating(spool, jfk_opus):
    """Claims of a runner with no heartbeat, an old one, or a `stopped` one go back to jobs/; a live runner's stay."""
    now = time.time()
    runner = Runner(settings(spool, heartbeat_seconds=1.0), engine=Engine())
    ghost, old, stopped, alive, fresh = (submit(spool, jfk_opus, tag=tag) for tag in ("1", "2", "3", "4", "5"))
    _claim(spool, ghost, "ghost", now - 100)
    _claim(spool, old, "old", now - 100)
    _claim(spool, stopped, "stopped", now - 1)
    _claim(spool, alive, "alive", now - 100)
    _claim(spool, fresh, "newcomer", now - 1)  # no heartbeat yet, but claimed a moment ago
    for name, updated, state in (("old", now - 10, "idle"), ("stopped", now - 1, "stopped"), ("alive", now - 1, "busy")):
        (spool / "runners" / f"{name}.json").write_bytes(
            dumps({"name": name, "updated_at": updated, "heartbeat_seconds": 1.0, "state": state}))
    returned = runner.reclaim_stale(now)
    assert sorted(returned) == sorted([ghost, old, stopped])
    for job, queued in ((ghost, now - 150), (old, now - 150), (stopped, now - 51)):
        document = read(spool / "jobs" / f"{job}.json")
        assert "claim" not in document and document["job_id"] == job
        assert abs((spool / "jobs" / f"{job}.json").stat().st_mtime - queued) < 1  # keeps its place in the queue
    assert sorted(path.name for path in (spool / "work").iterdir()) == sorted([f"{alive}.json", f"{fresh}.json"])
    assert runner.reclaim_stale(now) == []


def test_expire_removes_leftovers_older_than_expire_days(spool, jfk_opus):
    """expire() removes old files in incoming/, results/, failed/, progress/, work/ and stale .part, and keeps the rest."""
    runner = Runner(settings(spool, expire_days=1.0), engine=Engine())
    now = time.time()
    old, recent = now - 2 * 86400, now - 3600
    queued = submit(spool, jfk_opus, tag="queued")
    names = {
        "incoming": ["a" * 64 + ".opus", "b" * 64 + ".opus.part", f"{queued}.opus"],
        "results": ["c" * 64 + ".json"], "failed": ["d" * 64 + ".json"], "progress": ["e" * 64 + ".json"],
        "work": ["f" * 64 + ".json"], "jobs": ["1" * 64 + ".json.tmp"], "runners": ["gone.json"],
    }
    expected_gone = []
    for directory, files in names.items():
        for name in files:
            old_path, new_path = spool / directory / name, spool / directory / ("new-" + name)
            for path, moment in ((old_path, old), (new_path, recent)):
                if not path.exists():
                    path.write_text("x")
                os.utime(path, (moment, moment))
            new_path.touch()
            if name != f"{queued}.opus":
                expected_gone.append(old_path)
    os.utime(spool / "jobs" / f"{queued}.json", (old, old))
    runner.heartbeat(now)
    os.utime(spool / "runners" / "runner-a.json", (old, old))
    assert runner.expire(now) == len(expected_gone)
    assert not any(path.exists() for path in expected_gone)
    assert (spool / "incoming" / f"{queued}.opus").exists() and (spool / "jobs" / f"{queued}.json").exists()
    assert (spool / "runners" / "runner-a.json").exists()
    assert all((spool / directory / ("new-" + name)).exists() for directory, files in names.items() for name in files)
    assert runner.expire(now) == 0


def test_stop_cancels_the_job_in_hand_and_puts_it_back(spool, engine, long_opus):
    """serve() returns soon after stop is set, and the job it was transcribing goes back to jobs/ unclaimed."""
    runner = Runner(settings(spool), engine=engine)
    job = submit(spool, long_opus, duration=66.0, options=FAST)
    stop = threading.Event()
    thread = threading.Thread(target=runner.serve, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: progress_started(spool / "progress" / f"{job}.json"), 60, "transcription to start")
        stop.set()
        # The engine checks its cancel event between segments: stop takes effect at the next segment
        # of the current 30 s window (seconds with tiny.en; a behaviour bound here, not a timing).
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        stop.set()
        thread.join()
    document = read(spool / "jobs" / f"{job}.json")
    assert "claim" not in document and document["job_id"] == job
    assert list((spool / "work").iterdir()) == [] and list((spool / "progress").iterdir()) == []
    assert not (spool / "results" / f"{job}.json").exists()
    assert read(spool / "runners" / "runner-a.json")["state"] == "stopped"


def test_two_runner_processes_share_a_spool_and_do_each_job_once(spool, jfk_opus, processes):
    """Two runner processes on one spool do 20 jobs between them, each exactly once, both taking part."""
    first, first_log = processes.start(spool, "gpu-a")
    second, second_log = processes.start(spool, "gpu-b")
    for name in ("gpu-a", "gpu-b"):
        wait_for(lambda: (spool / "runners" / f"{name}.json").exists()
                 and read(spool / "runners" / f"{name}.json")["state"] == "idle", 60, f"{name} to load its model")
    jobs = [submit(spool, jfk_opus, tag=f"copy-{index}", options=FAST) for index in range(20)]
    wait_for(lambda: all((spool / "results" / f"{job}.json").exists() for job in jobs), 300, "20 results")
    for process in (first, second):
        process.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0 and second.wait(timeout=30) == 0
    done = {path: [event["job_id"] for event in events(path) if event.get("event") == "runner.job_done"]
            for path in (first_log, second_log)}
    counts = Counter(job for finished in done.values() for job in finished)
    assert counts == Counter({job: 1 for job in jobs})
    assert all(done.values()), {str(path): len(finished) for path, finished in done.items()}
    assert not list((spool / "failed").iterdir()) and not list((spool / "work").iterdir())
    for job in jobs:
        assert "ask not what your country" in words(read(spool / "results" / f"{job}.json")["text"])
    assert {read(spool / "runners" / f"{name}.json")["state"] for name in ("gpu-a", "gpu-b")} == {"stopped"}


def test_a_runner_killed_mid_job_leaves_a_claim_that_the_restarted_runner_completes(spool, long_opus, processes):
    """After kill -9 during a transcription, the restarted runner returns the stale claim to jobs/ and completes it."""
    first, _ = processes.start(spool, "gpu-a")
    job = submit(spool, long_opus, duration=66.0, options=FAST)
    # With batches, done_s moves once per batch; the progress document's arrival is the start of the work.
    wait_for(lambda: in_hand(spool / "progress" / f"{job}.json"), 90, "transcription to start")
    first.kill()
    first.wait(timeout=30)
    assert read(spool / "work" / f"{job}.json")["claim"]["claimed_by"] == "gpu-a"
    assert not (spool / "results" / f"{job}.json").exists()

    second, second_log = processes.start(spool, "gpu-a")
    wait_for(lambda: (spool / "results" / f"{job}.json").exists(), 180, "the restarted runner's result")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0
    result = read(spool / "results" / f"{job}.json")
    assert 65 < result["duration"] < 67 and words(result["text"]).count("not what your country") >= 5
    logged = [event["event"] for event in events(second_log) if event.get("job_id") == job]
    assert logged == ["runner.claim_returned", "runner.job_done"]
    assert list((spool / "work").iterdir()) == [] and list((spool / "progress").iterdir()) == []
