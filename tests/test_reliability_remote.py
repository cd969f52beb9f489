"""Reliability of the remote route under faults: nothing is lost, nothing is done twice.

Real parts throughout: the daemon and the runner as subprocesses (CPU, bundled tiny.en), a real
OpenSSH sshd (loopback or behind a shaped veth link in a network namespace), and the fault servers
of tests/faultserver.py (an asyncssh SFTP server whose writes fail with "disk full", a TCP server
that never answers). Random faults come from a seeded `random.Random`, so a failing run can be
replayed with the same schedule of kills.

Each test prints one `reliability: ...` line with its figures and records the same figures with
`record_property` (they land in the JUnit XML, so they are reported without `-s` too).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from daemon_helpers import Daemon, write_speech_wav, write_variant_wav
from faultserver import HungServer
from sshd import keygen
from test_remote import FAST_REMOTE, RunnerProcess, result_of

TESTS = Path(__file__).resolve().parent
SEED = 20240611
SPOOL_JOB_FOLDERS = ("incoming", "jobs", "work", "results")
FORMATS = ("srt", "vtt", "txt")


# helpers


def report(record_property, name: str, **figures) -> None:
    """Print one summary line and record every figure as a JUnit property."""
    print("\nreliability: " + name + " " + " ".join(f"{key}={value}" for key, value in figures.items()))
    for key, value in figures.items():
        record_property(key, value)


def drop(inbox: Path, staging: Path, name: str, index: int, seconds: float) -> None:
    """Write a distinct speech clip beside the inbox and rename it in (a finished file appears at once)."""
    staged = write_speech_wav(staging / name, index, seconds)
    os.replace(staged, inbox / name)


def per_job(events: list[dict], name: str) -> collections.Counter:
    return collections.Counter(event.get("job_id") for event in events if event.get("event") == name)


def inbox_files(daemon: Daemon) -> list[str]:
    return sorted(path.name for path in daemon.inbox.rglob("*") if path.is_file() and not path.name.startswith("."))


def all_done(daemon: Daemon, count: int) -> bool:
    return len(daemon.outputs(".json")) >= count and not inbox_files(daemon)


def spool_leftovers(spool: Path) -> dict[str, list[str]]:
    return {folder: sorted(path.name for path in (spool / folder).iterdir())
            for folder in SPOOL_JOB_FOLDERS if (spool / folder).exists() and any((spool / folder).iterdir())}


def check_exactly_once(daemon: Daemon, runner: RunnerProcess | None, names: list[str]) -> dict:
    """Assert each source has exactly one complete output set under its own name, is archived once,
    and nothing failed. Returns the figures (files, lost, duplicates, job ids, results) for the report.

    lost: sources with no Result JSON naming them. duplicates: extra Result JSONs, stray output files
    (a partial set beside a renamed `<stem>-1` set), extra archive copies, and runner completions
    beyond one per job.
    """
    stems = sorted(Path(name).stem for name in names)
    jsons = daemon.outputs(".json")
    by_source = collections.defaultdict(list)
    for path in jsons:
        document = json.loads(path.read_text())
        by_source[document["source"]["path"]].append((path, document))
    outputs = sorted(path.relative_to(daemon.outbox).as_posix() for path in daemon.outbox.rglob("*")
                     if path.is_file() and not path.name.startswith("."))
    expected_outputs = sorted(f"{stem}.{fmt}" for stem in stems for fmt in ("json", *FORMATS))
    archived = sorted(path.name for path in daemon.archive.rglob("*") if path.is_file())
    figures = {
        "files": len(names),
        "lost": sum(1 for name in names if not by_source.get(name)),
        "duplicates": (len({Path(name).stem for name in set(outputs) - set(expected_outputs)})
                       + len(archived) - len(set(archived) & set(names))),
    }
    assert figures["lost"] == 0, f"sources without a result: {[name for name in names if not by_source.get(name)]}"
    assert all(len(found) == 1 for found in by_source.values()), "a source has two Results"
    assert outputs == expected_outputs, (
        f"outbox differs from one set per source: extra {sorted(set(outputs) - set(expected_outputs))}, "
        f"missing {sorted(set(expected_outputs) - set(outputs))}")
    assert archived == sorted(names), f"archive differs from one copy per source: {sorted(set(archived) - set(names))}"
    assert list(daemon.failed.rglob("*")) == []
    assert inbox_files(daemon) == []
    results = {Path(name).stem: found[0][1] for name, found in by_source.items()}
    job_ids = [result["job_id"] for result in results.values()]
    assert len(set(job_ids)) == len(names), "two sources share a job id"
    figures["job_ids"] = job_ids
    figures["results"] = results
    if runner is not None:
        done = per_job(runner.events("runner.job_done"), "runner.job_done")
        twice = {job: count for job, count in done.items() if count > 1}
        figures["duplicates"] += sum(count - 1 for count in twice.values())
        assert twice == {}, f"jobs transcribed to completion more than once by the runner: {twice}"
        assert sorted(done) == sorted(job_ids), "runner completions do not match the outbox"
    assert figures["duplicates"] == 0
    return figures


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll `predicate` every 0.1 s until true; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def wait_for_no_leftovers(spool: Path, timeout: float = 60) -> dict[str, list[str]]:
    """The daemon removes a job's remote files after delivery, a little after the outbox shows it:
    wait (bounded) for the spool to empty, then return what is left."""
    deadline = time.monotonic() + timeout
    while spool_leftovers(spool) and time.monotonic() < deadline:
        time.sleep(0.2)
    return spool_leftovers(spool)


def wait_runner_loaded(runner: RunnerProcess, before: int, timeout: float = 120) -> None:
    """Wait until the runner logged one more `runner.model_loaded` than `before` (a fresh start is serving)."""
    deadline = time.monotonic() + timeout
    while len(runner.events("runner.model_loaded")) <= before:
        if runner.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"runner did not load its model:\n{runner.log.read_text()[-3000:]}")
        time.sleep(0.1)


def kill_runner(runner: RunnerProcess) -> None:
    if runner.process is not None and runner.process.poll() is None:
        runner.process.kill()
        runner.process.wait(10)


def stop_daemon(daemon: Daemon | None, strict: bool = False) -> int | None:
    """SIGTERM the daemon; its exit code. If it does not exit within 30 s, SIGKILL it and return None,
    or with `strict` raise AssertionError carrying its live threads and the log's tail."""
    if daemon is None or daemon.process is None:
        return None
    try:
        return daemon.stop(timeout=30)
    except subprocess.TimeoutExpired:
        threads = []
        for task in sorted(Path(f"/proc/{daemon.process.pid}/task").glob("*")):
            try:
                threads.append(f"{(task / 'comm').read_text().strip()}:{(task / 'wchan').read_text().strip()}")
            except OSError:
                continue
        daemon.kill()
        if strict:
            raise AssertionError(f"the daemon did not exit within 30 s of SIGTERM; threads {threads}\n{daemon.tail(15)}")
        return None


