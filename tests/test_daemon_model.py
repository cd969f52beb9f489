"""Issue 13, item 7: a local model that cannot load is found when `run` starts, not by every file
looping in job.retry. Real daemon processes, offline, with an empty model cache."""

from __future__ import annotations

import os
import shutil

from daemon_helpers import Daemon
from media import JFK


def offline(tmp_path) -> dict:
    """An environment with no network for models and an empty Hugging Face cache."""
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}


def test_provider_local_with_a_model_that_cannot_load_fails_at_start(tmp_path):
    """provider local, local.model small, offline: `run` exits non-zero before it is ready, and says
    plainly that local.model cannot load and what to do."""
    daemon = Daemon(tmp_path, transcription={"provider": "local"}, local={"model": "small"})
    daemon.start(wait_ready=False, env=offline(tmp_path))
    try:
        code = daemon.process.wait(timeout=120)
    finally:
        daemon.kill()
    events = daemon.events()
    assert code != 0, daemon.tail()
    assert not any(event.get("event") == "daemon.ready" for event in events)
    said = [event for event in events if event.get("event") == "daemon.local_unavailable"]
    assert said and said[0]["level"] == "error" and "small" in said[0]["error"], daemon.tail()
    assert "local.model" in said[0]["hint"]


def test_provider_auto_disables_the_local_fallback_it_cannot_load(tmp_path):
    """provider auto with a host, local.model that cannot load: the daemon starts, warns that the local
    fallback is off and why, and a dropped file waits for a host instead of looping in job.retry."""
    key, known_hosts = tmp_path / "id_ed25519", tmp_path / "known_hosts"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n...\n-----END OPENSSH PRIVATE KEY-----\n")
    key.chmod(0o600)
    known_hosts.write_text("")
    host = {"name": "gpu1", "host": "127.0.0.1", "port": 9, "key": str(key), "known_hosts": str(known_hosts)}
    daemon = Daemon(tmp_path, transcription={"provider": "auto"}, local={"model": "small"},
                    remote={"hosts": [host]})
    daemon.config_path.chmod(0o600)
    daemon.start(env=offline(tmp_path))
    try:
        said = [event for event in daemon.events() if event.get("event") == "daemon.local_unavailable"]
        assert said and said[0]["level"] == "warning" and said[0]["fallback"] == "off", daemon.tail()
        shutil.copyfile(JFK, tmp_path / "wait.part")
        os.rename(tmp_path / "wait.part", daemon.inbox / "wait.flac")
        daemon.wait_for(lambda: daemon.count("route.waiting_for_host") >= 1, timeout=120, what="route.waiting_for_host")
        retried = [event for event in daemon.events() if event.get("event") == "job.retry"]
        assert not retried, retried
    finally:
        assert daemon.stop(timeout=60) == 0
