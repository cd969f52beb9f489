"""Issue 29 through a real daemon: never strand a job on the CPU while a GPU host is back.

Real parts throughout: the daemon and a runner as subprocesses (CPU, bundled tiny.en), a real OpenSSH
sshd, on loopback where stopping it is the outage, or inside a network namespace whose link is cut
and restored. Every wait is on the daemon's log, its ledger or its files, with generous bounds: the
host comes back only once the local run has saved a checkpoint batch, a runner is killed only once
the job is on it, a daemon is killed at the hand-back's log line.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import sqlite3
import time
from pathlib import Path

from daemon_helpers import Daemon, json_lines, write_speech_wav, write_variant_wav
from test_remote import FAST_REMOTE, RunnerProcess, result_of

LONG_S = 600.0  # a long file: many checkpoint batches on the CPU, so the host can come back in the middle
SLOW_LOCAL = {"batch_size": 2, "threads": 1}  # many small checkpoint batches; the runner uses both cores
WAIT = 900  # generous bound on the slow waits (a 10-minute file on a shared 2-core CPU)


def daemon_for(root: Path, host: dict, **remote) -> Daemon:
    (root / "daemon").mkdir(exist_ok=True)
    return Daemon(root / "daemon", transcription={"provider": "auto"}, local=SLOW_LOCAL,
                  remote={**FAST_REMOTE, "probe_interval": 1.0, "job_timeout": 1800.0,  # a loaded CPU "GPU"
                          "hosts": [host], **remote})


def drop(daemon: Daemon, name: str, seconds: float, index: int = 1) -> None:
    """A distinct speech clip, renamed into the inbox (it appears whole)."""
    staged = write_speech_wav(daemon.root / "staging" / name, index, seconds)
    os.replace(staged, daemon.inbox / name)


def events(daemon: Daemon, name: str, **match) -> list[dict]:
    return [event for event in daemon.events() if event.get("event") == name
            and all(event.get(key) == value for key, value in match.items())]


def batches_kept(daemon: Daemon) -> int:
    """Batch lines in the (one) checkpoint of the local route."""
    files = list((daemon.root / "state" / "partial").glob("*.jsonl"))
    return len(json_lines(files[0])) - 1 if files else 0


def ledger_job(daemon: Daemon, job_id: str) -> dict:
    db = sqlite3.connect(f"file:{daemon.root / 'state' / 'ledger.sqlite3'}?mode=ro", uri=True, timeout=5)
    try:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return dict(row) if row else {}
    finally:
        db.close()


def warm(daemon: Daemon) -> dict:
    """One clip through the host first: the connection is up and the runner has measured its speed."""
    write_variant_wav(daemon.inbox / "warm.wav", 1)
    result = result_of(daemon, "warm", timeout=180)
    assert result["executed_on"]["route"] == "remote"
    return result


def fall_back_and_return(daemon: Daemon, namespace, until: str = "route.handback") -> str:
    """Start the daemon, send a clip through the host, cut the link and drop the long file (it falls
    back to the CPU); restore the link once a checkpoint batch is saved, and wait for the log's
    `until` event of the long file. Returns the long file's job id."""
    daemon.start()
    warm(daemon)
    namespace.cut()
    drop(daemon, "long.wav", LONG_S)
    daemon.wait_for(lambda: events(daemon, "route.fallback"), timeout=60, what="the fallback")
    daemon.wait_for(lambda: batches_kept(daemon) >= 1, timeout=WAIT, what="a checkpoint batch")
    namespace.restore()
    daemon.wait_for(lambda: events(daemon, until, path="long.wav"), timeout=WAIT, what=until)
    return events(daemon, until, path="long.wav")[0]["job_id"]


def stop(daemon: Daemon) -> None:
    try:
        daemon.stop(timeout=60)
    finally:
        daemon.kill()


