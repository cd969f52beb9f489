"""Languages on the HTTP API with real clients (curl, httpx, the openai SDK): `/detect-language` from
the first speech only, with a multilingual model (bundled:base) or with only the English-only tiny.en;
the OpenAI translations endpoint; and German asked of tiny.en refused at once on `/asr`,
`/v1/audio/transcriptions` and through a profile (issue 26, item 3), leaving nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy
import pytest
import yaml
from openai import BadRequestError, OpenAI

from media import JFK, without_base
from whisperdrop.engine.chunks import decode_blocks
from daemon_helpers import Daemon
from test_api import REQUEST_TIMEOUT_S, api_daemon, curl, free_port, ledger_rows, stored_uploads


@pytest.fixture(scope="module")
def base_daemon(tmp_path_factory, base_model):
    """A daemon whose local model is bundled:base, its API on a free loopback port."""
    port = free_port()
    running = Daemon(tmp_path_factory.mktemp("api-base"), api={"listen": f"127.0.0.1:{port}"},
                     transcription={"provider": "local"}, local={"model": base_model})
    running.url = f"http://127.0.0.1:{port}"
    running.start()
    yield running
    assert running.stop(timeout=60) == 0


@pytest.fixture(scope="module")
def tiny_daemon(tmp_path_factory):
    """A daemon on the default English-only tiny.en, started as if the extra `base` were not installed."""
    root = tmp_path_factory.mktemp("api-tiny")
    running = api_daemon(root)
    running.start(env=without_base(root / "no-base"))
    yield running
    assert running.stop(timeout=60) == 0


def test_detect_language_answers_german_from_the_first_speech_without_a_job(base_daemon, clips):
    """`/detect-language` (multipart, and raw PCM with encode=false as Bazarr sends it) answers german /
    de with its probability and the model that judged it; no job, no upload and no outbox file is left."""
    before = ledger_rows(base_daemon)
    status, body = curl("-F", f"audio_file=@{clips['de']}", f"{base_daemon.url}/detect-language")
    answer = json.loads(body)
    assert status == 200, body
    assert (answer["detected_language"], answer["language_code"], answer["model"]) == ("german", "de", "bundled:base")
    assert answer["language_probability"] > 0.8 and "language_warning" not in answer
    samples = numpy.concatenate(list(decode_blocks(clips["de"])))   # 16 kHz mono, as Bazarr's ffmpeg sends it
    pcm = (samples * 32767).astype("<i2").tobytes()
    raw = httpx.post(f"{base_daemon.url}/detect-language", params={"encode": "false"}, files={"audio_file": pcm},
                     timeout=REQUEST_TIMEOUT_S)
    assert raw.status_code == 200 and raw.json()["language_code"] == "de", raw.text
    assert ledger_rows(base_daemon) == before and not stored_uploads(base_daemon)
    assert not [path for path in base_daemon.outbox.rglob("*") if path.is_file()]


def test_openai_translations_give_english_text_of_german_speech(base_daemon, clips):
    """The openai SDK's translations.create on the German clip gets English words, not German ones."""
    client = OpenAI(base_url=f"{base_daemon.url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    try:
        with open(clips["de"], "rb") as audio:
            translated = client.audio.translations.create(model="whisper-1", file=audio)
    finally:
        client.close()
    words = set(translated.text.lower().replace(".", " ").replace(",", " ").split())
    assert {"renewable", "germany"} <= words and not words & {"heute", "energien", "deutschland"}, translated.text


def test_german_asked_of_tiny_en_is_refused_on_asr_and_openai_transcriptions(tiny_daemon):
    """`/asr?language=de` and the SDK's transcriptions.create(language="de") to a daemon on tiny.en get
    400 naming the model and the fix (a multilingual model, bundled:base) before any work: nothing
    reaches the ledger or state/uploads."""
    before = ledger_rows(tiny_daemon)
    status, body = curl("-F", f"audio_file=@{JFK}", f"{tiny_daemon.url}/asr?task=transcribe&language=de&output=srt")
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "language" and error["code"] == "language_unsupported"
    assert "bundled:tiny.en is English-only and cannot transcribe language 'de'" in error["message"]
    assert "bundled:base" in error["message"]
    client = OpenAI(base_url=f"{tiny_daemon.url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    try:
        with open(JFK, "rb") as audio, pytest.raises(BadRequestError, match="English-only") as caught:
            client.audio.transcriptions.create(model="whisper-1", file=audio, language="de")
    finally:
        client.close()
    assert caught.value.status_code == 400 and "cannot transcribe language 'de'" in str(caught.value)
    assert ledger_rows(tiny_daemon) == before and not stored_uploads(tiny_daemon)


def test_detect_language_with_only_tiny_en_never_answers_a_confident_english_for_german(tiny_daemon, clips):
    """Without a multilingual model, German speech gets 422 naming the extra that brings one, and
    English speech (jfk) gets `en`: tiny.en's English-only warning decides."""
    status, body = curl("-F", f"audio_file=@{clips['de']}", f"{tiny_daemon.url}/detect-language")
    error = json.loads(body)["error"]
    assert status == 422 and error["code"] == "language_undetectable", body
    assert "bundled:tiny.en, is English-only" in error["message"] and "whisperdrop[base]" in error["message"]
    status, body = curl("-F", f"audio_file=@{JFK}", f"{tiny_daemon.url}/detect-language")
    answer = json.loads(body)
    assert status == 200 and (answer["language_code"], answer["model"]) == ("en", "bundled:tiny.en"), body
    assert not stored_uploads(tiny_daemon)


def test_a_profile_asking_german_of_tiny_en_is_a_check_config_problem(tmp_path):
    """check-config names the profile, the English-only model and the fix for `language: de` with
    tiny.en (and for transcription.language), and exits 1: `run` would not start with it."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"transcription": {"language": "fr"}, "inbox": str(tmp_path / "inbox"),
                                      "profiles": [{"name": "german", "match": ["de/**"], "language": "de"}]}))
    (tmp_path / "inbox").mkdir()
    done = subprocess.run([sys.executable, "-m", "whisperdrop", "check-config", "-c", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "At 'profiles[0]': language 'de' with bundled:tiny.en, which is English-only" in done.stderr
    assert "At 'transcription': language 'fr' with bundled:tiny.en" in done.stderr
    assert "bundled:base" in done.stderr and "local.model" in done.stderr


def test_detect_language_gives_the_answer_the_job_gets_even_when_doubtful(base_daemon, clips):
    """The doubtful Portuguese clip gets the same language and probability from `/detect-language` as
    from a job of the same upload (both on its Opus extraction), each with the hint to set `language`."""
    status, body = curl("-F", f"audio_file=@{clips['pt']}", f"{base_daemon.url}/detect-language")
    answer = json.loads(body)
    assert status == 200 and answer["language_probability"] < 0.5, body
    assert "set `language`" in answer["language_warning"]
    status, body = curl("-F", f"audio=@{clips['pt']}", "-F", "outbox=false", f"{base_daemon.url}/transcribe")
    assert status == 200, body
    job = json.loads(body)
    result = json.loads((base_daemon.root / "state" / "results" / f"{job['job_id']}.json").read_text())
    assert (result["language"], result["language_probability"]) == (answer["language_code"],
                                                                    answer["language_probability"])
    assert f"{answer['language_probability']:.2f}" in result["language_warning"]