# 1. crashes


class Waves:
    """Distinct speech clips dropped into a daemon's inbox a wave at a time, so a kill schedule never
    runs out of work however fast the machine is: the test drops a new wave whenever the inbox is empty."""

    def __init__(self, daemon: Daemon, staging: Path, prefix: str, size: int, seconds: float):
        self.daemon, self.staging, self.prefix = daemon, staging, prefix
        self.size, self.seconds = size, seconds
        self.names: list[str] = []

    def keep_busy(self) -> None:
        """Drop the next wave if the daemon has nothing left in its inbox."""
        if inbox_files(self.daemon):
            return
        for _ in range(self.size):
            index = len(self.names)
            name = f"{self.prefix}{index:03d}.wav"
            drop(self.daemon.inbox, self.staging, name, index, self.seconds)
            self.names.append(name)

    def all_done(self) -> bool:
        return all_done(self.daemon, len(self.names))


def claims(spool: Path) -> list[Path]:
    """Jobs a runner holds right now (claimed into work/, not yet published or returned)."""
    return list((spool / "work").glob("*.json"))


# A kill lands a seeded random delay after the daemon (or runner) is back, so the kills hit every
# stage of a job. The delay only spreads the kills; nothing depends on how much work it lets run:
# a kill counts only if work was in flight when it hit, checked after the kill from what it left
# behind, and the loop goes on (with more files) until enough kills have counted.
MAX_KILLS = 200  # a bound on the loop, far above what the counted kills need


