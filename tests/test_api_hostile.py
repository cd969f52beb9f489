"""The HTTP API against a hostile client (issue 27): a flood of half-open connections, slow heads and
bodies, cross-site requests (a foreign Host or Origin), a chunked upload that goes on sending after
its 413, answers that could name the daemon's own folders, and more uploads than the bound. Each
against a real daemon (`python -m whisperdrop run`) and real sockets (tests/hostile.py)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import resource
import time
from pathlib import Path

import httpx
import pytest
import yaml

from daemon_helpers import Daemon, jfk_pcm, write_speech_wav, write_variant_wav, write_wav
from hostile import HalfOpenFlood, chunked_upload_that_keeps_sending, raise_open_file_limit, status_of
from sshd import skip_or_fail
from whisperdrop.daemon.api.connections import ACCEPT_BATCH
from test_api import REQUEST_TIMEOUT_S, api_daemon, curl, free_port, ledger_rows, stored_uploads

TOKEN = "flood-test-token"


def new_lines(daemon: Daemon, mark: int) -> list[bytes]:
    """The log's lines written after byte `mark`."""
    return daemon.log_path.read_bytes()[mark:].splitlines()


def rejected(daemon: Daemon, reason: str) -> list[dict]:
    return [event for event in daemon.events() if event["event"] == "api.rejected" and event.get("reason") == reason]