def test_after_a_fallback_the_next_job_goes_to_the_returned_host_at_once(sshd, tmp_path):
    """Host down: a job falls back. Host back: the next job probes it (host.up) and goes there at
    once, while the host's back-off (300 s) still runs; no second fallback."""
    runner = RunnerProcess(tmp_path, sshd.spool).start()
    daemon = daemon_for(tmp_path, sshd.host_settings(), retry_initial_seconds=300.0, retry_max_seconds=300.0)
    try:
        daemon.start()
        warm(daemon)
        sshd.stop()
        write_variant_wav(daemon.inbox / "during.wav", 2)
        during = result_of(daemon, "during")
        assert during["executed_on"]["route"] == "local" and "testhost" in during["fallback_reason"]
        sshd.start()
        health = daemon.root / "state" / "hosts.json"
        (host,) = json.loads(health.read_text())["hosts"]
        assert not host["up"] and host["down_until"] - time.time() > 200  # the back-off is far from over
        # A job about to fall back probes a host at most once per probe_interval (1 s here): the
        # daemon's snapshot says from when (its wall clock), so the next drop is not within it.
        daemon.wait_for(lambda: json.loads(health.read_text())["hosts"][0]["next_probe_at"] <= time.time(),
                        what="the probe interval after the failure to pass")
        write_variant_wav(daemon.inbox / "after.wav", 3)
        after = result_of(daemon, "after")
        assert after["executed_on"]["route"] == "remote" and after["fallback_reason"] is None
        assert "returned_to" not in after
        (up,) = events(daemon, "host.up")
        assert up["found_by"] == "probe" and up["host"] == "testhost"
        assert daemon.count("route.fallback") == 1
        assert json.loads(health.read_text())["hosts"][0]["up"]
    finally:
        stop(daemon)
        runner.stop()


def test_a_long_fallback_is_handed_to_the_host_when_it_returns_and_finishes_there(netns_sshd, tmp_path):
    """Link cut: a long file falls back to the CPU. Link back once a checkpoint batch is saved: the
    watch probes the host, the local run stops at a checkpoint boundary and the job finishes on the
    host, once: its Result says why it fell back and `returned_to`, the runner transcribed it once,
    nothing was transcribed locally to the end, and its checkpoint is gone."""
    namespace, server = netns_sshd
    runner = RunnerProcess(tmp_path, server.spool).start()
    daemon = daemon_for(tmp_path, server.host_settings(), hand_back_margin=0)  # any healthy host: no speed race
    try:
        fall_back_and_return(daemon, namespace, until="job.done")
        result = result_of(daemon, "long")
    finally:
        stop(daemon)
        runner.stop()
    assert result["executed_on"]["route"] == "remote" and result["executed_on"]["host"] == "testhost"
    assert "testhost" in result["fallback_reason"]
    (entry,) = result["handbacks"]
    assert entry["host"] == "testhost" and entry["outcome"] == "served"
    assert 0 < entry["done_s"] < LONG_S and entry["local_s"] > 0
    assert result["returned_to"].startswith("testhost after ") and "% done" in result["returned_to"]
    (handed,) = events(daemon, "route.handback")
    assert handed["job_id"] == result["job_id"] and handed["done_s"] == entry["done_s"]
    transcribed = events(daemon, "stage.transcribe", job_id=result["job_id"])
    assert [event["route"] for event in transcribed] == ["remote"]
    assert [job["job_id"] for job in runner.events("runner.job_done")].count(result["job_id"]) == 1
    assert sorted(path.name for path in daemon.outbox.glob("long*.json")) == ["long.json"]
    assert not list((daemon.root / "state" / "partial").glob("*.jsonl"))
    assert ledger_job(daemon, result["job_id"])["stage"] == "done"


def remote_files(spool: Path, job_id: str) -> list[str]:
    """The job's files left in the spool."""
    return sorted(str(path.relative_to(spool)) for path in spool.rglob(f"{job_id}*"))


def on_host(spool: Path, job_id: str) -> bool:
    """The job's document is in the spool: submitted (jobs/) or claimed by a runner (work/)."""
    return any((spool / folder / f"{job_id}.json").exists() for folder in ("jobs", "work"))


def test_a_host_that_fails_after_the_hand_back_leaves_the_job_to_resume_on_the_cpu(netns_sshd, tmp_path):
    """Handed back, then the runner dies (kill -9) with the job on the host: the daemon sees no live
    runner, falls back again and the local engine resumes from the checkpoint it kept (not from
    zero). The Result is local, says the hand-back failed, and is written once."""
    namespace, server = netns_sshd
    runner = RunnerProcess(tmp_path, server.spool).start()
    daemon = daemon_for(tmp_path, server.host_settings(), hand_back_margin=0, heartbeat_max_age=4.0)
    try:
        job_id = fall_back_and_return(daemon, namespace)
        daemon.wait_for(lambda: on_host(server.spool, job_id), timeout=120, what="the job on the host")
        runner.process.kill()  # the GPU host's runner dies with the job
        runner.process.wait(10)
        result = result_of(daemon, "long", timeout=WAIT)
        daemon.wait_for(lambda: events(daemon, "job.done", path="long.wav"), what="job.done")
    finally:
        stop(daemon)
        runner.stop()
    assert result["executed_on"]["route"] == "local" and "testhost" in result["fallback_reason"]
    (entry,) = result["handbacks"]
    assert entry["host"] == "testhost" and entry["outcome"].startswith("failed: ")
    assert "it failed there, resumed locally from" in result["returned_to"]
    (resumed,) = events(daemon, "transcribe.resumed", job_id=job_id)
    assert resumed["done_s"] > 0 and resumed["chunks"] >= 1
    assert result["timings"]["resumed_s"] == resumed["done_s"]
    assert [event["route"] for event in events(daemon, "stage.transcribe", job_id=job_id)] == ["local"]
    assert sorted(path.name for path in daemon.outbox.glob("long*.json")) == ["long.json"]
    assert not list((daemon.root / "state" / "partial").glob("*.jsonl"))


