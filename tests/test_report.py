"""`whisperdrop status`, `stats`, `doctor` and the Prometheus textfile, against a real daemon, a
real ledger and a real OpenSSH sshd; and the GPU host guide's sshd Match block under a real sshd."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncssh
import pytest
import yaml

from daemon_helpers import REPO, Daemon
from media import JFK
from sshd import SSHServer
from whisperdrop.daemon import metrics, status
from whisperdrop.daemon.ledger import Ledger
from whisperdrop.shared import config as config_module

GUIDE = REPO / "docs" / "gpu-host.md"

# One sample line of the text exposition format: name{labels} value (labels optional).
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*"'
                     r'(,[a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*")*)?\})? (-?[0-9.e+-]+|NaN|[+-]Inf)$')


def parse_exposition(text: str) -> dict[str, float]:
    """Check every line of a Prometheus text file; return {'name{labels}': value}. Fails on a bad line."""
    assert text.endswith("\n")
    samples, typed = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert len(line.split(" ", 3)) == 4, line
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "summary", "histogram", "untyped"), line
            typed[name] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a well-formed sample line: {line!r}"
            name = match.group(1)
            assert any(name == family or name.startswith(family + "_") for family in typed), f"no TYPE for {line!r}"
            samples[line.rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return samples


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisperdrop", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


# ------------------------------------------------------------------------------ status and stats


def test_status_and_stats_beside_a_live_daemon_after_a_local_job(tmp_path):
    """With jfk.flac dropped into a running daemon (local route), status shows the live state, stats --json the finished job, and the metrics file parses."""
    metrics = tmp_path / "metrics" / "whisperdrop.prom"
    metrics.parent.mkdir()
    daemon = Daemon(tmp_path, transcription={"provider": "local"},
                    logging={"format": "json", "metrics_textfile": str(metrics)})
    config = str(daemon.config_path)
    try:
        daemon.start()
        idle = cli("status", "--json", "-c", config)
        assert idle.returncode == 0, idle.stderr
        assert json.loads(idle.stdout)["queue_length"] == 0
        shutil.copyfile(JFK, daemon.inbox / "jfk.flac.part")
        os.rename(daemon.inbox / "jfk.flac.part", daemon.inbox / "jfk.flac")
        seen_active = []
        deadline = time.monotonic() + 120
        while not (daemon.outbox / "jfk.json").exists():
            assert time.monotonic() < deadline, daemon.tail()
            live = cli("status", "--json", "-c", config)
            assert live.returncode == 0, live.stderr
            seen_active += json.loads(live.stdout)["active"]
        finished = json.loads(cli("status", "--json", "-c", config).stdout)
        assert finished["stages"]["done"] == 1 and finished["queue_length"] == 0 and not finished["recent_errors"]
        for job in seen_active:  # whatever the polls caught in flight is a real stage of this job
            assert job["source"] == "jfk.flac" and job["stage"] in ("new", "extracted", "transcribed")
        text = cli("status", "-c", config)
        assert text.returncode == 0 and "done 1" in text.stdout

        stats = cli("stats", "--since", "1h", "--json", "-c", config)
        assert stats.returncode == 0, stats.stderr
        figures = json.loads(stats.stdout)
        assert figures["done"] == 1 and figures["failed"] == 0 and figures["error_rate"] == 0
        local = figures["routes"]["local"]
        assert local["jobs"] == 1 and 10 < local["audio_s"] < 12 and local["transcribe_s"] > 0
        # the real-time factor is transcription time over audio time (its size depends on the machine)
        assert local["real_time_factor"] == pytest.approx(local["transcribe_s"] / local["audio_s"], abs=1e-3)
        assert figures["stage_times"]["extract"]["count"] == 1 and figures["stage_times"]["transcribe"]["p95_s"] > 0
        assert figures["cost"]["local_real_time_factor"] == pytest.approx(local["real_time_factor"], rel=1e-3)
        assert figures["cost"]["gpu_seconds"] == 0 and figures["fallbacks_total"] == 0
        assert "1 done, 0 failed" in cli("stats", "-c", config).stdout

        daemon.wait_for(lambda: metrics.exists() and 'whisperdrop_jobs{stage="done"} 1.0' in metrics.read_text(),
                        timeout=60, what="the metrics file with the done job")
        samples = parse_exposition(metrics.read_text())
        assert samples['whisperdrop_jobs_done_total{route="local"}'] == 1
        assert samples['whisperdrop_audio_seconds_total{route="local"}'] > 10
        assert samples['whisperdrop_stage_seconds_count{stage="transcribe"}'] == 1
        assert not list(metrics.parent.glob("*.tmp"))
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def _ledger_with_jobs(config) -> None:
    """A ledger with two remote jobs, a fallback, a failure and an unfinished upload, written directly."""
    ledger = Ledger(config.path("state_dir") / "ledger.sqlite3")
    now = time.time()
    rows = [
        ("a" * 64, "done", "remote", "gpu1", None, 60.0, {"extract_s": 1.0, "upload_s": 2.0, "transcribe_s": 3.0},
         {"bytes": 100_000, "audio_bytes": 100_000}),
        ("b" * 64, "done", "remote", "gpu1", None, 120.0, {"extract_s": 3.0, "upload_s": 4.0, "transcribe_s": 6.0},
         {"bytes": 200_000, "audio_bytes": 200_000}),
        ("c" * 64, "done", "local", None, 'gpu1: no fresh runner heartbeat (newest is 90 s old); start it', 30.0,
         {"extract_s": 0.5, "transcribe_s": 15.0}, {}),
        ("d" * 64, "failed", None, None, None, None, {}, {}),
    ]
    for job_id, stage, route, host, reason, duration, timings, transfer in rows:
        ledger.create_job(job_id, job_id, 1_000_000, {}, now=now - 100)
        ledger.update_job(job_id, stage=stage, route=route, host=host, fallback_reason=reason, duration=duration,
                          timings=timings, transfer=transfer, now=now - 10,
                          last_error="media: not a media file" if stage == "failed" else None)
    ledger.create_job("e" * 64, "e" * 64, 5000, {}, now=now)
    ledger.update_job("e" * 64, stage="uploaded", host="gpu1", progress={"transcribe": 0.25, "done_s": 3, "duration_s": 12})
    ledger.add_source("talk.mp3", "e" * 64, 5000, 1, 0.0)
    ledger.close()


def _config(tmp_path: Path, **overrides):
    data = {"remote": {"hosts": [{"name": "gpu1", "host": "127.0.0.1"}]}, **overrides}
    return config_module.validate(data, tmp_path)


def test_stats_computes_percentiles_bytes_fallbacks_and_cost(tmp_path):
    """stats: p50/p95 per stage, bytes sent against source bytes, fallbacks by reason, GPU seconds against the local CPU's."""
    config = _config(tmp_path)
    _ledger_with_jobs(config)
    figures = status.collect_stats(config, since_s=3600)
    assert (figures["done"], figures["failed"], figures["error_rate"]) == (3, 1, 0.25)
    assert figures["fallbacks"]["no_runner"]["count"] == 1
    assert figures["stage_times"]["upload"] == {"count": 2, "p50_s": 3.0, "p95_s": 3.9, "total_s": 6.0}
    assert figures["bytes"] == {"sent": 300_000, "source": 2_000_000, "ratio": 0.15}
    assert figures["routes"]["remote"]["real_time_factor"] == 0.05
    cost = figures["cost"]
    assert cost["local_real_time_factor"] == 0.5 and cost["gpu_seconds"] == 9.0
    assert cost["cpu_seconds_equivalent"] == 90.0 and cost["speedup"] == 10.0
    assert status.collect_stats(config, since_s=1)["done"] == 0  # the window excludes older jobs


