"""The remote GPU route end to end: a real daemon, a real runner (CPU, tiny.en) and a real sshd.

The "GPU host" is an OpenSSH sshd on loopback or inside a network namespace, serving a spool that a
`whisperdrop runner` process works on. Faults at exact points come from the in-process asyncssh
fault server (tests/faultserver.py), run here in its own process inside a namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from daemon_helpers import Daemon, jfk_reference, word_error_rate, write_variant_wav
from media import JFK, concat_speech
from netns import NetNamespace
from sshd import keygen, require_root_and_sshd, skip_or_fail
from transcripts import assert_segments_in_order

TESTS = Path(__file__).resolve().parent

FAST_REMOTE = {
    "connect_timeout": 3.0,
    "keepalive_interval": 1.0,
    "poll_interval": 0.2,
    "retry_initial_seconds": 1.0,
    "retry_max_seconds": 2.0,
    "heartbeat_max_age": 15.0,
    "job_timeout": 120.0,
}


class RunnerProcess:
    """`whisperdrop runner` on a spool folder, CPU and the bundled model, as a subprocess."""

    def __init__(self, root: Path, spool: Path, name: str = "gpu-test"):
        self.root = root
        self.spool = spool
        self.config = root / f"runner-{name}.yaml"
        self.config.write_text(yaml.safe_dump({
            "runner": {"spool": str(spool), "model": "bundled:tiny.en", "device": "cpu", "name": name,
                       "heartbeat_seconds": 1.0},
            "logging": {"format": "json"},
        }))
        self.log = root / f"runner-{name}.log"
        self.process: subprocess.Popen | None = None
        self.name = name

    def start(self) -> "RunnerProcess":
        with open(self.log, "ab") as stream:
            self.process = subprocess.Popen([sys.executable, "-m", "whisperdrop", "runner", "-c", str(self.config)],
                                            stdout=stream, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        heartbeat = self.spool / "runners" / f"{self.name}.json"
        while not heartbeat.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"runner did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def events(self, name: str) -> list[dict]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                found.append(event)
        return found


def result_of(daemon: Daemon, stem: str, timeout: float = 120) -> dict:
    path = daemon.outbox / f"{stem}.json"
    daemon.wait_for(path.exists, timeout=timeout, what=str(path))
    result = json.loads(path.read_text())
    assert_segments_in_order(result.get("segments") or [], str(path))  # every route keeps the invariant (issue 30)
    return result


@pytest.fixture
def gpu_host(sshd, tmp_path):
    """(sshd, runner): a real sshd on loopback and a runner working the spool it serves."""
    runner = RunnerProcess(tmp_path, sshd.spool).start()
    yield sshd, runner
    runner.stop()


def remote_daemon(root: Path, host: dict, **transcription) -> Daemon:
    return Daemon(root / "daemon", remote={**FAST_REMOTE, "hosts": [host]},
                  transcription={"provider": "auto", **transcription})


def test_jfk_goes_remote_and_back(gpu_host, tmp_path):
    """jfk.flac dropped in is transcribed by the runner over SSH; the Result says remote and the text is right."""
    server, runner = gpu_host
    (tmp_path / "daemon").mkdir()
    daemon = remote_daemon(tmp_path, server.host_settings()).start()
    try:
        shutil.copy(JFK, daemon.inbox / "jfk.flac")
        result = result_of(daemon, "jfk")
        assert result["executed_on"]["route"] == "remote" and result["executed_on"]["host"] == "testhost"
        assert result["fallback_reason"] is None
        assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
        assert result["transfer"]["bytes"] == result["transfer"]["audio_bytes"] > 0
        assert result["transfer"]["resumed_from"] == 0  # every remote Result carries the three transfer figures
        for key in ("extract_s", "upload_s", "queue_s", "transcribe_s", "fetch_s", "total_s", "settle_s"):
            assert key in result["timings"], key
        daemon.wait_for(lambda: (daemon.archive / "jfk.flac").exists(), what="archived")
        # the job's remote files are removed once its Result is safe here
        daemon.wait_for(lambda: not any((server.spool / "incoming").iterdir())
                        and not any((server.spool / "results").iterdir()), what="remote cleanup")
        assert len(runner.events("runner.job_done")) == 1
    finally:
        assert daemon.stop() == 0


def test_sshd_down_falls_back_locally_then_returns(gpu_host, tmp_path):
    """With sshd stopped the next file is transcribed locally with a reason; with sshd back the next goes remote."""
    server, runner = gpu_host
    (tmp_path / "daemon").mkdir()
    daemon = remote_daemon(tmp_path, server.host_settings()).start()
    try:
        write_variant_wav(daemon.inbox / "one.wav", 1)
        assert result_of(daemon, "one")["executed_on"]["route"] == "remote"
        server.stop()
        write_variant_wav(daemon.inbox / "two.wav", 2)
        second = result_of(daemon, "two")
        assert second["executed_on"]["route"] == "local"
        assert "testhost" in second["fallback_reason"]
        assert "refused" in second["fallback_reason"].lower() or "connect" in second["fallback_reason"].lower()
        assert daemon.count("route.fallback") == 1 and daemon.count("route.waiting_for_host") == 0  # at once, no wait
        server.start()
        # Until the back-off after that failed connect ends, a job falls back without trying the host:
        # wait for the time the daemon's hosts.json gives (down_until, on its wall clock).
        health = daemon.root / "state" / "hosts.json"
        daemon.wait_for(lambda: all(host["down_until"] <= time.time() for host in json.loads(health.read_text())["hosts"]),
                        what="the host's back-off to end")
        write_variant_wav(daemon.inbox / "three.wav", 3)
        third = result_of(daemon, "three")
        assert third["executed_on"]["route"] == "remote" and third["fallback_reason"] is None
    finally:
        assert daemon.stop() == 0


def test_changed_audio_on_the_host_is_caught_and_sent_again(sshd, tmp_path):
    """Bytes of the uploaded audio changed on the host: the runner's checksum fails it, the daemon uploads again."""
    (tmp_path / "daemon").mkdir()
    daemon = remote_daemon(tmp_path, sshd.host_settings(), provider="remote").start()
    runner = RunnerProcess(tmp_path, sshd.spool)
    heartbeat = sshd.spool / "runners" / "gpu-test.json"
    heartbeat.parent.mkdir(parents=True, exist_ok=True)
    # A heartbeat so the host counts as healthy before the runner starts (its own replaces this one).
    heartbeat.write_text(json.dumps({"name": "gpu-test", "updated_at": time.time() + 30, "queue_length": 0}))
    try:
        shutil.copy(JFK, daemon.inbox / "jfk.flac")
        jobs = sshd.spool / "jobs"
        daemon.wait_for(lambda: jobs.exists() and any(jobs.glob("*.json")), timeout=60, what="job submitted")
        job_id = next(jobs.glob("*.json")).stem
        audio = sshd.spool / "incoming" / f"{job_id}.opus"
        data = bytearray(audio.read_bytes())
        data[len(data) // 2] ^= 0xFF
        audio.write_bytes(bytes(data))
        runner.start()
        result = result_of(daemon, "jfk")
        assert result["executed_on"]["route"] == "remote"
        assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
        assert result["transfer"]["bytes"] == 2 * result["transfer"]["audio_bytes"]
        assert result["transfer"]["checksum_retries"] == 1
        assert daemon.count("stage.checksum_mismatch") == 1
        assert [event["kind"] for event in runner.events("runner.job_failed")] == ["checksum"]
    finally:
        runner.stop()
        assert daemon.stop() == 0


def test_host_key_mismatch_is_refused_and_falls_back(gpu_host, tmp_path):
    """A host key that does not match known_hosts stops remote use with an error naming the host; auto falls back."""
    server, runner = gpu_host
    impostor = keygen(tmp_path / "impostor", "impostor")
    known_hosts = tmp_path / "known_hosts"
    port_part = f"[{server.host}]:{server.port}"
    known_hosts.write_text(f"{port_part} {impostor.with_suffix('.pub').read_text().split(' ', 2)[0]} "
                           f"{impostor.with_suffix('.pub').read_text().split()[1]}\n")
    before = known_hosts.read_text()
    (tmp_path / "daemon").mkdir()
    daemon = remote_daemon(tmp_path, server.host_settings(known_hosts=str(known_hosts))).start()
    try:
        shutil.copy(JFK, daemon.inbox / "jfk.flac")
        result = result_of(daemon, "jfk")
        assert result["executed_on"]["route"] == "local"
        assert "testhost" in result["fallback_reason"] and "host key" in result["fallback_reason"].lower()
        down = [event for event in daemon.events() if event.get("event") == "host.down"]
        assert down and "ssh-keygen -R" in (down[0].get("hint") or "") + down[0]["error"]
        assert known_hosts.read_text() == before  # never accepted silently
        assert runner.events("runner.job_done") == []
    finally:
        assert daemon.stop() == 0


@pytest.mark.needs_root
def test_remote_in_a_network_namespace(netns_sshd, tmp_path):
    """With sshd and its spool behind a veth link in a network namespace, jfk.flac comes back remote."""
    namespace, server = netns_sshd
    runner = RunnerProcess(tmp_path, server.spool).start()
    (tmp_path / "daemon").mkdir()
    daemon = remote_daemon(tmp_path, server.host_settings()).start()
    try:
        shutil.copy(JFK, daemon.inbox / "jfk.flac")
        result = result_of(daemon, "jfk")
        assert result["executed_on"]["route"] == "remote"
        assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
    finally:
        runner.stop()
        assert daemon.stop() == 0


@pytest.mark.needs_root
@pytest.mark.slow
def test_upload_resumes_after_the_server_drops_mid_upload_over_a_slow_link(tmp_path):
    """The server drops the connection halfway through a two-minute clip's upload over a 2 Mbit/s link:
    the upload resumes above zero, re-sends little, and the transcript is right."""
    require_root_and_sshd()
    namespace = NetNamespace()
    server = runner = daemon = None
    try:
        try:
            namespace.create()
            namespace.shape(rate="2mbit")
        except (subprocess.CalledProcessError, OSError) as error:
            skip_or_fail(f"cannot build a shaped network namespace: {error}")
        root = tmp_path / "host"
        spool = root / "spool"
        spool.mkdir(parents=True)
        client_key = keygen(tmp_path / "client", "client")
        known_hosts = tmp_path / "known_hosts"
        clip = concat_speech(tmp_path / "two-minutes.wav", 120.0)
        # The daemon's Opus of this clip is ~360 KB at 24 kbit/s; drop at about half of it.
        server = subprocess.Popen(
            ["ip", "netns", "exec", namespace.name, sys.executable, str(TESTS / "faultserver.py"),
             "--root", str(root), "--client-key", str(client_key.with_suffix(".pub")),
             "--known-hosts", str(known_hosts), "--listen", namespace.inner_address, "--drop-after", "180000"],
            stdout=subprocess.PIPE, text=True)
        port = int(server.stdout.readline())
        runner = RunnerProcess(tmp_path, spool).start()
        (tmp_path / "daemon").mkdir()
        host = {"name": "slowhost", "host": namespace.inner_address, "port": port, "user": "root",
                "key": str(client_key), "known_hosts": str(known_hosts), "spool": "/spool"}
        daemon = remote_daemon(tmp_path, host, provider="remote").start()
        shutil.copy(clip, daemon.inbox / "long.wav")
        result = result_of(daemon, "long", timeout=240)
        transfer = result["transfer"]
        assert result["executed_on"]["route"] == "remote"
        assert transfer["resumed_from"] > 0
        assert transfer["bytes"] <= transfer["audio_bytes"] + 2 * 1024 * 1024
        assert transfer["bytes"] < 2 * transfer["audio_bytes"]
        assert "ask not what your country can do for you" in " ".join(result["text"].lower().replace(",", "").split())
        assert len(runner.events("runner.job_done")) == 1
    finally:
        if daemon is not None:
            daemon.stop()
        if runner is not None:
            runner.stop()
        if server is not None:
            server.kill()
            server.wait(5)
        namespace.cleanup()


def test_second_host_serves_when_the_first_is_down(sshd, tmp_path):
    """With the first host's sshd stopped, the job goes to the other healthy host, not to the local CPU."""
    from sshd import SSHServer

    second = SSHServer()
    runner = None
    daemon = None
    try:
        second.start()
        runner = RunnerProcess(tmp_path, second.spool, name="gpu-two").start()
        sshd.stop()
        (tmp_path / "daemon").mkdir()
        daemon = Daemon(tmp_path / "daemon", transcription={"provider": "auto"}, remote={
            **FAST_REMOTE, "hosts": [sshd.host_settings(name="first"), second.host_settings(name="second")]}).start()
        shutil.copy(JFK, daemon.inbox / "jfk.flac")
        result = result_of(daemon, "jfk")
        executed = result["executed_on"]
        assert (executed["route"], executed["host"], executed["runner"], executed["device"]) == (
            "remote", "second", "gpu-two", "cpu")
        assert result["fallback_reason"] is None
        assert any(event.get("event") == "host.down" and event.get("host") == "first" for event in daemon.events())
    finally:
        if daemon is not None:
            assert daemon.stop() == 0
        if runner is not None:
            runner.stop()
        second.cleanup()


def test_job_timeout_falls_back_and_discards_the_late_job(sshd, tmp_path):
    """A submitted job with no runner to take it falls back locally after remote.job_timeout; its remote files are removed."""
    heartbeat = sshd.spool / "runners" / "ghost.json"
    heartbeat.parent.mkdir(parents=True, exist_ok=True)
    # A runner that looks alive (fresh heartbeat) but never takes a job: it vanished after the heartbeat.
    heartbeat.write_text(json.dumps({"name": "ghost", "updated_at": time.time() + 300, "queue_length": 0}))
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", transcription={"provider": "auto"},
                    remote={**FAST_REMOTE, "job_timeout": 4.0, "hosts": [sshd.host_settings()]}).start()
    try:
        shutil.copy(JFK, daemon.inbox / "jfk.flac")
        result = result_of(daemon, "jfk")
        assert result["executed_on"]["route"] == "local"
        assert "job_timeout" in result["fallback_reason"] and "testhost" in result["fallback_reason"]
        leftovers = [path.name for folder in ("incoming", "jobs", "work", "results")
                     for path in (sshd.spool / folder).iterdir()]
        assert leftovers == []
    finally:
        assert daemon.stop() == 0
