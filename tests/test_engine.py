"""The shared engine: the bundled model, options, progress, cancel, the model cache, missing models."""

from __future__ import annotations

import threading

import pytest

from daemon_helpers import jfk_reference, word_error_rate
from media import JFK
from transcripts import assert_segments_in_order
from whisperdrop.engine.engine import Cancelled, Engine, EngineError, ModelKey, resolve_model_path
from whisperdrop.shared.spool import RESULT_SCHEMA, TranscribeOptions


@pytest.fixture(scope="module")
def engine():
    return Engine(max_models=2)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_bundled_model_transcribes_jfk_with_words_and_language(engine, batch_size):
    """tiny.en on jfk.flac, sequential and batched, gives the reference text, word timestamps inside each
    segment, language en, and progress that rises to the duration."""
    progress = []
    result = engine.transcribe(JFK, TranscribeOptions(), batch_size=batch_size,
                               progress=lambda done, total: progress.append((done, total)))
    assert result["schema"] == RESULT_SCHEMA and result["language"] == "en"
    assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
    assert_segments_in_order(result["segments"], f"batch_size {batch_size}")
    for segment in result["segments"]:
        assert segment["words"]
        assert segment["start"] - 0.5 <= segment["words"][0]["start"] <= segment["words"][-1]["end"] <= segment["end"] + 0.5
    assert progress[-1][0] == progress[-1][1] == result["duration"]
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    assert result["options"] == TranscribeOptions().to_dict()


def test_options_reach_the_model(engine):
    """Prompt, hotwords, a fixed language, no word timestamps and no VAD are accepted and recorded."""
    options = TranscribeOptions(language="en", initial_prompt="Kennedy inaugural address.", hotwords="Americans",
                                word_timestamps=False, vad_filter=False, beam_size=2)
    result = engine.transcribe(JFK, options)
    assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
    assert all(segment["words"] == [] for segment in result["segments"])
    assert_segments_in_order(result["segments"])
    assert result["options"]["initial_prompt"] == "Kennedy inaugural address."


@pytest.mark.parametrize("batch_size", [1, 8])
def test_cancel_stops_between_segments(engine, batch_size):
    """A set cancel event raises Cancelled instead of returning a partial Result."""
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        engine.transcribe(JFK, TranscribeOptions(), batch_size=batch_size, cancel=cancel)


def test_model_cache_reuses_and_evicts():
    """The same key returns the loaded model; a third model evicts the least recently used one."""
    engine = Engine(max_models=1)
    first = engine.load(ModelKey("bundled:tiny.en", "cpu", "int8"))
    assert engine.load(ModelKey("bundled:tiny.en", "cpu", "int8")) is first
    engine.load(ModelKey("bundled:tiny.en", "cpu", "float32"))
    assert engine.loaded() == [ModelKey("bundled:tiny.en", "cpu", "float32")]


def test_unavailable_model_says_how_to_get_it(monkeypatch):
    """A model name that is not available offline fails with a message naming it and how to fetch it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EngineError) as caught:
        resolve_model_path("large-v3")
    message = str(caught.value)
    assert caught.value.kind == "model" and "'large-v3'" in message
    assert "download_model('large-v3')" in message and "bundled:tiny.en" in message


def test_bad_model_folder_and_unknown_bundled_name(tmp_path):
    """A folder without model.bin and an unknown bundled name are model errors that name the problem."""
    with pytest.raises(EngineError, match="no model.bin"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(EngineError, match="bundled models are"):
        resolve_model_path("bundled:large-v9")