@pytest.mark.slow
def test_kill9_of_the_daemon_loses_nothing_and_repeats_nothing(sshd, tmp_path, record_property):
    """Files through the remote route survive 20 seeded kill -9s of the daemon, each with work in flight:
    one result each, none lost or repeated."""
    rng = random.Random(SEED)
    kills_wanted = 20
    runner = RunnerProcess(tmp_path, sshd.spool).start()
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", transcription={"provider": "remote"},
                    remote={**FAST_REMOTE, "job_timeout": 900.0, "hosts": [sshd.host_settings()]})
    waves = Waves(daemon, tmp_path / "staging", "clip", size=10, seconds=4.0)
    kills = kills_in_flight = 0
    try:
        daemon.start()
        started = time.monotonic()
        while kills_in_flight < kills_wanted:
            assert kills < MAX_KILLS, f"only {kills_in_flight} of {kills} kills found work in flight"
            waves.keep_busy()
            time.sleep(rng.uniform(0.0, 2.0))
            daemon.kill()
            kills += 1
            # A source leaves the inbox only once its job is delivered: one still there after the
            # kill was in flight when the kill hit.
            kills_in_flight += bool(inbox_files(daemon))
            daemon.start()
        count = len(waves.names)
        daemon.wait_for(waves.all_done, timeout=600, what=f"{count} results after {kills} kills")
        elapsed = time.monotonic() - started
        assert stop_daemon(daemon, strict=True) == 0
        figures = check_exactly_once(daemon, runner, waves.names)
        assert all(result["executed_on"]["route"] == "remote" for result in figures["results"].values())
        # The daemon logs stage.transcribe after the ledger commit; a kill between writing the cached
        # Result and that log leaves no event (the restart takes the cache): never two, maybe none.
        logged = per_job(daemon.events(), "stage.transcribe")
        assert max(logged.values(), default=0) <= 1, {job: n for job, n in logged.items() if n > 1}
        missing_events = sum(1 for job in figures["job_ids"] if logged[job] == 0)
        leftovers = wait_for_no_leftovers(sshd.spool)
        report(record_property, "daemon_kill9", kills=kills, kills_in_flight=kills_in_flight, files=count,
               lost=figures["lost"], duplicates=figures["duplicates"],
               runner_transcriptions=len(runner.events("runner.job_done")),
               transcribe_events_missing=missing_events, remote_leftovers=sum(map(len, leftovers.values())),
               seconds=round(elapsed, 1))
        assert leftovers == {}, f"remote files left after every job was done: {leftovers}"
    finally:
        stop_daemon(daemon)
        runner.stop()


@pytest.mark.slow
def test_kill9_of_the_runner_loses_nothing_and_completes_each_job_once(sshd, tmp_path, record_property):
    """Files through the remote route survive 10 seeded kill -9s of the runner, each while it holds a
    claimed job: each job completes once, none lost."""
    rng = random.Random(SEED + 1)
    kills_wanted = 10
    runner = RunnerProcess(tmp_path, sshd.spool).start()
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", transcription={"provider": "remote"},
                    remote={**FAST_REMOTE, "job_timeout": 900.0, "hosts": [sshd.host_settings()]})
    waves = Waves(daemon, tmp_path / "staging", "take", size=6, seconds=6.0)
    kills = interrupted = 0
    try:
        wait_runner_loaded(runner, 0)
        daemon.start()
        started = time.monotonic()
        while interrupted < kills_wanted:
            assert kills < MAX_KILLS, f"only {interrupted} of {kills} kills found a claimed job"
            waves.keep_busy()
            # Kill only while the runner holds a claim; an empty inbox means this wave is through.
            wait_until(lambda: claims(sshd.spool) or not inbox_files(daemon), timeout=300,
                       what="a job claimed by the runner")
            if not claims(sshd.spool):
                continue
            time.sleep(rng.uniform(0.0, 1.0))
            loaded = len(runner.events("runner.model_loaded"))
            kill_runner(runner)
            kills += 1
            interrupted += bool(claims(sshd.spool))  # a claim left in work/ died with the runner
            runner.start()
            wait_runner_loaded(runner, loaded)
        count = len(waves.names)
        daemon.wait_for(waves.all_done, timeout=600, what=f"{count} results after {kills} runner kills")
        elapsed = time.monotonic() - started
        assert stop_daemon(daemon, strict=True) == 0
        figures = check_exactly_once(daemon, runner, waves.names)
        assert all(result["executed_on"]["route"] == "remote" for result in figures["results"].values())
        logged = per_job(daemon.events(), "stage.transcribe")
        assert all(logged[job] == 1 for job in figures["job_ids"])
        returned = len(runner.events("runner.claim_returned"))
        leftovers = wait_for_no_leftovers(sshd.spool)
        report(record_property, "runner_kill9", kills=kills, kills_mid_job=interrupted, claims_returned=returned,
               files=count, lost=figures["lost"], duplicates=figures["duplicates"],
               runner_completions=len(runner.events("runner.job_done")),
               already_done=len(runner.events("runner.job_already_done")),
               remote_leftovers=sum(map(len, leftovers.values())), seconds=round(elapsed, 1))
        assert leftovers == {}, f"remote files left after every job was done: {leftovers}"
    finally:
        stop_daemon(daemon)
        runner.stop()


