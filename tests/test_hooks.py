"""Done notifications with the real daemon: a webhook on a real local HTTP server (http.server in a
thread) and a command (a small Python script) get the JSON when a job is done or failed; a webhook
that hangs or is down delays no job's outputs, is tried again and given up on, and does not hold the stop."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from daemon_helpers import Daemon, wait_failed, write_variant_wav
from media import JFK, make_text_as_mp3

# The command: writes what it got (stdin's JSON and the WHISPERDROP_* variables) to <folder>/<n>.json.
RECORDER = """
import json, os, sys
folder = sys.argv[1]
document = json.load(sys.stdin)
env = {key: value for key, value in os.environ.items() if key.startswith("WHISPERDROP_")}
name = os.path.join(folder, document["job_id"] + "-" + document["event"] + ".json")
with open(name + ".tmp", "w") as stream:
    json.dump({"stdin": document, "env": env}, stream)
os.rename(name + ".tmp", name)
"""


class Webhook:
    """A real HTTP server on 127.0.0.1 that records each POST's JSON. With `hold` set, it keeps every
    request open (no answer) until `release()`; after that it answers `status`."""

    def __init__(self, status: int = 200, hold: bool = False):
        self.posts: list[dict] = []
        self.arrived = threading.Condition()
        self.released = threading.Event()
        if not hold:
            self.released.set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.arrived:
                    outer.posts.append({"json": json.loads(body), "content_type": self.headers["Content-Type"]})
                    outer.arrived.notify_all()
                if not outer.released.wait(timeout=300):
                    return
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?secret=s3cret"
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-webhook")
        self.thread.start()

    def wait_posts(self, count: int, timeout: float = 120) -> list[dict]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.posts) >= count, timeout=timeout), \
                f"{len(self.posts)} webhook calls, waited for {count}"
            return list(self.posts)

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()  # joins the handler threads
        self.thread.join(timeout=30)


def free_port() -> int:
    """A loopback port with nothing listening on it (a webhook that is down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def notified(tmp_path_factory):
    """(daemon, webhook, folder the command writes to): one daemon with both a webhook and a command."""
    root = tmp_path_factory.mktemp("notify")
    webhook = Webhook()
    received = root / "command"
    received.mkdir()
    daemon = Daemon(root, transcription={"provider": "local"},
                    notify={"webhook": webhook.url, "command": [sys.executable, "-c", RECORDER, str(received)]})
    try:
        daemon.start()
        yield daemon, webhook, received
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        webhook.close()


def posts_for(webhook: Webhook, path: str, count: int = 1) -> list[dict]:
    with webhook.arrived:
        webhook.arrived.wait_for(lambda: sum(post["json"]["path"] == path for post in webhook.posts) >= count,
                                 timeout=120)
        return [post for post in webhook.posts if post["json"]["path"] == path]


def test_webhook_gets_a_done_job(notified):
    """A done job POSTs JSON with event done, the path, job id, route, no fallback, and the outputs that exist."""
    daemon, webhook, _ = notified
    shutil.copyfile(JFK, daemon.inbox / "jfk.flac")
    [post] = posts_for(webhook, "jfk.flac")
    document = post["json"]
    assert post["content_type"] == "application/json"
    assert document["schema"] == "whisperdrop.notify/1" and document["event"] == "done"
    assert len(document["job_id"]) == 64 and document["route"] == "local" and document["fallback_reason"] is None
    assert document["error"] is None and document["language"] == "en"
    assert sorted(Path(output).name for output in document["outputs"]) == ["jfk.json", "jfk.srt", "jfk.txt", "jfk.vtt"]
    assert all(Path(output).is_file() for output in document["outputs"])
    assert document["source"] == str(daemon.archive / "jfk.flac") and Path(document["source"]).is_file()
    def sent() -> list[dict]:
        return [event for event in daemon.events() if event["event"] == "notify.sent" and event["path"] == "jfk.flac"]

    daemon.wait_for(lambda: {event["target"] for event in sent()} == {"webhook", "command"}, timeout=120,
                    what="notify.sent for the webhook and the command")
    assert all("s3cret" not in event["to"] and "/hook" not in event["to"] for event in sent())  # no secret in the log


def test_webhook_gets_a_failed_job(notified):
    """A non-media file POSTs event failed with the error's kind, message and hint, and where the file went."""
    daemon, webhook, _ = notified
    make_text_as_mp3(daemon.inbox / "notes.mp3")
    record = wait_failed(daemon, "notes.mp3")
    [post] = posts_for(webhook, "notes.mp3")
    document = post["json"]
    assert document["event"] == "failed" and document["job_id"] == record["job_id"]
    assert document["error"]["kind"] == "media" == record["kind"]
    assert document["error"]["message"] == record["error"] and document["error"]["hint"]
    assert document["outputs"] == [] and document["source"] == str(daemon.failed / "notes.mp3")


def test_command_gets_the_json_on_stdin_and_in_variables(notified):
    """The command (argv, no shell) gets the same JSON on its stdin and the WHISPERDROP_* variables."""
    daemon, webhook, received = notified
    write_variant_wav(daemon.inbox / "variant.wav", 3)
    [post] = posts_for(webhook, "variant.wav")
    job_id = post["json"]["job_id"]
    written = received / f"{job_id}-done.json"
    daemon.wait_for(written.exists, timeout=120, what=str(written))
    got = json.loads(written.read_text())
    assert got["stdin"]["path"] == "variant.wav" and got["stdin"]["event"] == "done"
    assert got["stdin"]["outputs"] == post["json"]["outputs"]
    env = got["env"]
    assert env["WHISPERDROP_EVENT"] == "done" and env["WHISPERDROP_PATH"] == "variant.wav"
    assert env["WHISPERDROP_JOB_ID"] == job_id and env["WHISPERDROP_ROUTE"] == "local"
    assert env["WHISPERDROP_OUTPUTS"].splitlines() == post["json"]["outputs"]
    assert env["WHISPERDROP_ERROR"] == "" and env["WHISPERDROP_SOURCE"] == str(daemon.archive / "variant.wav")


def test_a_hanging_webhook_delays_no_job_and_not_the_stop(tmp_path):
    """While the webhook holds the first notification unanswered, the next job's outputs still arrive;
    a stop then exits 0 at once, cleanly, naming the unsent notifications (notify.dropped)."""
    webhook = Webhook(hold=True)
    daemon = Daemon(tmp_path, transcription={"provider": "local"},
                    notify={"webhook": webhook.url, "timeout_seconds": 600, "retries": 0})
    try:
        daemon.start()
        write_variant_wav(daemon.inbox / "first.wav", 1)
        webhook.wait_posts(1)  # held: no answer until released
        write_variant_wav(daemon.inbox / "second.wav", 2)
        # job.done, not the archived file: the notification is queued right after job.done is logged,
        # and a stop between archiving and that line parks the job (CI: 1 dropped where 2 were queued)
        daemon.wait_for(lambda: any(event.get("event") == "job.done" and event.get("path") == "second.wav"
                                    for event in daemon.events()),
                        timeout=120, what="second.wav's job.done while the webhook hangs")
        assert (daemon.archive / "second.wav").exists() and (daemon.outbox / "second.json").exists()
        assert len(webhook.posts) == 1 and not webhook.released.is_set()
        assert daemon.stop() == 0
        stopped = [event for event in daemon.events() if event["event"] == "daemon.stopped"]
        assert stopped and stopped[-1]["clean"] is True
        dropped = [event for event in daemon.events() if event["event"] == "notify.dropped"]
        assert sum(event["count"] for event in dropped) == 2  # the held one and the one queued behind it
    finally:
        daemon.kill()
        webhook.close()


def test_a_dead_webhook_is_retried_then_given_up_on(tmp_path):
    """A webhook that is down: the outputs arrive, and after the retries (doubling pauses) notify.failed
    says so with the attempts; a webhook answering 503 is retried the same way."""
    refusing = f"http://127.0.0.1:{free_port()}/hook"
    failing = Webhook(status=503)
    daemon = Daemon(tmp_path, transcription={"provider": "local"},
                    notify={"webhook": refusing, "timeout_seconds": 5, "retries": 2})
    try:
        daemon.start()
        write_variant_wav(daemon.inbox / "down.wav", 4)
        daemon.wait_for(lambda: (daemon.outbox / "down.json").exists(), timeout=120, what="down.wav's outputs")
        daemon.wait_for(lambda: daemon.count("notify.failed") == 1, timeout=120, what="notify.failed")
        [failed] = [event for event in daemon.events() if event["event"] == "notify.failed"]
        assert failed["attempts"] == 3 and failed["path"] == "down.wav" and failed["target"] == "webhook"
        assert "cannot reach it" in failed["error"] and failed["hint"]
        retries = [event for event in daemon.events() if event["event"] == "notify.retry"]
        assert [event["retry_in_s"] for event in retries] == [1.0, 2.0]
        assert daemon.stop() == 0

        config = daemon.config_path.read_text().replace(refusing, failing.url)
        daemon.config_path.write_text(config)
        daemon.start()
        write_variant_wav(daemon.inbox / "refused.wav", 5)
        daemon.wait_for(lambda: daemon.count("notify.failed") == 2, timeout=120, what="the second notify.failed")
        assert len(failing.wait_posts(3)) == 3
        last = [event for event in daemon.events() if event["event"] == "notify.failed"][-1]
        assert last["attempts"] == 3 and "HTTP 503" in last["error"]
    finally:
        daemon.stop()
        daemon.kill()
        failing.close()


def test_a_webhook_that_is_not_http_is_a_config_error(tmp_path):
    """notify.webhook must be an http:// or https:// URL: check-config names the key and what was expected."""
    from whisperdrop.shared import config

    with pytest.raises(config.ConfigError) as caught:
        config.validate({"notify": {"webhook": "file:///etc/passwd", "events": ["done", "started"]}}, tmp_path)
    text = str(caught.value)
    assert "At 'notify.webhook': 'file:///etc/passwd'; expected an http:// or https:// URL" in text
    assert "At 'notify.events'" in text
