"""The GPU host in a container: `bash scripts/build-image` builds localhost/whisperdrop-runner from
Debian packages and this checkout, podman runs it as docs/gpu-host-container.md says, and a real
daemon on this machine reaches it over SSH with the host key the container wrote (known_hosts, never
auto-accepted), as the account `whisperdrop` with the spool `/spool`.

The image is built once per module under a test tag and removed afterwards; the Debian base that
mmdebstrap makes is kept between runs (scripts/build-image reuses it while its inputs are the same;
a fresh CI machine always makes it). Build and first-start times are printed and recorded.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_helpers import REPO, Daemon, jfk_reference, json_lines, word_error_rate, write_speech_wav
from media import JFK
from sshd import free_port, keygen, known_hosts_line, skip_or_fail

pytestmark = [pytest.mark.slow, pytest.mark.needs_root]

# What docs/gpu-host-container.md tells a user to type, less the port and folder.
STOP_TIMEOUT = 120   # seconds podman lets the runner finish its batch before it kills the container
REMOTE = {
    "connect_timeout": 3.0, "keepalive_interval": 1.0, "poll_interval": 0.2, "retry_initial_seconds": 1.0,
    "retry_max_seconds": 2.0, "heartbeat_max_age": 15.0, "job_timeout": 900.0,
}


def podman_run_flags() -> list[str]:
    """The flags these machines need on `podman run` (scripts/build-image explains them): runc, and
    ulimits no higher than 20000 files and 32768 processes."""
    files = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 20000)
    processes = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    flags = ["--ulimit", f"nofile={files}:{files}", "--ulimit", f"nproc={processes}:{processes}"]
    runc = shutil.which("runc")
    return flags + (["--runtime", runc] if runc else [])


def podman(*arguments: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run `podman ARGUMENTS`; raises AssertionError with its output when it fails and `check` is set."""
    done = subprocess.run(["podman", *arguments], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(arguments)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The image built by scripts/build-image under a test tag; removed after the module."""
    if os.geteuid() != 0:
        skip_or_fail("needs root to build and run the container image (mmdebstrap, rootful podman)")
    for command in ("podman", "buildah", "mmdebstrap", "runc"):
        if shutil.which(command) is None:
            skip_or_fail(f"needs {command} (apt-get install podman buildah mmdebstrap runc)")
    tag = f"localhost/whisperdrop-runner-test:{secrets.token_hex(4)}"
    log = tmp_path_factory.mktemp("image") / "build.log"
    started = time.monotonic()
    with open(log, "wb") as output:
        built = subprocess.run(["bash", str(REPO / "scripts" / "build-image"), "--tag", tag],
                               stdout=output, stderr=subprocess.STDOUT, timeout=1800)
    seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    if built.returncode != 0:
        podman("rmi", "--force", tag, check=False)
        pytest.fail(f"scripts/build-image failed ({built.returncode}):\n{text[-4000:]}")
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout)
    figures = [line for line in text.splitlines() if line.startswith("build-image:")]
    print(f"\nimage {tag}: built in {seconds:.1f} s, {size / 1e6:.0f} MB\n" + "\n".join(figures))
    try:
        yield {"tag": tag, "build_s": round(seconds, 1), "size_mb": round(size / 1e6)}
    finally:
        podman("rmi", "--force", tag, check=False)


class GpuHostContainer:
    """One container of the image with its own /config folder (`config`), on 127.0.0.1:`port`.

    `client_key` is the daemon's key, put in config/authorized_keys before the first start; the
    spool is config/sftp/spool on this machine, /spool over SFTP.
    """

    def __init__(self, image: str, root: Path):
        self.image, self.root = image, root
        self.config = root / "config"
        self.config.mkdir(parents=True)
        self.client_key = keygen(root / "daemon_ed25519", "whisperdrop-daemon")
        shutil.copy(self.client_key.with_suffix(".pub"), self.config / "authorized_keys")
        self.spool = self.config / "sftp" / "spool"
        self.host_public_key = self.config / "ssh_host_ed25519_key.pub"
        self.known_hosts = root / "known_hosts"
        self.port = free_port()
        self.name = f"wd-test-{secrets.token_hex(4)}"
        self.created: list[str] = []

    def run(self) -> float:
        """`podman run` as the docs say (a new container, same /config); seconds until the runner's
        heartbeat says it is idle with its model loaded (the first start's time)."""
        if self.created:
            podman("rm", "--force", self.name)
        started = time.monotonic()
        podman("run", "-d", "--name", self.name, "--hostname", self.name, *podman_run_flags(),
               "--stop-timeout", str(STOP_TIMEOUT),
               "-p", f"127.0.0.1:{self.port}:22", "-v", f"{self.config}:/config", self.image)
        self.created.append(self.name)
        self.wait_idle(since=time.time() - 1)
        return time.monotonic() - started

    def start(self) -> None:
        """`podman start` the stopped container; returns once its runner is idle again."""
        since = time.time() - 1
        podman("start", self.name)
        self.wait_idle(since)

    def stop(self) -> float:
        """`podman stop` (SIGTERM, then SIGKILL after STOP_TIMEOUT); the seconds it took."""
        started = time.monotonic()
        podman("stop", self.name, timeout=STOP_TIMEOUT + 60)
        return time.monotonic() - started

    def heartbeat(self) -> dict:
        documents = []
        for path in (self.spool / "runners").glob("*.json"):
            try:
                documents.append(json.loads(path.read_text()))
            except ValueError:
                continue
        return max(documents, key=lambda document: document.get("updated_at", 0), default={})

    def wait_idle(self, since: float, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            beat = self.heartbeat()
            if beat.get("state") in ("idle", "busy") and beat.get("started_at", 0) >= since and beat.get("models_loaded"):
                return
            state = podman("inspect", "--format", "{{.State.Status}}", self.name).stdout.strip()
            if state not in ("running", "created", "configured"):
                raise AssertionError(f"container {self.name} is {state} before its runner was ready:\n{self.logs()}")
            time.sleep(0.2)
        raise AssertionError(f"runner of {self.name} not idle after {timeout} s:\n{self.logs()}")

    def trust_host_key(self) -> None:
        """known_hosts gets the key the container wrote into /config, and nothing else."""
        self.known_hosts.write_text(known_hosts_line("127.0.0.1", self.port, self.host_public_key))

    def host_settings(self) -> dict:
        """The daemon's remote.hosts item for this container, as the docs give it."""
        return {"name": "box", "host": "127.0.0.1", "port": self.port, "user": "whisperdrop",
                "key": str(self.client_key), "known_hosts": str(self.known_hosts), "spool": "/spool"}

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return (done.stdout + done.stderr)[-6000:]

    def events(self) -> list[dict]:
        """The JSON lines of the container's log (the entrypoint's and the runner's), both runs."""
        done = podman("logs", self.name, check=False)
        lines = []
        for line in (done.stdout + "\n" + done.stderr).splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                lines.append(event)
        return lines

    def remove(self) -> None:
        for name in dict.fromkeys(self.created):
            podman("rm", "--force", "--time", "5", name, check=False)


@pytest.fixture
def container(image, tmp_path):
    box = GpuHostContainer(image["tag"], tmp_path / "gpu-host")
    try:
        yield box
    finally:
        box.remove()


def doctor(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisperdrop", "doctor", "-c", str(config), "--timeout", "10"],
                          capture_output=True, text=True, timeout=120)


def test_container_serves_a_daemon_and_keeps_its_host_key(image, container, tmp_path, record_property):
    """A container started with a fresh /config makes its host key, passes doctor and transcribes
    jfk.flac for a real daemon (route remote, the right words, CPU named in the heartbeat), and a
    new container on the same /config keeps that host key."""
    first_start = container.run()
    print(f"\nfirst start (podman run to a runner idle with tiny.en loaded): {first_start:.1f} s")
    record_property("build_s", image["build_s"])
    record_property("image_mb", image["size_mb"])
    record_property("first_start_s", round(first_start, 1))
    assert container.heartbeat()["device"] == "cpu"     # no GPU given: it says so
    host_key = container.host_public_key.read_text()
    container.trust_host_key()

    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", transcription={"provider": "remote", "model": "bundled:tiny.en"},
                    remote={**REMOTE, "hosts": [container.host_settings()]})
    checked = doctor(daemon.config_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "device cpu" in checked.stdout and "host box: auth: logged in as whisperdrop" in checked.stdout

    daemon.start()
    try:
        shutil.copy(JFK, daemon.inbox / "jfk.flac")
        result_path = daemon.outbox / "jfk.json"
        daemon.wait_for(result_path.exists, timeout=180, what="outbox/jfk.json")
        daemon.wait_for(lambda: daemon.count("job.done") == 1, timeout=60, what="job.done")
    finally:
        daemon.stop()
    result = json.loads(result_path.read_text())
    assert result["executed_on"]["route"] == "remote" and result["executed_on"]["device"] == "cpu", result["executed_on"]
    assert word_error_rate(jfk_reference(), result["text"]) <= 0.10, result["text"]
    assert (daemon.archive / "jfk.flac").exists()

    container.run()                                      # podman rm, then podman run on the same /config
    assert container.host_public_key.read_text() == host_key
    again = doctor(daemon.config_path)                   # the daemon's known_hosts still holds
    assert again.returncode == 0, again.stdout + again.stderr


def test_podman_stop_mid_job_parks_it_and_the_restarted_container_finishes_it_once(container, tmp_path,
                                                                                   record_property):
    """`podman stop` while the runner holds a job (its claim in work/, seen on disk) stops the
    container cleanly with the job back in jobs/; `podman start` finishes it: one Result, remote,
    transcribed to the end once, nothing lost."""
    container.run()
    container.trust_host_key()
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", transcription={"provider": "remote", "model": "bundled:tiny.en"},
                    remote={**REMOTE, "hosts": [container.host_settings()]}).start()
    try:
        # 9 minutes of speech: 18 chunks of 30 s, more than one batch of 16, so a stop lands between two.
        source = write_speech_wav(tmp_path / "long.wav", 1, 540.0)
        source.rename(daemon.inbox / "long.wav")
        work = container.spool / "work"
        daemon.wait_for(lambda: any(work.glob("*.json")), timeout=300, what="the runner's claim in work/")
        job_id = next(work.glob("*.json")).stem
        stopped_in = container.stop()
        print(f"\npodman stop with a job in hand: {stopped_in:.1f} s")
        record_property("stop_mid_job_s", round(stopped_in, 1))

        state = podman("inspect", "--format", "{{.State.ExitCode}}", container.name).stdout.strip()
        assert state == "0", f"container exit code {state} (137: killed, the runner did not stop in time):\n{container.logs()}"
        events = container.events()
        runner_events = [event for event in events if event.get("job_id") == job_id]
        assert [event["event"] for event in runner_events if event["event"].startswith("runner.job_")] == \
            ["runner.job_parked"], container.logs()
        assert (container.spool / "jobs" / f"{job_id}.json").exists()       # parked: queued again
        assert not any(work.glob("*.json"))
        assert not (container.spool / "results" / f"{job_id}.json").exists()

        container.start()
        result_path = daemon.outbox / "long.json"
        daemon.wait_for(result_path.exists, timeout=600, what="outbox/long.json")
        daemon.wait_for(lambda: daemon.count("job.done") == 1, timeout=60, what="job.done")
    finally:
        daemon.stop()
    result = json.loads(result_path.read_text())
    assert result["job_id"] == job_id and result["executed_on"]["route"] == "remote"
    assert result["duration"] == pytest.approx(540.0 + 0.01, abs=1.0)
    # The words of 49 jfk clips in a row, cut where the clips meet: most of them come back.
    reference = " ".join([jfk_reference()] * 49)
    assert word_error_rate(reference, result["text"]) <= 0.25
    finished = [event["event"] for event in container.events()
                if event.get("job_id") == job_id and event["event"].startswith("runner.job_")]
    assert finished == ["runner.job_parked", "runner.job_done"], finished
    assert [path.name for path in daemon.outbox.glob("long*.json")] == ["long.json"]
    assert daemon.count("job.done") == 1 and (daemon.archive / "long.wav").exists()
    assert not list(daemon.inbox.iterdir()) and not list(daemon.failed.iterdir())


def test_container_without_authorized_keys_exits_naming_the_file_and_the_fix(image, tmp_path):
    """A container whose /config lacks authorized_keys exits 2 with an error that names the file and
    the fix, and has already made the host key the next start keeps."""
    config = tmp_path / "config"
    config.mkdir()
    name = f"wd-test-{secrets.token_hex(4)}"
    try:
        done = podman("run", "--name", name, *podman_run_flags(), "-v", f"{config}:/config", image["tag"],
                      check=False, timeout=120)
    finally:
        podman("rm", "--force", name, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [json.loads(line) for line in done.stdout.splitlines() if '"container.cannot_start"' in line]
    assert errors and "/config/authorized_keys is missing" in errors[0]["error"], done.stdout
    assert "daemon's public key" in errors[0]["error"]
    assert (config / "ssh_host_ed25519_key.pub").exists()