def test_a_crash_after_the_result_is_cached_still_cleans_the_remote_spool(sshd, tmp_path, record_property):
    """A daemon killed after caching a remote Result but before removing the job's remote files removes them on restart."""
    runner = RunnerProcess(tmp_path, sshd.spool).start()
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", transcription={"provider": "remote"},
                    remote={**FAST_REMOTE, "hosts": [sshd.host_settings()]})
    try:
        # Hold the job on the host: stop the runner once the job is submitted, so the result
        # appears on the host while the daemon is down.
        runner.stop()
        heartbeat = sshd.spool / "runners" / "gpu-test.json"
        heartbeat.write_text(json.dumps({"name": "gpu-test", "updated_at": time.time() + 60, "queue_length": 0}))
        daemon.start()
        write_variant_wav(daemon.inbox / "held.wav", 1)
        jobs = sshd.spool / "jobs"
        daemon.wait_for(lambda: any(jobs.glob("*.json")), timeout=60, what="job submitted")
        job_id = next(jobs.glob("*.json")).stem
        daemon.kill()
        runner.start()
        result = sshd.spool / "results" / f"{job_id}.json"
        wait_until(result.exists, timeout=120, what="the runner's result")
        # The instant the kill hit: Pipeline._transcribe had written state/results/<id>.json
        # (outbox.write_atomic) and had not yet called remote.cleanup nor committed the stage.
        document = json.loads(result.read_text())
        document["executed_on"] = {"route": "remote", "host": "testhost", "device": "cpu"}
        document["fallback_reason"] = None
        (daemon.root / "state" / "results" / f"{job_id}.json").write_text(json.dumps(document))
        daemon.start()
        daemon.wait_for(lambda: all_done(daemon, 1), timeout=120, what="the held file's result")
        assert stop_daemon(daemon, strict=True) == 0
        check_exactly_once(daemon, runner, ["held.wav"])
        leftovers = wait_for_no_leftovers(sshd.spool)
        logged = per_job(daemon.events(), "stage.transcribe")[job_id]
        report(record_property, "crash_after_cache", files=1, lost=0, duplicates=0,
               remote_leftovers=sum(map(len, leftovers.values())), transcribe_events=logged)
        assert leftovers == {}, f"remote files of a finished job left on the host: {leftovers}"
        assert logged == 1, "the metrics feed has no stage.transcribe for a job transcribed remotely"
    finally:
        stop_daemon(daemon)
        runner.stop()


def finish_one_locally(tmp_path: Path, name: str) -> Daemon:
    """A daemon (provider local) that took one clip all the way to the outbox and archive, then stopped."""
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", transcription={"provider": "local"}).start()
    write_variant_wav(daemon.inbox / name, 5)
    daemon.wait_for(lambda: all_done(daemon, 1), timeout=120, what="the first pass")
    assert stop_daemon(daemon, strict=True) == 0
    return daemon


def rewind_to_delivery(daemon: Daemon) -> None:
    """Put the ledger back where a kill during delivery leaves it: job transcribed, source pending."""
    import sqlite3

    database = sqlite3.connect(daemon.root / "state" / "ledger.sqlite3")
    try:
        with database:
            database.execute("UPDATE jobs SET stage = 'transcribed'")
            database.execute("UPDATE sources SET state = 'pending'")
    finally:
        database.close()


def deliver_again(daemon: Daemon) -> None:
    daemon.start()
    daemon.wait_for(lambda: not inbox_files(daemon)
                    and any(event["event"] == "stage.outbox" for event in daemon.events(since_start=True)),
                    timeout=120, what="the second delivery")
    assert stop_daemon(daemon, strict=True) == 0