def test_stats_says_when_there_is_no_local_measurement(tmp_path):
    """Without any local job the cost analysis says "no local measurement yet" instead of inventing a figure."""
    config = _config(tmp_path)
    ledger = Ledger(config.path("state_dir") / "ledger.sqlite3")
    ledger.create_job("a" * 64, "a" * 64, 1000, {})
    ledger.update_job("a" * 64, stage="done", route="remote", duration=10.0, timings={"transcribe_s": 1.0})
    ledger.close()
    cost = status.collect_stats(config, since_s=3600)["cost"]
    assert cost["note"] == "no local measurement yet" and cost["cpu_seconds_equivalent"] is None


def _local_job_only(config) -> None:
    """A ledger holding one job done on the local CPU, as a CPU-only set-up makes them."""
    ledger = Ledger(config.path("state_dir") / "ledger.sqlite3")
    ledger.create_job("a" * 64, "a" * 64, 1000, {})
    ledger.update_job("a" * 64, stage="done", route="local", duration=11.0, timings={"transcribe_s": 2.2})
    ledger.close()


@pytest.mark.parametrize("setting", [{}, {"transcription": {"provider": "local"}}])
def test_stats_on_a_cpu_only_set_up_says_so_once_instead_of_zero_rows(tmp_path, setting):
    """`stats` with no GPU host (none configured, or provider local) says once that none is in use and
    prints no remote, bytes-sent or GPU-cost row of zeros; the local route's row stays (issue 22, item 5)."""
    from whisperdrop.cli.report import print_stats

    remote = {"remote": {"hosts": [{"name": "gpu1", "host": "127.0.0.1"}]}} if setting else {}
    config = config_module.validate({**remote, **setting}, tmp_path)
    _local_job_only(config)
    out = io.StringIO()
    print_stats(status.collect_stats(config, since_s=3600), out)
    text = out.getvalue()
    assert text.count("GPU hosts: none in use") == 1, text
    reason = "transcription.provider is local" if setting else "none is configured in remote.hosts"
    assert reason in text
    assert "local: 1 job(s), 11.0 s of audio in 2.2 s" in text
    assert "remote:" not in text and "cost:" not in text and "bytes sent" not in text, text