def short_wav(tmp_path: Path, name: str, index: int) -> Path:
    """4 s of jfk after `index` tenths of a second of silence: distinct bytes, quick to transcribe."""
    samples = jfk_pcm()[:16000 * 4]
    import numpy

    return write_wav(tmp_path / name, numpy.concatenate([numpy.zeros(1600 * index, dtype=numpy.int16), samples]))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A token-less daemon on loopback (the case a web page could drive) with short head and body
    deadlines, a 1 MB upload limit, one allowed extra host name and one allowed origin, started
    with the open-file limits systemd gives a unit without LimitNOFILE (soft 1024, hard 4096)."""
    root = tmp_path_factory.mktemp("guarded")
    daemon = api_daemon(root, max_upload_mb=1.0, head_timeout=3.0, body_timeout=3.0,
                        allowed_hosts=["whisper.example"], allowed_origins=["http://app.example:8080"])
    daemon.port = int(daemon.url.rsplit(":", 1)[1])
    daemon.start(open_files=(1024, 4096))
    yield daemon
    assert daemon.stop() == 0


def test_the_daemon_raises_its_soft_open_file_limit(guarded):
    """Started with systemd's default soft limit (1024) below a hard one, the daemon raises its soft
    limit to the hard one, says so, and sizes the API's connection bound from it."""
    limits = Path(f"/proc/{guarded.process.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line
    opened = [event for event in guarded.events() if event["event"] == "daemon.open_files"]
    assert opened[-1]["raised_from"] == 1024 and opened[-1]["limit"] == 4096
    listening = [event for event in guarded.events() if event["event"] == "api.listening"][-1]
    assert listening["open_files"] == 4096 and listening["max_connections"] == 256


def test_foreign_host_and_origin_are_refused_with_nothing_written(guarded, tmp_path):
    """The issue's cross-site request (Origin attacker.example, Host attacker.example) gets 421 and a
    foreign Origin under the right Host gets 403, both before the body is read, leaving nothing in the
    ledger, state/uploads or the outbox; GET with a foreign Origin, a request with no Origin (curl),
    the daemon's own origin, an allowed origin and an allowed host name are served."""
    audio = short_wav(tmp_path, "cross-site.wav", 1)
    before = ledger_rows(guarded), sorted(guarded.outbox.rglob("*"))
    url = f"{guarded.url}/asr?output=txt&language=en"
    status, body = curl("-H", "Host: attacker.example", "-H", "Origin: http://attacker.example",
                        "-F", f"audio_file=@{audio}", url)
    assert status == 421 and "attacker.example" in json.loads(body)["error"]["message"]
    status, body = curl("-H", "Origin: http://attacker.example", "-F", f"audio_file=@{audio}", url)
    assert status == 403 and json.loads(body)["error"]["code"] == "foreign_origin"
    status, body = curl("-H", "Origin: null", "-F", f"audio_file=@{audio}", url)  # a sandboxed frame, a file:// page
    assert status == 403
    status, body = curl("-H", f"Host: localhost.attacker.example:{guarded.port}", f"{guarded.url}/health")
    assert status == 421
    assert (ledger_rows(guarded), sorted(guarded.outbox.rglob("*"))) == before
    assert not stored_uploads(guarded)
    assert rejected(guarded, "wrong_host") and rejected(guarded, "foreign_origin")

    status, _ = curl("-H", "Origin: http://attacker.example", f"{guarded.url}/health")
    assert status == 200  # reading is no change, and without CORS headers the page cannot read the answer
    status, body = curl("-F", f"audio_file=@{audio}", url)
    assert status == 200 and "fellow" in body.decode().lower()
    for origin, host in ((guarded.url, None), ("http://app.example:8080", None),
                         (f"http://whisper.example:{guarded.port}", f"whisper.example:{guarded.port}")):
        headers = ["-H", f"Origin: {origin}"] + (["-H", f"Host: {host}"] if host else [])
        status, body = curl(*headers, "-F", f"audio_file=@{audio}", url)
        assert status == 200, (origin, body)
    status, _ = curl("-H", f"Host: localhost:{guarded.port}", f"{guarded.url}/health")
    assert status == 200


def test_chunked_upload_past_the_limit_that_keeps_sending_logs_no_traceback(guarded):
    """A chunked upload over api.max_upload_mb (1 MB) that goes on sending (in chunks, or raw bytes
    once past 4 MB, as the issue's client did) gets 413 and its connection closed (the rest is never
    read); the log gets api.rejected lines, never a traceback or a line that is not JSON."""
    mark = guarded.log_path.stat().st_size
    before = ledger_rows(guarded)
    for attempt in range(6):
        answer, sent = chunked_upload_that_keeps_sending(("127.0.0.1", guarded.port), "/transcribe",
                                                         f"127.0.0.1:{guarded.port}", megabytes=16,
                                                         framed_megabytes=4 if attempt % 2 else None)
        assert status_of(answer) == 413, answer[:300]
        assert b"max_upload_mb" in answer and b"connection: close" in answer.lower()
        assert sent < 16 << 20  # cut: the server closed the connection before all of it was sent
    guarded.wait_for(lambda: rejected(guarded, "too_large"), what="api.rejected too_large")
    lines = new_lines(guarded, mark)
    assert all(line.startswith(b"{") for line in lines), [line for line in lines if not line.startswith(b"{")][:5]
    assert not any(b"Traceback" in line or b"Fatal error" in line or b"LocalProtocolError" in line for line in lines)
    assert len(lines) <= 12  # the first refusal, maybe a minute's count: not one line per chunk
    assert ledger_rows(guarded) == before and not stored_uploads(guarded)


def test_slow_heads_and_bodies_are_cut_with_one_line_per_reason(guarded):
    """Connections that never finish their request head get 408 and are closed after api.head_timeout;
    an upload whose body stalls is cut after api.body_timeout; twenty of each give one log line per
    reason, not one per connection."""
    mark = guarded.log_path.stat().st_size
    address = ("127.0.0.1", guarded.port)
    heads = HalfOpenFlood(address, 20, head=f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{guarded.port}\r\n".encode())
    bodies = HalfOpenFlood(address, 20, head=(
        f"POST /transcribe HTTP/1.1\r\nHost: 127.0.0.1:{guarded.port}\r\nContent-Length: 500000\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\n\r\n--x\r\n").encode())
    try:
        assert heads.open() == 20 and bodies.open() == 20
        deadline = time.monotonic() + 120
        while (heads.held() or bodies.held()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert heads.held() == 0 and bodies.held() == 0
        answers = [sock.recv(200, 0) for sock in heads.sockets[:3]]
        assert all(status_of(answer) == 408 for answer in answers), answers
    finally:
        heads.close()
        bodies.close()
    lines = [json.loads(line) for line in new_lines(guarded, mark)]
    reasons = [line.get("reason") for line in lines if line["event"] == "api.rejected"]
    assert reasons.count("head_timeout") == 1 and reasons.count("body_timeout") == 1, reasons
    assert len(lines) <= 6


def test_no_answer_names_the_state_folder(guarded, tmp_path):
    """A 3-byte raw PCM upload (the issue's 422), a text file posing as mp3, and the failed job's
    status name the upload as the client named it and never the daemon's folders."""
    state = str(guarded.root / "state")
    root = str(guarded.root)
    answers = []
    response = httpx.post(f"{guarded.url}/asr", params={"encode": "false", "output": "json"},
                          files={"audio_file": ("three-bytes.pcm", b"\x01\x02\x03")}, timeout=REQUEST_TIMEOUT_S)
    answers.append(response.text)
    assert 400 <= response.status_code < 500, response.text
    notes = tmp_path / "notes.mp3"
    notes.write_text("not audio\n" * 100)
    status, body = curl("-F", f"audio=@{notes}", f"{guarded.url}/transcribe")
    answers.append(body.decode())
    assert status == 415 and "notes.mp3" in body.decode()
    job_id = response.json().get("job_id")
    if job_id:  # the upload became a job that failed: its status says why, in the client's terms
        view = httpx.get(f"{guarded.url}/v1/jobs/{job_id}", timeout=REQUEST_TIMEOUT_S)
        assert view.json()["status"] == "failed" and view.json()["error"]
        answers.append(view.text)
    assert all(state not in answer and root not in answer for answer in answers), answers


def test_uploads_past_the_bound_get_503_and_nothing_is_lost(tmp_path):
    """With room for three uploads in flight and 2 MB of them (jobs waiting for a GPU host that is
    down), an upload past the bytes and then one past the count get 503 with Retry-After and leave
    nothing behind; /health shows the bound; the accepted ones are transcribed once the daemon can
    (restarted with the local CPU), and a refused one is taken then."""
    closed_port = free_port()
    daemon = api_daemon(tmp_path, max_uploads_in_flight=3, max_uploads_in_flight_mb=2.0, max_upload_mb=2.0)
    settings = yaml.safe_load(daemon.config_path.read_text())
    settings["transcription"] = {"provider": "remote"}
    settings["remote"] = {"hosts": [{"name": "down", "host": "127.0.0.1", "port": closed_port}],
                          "connect_timeout": 1.0, "retry_initial_seconds": 60.0}
    daemon.config_path.write_text(yaml.safe_dump(settings))
    files = [short_wav(tmp_path, f"upload{index}.wav", index) for index in range(4)]  # about 130 kB each
    big = write_speech_wav(tmp_path / "big.wav", 0, 55.0)  # 1.76 MB: with two others, past 2 MB

    def kept() -> tuple:  # the jobs and sources recorded, and the uploads stored (the jobs' stages move on)
        jobs, sources = ledger_rows(daemon)
        return ([job_id for job_id, _ in jobs], [(relpath, job_id) for relpath, job_id, _ in sources],
                sorted(entry.name for entry in stored_uploads(daemon)))

    daemon.start()
    try:
        accepted = []

        def accept(path: Path) -> None:
            status, body = curl("-F", f"file=@{path}", f"{daemon.url}/v1/jobs")
            assert status == 202, body
            accepted.append(json.loads(body)["job_id"])

        accept(files[0])
        accept(files[1])
        for path, bound, chunked in ((big, "max_uploads_in_flight_mb", False),  # refused on its Content-Length
                                     (big, "max_uploads_in_flight_mb", True),  # refused as its bytes come
                                     (None, "max_uploads_in_flight", False)):
            if path is None:
                accept(files[2])
                path = files[3]
            before = kept()
            refused = subprocess_curl_with_headers(f"{daemon.url}/v1/jobs", path, chunked)
            assert refused["status"] == 503 and refused["headers"].get("retry-after"), refused
            assert re.search(rf"{bound}[: ]", refused["body"]), refused["body"]  # the bound it passed, by name
            assert kept() == before
        health = httpx.get(f"{daemon.url}/health", timeout=REQUEST_TIMEOUT_S).json()["api"]["uploads"]
        assert health["in_flight"] == 3 and health["max"] == 3 and health["max_bytes"] == 2_000_000
        assert len(rejected(daemon, "uploads_full")) == 1  # three refusals, one line
        assert daemon.stop() == 0
        settings["transcription"] = {"provider": "local"}
        settings["remote"] = {"hosts": []}
        daemon.config_path.write_text(yaml.safe_dump(settings))
        daemon.start()
        for job_id in accepted:
            daemon.wait_for(lambda job_id=job_id: httpx.get(f"{daemon.url}/v1/jobs/{job_id}",
                                                            timeout=REQUEST_TIMEOUT_S).json()["status"] == "done",
                            timeout=300, what=f"job {job_id[:12]} done")
        assert sorted(path.name for path in daemon.outputs()) == ["upload0.json", "upload1.json", "upload2.json"]
        status, body = curl("-F", f"file=@{files[3]}", f"{daemon.url}/v1/jobs")
        assert status == 202, body
    finally:
        daemon.stop()
        daemon.kill()


def subprocess_curl_with_headers(url: str, path: Path, chunked: bool = False) -> dict:
    """POST `path` as `file` with curl (`chunked`: without Content-Length); {"status", "headers"
    (lowercase names), "body"}."""
    import subprocess

    extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    done = subprocess.run(["curl", "-sS", "-D", "-", "-o", "-", "--max-time", str(REQUEST_TIMEOUT_S), *extra,
                           "-F", f"file=@{path}", url], capture_output=True, timeout=REQUEST_TIMEOUT_S + 10)
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return {"status": status_of(head), "headers": {key.lower(): value for key, value in headers.items()},
            "body": body.decode(errors="replace")}


def open_sockets(pid: int) -> list[str]:
    """The descriptors of process `pid` that are sockets; one closed while they are read is not counted."""
    sockets = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                sockets.append(name)
        except FileNotFoundError:  # closed between the listing and the read: the daemon is closing connections
            pass
    return sockets


@pytest.mark.slow
def test_half_open_flood_leaves_the_daemon_serving(tmp_path):
    """1,100 connections that never finish their request head, against a daemon whose open-file limit
    is 1,024 (soft and hard): the daemon holds at most its connection bound, an authorized request is
    answered during the flood, the log stays under a few hundred lines, and a file dropped into the
    inbox during the flood is transcribed."""
    if not raise_open_file_limit(1400):
        skip_or_fail("needs an open-file hard limit of at least 1400 for the test's own 1,100 sockets")
    daemon = api_daemon(tmp_path, token=TOKEN)
    try:
        daemon.start(open_files=(1024, 1024))
        port = int(daemon.url.rsplit(":", 1)[1])
        flood = HalfOpenFlood(("127.0.0.1", port), 1100)
        try:
            mark = daemon.log_path.stat().st_size
            connected = flood.open(timeout=120)
            assert connected >= 1000, f"only {connected} of 1100 connected ({flood.failed} failed)"
            staged = write_variant_wav(tmp_path / "staging" / "during-flood.wav", 7)
            os.rename(staged, daemon.inbox / "during-flood.wav")
            answer = httpx.get(f"{daemon.url}/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
            assert answer.status_code == 200
            figures = answer.json()["api"]["connections"]
            assert figures["max"] == 256 and figures["most"] <= 256
            sockets = open_sockets(daemon.process.pid)
            assert len(sockets) <= 256 + 2 * ACCEPT_BATCH + 16, len(sockets)  # the bound, and a turn's accepts and closes
            daemon.wait_for(lambda: (daemon.outbox / "during-flood.json").exists(), timeout=300,
                            what="the file dropped during the flood transcribed")
        finally:
            flood.close()
        lines = new_lines(daemon, mark)
        assert len(lines) < 300, len(lines)
        assert all(line.startswith(b"{") for line in lines)
        assert rejected(daemon, "connection_evicted")
        assert not [event for event in daemon.events() if event["event"] == "intake.unreadable"]
        assert daemon.stop() == 0
    finally:
        daemon.kill()  # a failed assertion above must not leave the daemon running


def test_a_file_that_failed_for_lack_of_file_descriptors_is_taken_at_the_next_rescan(tmp_path):
    """An inbox file whose intake fails with EMFILE (this process out of file descriptors, for real) is
    not forgotten: the watcher offers it again at its next rescan and it becomes a job."""
    from whisperdrop.shared import log
    from whisperdrop.daemon.service import take_or_offer_again
    from whisperdrop.daemon.watch import InboxWatcher
    from test_pipeline_units import pipeline_for, until

    stream = io.StringIO()
    log.configure(fmt="json", stream=stream)
    pipeline = pipeline_for(tmp_path)
    staged = write_variant_wav(tmp_path / "staging" / "emfile.wav", 3)

    async def scenario() -> None:
        await pipeline.start()
        watcher = InboxWatcher(tmp_path / "inbox", settle_seconds=0.0, rescan_seconds=0.5, recursive=True, ignore=[],
                               shutdown=pipeline.shutdown)
        taken: list[bool] = []

        async def on_ready(path: Path) -> None:
            await take_or_offer_again(pipeline, watcher, path)
            taken.append(True)

        task = asyncio.get_running_loop().create_task(watcher.run(on_ready))
        try:
            await watcher.started.wait()
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            held = exhaust_file_descriptors()
            try:
                os.rename(staged, tmp_path / "inbox" / "emfile.wav")
                await until(lambda: bool(taken), "the file offered and its intake failed", timeout=60)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                for descriptor in held:
                    os.close(descriptor)
            await until(lambda: '"stage.intake"' in stream.getvalue(), "the file taken at a later rescan", timeout=60)
        finally:
            watcher.stop()  # the pipeline's own stop request: the watcher returns, the job is parked
            await asyncio.wait({task}, timeout=10)
            await pipeline.drain(5.0)
            pipeline.close()

    try:
        asyncio.run(scenario())
    finally:
        log.configure(fmt="json")
    events = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    unreadable = [event for event in events if event["event"] == "intake.unreadable"]
    assert unreadable and "Too many open files" in unreadable[0]["error"] and unreadable[0]["retry"]
    assert any(event["event"] == "stage.intake" and event["path"] == "emfile.wav" for event in events)


def exhaust_file_descriptors() -> list[int]:
    """Take every free descriptor number below the highest one in use, then lower the soft limit to
    just above it: the next open() in this process fails with EMFILE. Returns the descriptors taken."""
    highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    held = []
    while True:
        descriptor = os.open("/dev/null", os.O_RDONLY)
        held.append(descriptor)
        if descriptor >= highest:
            break
    resource.setrlimit(resource.RLIMIT_NOFILE, (held[-1] + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    return held