def test_a_crash_while_writing_outputs_leaves_one_set_under_the_source_name(tmp_path, record_property):
    """A kill after the SRT/VTT/TXT were written but before the JSON: the restart completes that set, no `-1` copy."""
    daemon = finish_one_locally(tmp_path, "partial.wav")
    # The instant the kill hit: outbox.write_outputs had renamed the formats into place, not the JSON.
    (daemon.outbox / "partial.json").unlink()
    os.replace(daemon.archive / "partial.wav", daemon.inbox / "partial.wav")
    rewind_to_delivery(daemon)
    try:
        deliver_again(daemon)
        outputs = sorted(path.name for path in daemon.outbox.iterdir() if not path.name.startswith("."))
        report(record_property, "crash_in_outputs", files=1, lost=0,
               duplicates=len({name.split(".")[0] for name in outputs} - {"partial"}))
        assert outputs == ["partial.json", "partial.srt", "partial.txt", "partial.vtt"]
    finally:
        stop_daemon(daemon)


def test_a_crash_while_archiving_leaves_one_archived_copy(tmp_path, record_property):
    """A kill between linking the source into archive/ and unlinking it from the inbox: the restart keeps one copy."""
    daemon = finish_one_locally(tmp_path, "moved.wav")
    # The instant the kill hit: outbox.move_without_overwrite had made the hard link, not yet unlinked the source.
    os.link(daemon.archive / "moved.wav", daemon.inbox / "moved.wav")
    rewind_to_delivery(daemon)
    try:
        deliver_again(daemon)
        archived = sorted(path.name for path in daemon.archive.iterdir())
        report(record_property, "crash_in_archive", files=1, lost=0, duplicates=len(archived) - 1)
        assert archived == ["moved.wav"]
    finally:
        stop_daemon(daemon)


# 2. link flaps


class Flapper:
    """A thread that cuts the namespace's link for `down` s, then keeps it up at least `up` s, until
    stopped. Each cut waits for `due()` (with `due` None: none), so a test can land every cut on the
    state it is about (an upload in flight past its resume margin) however fast the machine is."""

    def __init__(self, namespace, down: float, up: float, due=None):
        self.namespace, self.down, self.up, self.due = namespace, down, up, due
        self.cuts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="link-flapper", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.up):
            while self.due is not None and not self.due():
                if self._stop.wait(0.005):
                    return
            self.namespace.cut()
            self.cuts += 1
            try:
                self._stop.wait(self.down)
            finally:
                self.namespace.restore()

    def __enter__(self) -> "Flapper":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(30)
        self.namespace.restore()


def upload_past(spool: Path, size: int) -> bool:
    """Whether an upload into `spool` is in flight with more than `size` bytes written (its .part)."""
    for part in (spool / "incoming").glob("*.part"):
        with contextlib.suppress(FileNotFoundError):
            if part.stat().st_size > size:
                return True
    return False


