"""The daemon's HTTP API with real clients: curl, the official openai SDK, a multipart client
sending the original plan's fields, against a daemon started by the test (`api.listen` on a free
loopback port, the real engine with bundled tiny.en)."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import warnings

import httpx
import openai
import pytest
import yaml
from openai import OpenAI

from daemon_helpers import Daemon, jfk_pcm, jfk_reference, word_error_rate, write_variant_wav, write_wav
from media import JFK
from transcripts import assert_segments_in_order

REQUEST_TIMEOUT_S = 300  # a generous bound: two cores shared by several test runs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ledger_rows(daemon: Daemon) -> tuple[list[tuple], list[tuple]]:
    """(jobs as (job_id, stage), sources as (relpath, job_id, state)) read from the daemon's ledger."""
    with sqlite3.connect(f"file:{daemon.root / 'state' / 'ledger.sqlite3'}?mode=ro", uri=True) as db:
        jobs = db.execute("SELECT job_id, stage FROM jobs ORDER BY created_at").fetchall()
        sources = db.execute("SELECT relpath, job_id, state FROM sources ORDER BY id").fetchall()
    return jobs, sources


def stored_uploads(daemon: Daemon) -> list:
    """The upload folders kept under state/uploads (`.incoming`, the parser's spool, is not one)."""
    return [entry for entry in (daemon.root / "state" / "uploads").iterdir() if not entry.name.startswith(".")]


def curl(*arguments: str) -> tuple[int, bytes]:
    """Run curl; (HTTP status, body)."""
    done = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", str(REQUEST_TIMEOUT_S),
                           *arguments], capture_output=True, check=True, timeout=REQUEST_TIMEOUT_S + 10)
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


def api_daemon(root, **api) -> Daemon:
    port = free_port()
    daemon = Daemon(root, api={"listen": f"127.0.0.1:{port}", **api})
    daemon.url = f"http://127.0.0.1:{port}"
    return daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    running = api_daemon(root)
    settings = yaml.safe_load(running.config_path.read_text())
    settings["profiles"] = [{"name": "bjj", "match": ["bjj/**"], "initial_prompt": "Berimbolo, kimura, de la Riva.",
                             "outputs": ["srt"]}]
    running.config_path.write_text(yaml.safe_dump(settings))
    running.start()
    yield running
    assert running.stop() == 0