def test_stats_with_a_gpu_host_keeps_the_remote_rows(tmp_path):
    """With a GPU host configured, `stats` prints the remote route, bytes and cost rows even at zero."""
    from whisperdrop.cli.report import print_stats

    config = _config(tmp_path)
    _local_job_only(config)
    out = io.StringIO()
    print_stats(status.collect_stats(config, since_s=3600), out)
    assert "remote: 0 job(s)" in out.getvalue() and "cost: 0.0 GPU seconds" in out.getvalue()
    assert "GPU hosts: none" not in out.getvalue()


def test_status_reads_hosts_snapshot_and_progress(tmp_path):
    """status shows an uploaded job's progress, each host's health and runner queue from hosts.json, and the last errors."""
    config = _config(tmp_path)
    _ledger_with_jobs(config)
    now = time.time()
    (config.path("state_dir") / "hosts.json").write_text(json.dumps({"updated_at": now, "hosts": [
        {"name": "gpu1", "up": False, "failures": 2, "last_error": "host gpu1: connect failed", "in_flight": 1,
         "runners": [{"name": "gpu1-gpu0", "device": "cuda", "gpu": "RTX 4090", "queue_length": 3,
                      "updated_at": now - 5, "model": "large-v3"}]}]}))
    data = status.collect_status(config)
    assert data["queue_length"] == 1 and data["pending_sources"] == 1
    job = data["active"][0]
    assert job["source"] == "talk.mp3" and job["progress"]["upload"] == 1.0 and job["progress"]["transcribe"] == 0.25
    host = data["hosts"][0]
    assert host["up"] is False and host["queue_length"] == 3 and host["runners"][0]["gpu"] == "RTX 4090"
    assert data["recent_errors"][0]["error"] == "media: not a media file"


