"""The API's asynchronous jobs and its routing: an accepted job survives a daemon restart, and a
response names the local fallback when the GPU host is down."""

from __future__ import annotations

import json

import httpx

from daemon_helpers import Daemon, jfk_reference, word_error_rate
from media import JFK
from test_api import REQUEST_TIMEOUT_S, free_port
from transcripts import assert_segments_in_order


def dead_host() -> dict:
    """A GPU host nothing listens for (a closed loopback port): every connection is refused."""
    return {"name": "gpu-down", "host": "127.0.0.1", "port": free_port(), "user": "nobody"}


def test_async_job_survives_restart(tmp_path):
    """POST /v1/jobs answers 202 with the job id at once; the daemon stops before the job is done
    (it waits for a GPU host that is down); after a restart the job finishes, and GET /v1/jobs/<id>
    gives its stage, then the transcript."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    waiting = Daemon(tmp_path, api={"listen": f"127.0.0.1:{port}"},
                     transcription={"provider": "remote"}, remote={"hosts": [dead_host()]}).start()
    with open(JFK, "rb") as audio:
        response = httpx.post(f"{url}/v1/jobs", files={"file": ("talk.flac", audio)}, data={"language": "en"},
                              timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    waiting.wait_for(lambda: any(event["event"] == "route.waiting_for_host" for event in waiting.events()),
                     timeout=REQUEST_TIMEOUT_S, what="the job waiting for a GPU host")
    view = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
    assert view["status"] == "running" and view["stage"] == "extracted" and "result" not in view
    assert waiting.stop() == 0

    resumed = Daemon(tmp_path, api={"listen": f"127.0.0.1:{port}"}, transcription={"provider": "auto"},
                     remote={"hosts": []}).start()
    try:
        resumed.wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()["status"] == "done",
                         timeout=REQUEST_TIMEOUT_S, what="the resumed job")
        view = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        assert view["route"] == "local" and word_error_rate(jfk_reference(), view["result"]["text"]) < 0.2
        assert view["result"]["segments"][0]["words"]
        assert_segments_in_order(view["result"]["segments"])
        assert (resumed.outbox / "api" / "talk.json").exists()
    finally:
        assert resumed.stop() == 0


def test_fallback_named_when_host_down(tmp_path):
    """With the only GPU host down, /transcribe is served by the local fallback and the response
    says so and why; /health lists the host as down and the local route as the fallback."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    daemon = Daemon(tmp_path, api={"listen": f"127.0.0.1:{port}"}, transcription={"provider": "auto"},
                    remote={"hosts": [dead_host()], "local_below_seconds": 0}).start()
    try:
        with open(JFK, "rb") as audio:
            response = httpx.post(f"{url}/transcribe", files={"audio": ("jfk.flac", audio)}, data={"language": "en"},
                                  timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["route"] == "local" and "gpu-down" in body["fallback_reason"]
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["status"] == "healthy" and health["local"]["role"] == "fallback"
        assert [(host["name"], host["state"]) for host in health["hosts"]] == [("gpu-down", "down")]
        result = json.loads((daemon.root / "state" / "results" / f"{body['job_id']}.json").read_text())
        assert result["fallback_reason"] == body["fallback_reason"]
    finally:
        assert daemon.stop() == 0


def test_stop_answers_a_waiting_request_and_keeps_its_job(tmp_path):
    """SIGTERM while a synchronous request waits for its job: the request gets 503 JSON naming the
    job (which is kept in the ledger), and the daemon stops cleanly with 0."""
    import subprocess

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    daemon = Daemon(tmp_path, api={"listen": f"127.0.0.1:{port}"}, transcription={"provider": "remote"},
                    remote={"hosts": [dead_host()]}).start()
    request = subprocess.Popen(["curl", "-sS", "-w", "\n%{http_code}", "--max-time", str(REQUEST_TIMEOUT_S),
                                "-F", f"audio=@{JFK}", f"{url}/transcribe"], stdout=subprocess.PIPE)
    try:
        daemon.wait_for(lambda: any(event["event"] == "route.waiting_for_host" for event in daemon.events()),
                        timeout=REQUEST_TIMEOUT_S, what="the job waiting for a GPU host")
        assert daemon.stop() == 0
        output, _ = request.communicate(timeout=60)
    finally:
        if request.poll() is None:
            request.kill()
            request.wait()
    body, _, status = output.rpartition(b"\n")
    answer = json.loads(body)
    assert int(status) == 503 and answer["error"]["code"] == "stopping" and len(answer["job_id"]) == 64
    stopped = [event for event in daemon.events() if event["event"] == "daemon.stopped"]
    assert stopped and stopped[-1]["clean"] is True


def test_api_job_sends_the_done_notification(tmp_path):
    """A request's job, once done, sends the `notify` command its notification like a dropped file's:
    event done, the job id, the route, and the outbox files written for it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    notes = tmp_path / "notifications.jsonl"
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", api={"listen": f"127.0.0.1:{port}"},
                    notify={"command": ["tee", "-a", str(notes)]}).start()
    try:
        with open(JFK, "rb") as audio:
            response = httpx.post(f"{url}/transcribe", files={"audio": ("jfk.flac", audio)}, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 200, response.text
        daemon.wait_for(lambda: notes.exists() and notes.read_text().strip(), timeout=REQUEST_TIMEOUT_S,
                        what="the notification")
        sent = json.loads(notes.read_text().splitlines()[0])
        assert sent["event"] == "done" and sent["job_id"] == response.json()["job_id"] and sent["route"] == "local"
        assert str(daemon.outbox / "api" / "jfk.json") in sent["outputs"] and sent["path"].startswith(".api/")
    finally:
        assert daemon.stop() == 0