def test_transcribe_contract_health_and_one_transcription(daemon):
    """jfk.flac posted with curl -F to /transcribe returns the right text and segments of exactly
    start, end and text; /health answers; the same file again is served from the first job."""
    status, body = curl(f"{daemon.url}/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "healthy" and health["model"] == "bundled:tiny.en"
    assert health["local"]["model"] == "bundled:tiny.en" and health["hosts"] == []

    status, body = curl("-F", f"audio=@{JFK}", "-F", "language=en", "-F", "model=whisper-1", f"{daemon.url}/transcribe")
    assert status == 200, body
    first = json.loads(body)
    assert word_error_rate(jfk_reference(), first["text"]) < 0.2
    assert first["language"] == "en" and first["segments"]
    assert all(set(segment) == {"start", "end", "text"} for segment in first["segments"])
    assert_segments_in_order(first["segments"])
    assert first["route"] == "local" and first["outbox"] == "api/jfk"
    assert (daemon.outbox / "api" / "jfk.json").exists() and (daemon.outbox / "api" / "jfk.srt").exists()

    status, body = curl("-F", f"audio=@{JFK}", "-F", "language=en", f"{daemon.url}/transcribe")
    second = json.loads(body)
    assert status == 200 and second["job_id"] == first["job_id"] and second["text"] == first["text"]
    transcriptions = [event for event in daemon.events() if event["event"] == "stage.transcribe"
                      and event["job_id"] == first["job_id"]]
    assert len(transcriptions) == 1
    jobs, sources = ledger_rows(daemon)
    assert [stage for job_id, stage in jobs if job_id == first["job_id"]] == ["done"]
    assert [state for _, job_id, state in sources if job_id == first["job_id"]] == ["done", "done"]
    assert not stored_uploads(daemon)  # delivered uploads are removed


def test_original_plan_client_fields(daemon):
    """A multipart client that sends exactly the original plan's fields (audio, prompt, language)
    gets the contract's shape, and the prompt reaches the job's options."""
    with open(JFK, "rb") as audio:
        response = httpx.post(f"{daemon.url}/transcribe", files={"audio": ("jfk.flac", audio, "audio/flac")},
                              data={"prompt": "Armbar, kimura, triangle.", "language": "en"},
                              timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    body = response.json()
    assert {"text", "language", "segments"} <= set(body) and body["language"] == "en"
    assert word_error_rate(jfk_reference(), body["text"]) < 0.2
    result = json.loads((daemon.root / "state" / "results" / f"{body['job_id']}.json").read_text())
    assert result["options"]["initial_prompt"] == "Armbar, kimura, triangle."


def test_outbox_false_writes_nothing_to_the_outbox(daemon, tmp_path):
    """A request that says outbox=false gets its transcript and leaves no file in the outbox, and
    its upload is removed once it is served."""
    variant = write_variant_wav(tmp_path / "quiet start.wav", 3)
    before = sorted(daemon.outbox.rglob("*"))
    status, body = curl("-F", f"audio=@{variant}", "-F", "outbox=false", f"{daemon.url}/transcribe")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["outbox"] is None and "country" in answer["text"]
    assert sorted(daemon.outbox.rglob("*")) == before
    assert not stored_uploads(daemon)


def test_a_named_profile(daemon):
    """A request naming a profile gets its options (in the job's options) and its outputs in the
    outbox; an unknown profile is a 400 naming the known ones, and no job."""
    with open(JFK, "rb") as audio:
        response = httpx.post(f"{daemon.url}/transcribe", files={"audio": ("rolling.flac", audio)},
                              data={"profile": "bjj"}, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["profile"] == "bjj" and body["outbox"] == "api/rolling"
    result = json.loads((daemon.root / "state" / "results" / f"{body['job_id']}.json").read_text())
    assert result["options"]["initial_prompt"] == "Berimbolo, kimura, de la Riva."
    written = json.loads((daemon.outbox / "api" / "rolling.json").read_text())
    assert written["profile"] == "bjj" and (daemon.outbox / "api" / "rolling.srt").exists()
    assert not (daemon.outbox / "api" / "rolling.vtt").exists()
    before = ledger_rows(daemon)
    status, body = curl("-F", f"audio=@{JFK}", "-F", "profile=judo", f"{daemon.url}/transcribe")
    error = json.loads(body)["error"]
    assert status == 400 and "judo" in error["message"] and "bjj" in error["message"]
    assert ledger_rows(daemon) == before


def test_openai_sdk_json_verbose_words_srt_and_vtt(daemon):
    """The newest openai SDK gets json, verbose_json with word timestamps and OpenAI's segment fields
    filled from the engine (tokens, seek, temperature, log probability, compression ratio, no-speech
    probability), srt and vtt from the daemon."""
    client = OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    try:
        with open(JFK, "rb") as audio:
            plain = client.audio.transcriptions.create(model="whisper-1", file=audio)
        assert word_error_rate(jfk_reference(), plain.text) < 0.2
        with open(JFK, "rb") as audio:
            verbose = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="verbose_json",
                                                         timestamp_granularities=["word", "segment"])
        assert verbose.language == "english" and verbose.duration == pytest.approx(11.0, abs=0.1)
        assert verbose.text == plain.text and verbose.usage.seconds == verbose.duration
        assert len(verbose.words) >= 20 and verbose.words[0].word.strip() == "And"
        assert all(word.start <= word.end for word in verbose.words)
        assert verbose.segments and verbose.segments[0].id == 0 and verbose.segments[-1].end <= 11.1
        assert_segments_in_order(verbose.segments, "verbose_json")
        for segment in verbose.segments:
            assert segment.tokens and all(isinstance(token, int) for token in segment.tokens)
            assert segment.temperature == 0.0 and segment.avg_logprob < 0 and segment.compression_ratio > 0
            assert 0 <= segment.no_speech_prob <= 1 and 0 <= segment.seek <= 100 * segment.start
        with open(JFK, "rb") as audio:
            srt = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="srt")
        assert srt.startswith("1\n00:00:00,") and " --> " in srt and "country" in srt
        with open(JFK, "rb") as audio:
            vtt = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="vtt")
        assert vtt.startswith("WEBVTT\n") and "00:00:00.000 --> " in vtt and "country" in vtt
    finally:
        client.close()