def test_metrics_render_escapes_labels_and_parses(tmp_path):
    """render_metrics writes well-formed HELP/TYPE/sample lines, with host names escaped, and write_textfile replaces atomically."""
    config = _config(tmp_path)
    _ledger_with_jobs(config)
    ledger = Ledger(config.path("state_dir") / "ledger.sqlite3", readonly=True)
    hosts = {"hosts": [{"name": 'odd "name"\\', "up": True, "failures": 0,
                        "runners": [{"name": "r0", "queue_length": 2, "updated_at": time.time()}]}]}
    text = metrics.render_metrics(ledger, hosts)
    ledger.close()
    samples = parse_exposition(text)
    assert samples['whisperdrop_jobs{stage="done"}'] == 3
    assert samples['whisperdrop_fallbacks_total{reason="no_runner"}'] == 1
    assert samples["whisperdrop_bytes_sent_total"] == 300_000
    assert samples['whisperdrop_host_up{host="odd \\"name\\"\\\\"}'] == 1
    target = tmp_path / "out.prom"
    metrics.write_textfile(target, text)
    assert target.read_text() == text and list(tmp_path.glob("*.tmp")) == []


def test_metrics_writer_renders_off_the_event_loop(tmp_path):
    """MetricsWriter.step only schedules: the ledger is read and the file written in the writer's own
    thread; a rewrite waits for a ledger change or the period; close() writes the last state and ends the thread."""
    config = _config(tmp_path)
    _ledger_with_jobs(config)
    ledger = Ledger(config.path("state_dir") / "ledger.sqlite3")  # the daemon's live connection
    target = tmp_path / "whisperdrop.prom"
    clock = [100.0]
    writer_threads = []

    class Recording(metrics.MetricsWriter):
        def write(self) -> bool:
            writer_threads.append(threading.current_thread())
            return super().write()

    writer = Recording(str(target), ledger.path, tmp_path / "hosts.json", lambda: ledger.db.total_changes,
                       clock=lambda: clock[0])

    async def drive() -> list[bool]:
        loop_thread = threading.current_thread()
        started = [writer.step()]
        await asyncio.wait_for(asyncio.wrap_future(writer.in_flight), 60)
        clock[0] += metrics.METRICS_MIN_S
        started.append(writer.step())  # nothing changed and the period is not over
        ledger.update_job("a" * 64, stage="failed")
        started.append(writer.step())  # the ledger changed
        assert await writer.close() is True
        assert all(thread is not loop_thread for thread in writer_threads)
        return started

    try:
        assert asyncio.run(drive()) == [True, False, True]
    finally:
        ledger.close()
    assert len(writer_threads) == 3 and not any(thread.is_alive() for thread in writer_threads)
    samples = parse_exposition(target.read_text())
    assert samples['whisperdrop_jobs{stage="failed"}'] == 2 and samples['whisperdrop_jobs{stage="done"}'] == 2


def test_daemon_package_imports_nothing_above_it():
    """No module in whisperdrop/daemon/ imports the CLI, the runner or any other layer above it."""
    import ast

    package = REPO / "whisperdrop" / "daemon"
    upward = ("whisperdrop.cli", "whisperdrop.gpu_runner")
    found = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found += [f"{path.name}: {name}" for name in names
                      if any(name == layer or name.startswith(layer + ".") for layer in upward)]
    assert found == []


# ------------------------------------------------------------------------------ doctor


def _doctor_config(tmp_path: Path, host: dict, provider: str = "remote") -> Path:
    path = tmp_path / "config.yaml"
    (tmp_path / "inbox").mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({"transcription": {"provider": provider}, "local": {"model": "bundled:tiny.en"},
                                    "remote": {"hosts": [host]}}))
    return path


def _heartbeat(spool: Path, **fields) -> None:
    (spool / "runners").mkdir(parents=True, exist_ok=True)
    document = {"name": "gpu-test-0", "host": "gpu-test", "pid": 1, "device": "cuda", "gpu": "Test GPU 80GB",
                "model": "large-v3", "queue_length": 0, "current": None, "updated_at": time.time(),
                "heartbeat_seconds": 5, **fields}
    (spool / "runners" / "gpu-test-0.json").write_text(json.dumps(document))


