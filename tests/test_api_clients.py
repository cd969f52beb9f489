"""Bazarr and Open WebUI as people deploy them (issue 26): their exact requests, sent with `requests`
(the HTTP client both use), against a real daemon. Bazarr comes from an address in a network
namespace the test builds (tests/netns.py) and sends no token; Open WebUI sends a Bearer key and an
mp3 named `<uuid>.mp3`. Also: X-Forwarded-For only from the proxies `api.forwarded_allow` names,
and the outbox names of API jobs (from `video_file`, from a generic name, two of one name at once)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import uuid

import pytest
import requests
import yaml

from daemon_helpers import Daemon, jfk_pcm, jfk_reference, word_error_rate
from media import make_clip
from netns import NetNamespace
from sshd import skip_or_fail
from test_api import REQUEST_TIMEOUT_S, api_daemon, free_port

TOKEN = "open-webui-key"
VIDEO = "/media/tv/The Show/Season 1/The Show - S01E02 - The Pilot.mkv"

# Bazarr's Whisper provider (subliminal_patch/providers/whisperai.py), as it builds its request:
# ffmpeg's headerless 16 kHz mono s16le PCM as the multipart part `audio_file` (requests names the
# file after the field), options as query parameters, `video_file` the video's path when "pass video
# name" is on (None, so left out, when off), timeouts (response, timeout), no Authorization header.
BAZARR = """
import sys, requests
url, pcm_path, video = sys.argv[1], sys.argv[2], sys.argv[3] or None
with open(pcm_path, "rb") as stream:
    out = stream.read()
session = requests.Session()
session.headers["User-Agent"] = "Subliminal/2.1.0"
try:
    answer = session.post(f"{url}/asr", params={"task": "transcribe", "language": "en", "output": "srt",
                                                "encode": "false", "video_file": video},
                          files={"audio_file": out}, timeout=(5, 3600))
    print(answer.status_code)
    print(answer.text)
except requests.ConnectionError as error:
    print(0)
    print(error)
"""


def bazarr(url: str, pcm: bytes, tmp_path, video: str | None = None, netns: str | None = None) -> tuple[int, str]:
    """Send Bazarr's request (from inside network namespace `netns` when given); (status, body)."""
    pcm_path = tmp_path / f"bazarr-{uuid.uuid4().hex}.pcm"
    pcm_path.write_bytes(pcm)
    command = [sys.executable, "-c", BAZARR, url, str(pcm_path), video or ""]
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=REQUEST_TIMEOUT_S + 60)
    assert done.returncode == 0, done.stderr
    status, _, body = done.stdout.partition("\n")
    return int(status), body


def pcm_variant(index: int) -> bytes:
    """jfk as raw 16 kHz mono s16le after `index` tenths of a second of silence: distinct bytes, same words."""
    import numpy

    return numpy.concatenate([numpy.zeros(1600 * index, dtype=numpy.int16), jfk_pcm()]).tobytes()


@pytest.fixture
def namespace():
    """A network namespace joined to this host by a veth pair (host end .1, namespace end .2)."""
    if os.geteuid() != 0:
        skip_or_fail("needs root to build a network namespace")
    if shutil.which("ip") is None:
        skip_or_fail("needs iproute2 (ip)")
    built = NetNamespace()
    try:
        try:
            built.create()
        except (subprocess.CalledProcessError, OSError) as error:
            skip_or_fail(f"cannot create a network namespace: {error}")
        yield built
    finally:
        built.cleanup()


@pytest.mark.slow
@pytest.mark.needs_root
def test_bazarr_from_another_host_needs_a_trusted_network(namespace, tmp_path):
    """Bazarr's exact request from an address in another network namespace is refused (401) by a
    daemon with a token and no trusted networks; with that address in api.trusted_networks (and no
    token at all) it is served: SRT of the right words, outputs named after `video_file`, or after the
    date and job id without it; a request from an address outside the trusted networks is refused (403)."""
    port = free_port()
    url = f"http://{namespace.outer_address}:{port}"
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", api={"listen": f"{namespace.outer_address}:{port}", "token": "s3cret"})
    daemon.start()
    try:
        status, body = bazarr(url, pcm_variant(1), tmp_path, VIDEO, netns=namespace.name)
        assert status == 401 and "Bearer" in json.loads(body)["error"]["message"]
        assert daemon.stop() == 0

        settings = yaml.safe_load(daemon.config_path.read_text())
        settings["api"] = {"listen": f"{namespace.outer_address}:{port}",
                           "trusted_networks": [f"{namespace.inner_address}/32"]}
        daemon.config_path.write_text(yaml.safe_dump(settings))
        checked = subprocess.run([sys.executable, "-m", "whisperdrop", "check-config", "-c", str(daemon.config_path)],
                                 capture_output=True, text=True, timeout=60, cwd=daemon.root)
        assert checked.returncode == 0 and "WITHOUT a token" in checked.stderr, checked.stderr
        daemon.start()
        status, body = bazarr(url, pcm_variant(1), tmp_path, VIDEO, netns=namespace.name)
        assert status == 200, body
        assert body.startswith("1\n00:00:00,") and word_error_rate(jfk_reference(), _srt_text(body)) < 0.2
        named = daemon.outbox / "api" / "The_Show_-_S01E02_-_The_Pilot"
        assert named.with_suffix(".srt").exists() and named.with_suffix(".json").exists()
        status, body = bazarr(url, pcm_variant(2), tmp_path, None, netns=namespace.name)
        assert status == 200, body
        generic = [path.name for path in (daemon.outbox / "api").glob("*.json") if not path.name.startswith("The_")]
        job_id = json.loads((daemon.outbox / "api" / generic[0]).read_text())["job_id"]
        assert generic == [f"{generic[0][:10]}-{job_id[:12]}.json"] and generic[0][:4].isdigit()
        assert not list((daemon.outbox / "api").glob("audio_file*"))

        outside = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "--interface",
                                  namespace.outer_address, f"{url}/health"], capture_output=True, text=True, timeout=60)
        body, _, status = outside.stdout.rpartition("\n")
        assert status == "403" and "api.trusted_networks" in body
    finally:
        daemon.stop()
        daemon.kill()