def _moment(event: dict) -> float:
    return datetime.datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def test_fifty_short_jobs_during_an_outage_share_a_handful_of_probes(netns_sshd, tmp_path):
    """The host switched off before the daemon ever reached it (each connect hangs about 3 s); 50
    clips dropped at once all fall back to the CPU naming the host, and the host is looked at a
    handful of times, one look at a time, not once per job (the shipped back-off and probe interval)."""
    namespace, server = netns_sshd
    namespace.power_off()
    (tmp_path / "daemon").mkdir()
    remote = {**FAST_REMOTE, "connect_timeout": 10.0, "retry_initial_seconds": 5.0, "retry_max_seconds": 300.0,
              "probe_interval": 5.0, "hosts": [server.host_settings()]}
    daemon = Daemon(tmp_path / "daemon", transcription={"provider": "auto"}, remote=remote,
                    logging={"format": "json", "level": "debug"})  # every probe, the repeats of one too
    names = [f"clip{index:02d}.wav" for index in range(50)]
    try:
        daemon.start()
        for index, name in enumerate(names):
            write_speech_wav(daemon.root / "staging" / name, index + 1, 2.0)
        for name in names:
            os.replace(daemon.root / "staging" / name, daemon.inbox / name)
        daemon.wait_for(lambda: len(events(daemon, "job.done")) == len(names), timeout=WAIT, what="50 results")
    finally:
        stop(daemon)
    results = [json.loads((daemon.outbox / f"{Path(name).stem}.json").read_text()) for name in names]
    assert all(result["executed_on"]["route"] == "local" and "testhost" in result["fallback_reason"]
               for result in results)
    probes, failures = events(daemon, "host.probe"), events(daemon, "host.down")
    print(f"\n50 short jobs during an outage: {len(probes)} probes, {len(failures)} failures counted")
    assert len(probes) <= 4 and len(failures) <= 5, [(event["event"], event["ts"]) for event in daemon.events()
                                                     if event["event"] in ("host.probe", "host.down")]
    spans = sorted((_moment(event) - event["seconds"], _moment(event)) for event in probes)
    assert all(later[0] >= earlier[1] - 0.01 for earlier, later in zip(spans, spans[1:]))  # one in flight


def test_a_daemon_killed_in_the_middle_of_a_hand_back_loses_nothing_and_repeats_nothing(netns_sshd, tmp_path):
    """kill -9 of the daemon as it logs the hand-back (committed: the job at `extracted` with its
    hand-back entry); restarted, it sends the job to the host, which transcribes it once: one
    Result, saying where it had been, no local transcription to the end, no leftovers."""
    namespace, server = netns_sshd
    runner = RunnerProcess(tmp_path, server.spool).start()
    daemon = daemon_for(tmp_path, server.host_settings(), hand_back_margin=0)
    try:
        job_id = fall_back_and_return(daemon, namespace)
        daemon.kill()
        kept = ledger_job(daemon, job_id)
        assert kept["stage"] in ("extracted", "uploaded", "submitted") and json.loads(kept["handbacks"])
        assert (daemon.root / "state" / "partial" / f"{job_id}.jsonl").exists()  # the CPU's work is kept
        daemon.start()
        result = result_of(daemon, "long", timeout=WAIT)
        daemon.wait_for(lambda: events(daemon, "job.done", path="long.wav"), what="job.done")
        deadline = time.monotonic() + 60  # removed a little after the outbox shows the job
        while remote_files(server.spool, job_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert remote_files(server.spool, job_id) == []
    finally:
        stop(daemon)
        runner.stop()
    assert result["executed_on"]["route"] == "remote" and result["handbacks"][0]["outcome"] == "served"
    assert result["returned_to"].startswith("testhost after ")
    done = collections.Counter(job["job_id"] for job in runner.events("runner.job_done"))
    assert done[job_id] == 1
    assert [event["route"] for event in events(daemon, "stage.transcribe", job_id=job_id)] == ["remote"]
    assert len(events(daemon, "job.done", job_id=job_id)) == 1
    assert sorted(path.name for path in daemon.outbox.glob("long*.json")) == ["long.json"]
    assert not list((daemon.root / "state" / "partial").glob("*.jsonl"))
