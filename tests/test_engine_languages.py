"""Languages in the engine, on the multilingual bundled:base (the install extra `base`): the model
joined once into whisperdrop's cache from its two packages, and one language detection whatever
the path (sequential, batched, the API's `detect_file`), a doubtful one said in the Result.

Every test here would fail on tiny.en: it labels all speech `en` with probability 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_helpers import word_error_rate
from media import SPOKEN
from whisperdrop.engine import bundled, language
from whisperdrop.engine.engine import Engine, EngineError, ModelKey
from whisperdrop.outputs import result as results
from whisperdrop.shared.spool import TranscribeOptions


@pytest.fixture(scope="module")
def engine():
    return Engine(max_models=1)


def test_base_is_joined_once_checked_by_size_and_found_again(base_model, tmp_path):
    """The first use joins the two halves into <cache>/models/base-<version>/ (model.bin of 145,217,532
    bytes beside config, tokenizer and vocabulary); the next finds it without writing; a cut-short
    model.bin and an interrupted join's leftover are replaced by a whole one."""
    folder = Path(bundled.path("base", cache=tmp_path))
    assert folder.parent == tmp_path / "models" and folder.name.startswith("base-")
    assert sorted(entry.name for entry in folder.iterdir()) == ["config.json", "model.bin", "tokenizer.json",
                                                                "vocabulary.txt"]
    model = folder / "model.bin"
    first = model.stat()
    assert first.st_size == bundled.BASE_SIZE == 145_217_532
    assert bundled.path("base", cache=tmp_path) == str(folder)
    again = model.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)   # found, not joined again

    with open(model, "r+b") as cut:   # a crash or a full disk left half a file
        cut.truncate(1000)
    leftover = tmp_path / "models" / f".{folder.name}.interrupted"
    leftover.mkdir()
    (leftover / "model.bin").write_bytes(b"half")
    assert bundled.path("base", cache=tmp_path) == str(folder)
    assert model.stat().st_size == bundled.BASE_SIZE and not leftover.exists()
    assert [entry.name for entry in (tmp_path / "models").iterdir() if entry.name.startswith(".base-1")] == \
        [f".{folder.name}.lock"]


def test_two_processes_starting_at_once_join_it_once(base_model, tmp_path):
    """Two processes asking for bundled:base at the same moment in an empty cache both get the same
    complete folder: the second waits on the lock and finds it done (a second join would fail renaming
    over the first's folder), and no temporary folder is left."""
    script = ("import os, sys, time\n"
              "while not os.path.exists(sys.argv[1]): time.sleep(0.001)\n"
              "from whisperdrop.engine import bundled\n"
              "folder = bundled.path('base')\n"
              "print(folder, os.stat(os.path.join(folder, 'model.bin')).st_ino)\n")
    go = tmp_path / "go"
    environment = {**os.environ, "WHISPERDROP_CACHE": str(tmp_path / "cache")}
    processes = [subprocess.Popen([sys.executable, "-c", script, str(go)], env=environment, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0] and outputs[0][0].startswith(str(tmp_path / "cache" / "models" / "base-"))
    models = tmp_path / "cache" / "models"
    assert sorted(entry.name for entry in models.iterdir() if not entry.name.endswith(".lock")) == \
        [Path(outputs[0][0].split()[0]).name]
    assert bundled.complete(Path(outputs[0][0].split()[0]))


def test_every_path_detects_one_language_per_file_and_a_doubtful_one_is_said(base_model, engine, clips):
    """German, Spanish and English are detected right (probability over 0.8) and transcribed in their
    language; batched decoding (the runner's and the daemon's default), the API's detect_file and, on
    a sure and a doubtful clip, sequential decoding give each file the same language and probability;
    the Portuguese clip, detected as English at a low probability, gets a language_warning in the
    Result that gives the probability and says to set `language`."""
    model = engine.load(ModelKey(base_model, "cpu", "int8"))
    answers = {}
    for code in ("de", "es", "en", "pt"):
        batched = engine.transcribe(clips[code], TranscribeOptions(model=base_model), batch_size=8)
        detected = language.detect_file(model, clips[code])
        assert (batched["language"], batched["language_probability"]) == \
            (detected.code, round(detected.probability, 4)), code
        if code in ("de", "pt"):
            sequential = engine.transcribe(clips[code], TranscribeOptions(model=base_model), batch_size=1)
            assert (sequential["language"], sequential["language_probability"]) == \
                (batched["language"], batched["language_probability"]), code
        answers[code] = batched
    for code in ("de", "es", "en"):
        assert answers[code]["language"] == code and answers[code]["language_probability"] > 0.8
        assert word_error_rate(SPOKEN[code], answers[code]["text"]) < 0.35, answers[code]["text"]
        assert results.detection_warning(answers[code]) is None
    doubtful = answers["pt"]
    assert doubtful["language_probability"] < results.DOUBTFUL_PROBABILITY
    warning = results.transcribed(doubtful, job_id="j", route="local", host=None, fallback_reason=None, timings={},
                                  transfer={})["language_warning"]
    assert f"{doubtful['language_probability']:.2f}" in warning and "set `language`" in warning and "profile" in warning


def test_portuguese_named_in_the_options_is_transcribed_as_portuguese(base_model, engine, clips):
    """The fix the warning gives works: with language pt the same clip comes out Portuguese, without a warning."""
    made = engine.transcribe(clips["pt"], TranscribeOptions(model=base_model, language="pt"), batch_size=8)
    assert made["language"] == "pt" and results.detection_warning(made) is None
    assert {"bom", "dia", "passagem", "gancho"} <= set(made["text"].lower().replace(",", " ").split()), made["text"]


def test_an_english_only_model_refuses_another_language_at_job_time(clips):
    """German asked of tiny.en fails at once with kind `model`, naming the model and the fix, as translate does."""
    with pytest.raises(EngineError, match="bundled:tiny.en is English-only and cannot transcribe language 'de'") as caught:
        Engine().transcribe(clips["de"], TranscribeOptions(language="de"))
    assert caught.value.kind == "model" and "bundled:base" in str(caught.value)
