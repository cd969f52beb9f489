"""The API through the remote route: a real sshd on loopback and a real runner (CPU, tiny.en)."""

from __future__ import annotations

import httpx
from openai import OpenAI

from daemon_helpers import Daemon, jfk_reference, word_error_rate
from media import JFK
from test_api import REQUEST_TIMEOUT_S, free_port
from test_remote import FAST_REMOTE, RunnerProcess


def test_api_request_goes_to_the_gpu_host(sshd, tmp_path):
    """/transcribe and the openai SDK are served by the runner behind sshd: the response names the
    remote route and host and no fallback, and the runner did the job once for both requests."""
    runner = RunnerProcess(tmp_path, sshd.spool).start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", api={"listen": f"127.0.0.1:{port}"},
                    remote={**FAST_REMOTE, "hosts": [sshd.host_settings()]}, transcription={"provider": "auto"})
    daemon.start()
    try:
        with open(JFK, "rb") as audio:
            response = httpx.post(f"{url}/transcribe", files={"audio": ("jfk.flac", audio)},
                                  timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["route"] == "remote" and body["host"] == "testhost" and body["fallback_reason"] is None
        assert word_error_rate(jfk_reference(), body["text"]) <= 0.10
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
        try:
            with open(JFK, "rb") as audio:
                verbose = client.audio.transcriptions.create(model="whisper-1", file=audio,
                                                             response_format="verbose_json",
                                                             timestamp_granularities=["word"])
        finally:
            client.close()
        assert verbose.text == body["text"].strip() and verbose.words
        assert verbose.model_extra["route"] == "remote" and verbose.model_extra["job_id"] == body["job_id"]
        assert len(runner.events("runner.job_done")) == 1
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert [(host["name"], host["state"], host["runners"]) for host in health["hosts"]] == [("testhost", "up", 1)]
    finally:
        assert daemon.stop() == 0
        runner.stop()