@pytest.mark.needs_root
@pytest.mark.slow
def test_link_flaps_resume_uploads_and_lose_nothing(netns_sshd, tmp_path, record_property):
    """Files over a 4 Mbit/s link cut for 5 s at a time, each cut landing on an upload past its resume
    margin, at least 3 cuts: all come back remote, once each, with uploads resumed."""
    namespace, server = netns_sshd
    cuts_wanted, wave, max_files = 3, 10, 100
    namespace.shape(rate="4mbit")
    runner = RunnerProcess(tmp_path, server.spool).start()
    (tmp_path / "daemon").mkdir()
    # 96 kbit/s Opus makes a 20 s clip ~240 KB: about a second on the wire (two uploads share it). A cut
    # waits for an upload with 160 KiB written, past the resume margin (7 blocks of 16 KiB), so it resumes.
    daemon = Daemon(tmp_path / "daemon", audio={"bitrate_kbps": 96}, transcription={"provider": "remote"},
                    remote={**FAST_REMOTE, "job_timeout": 900.0, "hosts": [server.host_settings()]})
    names: list[str] = []
    try:
        daemon.start()
        started = time.monotonic()
        with Flapper(namespace, down=5.0, up=4.0, due=lambda: upload_past(server.spool, 160 * 1024)) as flapper:
            while len(names) < max_files:  # a wave at a time, until enough cuts have landed
                for index in range(len(names), len(names) + wave):
                    names.append(f"flap{index:03d}.wav")
                    drop(daemon.inbox, tmp_path / "staging", names[-1], index, 20.0)
                daemon.wait_for(lambda: all_done(daemon, len(names)), timeout=420,
                                what=f"{len(names)} results over a flapping link")
                if flapper.cuts >= cuts_wanted:
                    break
        elapsed = time.monotonic() - started
        count = len(names)
        assert stop_daemon(daemon, strict=True) == 0
        figures = check_exactly_once(daemon, runner, names)
        assert all(result["executed_on"]["route"] == "remote" for result in figures["results"].values())
        uploads = [event for event in daemon.events() if event.get("event") == "stage.upload"]
        resumed = [event for event in uploads if event["resumed_from"] > 0 and event["bytes"] > 0]
        skipped = [event for event in uploads if event["bytes"] == 0]
        # A Result's transfer.resumed_from is also > 0 when an upload was skipped because the whole
        # audio was there already (a retry after a cut during submit or fetch): counted apart.
        results_resumed = sum(1 for result in figures["results"].values() if result["transfer"]["resumed_from"] > 0)
        sent = sum(result["transfer"]["bytes"] for result in figures["results"].values())
        audio = sum(result["transfer"]["audio_bytes"] for result in figures["results"].values())
        report(record_property, "link_flaps", cuts=flapper.cuts, files=count, lost=figures["lost"],
               duplicates=figures["duplicates"], resumed_uploads=len(resumed), results_resumed_from_gt0=results_resumed,
               uploads_skipped_complete=len(skipped), submits=daemon.count("stage.submit"),
               runner_already_done=len(runner.events("runner.job_already_done")), host_down=daemon.count("host.down"),
               bytes_sent=sent, audio_bytes=audio, seconds=round(elapsed, 1))
        assert flapper.cuts >= 3
        assert daemon.count("route.fallback") == 0
        assert resumed, "no upload was resumed: the cuts missed every upload"
        resumed_jobs = {event["job_id"] for event in resumed}
        assert all(result["transfer"]["resumed_from"] > 0 for result in figures["results"].values()
                   if result["job_id"] in resumed_jobs)
    finally:
        stop_daemon(daemon)
        runner.stop()


# 3. remote disk full


def start_fault_server(tmp_path: Path, **faults) -> tuple[subprocess.Popen, dict, Path]:
    """faultserver.py on loopback in its own process: (process, remote.hosts item, spool on disk)."""
    root = tmp_path / "host"
    spool = root / "spool"
    spool.mkdir(parents=True)
    client_key = keygen(tmp_path / "client", "client")
    known_hosts = tmp_path / "known_hosts"
    command = [sys.executable, str(TESTS / "faultserver.py"), "--root", str(root),
               "--client-key", str(client_key.with_suffix(".pub")), "--known-hosts", str(known_hosts),
               "--listen", "127.0.0.1"]
    for name, value in faults.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = int(server.stdout.readline())
    # Keep reading its counter lines, so a full pipe never stalls it.
    threading.Thread(target=server.stdout.read, name="faultserver-drain", daemon=True).start()
    host = {"name": "diskhost", "host": "127.0.0.1", "port": port, "user": "root", "key": str(client_key),
            "known_hosts": str(known_hosts), "spool": "/spool"}
    return server, host, spool


