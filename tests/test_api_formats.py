"""The API's response bodies, rendered from a Result (pure functions, no daemon)."""

from __future__ import annotations

import json

import pytest

from whisperdrop.daemon.api import formats
from whisperdrop.daemon.api.uploads import safe_name, wav_header
from whisperdrop.outputs.subtitles import Limits

RESULT = {
    "text": " Hello there. General\tKenobi.", "language": "en", "duration": 4.0, "model": "bundled:tiny.en",
    "segments": [
        {"id": 1, "start": 0.0, "end": 1.5, "text": " Hello there.", "avg_logprob": -0.2, "no_speech_prob": 0.01,
         "seek": 0, "tokens": [2425, 612, 13], "temperature": 0.0, "compression_ratio": 0.7,
         "words": [{"word": " Hello", "start": 0.0, "end": 0.6, "probability": 0.9},
                   {"word": " there.", "start": 0.7, "end": 1.5, "probability": 0.8}]},
        {"id": 2, "start": 2.0, "end": 3.25, "text": " General\tKenobi.", "avg_logprob": -0.3, "no_speech_prob": 0.02,
         "words": [{"word": " General", "start": 2.0, "end": 2.5, "probability": 0.9},
                   {"word": "\tKenobi.", "start": 2.6, "end": 3.25, "probability": 0.7}]},
    ],
}


def test_native_segments_have_exactly_start_end_text():
    """The original plan's body: text, language, segments of start, end and text, extras beside."""
    body = formats.native(RESULT, {"job_id": "x"})
    assert body["segments"] == [{"start": 0.0, "end": 1.5, "text": " Hello there."},
                                {"start": 2.0, "end": 3.25, "text": " General\tKenobi."}]
    assert body["language"] == "en" and body["job_id"] == "x"


def test_openai_verbose_json_shape():
    """verbose_json: task, language by name, duration, usage, text, OpenAI's segment fields from 0
    with the engine's figures, none made up where the Result lacks them (a Result cached before the
    engine kept them), words only when asked for, and segments left out when only words are."""
    body, media = formats.openai(RESULT, "verbose_json", ["word", "segment"], "transcribe", Limits(), {})
    assert media == "application/json" and body["language"] == "english" and body["task"] == "transcribe"
    assert body["usage"] == {"type": "duration", "seconds": 4.0}
    assert body["segments"][0] == {"id": 0, "seek": 0, "start": 0.0, "end": 1.5, "text": " Hello there.",
                                   "tokens": [2425, 612, 13], "temperature": 0.0, "avg_logprob": -0.2,
                                   "compression_ratio": 0.7, "no_speech_prob": 0.01}
    assert set(body["segments"][1]) == {"id", "start", "end", "text", "avg_logprob", "no_speech_prob"}
    assert [segment["id"] for segment in body["segments"]] == [0, 1]
    assert body["words"][0] == {"word": " Hello", "start": 0.0, "end": 0.6}
    words_only, _ = formats.openai(RESULT, "verbose_json", ["word"], "transcribe", Limits(), {})
    assert "segments" not in words_only and len(words_only["words"]) == 4
    plain, _ = formats.openai(RESULT, "verbose_json", [], "transcribe", Limits(), {})
    assert "words" not in plain and len(plain["segments"]) == 2
    translated, _ = formats.openai(RESULT, "verbose_json", [], "translate", Limits(), {})
    assert translated["task"] == "translate" and "usage" not in translated
    assert formats.openai(RESULT, "json", [], "transcribe", Limits(), {})[0] == {"text": "Hello there. General\tKenobi."}
    assert formats.openai(RESULT, "text", [], "transcribe", Limits(), {})[0] == "Hello there. General\tKenobi.\n"


def test_asr_outputs():
    """/asr: tsv in integer milliseconds with tabs in text replaced, txt a line a segment, json with words."""
    tsv, _ = formats.asr(RESULT, "tsv", Limits())
    assert tsv == "start\tend\ttext\n0\t1500\tHello there.\n2000\t3250\tGeneral Kenobi.\n"
    assert formats.asr(RESULT, "txt", Limits())[0] == "Hello there.\nGeneral\tKenobi.\n"
    document = json.loads(formats.asr(RESULT, "json", Limits())[0])
    assert document["language"] == "en" and document["segments"][1]["words"][1]["word"] == "\tKenobi."
    assert formats.asr(RESULT, "srt", Limits())[0].startswith("1\n00:00:00,000 --> ")
    assert formats.asr(RESULT, "vtt", Limits())[0].startswith("WEBVTT\n")


def test_language_codes_and_names():
    """A request's language: a code or an English name; auto or empty detects; anything else is refused."""
    assert formats.language_code("pt") == "pt" and formats.language_code("Portuguese") == "pt"
    assert formats.language_code("auto") is None and formats.language_code("") is None
    assert formats.language_name("haw") == "hawaiian" and formats.language_name("ht") == "haitian creole"
    with pytest.raises(ValueError, match="klingon"):
        formats.language_code("klingon")


def test_upload_names_and_wav_header():
    """Upload names keep only safe characters; raw PCM gets a 44-byte header that says its size."""
    assert safe_name("../../etc/passwd") == "passwd" and safe_name("a b/c d.mp3") == "c_d.mp3"
    assert safe_name(None) == "upload" and safe_name("...") == "upload"
    header = wav_header(32000)
    assert len(header) == 44 and header[:4] == b"RIFF" and int.from_bytes(header[40:44], "little") == 32000