def test_openai_sdk_temperature_is_honoured(daemon):
    """temperature 0 (OpenAI's default) is the same job as none; 1.0 is another job, decoded by
    faster-whisper sampling at that temperature (its segments say so); 1.5 is refused with 400
    naming the field."""
    client = OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    try:
        jobs = {}
        for temperature in (None, 0.0, 1.0):
            with open(JFK, "rb") as audio:
                extra = {} if temperature is None else {"temperature": temperature}
                verbose = client.audio.transcriptions.create(model="whisper-1", file=audio,
                                                             response_format="verbose_json", **extra)
            jobs[temperature] = verbose
        assert jobs[0.0].model_extra["job_id"] == jobs[None].model_extra["job_id"]
        assert jobs[1.0].model_extra["job_id"] != jobs[None].model_extra["job_id"]
        assert {segment.temperature for segment in jobs[1.0].segments} == {1.0}
        assert {segment.temperature for segment in jobs[None].segments} == {0.0}
        with open(JFK, "rb") as audio, pytest.raises(openai.BadRequestError) as refused:
            client.audio.transcriptions.create(model="whisper-1", file=audio, temperature=1.5)
        error = refused.value.body
        assert error["param"] == "temperature" and "between 0 and 1" in error["message"]
    finally:
        client.close()


def test_openai_sdk_translation_refused_with_the_fix(daemon):
    """/v1/audio/translations through the SDK: with the English-only tiny.en the SDK raises
    BadRequestError whose body names the field (task), the code and the multilingual models to use;
    nothing is transcribed."""
    before = ledger_rows(daemon)
    client = OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    try:
        for response_format in ("json", "verbose_json", "srt"):
            with open(JFK, "rb") as audio, pytest.raises(openai.BadRequestError) as refused, warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # the 3.x SDK marks translations deprecated
                client.audio.translations.create(model="whisper-1", file=audio, response_format=response_format)
            assert refused.value.status_code == 400 and refused.value.code == "translate_unsupported"
            assert refused.value.param == "task" and "multilingual" in refused.value.message
    finally:
        client.close()
    assert ledger_rows(daemon) == before