@pytest.mark.parametrize("provider", ["remote", "auto"])
def test_remote_disk_full_waits_or_falls_back_naming_host_and_cause(tmp_path, record_property, provider):
    """An SFTP write failing with "No space left on device" marks the host down naming it and the cause:
    provider remote waits and then finishes remotely; provider auto falls back to the local CPU."""
    server, host, spool = start_fault_server(tmp_path, fail_after=20000)
    runner = daemon = None
    try:
        runner = RunnerProcess(tmp_path, spool).start()
        (tmp_path / "daemon").mkdir()
        daemon = Daemon(tmp_path / "daemon", transcription={"provider": provider},
                        remote={**FAST_REMOTE, "hosts": [host]}).start()
        write_variant_wav(daemon.inbox / "full.wav", 3)
        result = result_of(daemon, "full", timeout=180)
        events = daemon.events()
        down = [event for event in events if event.get("event") == "host.down"]
        assert down, "no host.down event"
        assert down[0]["host"] == "diskhost"
        assert "No space left on device" in down[0]["error"] and "upload" in down[0]["error"]
        assert "free space on 127.0.0.1" in (down[0].get("hint") or "") + down[0]["error"]
        if provider == "remote":
            waiting = [event for event in events if event.get("event") == "route.waiting_for_host"]
            assert waiting and "diskhost" in waiting[0]["reason"] and "No space left on device" in waiting[0]["reason"]
            assert result["executed_on"]["route"] == "remote" and result["fallback_reason"] is None
            assert len(runner.events("runner.job_done")) == 1
            daemon.wait_for(lambda: spool_leftovers(spool) == {}, timeout=30, what="remote cleanup")
        else:
            fallback = [event for event in events if event.get("event") == "route.fallback"]
            assert fallback and "diskhost" in fallback[0]["reason"]
            assert result["executed_on"]["route"] == "local"
            assert "diskhost" in result["fallback_reason"] and "No space left on device" in result["fallback_reason"]
            assert runner.events("runner.job_done") == []
        daemon.wait_for(lambda: all_done(daemon, 1), timeout=30, what="archived")
        leftovers = spool_leftovers(spool)
        report(record_property, f"disk_full_{provider}", files=1, lost=0, duplicates=0,
               route=result["executed_on"]["route"], host_down=len(down),
               fallback_reason=json.dumps(result["fallback_reason"]),
               remote_leftovers=sum(map(len, leftovers.values())))
    finally:
        stop_daemon(daemon)
        if runner is not None:
            runner.stop()
        server.kill()
        server.wait(10)


# 4. a hung server


class HungServerThread:
    """tests/faultserver.HungServer run on its own event loop in a thread (the daemon is another process)."""

    def __init__(self) -> None:
        self.server = HungServer()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hung-server", daemon=True)

    def __enter__(self) -> HungServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.__aenter__(), self.loop).result(10)
        return self.server

    def __exit__(self, *exc_info) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.__aexit__(None, None, None), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def test_hung_server_times_out_and_falls_back_within_the_bound(tmp_path, record_property):
    """A host that accepts TCP and never answers is given up after the connect timeout; auto falls back locally in bound."""
    client_key = keygen(tmp_path / "client", "client")
    daemon = None
    with HungServerThread() as hung:
        try:
            known_hosts = tmp_path / "known_hosts"
            # Any key will do: the server never gets as far as showing one.
            known_hosts.write_text(f"[{hung.host}]:{hung.port} " + " ".join(
                client_key.with_suffix(".pub").read_text().split()[:2]) + "\n")
            host = {"name": "hunghost", "host": hung.host, "port": hung.port, "user": "root",
                    "key": str(client_key), "known_hosts": str(known_hosts), "spool": "/spool"}
            (tmp_path / "daemon").mkdir()
            daemon = Daemon(tmp_path / "daemon", transcription={"provider": "auto"},
                            remote={**FAST_REMOTE, "hosts": [host]}).start()
            connect_timeout, settle = FAST_REMOTE["connect_timeout"], 0.5
            dropped = time.monotonic()
            write_variant_wav(daemon.inbox / "hung.wav", 4)
            daemon.wait_for(lambda: daemon.count("route.fallback") > 0, timeout=120, what="route.fallback")
            fallback_s = time.monotonic() - dropped
            result = result_of(daemon, "hung", timeout=120)
            result_s = time.monotonic() - dropped
            assert result["executed_on"]["route"] == "local"
            reason = result["fallback_reason"]
            assert "hunghost" in reason and ("connect" in reason.lower() or "timeout" in reason.lower()), reason
            # Bound: settle + hashing and extracting one 11 s clip + connect_timeout (+1 s guard in
            # transfer.Host._open) + 15 s of slack for a CPU shared with other test runs.
            fallback_bound = settle + connect_timeout + 1.0 + 15.0
            # ... and then one local transcription of 11 s of speech with tiny.en (model load included).
            result_bound = fallback_bound + 45.0
            report(record_property, "hung_server", files=1, lost=0, duplicates=0, fallback_s=round(fallback_s, 1),
                   fallback_bound_s=fallback_bound, result_s=round(result_s, 1), result_bound_s=result_bound,
                   fallback_reason=json.dumps(reason))
            assert fallback_s < fallback_bound
            assert result_s < result_bound
            assert stop_daemon(daemon, strict=True) == 0
        finally:
            stop_daemon(daemon)