def test_doctor_passes_on_a_healthy_setup(sshd, tmp_path):
    """doctor exits 0 with a real sshd, a fresh runner heartbeat (device and GPU shown) and the bundled local model."""
    _heartbeat(sshd.spool)
    config = _doctor_config(tmp_path, sshd.host_settings(), provider="auto")
    result = cli("doctor", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("resolve", "tcp", "host key", "auth", "spool", "runner gpu-test-0"):
        assert f"ok    host testhost: {step}:" in result.stdout, result.stdout
    assert "device cuda, GPU Test GPU 80GB" in result.stdout
    assert "ok    local model: load: bundled:tiny.en loaded" in result.stdout
    assert "everything looks right" in result.stdout
    assert not list((sshd.spool / "incoming").iterdir())  # the write probe is gone


@pytest.mark.parametrize("case", ["missing key file", "public key as key", "key not authorized", "unknown host key",
                                  "no runner heartbeat"])
def test_doctor_names_the_broken_step_and_its_fix(case, sshd, tmp_path):
    """doctor exits 1, names the host and the failing step, and prints the fix for each broken set-up."""
    settings = sshd.host_settings()
    if case == "missing key file":
        settings["key"] = str(tmp_path / "no-such-key")
        step, fix = "auth", "fix: set remote.hosts[].key to an existing private key file"
    elif case == "public key as key":  # the host answers: the error must not be asyncssh's "Invalid private key"
        settings["key"] = str(sshd.client_key.with_suffix(".pub"))
        step, fix = "auth", f"fix: set remote.hosts[].key to the private key: the private key is probably {sshd.client_key}"
    elif case == "key not authorized":
        settings["key"] = str(sshd.host_key)  # a valid private key that is not in authorized_keys
        step, fix = "auth", f"fix: add the public key of {sshd.host_key} to the authorized_keys of root"
    elif case == "unknown host key":
        other = tmp_path / "known_hosts"
        other.write_text("")
        settings["known_hosts"] = str(other)
        step, fix = "host key", f"fix: [127.0.0.1]:{sshd.port} is not in {other}"
        _heartbeat(sshd.spool)
    else:
        step, fix = "runner", "fix: start the runner on 127.0.0.1"
    if case in ("missing key file", "public key as key", "key not authorized"):
        _heartbeat(sshd.spool)
    result = cli("doctor", "-c", str(_doctor_config(tmp_path, settings)), "--timeout", "5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"FAIL  host testhost: {step}:" in result.stdout, result.stdout
    assert fix in result.stdout, result.stdout
    if case == "unknown host key":
        assert "ssh-keyscan -p" in result.stdout
    if case in ("missing key file", "public key as key"):  # no connection was made: nothing may claim the host key is fine
        assert "host testhost: host key" not in result.stdout and "Invalid private key" not in result.stdout
    if case == "key not authorized":
        assert "ok    host testhost: host key:" in result.stdout


def test_doctor_reports_a_spool_the_account_cannot_write(chroot_sshd, tmp_path):
    """doctor exits 1 and says to let the SSH user write the spool when the chrooted account may only read it."""
    spool = chroot_sshd.spool
    for name in ("incoming", "jobs", "work", "progress", "results", "failed", "runners"):
        (spool / name).mkdir(exist_ok=True)
    _heartbeat(spool)
    for path in (spool, *spool.iterdir()):
        shutil.chown(path, "root", "root")
        path.chmod(0o755)
    result = cli("doctor", "-c", str(_doctor_config(tmp_path, chroot_sshd.host_settings())), "--timeout", "5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  host testhost: spool:" in result.stdout, result.stdout
    assert "fix: let the SSH user write the spool 'spool'" in result.stdout


def test_doctor_times_out_on_a_port_that_never_answers(tmp_path):
    """A TCP port that accepts and never speaks SSH fails the tcp step within the timeout, with a fix."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        config = _doctor_config(tmp_path, {"name": "silent", "host": "127.0.0.1", "port": port})
        result = cli("doctor", "-c", str(config), "--timeout", "1")  # cli() fails the test if doctor hangs
    assert result.returncode == 1 and "FAIL  host silent: tcp:" in result.stdout, result.stdout
    # it was the 1 s --timeout that ended the wait, not some longer one
    assert "no SSH banner within 1 s" in result.stdout and "fix: check remote.hosts[].port" in result.stdout


# ------------------------------------------------------------------------------ the GPU host guide


def guide_match_block() -> str:
    """The sshd Match block exactly as the GPU host set-up (docs/gpu-host.md) prints it."""
    text = GUIDE.read_text()
    marker = text.index("<!-- sshd-match-block")
    start = text.index("```\n", marker) + 4
    return text[start:text.index("```", start)]


class GuideSSHServer(SSHServer):
    """A chroot sshd whose Match block is the guide's, with only the names (user, chroot, key folder) swapped."""

    def _config(self, authorized: Path) -> str:
        base = super()._config(authorized)
        base = base[:base.index("Match User")]
        block = (guide_match_block().replace("whisperdrop-sftp", self.user)
                 .replace("/srv/" + self.user, str(self.chroot))
                 .replace("/etc/ssh/authorized_keys", str(authorized)))
        return base + block


def test_guide_match_block_gives_an_sftp_only_account_that_can_use_the_spool(tmp_path):
    """Under the guide's exact Match block the account writes group-writable files in the spool, sees only the chroot, and cannot run a command."""
    block = guide_match_block()
    assert "ForceCommand internal-sftp -u 0002" in block and "ChrootDirectory /srv/whisperdrop-sftp" in block
    group = f"wdg{secrets.token_hex(4)}"
    server = GuideSSHServer(chroot_user=True)
    try:
        subprocess.run(["groupadd", "--system", group], check=True, capture_output=True)
        subprocess.run(["usermod", "-aG", group, server.user], check=True, capture_output=True)
        # The guide's ownership: the spool belongs to the runner (root stands in here), group-writable, setgid.
        shutil.chown(server.spool, "root", group)
        server.spool.chmod(0o2775)
        server.start()
        assert "internal-sftp -u 0002" in server.config.read_text()

        async def session() -> tuple[list[str], int, str]:
            async with asyncssh.connect(server.host, port=server.port, username=server.user,
                                        client_keys=[str(server.client_key)], known_hosts=str(server.known_hosts),
                                        connect_timeout=10) as connection:
                async with connection.start_sftp_client() as sftp:
                    root = sorted(await sftp.listdir("/"))
                    await sftp.makedirs("spool/incoming", exist_ok=True)
                    async with sftp.open("spool/incoming/x.opus.part", "wb") as handle:
                        await handle.write(b"audio")
                    await sftp.posix_rename("spool/incoming/x.opus.part", "spool/incoming/x.opus")
                result = await asyncio.wait_for(connection.run("id", check=False), 10)
                return root, result.exit_status, (result.stdout or "") + (result.stderr or "")

        root, status, output = asyncio.run(session())
        assert [name for name in root if name not in (".", "..")] == ["spool"]
        uploaded = server.spool / "incoming" / "x.opus"
        info = uploaded.stat()
        assert uploaded.read_bytes() == b"audio"
        assert info.st_mode & 0o020, oct(info.st_mode)  # group-writable: the runner may rename and remove it
        import grp

        assert grp.getgrgid(info.st_gid).gr_name == group and grp.getgrgid((server.spool / "incoming").stat().st_gid).gr_name == group
        assert status != 0 and "uid=" not in output, output
    finally:
        server.cleanup()
        subprocess.run(["groupdel", group], capture_output=True)
