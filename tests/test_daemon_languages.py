"""Languages through a real daemon process on the multilingual bundled:base: each job's language
detected, a profile's `language: pt`, a profile's `task: translate`, German SRT with its umlauts, and
a doubtful detection said in the Result and the log. One daemon, the shared clip set (media.SPOKEN).

Each check fails on tiny.en: it labels every file `en` and cannot translate."""

from __future__ import annotations

import json

import pytest

from daemon_helpers import Daemon, word_error_rate
from media import SPOKEN
from test_daemon import drop

PROFILES = [{"name": "portuguese", "match": ["pt/**"], "language": "pt"},
            {"name": "to-english", "match": ["translate/**"], "task": "translate"}]
FILES = {"de.wav": "de", "es.wav": "es", "en.wav": "en", "pt/pt.wav": "pt", "translate/de.wav": "de",
         "doubt/pt.wav": "pt"}


@pytest.fixture(scope="module")
def outcome(tmp_path_factory, clips, base_model):
    """A daemon on bundled:base given every file of FILES at once; yields (daemon, {name: Result})."""
    daemon = Daemon(tmp_path_factory.mktemp("languages"), transcription={"provider": "local"},
                    local={"model": base_model}, profiles=PROFILES).start()
    try:
        for name, code in FILES.items():
            drop(daemon, clips[code], name)
        daemon.wait_for(lambda: all((daemon.archive / name).exists() for name in FILES), timeout=600,
                        what="every clip archived")
        yield daemon, {name: json.loads((daemon.outbox / name).with_suffix(".json").read_text()) for name in FILES}
    finally:
        assert daemon.stop(timeout=60) == 0


def test_each_job_gets_its_own_detected_language(outcome):
    """German, Spanish and English dropped together: each Result has its own language and text in it."""
    _daemon, results = outcome
    for name in ("de.wav", "es.wav", "en.wav"):
        code = FILES[name]
        assert results[name]["language"] == code and results[name]["model"] == "bundled:base", name
        assert word_error_rate(SPOKEN[code], results[name]["text"]) < 0.35, results[name]["text"]
        assert "language_warning" not in results[name]


def test_the_german_srt_keeps_its_umlauts(outcome):
    """de.srt is UTF-8 with the German words as spoken: über, nächsten."""
    daemon, _results = outcome
    subtitles = (daemon.outbox / "de.srt").read_text(encoding="utf-8")
    assert "über" in subtitles and "Entwicklung" in subtitles and "\ufffd" not in subtitles


def test_a_profile_language_and_a_profile_translate_task(outcome):
    """pt/ (language: pt) comes out Portuguese with no warning; translate/ (task: translate) gives
    English text of the German speech, its language still the spoken one."""
    _daemon, results = outcome
    portuguese = results["pt/pt.wav"]
    assert portuguese["language"] == "pt" and portuguese["profile"] == "portuguese"
    assert "passagem" in portuguese["text"].lower() and "language_warning" not in portuguese
    translated = results["translate/de.wav"]
    assert translated["options"]["task"] == "translate" and translated["language"] == "de"
    words = set(translated["text"].lower().replace(".", " ").replace(",", " ").split())
    assert {"renewable", "germany"} <= words and not words & {"heute", "energien", "deutschland"}, translated["text"]


def test_a_doubtful_detection_is_said_in_the_result_and_the_log(outcome):
    """doubt/pt.wav (no profile) is detected with a probability under 0.5: its Result's
    language_warning and the stage.transcribe log line (a warning) give the probability and the hint
    to set `language` on the folder's profile."""
    daemon, results = outcome
    doubtful = results["doubt/pt.wav"]
    warning = doubtful["language_warning"]
    assert doubtful["language_probability"] < 0.5 and f"{doubtful['language_probability']:.2f}" in warning
    assert "set `language`" in warning and "profile of this file's folder" in warning
    logged = [event for event in daemon.events() if event.get("event") == "stage.transcribe"
              and event.get("job_id") == doubtful["job_id"]]
    assert logged and logged[0]["language_warning"] == warning and logged[0]["level"] == "warning"