def _srt_text(srt: str) -> str:
    return " ".join(line for line in srt.splitlines() if line and not line.isdigit() and "-->" not in line)


def test_open_webui_sends_a_uuid_mp3_with_its_key(tmp_path):
    """Open WebUI's request (an mp3 named `<uuid>.mp3` as `file`, `model` empty or a name, Bearer key)
    gets the right words in OpenAI's JSON; its generic name gives outputs named by date and job id."""
    daemon = api_daemon(tmp_path, token=TOKEN).start()
    try:
        mp3 = make_clip(tmp_path / "clip.mp3", "mp3")
        for model in ("", "whisper-1"):
            name = f"{uuid.uuid4()}.mp3"
            with open(mp3, "rb") as stream:
                answer = requests.post(f"{daemon.url}/v1/audio/transcriptions",
                                       headers={"Authorization": f"Bearer {TOKEN}"},
                                       files={"file": (name, stream)}, data={"model": model},
                                       timeout=REQUEST_TIMEOUT_S)
            assert answer.status_code == 200, answer.text
            assert word_error_rate(jfk_reference(), answer.json()["text"]) < 0.2
        outputs = sorted(path.name for path in (daemon.outbox / "api").glob("*.json"))
        assert len(outputs) == 1 and outputs[0][:4].isdigit()  # the same audio twice: one job, one set
        with open(mp3, "rb") as stream:
            refused = requests.post(f"{daemon.url}/v1/audio/transcriptions", files={"file": ("x.mp3", stream)},
                                    data={"model": ""}, timeout=REQUEST_TIMEOUT_S)
        assert refused.status_code == 401
    finally:
        assert daemon.stop() == 0


def test_two_uploads_of_one_name_at_once_overwrite_nothing(tmp_path):
    """Two different recordings sent at once under the same video_file get `<name>` and `<name>-1`, each
    holding its own job's transcript; the same recording sent again is served from its job, no third set."""
    daemon = api_daemon(tmp_path).start()
    try:
        answers: list = [None, None]

        def send(index: int) -> None:
            answers[index] = requests.post(
                f"{daemon.url}/asr", params={"output": "json", "encode": "false", "language": "en",
                                              "video_file": "Film (2019).mkv"},
                files={"audio_file": pcm_variant(3 + index)}, timeout=REQUEST_TIMEOUT_S)

        threads = [threading.Thread(target=send, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [answer.status_code for answer in answers] == [200, 200]
        folder = daemon.outbox / "api"
        written = sorted(path.name for path in folder.glob("*.json"))
        assert written == ["Film_2019-1.json", "Film_2019.json"]
        jobs = {json.loads((folder / name).read_text())["job_id"] for name in written}
        assert jobs == {answer.headers["X-Whisperdrop-Job"] for answer in answers}
        again = requests.post(f"{daemon.url}/asr", params={"output": "txt", "encode": "false", "language": "en",
                                                           "video_file": "Film (2019).mkv"},
                              files={"audio_file": pcm_variant(3)}, timeout=REQUEST_TIMEOUT_S)
        assert again.status_code == 200 and len(list(folder.glob("*.json"))) == 2
    finally:
        assert daemon.stop() == 0


def test_forwarded_for_is_trusted_only_from_the_proxies_named(tmp_path):
    """Behind a proxy on loopback named in api.forwarded_allow, X-Forwarded-For's client from a trusted
    network needs no token (and one outside needs it, whatever it puts left of it); without
    forwarded_allow the header is never trusted, even when uvicorn's FORWARDED_ALLOW_IPS says `*`."""
    daemon = api_daemon(tmp_path, token="s3cret", trusted_networks=["10.9.9.0/24"], forwarded_allow=["127.0.0.1"])
    daemon.start()
    try:
        def health(forwarded: str) -> int:
            return requests.get(f"{daemon.url}/health", headers={"X-Forwarded-For": forwarded}, timeout=60).status_code

        assert health("10.9.9.9") == 200
        assert health("10.9.8.1") == 401
        assert health("10.9.9.9, 10.1.1.1") == 401  # the proxy appended the real client: 10.1.1.1
        assert requests.get(f"{daemon.url}/health", timeout=60).status_code == 401  # the proxy itself
        assert daemon.stop() == 0
        settings = yaml.safe_load(daemon.config_path.read_text())
        settings["api"].pop("forwarded_allow")
        daemon.config_path.write_text(yaml.safe_dump(settings))
        daemon.start(env={"FORWARDED_ALLOW_IPS": "*"})
        assert health("10.9.9.9") == 401
    finally:
        daemon.stop()
        daemon.kill()