def test_asr_srt_as_bazarr_asks(daemon):
    """`/asr?output=srt` returns SRT, for a file (curl) and for raw 16 kHz PCM with encode=false, as
    Bazarr sends it; the same speech gives the same cues."""
    status, body = curl("-F", f"audio_file=@{JFK}", f"{daemon.url}/asr?task=transcribe&language=en&output=srt")
    assert status == 200, body
    srt = body.decode()
    assert srt.startswith("1\n00:00:00,") and "country" in srt
    pcm = jfk_pcm().tobytes()
    response = httpx.post(f"{daemon.url}/asr", params={"task": "transcribe", "language": "en", "output": "srt",
                                                       "encode": "false"},
                          files={"audio_file": pcm}, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    assert "country" in response.text and response.headers["content-disposition"].endswith('.srt"')
    status, body = curl("-F", f"audio_file=@{JFK}", f"{daemon.url}/asr?output=tsv&language=en")
    assert status == 200 and body.decode().startswith("start\tend\ttext\n0\t")
    detected = httpx.post(f"{daemon.url}/detect-language", params={"encode": "false"}, files={"audio_file": pcm},
                          timeout=REQUEST_TIMEOUT_S)
    assert detected.status_code == 200 and detected.json()["detected_language"] == "english"
    assert detected.json()["language_code"] == "en"


def test_rejected_requests_leave_nothing(daemon, tmp_path):
    """A non-media upload gets 415 and a wrong field 422, each a JSON error naming the problem; neither
    reaches the ledger, the outbox or state/uploads."""
    before_jobs, before_sources = ledger_rows(daemon)
    before_outbox = sorted(daemon.outbox.rglob("*"))
    notes = tmp_path / "notes.mp3"
    notes.write_text("these are notes, not audio\n" * 50)
    status, body = curl("-F", f"audio=@{notes}", f"{daemon.url}/transcribe")
    error = json.loads(body)["error"]
    assert status == 415 and "notes.mp3" in error["message"] and error["code"] == "not_media"
    assert "state" not in error["message"]  # the daemon's own paths stay its own
    assert "not an audio or video file PyAV can read" in error["message"] and "Errno" not in error["message"]
    status, body = curl("-F", f"file=@{JFK}", f"{daemon.url}/transcribe")
    error = json.loads(body)["error"]
    assert status == 422 and "audio" in error["message"] and error["param"] == "audio"
    status, body = curl("-F", f"audio_file=@{JFK}", f"{daemon.url}/asr?output=docx")
    assert status == 400 and "output" in json.loads(body)["error"]["message"]
    status, body = curl("-F", f"file=@{JFK}", "-F", "model=whisper-1", f"{daemon.url}/v1/audio/translations")
    error = json.loads(body)["error"]
    assert status == 400 and "English-only" in error["message"] and error["param"] == "task"
    status, body = curl("-F", f"audio=@{JFK}", "-F", "model=large-v9", f"{daemon.url}/transcribe")
    assert status == 400 and "large-v3" in json.loads(body)["error"]["message"]
    status, body = curl(f"{daemon.url}/v1/jobs/{'0' * 64}")
    assert status == 404 and "no job" in json.loads(body)["error"]["message"]
    assert ledger_rows(daemon) == (before_jobs, before_sources)
    assert sorted(daemon.outbox.rglob("*")) == before_outbox
    assert not stored_uploads(daemon)
    with socket.create_connection(("127.0.0.1", int(daemon.url.rsplit(":", 1)[1])), timeout=30) as raw:
        raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert raw.recv(1024).startswith(b"HTTP/1.1 400")
    daemon.wait_for(lambda: any(event["event"] == "api.rejected" and event["reason"] == "malformed"
                                for event in daemon.events()), what="api.rejected (malformed)")
    assert not any(event["event"] in ("api.error", "non-json") for event in daemon.events())


def test_token_and_size_limit(tmp_path):
    """With api.token set, a request without it (or with another) gets 401 JSON; an upload over
    api.max_upload_mb gets 413; neither reaches the ledger. The right token is served."""
    daemon = api_daemon(tmp_path, token="s3cret-token", max_upload_mb=1.0).start()
    try:
        status, body = curl(f"{daemon.url}/health")
        assert status == 401 and "Bearer" in json.loads(body)["error"]["message"]
        status, body = curl("-H", "Authorization: Bearer wrong", "-F", f"audio=@{JFK}", f"{daemon.url}/transcribe")
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        status, body = curl("-H", "Authorization: Bearer s3cret-token", "-F", f"audio=@{JFK}",
                            f"{daemon.url}/transcribe")  # jfk.flac is 1.15 MB
        assert status == 413 and "max_upload_mb" in json.loads(body)["error"]["message"]
        big = tmp_path / "big.wav"  # sent chunked: no Content-Length, so the limit is found while reading
        big.write_bytes(JFK.read_bytes() * 2)
        status, body = curl("-H", "Authorization: Bearer s3cret-token", "-H", "Transfer-Encoding: chunked",
                            "-F", f"audio=@{big}", f"{daemon.url}/transcribe")
        assert status == 413 and "max_upload_mb" in json.loads(body)["error"]["message"]
        assert ledger_rows(daemon) == ([], [])
        assert not stored_uploads(daemon)
        small = write_wav(tmp_path / "small.wav", jfk_pcm()[:16000 * 4])
        status, body = curl("-H", "Authorization: Bearer s3cret-token", "-F", f"audio=@{small}",
                            f"{daemon.url}/transcribe")
        assert status == 200 and "fellow americans" in json.loads(body)["text"].lower()
    finally:
        assert daemon.stop() == 0


def test_public_listen_without_token_is_refused(tmp_path):
    """check-config and run refuse an API on a non-loopback address without api.token, saying which
    key to set."""
    daemon = Daemon(tmp_path, api={"listen": "0.0.0.0:8765"})
    checked = subprocess.run([*daemon_command(), "check-config", "-c", str(daemon.config_path)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode != 0 and "api.token" in checked.stdout + checked.stderr
    ran = subprocess.run([*daemon_command(), "run", "-c", str(daemon.config_path)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert ran.returncode != 0 and "api.token" in ran.stdout + ran.stderr


def daemon_command() -> list[str]:
    import sys

    return [sys.executable, "-m", "whisperdrop"]
