"""`whisperdrop transcribe` flags (issue 12, items 4 and 5), end to end on jfk.flac with the bundled
tiny.en: --prompt/--language/--hotwords reach the Result's options, --format chooses the files
(json always), --profile names a profile of the config, translate with an English-only model is a
clear error, and the plain functions other front ends call (`transcribe_files`, `transcribe_one`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon_helpers import jfk_reference, word_error_rate
from media import JFK

PROMPT = "President Kennedy's inaugural address."


def whisperdrop(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisperdrop", *arguments], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr, done.stderr


def write_config(folder: Path, data: dict) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_prompt_language_and_hotwords_reach_the_result(tmp_path):
    """--prompt, --language and --hotwords override the config; the Result's options show them and
    stdout lists every file written, the JSON last."""
    done = whisperdrop("transcribe", str(JFK), "-o", "out", "--prompt", PROMPT, "--language", "en",
                       "--hotwords", "Kennedy", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out" / "jfk.json").read_text())
    assert (result["options"]["initial_prompt"], result["options"]["language"], result["options"]["hotwords"]) == (
        PROMPT, "en", "Kennedy")
    assert result["profile"] is None
    assert word_error_rate(jfk_reference(), result["text"]) <= 0.15
    assert done.stdout.splitlines() == ["out/jfk.srt", "out/jfk.vtt", "out/jfk.txt", "out/jfk.json"]


def test_format_srt_writes_the_srt_and_the_json_only(tmp_path):
    """--format srt writes jfk.srt and jfk.json (the Result, always written) and nothing else; `auto` detects."""
    done = whisperdrop("transcribe", str(JFK), "-o", "out", "--format", "srt", "--language", "auto", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["jfk.json", "jfk.srt"]
    assert done.stdout.splitlines() == ["out/jfk.srt", "out/jfk.json"]
    result = json.loads((tmp_path / "out" / "jfk.json").read_text())
    assert result["options"]["language"] is None and result["language"] == "en"
    assert "-->" in (tmp_path / "out" / "jfk.srt").read_text()


def test_formats_repeat_or_take_commas_and_json_alone_is_just_the_result(tmp_path):
    """--format vtt,txt --format json writes those; --format json alone writes only the Result."""
    done = whisperdrop("transcribe", str(JFK), "-o", "both", "--format", "vtt,txt", "--format", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in (tmp_path / "both").iterdir()) == ["jfk.json", "jfk.txt", "jfk.vtt"]
    done = whisperdrop("transcribe", str(JFK), "-o", "one", "--format", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [path.name for path in (tmp_path / "one").iterdir()] == ["jfk.json"]


def test_an_unknown_format_is_named_before_any_work(tmp_path):
    """--format docx exits 2 naming it and the formats there are; nothing is written."""
    done = whisperdrop("transcribe", str(JFK), "-o", "out", "--format", "srt,docx", cwd=tmp_path)
    no_traceback(done)
    assert done.returncode == 2
    assert "--format docx" in done.stderr and "json, srt, vtt, txt" in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_language_is_named_before_any_work(tmp_path):
    """--language xx exits 2 naming it and what to give instead."""
    done = whisperdrop("transcribe", str(JFK), "-o", "out", "--language", "xx", cwd=tmp_path)
    no_traceback(done)
    assert done.returncode == 2 and "--language xx: not a language code" in done.stderr
    assert not (tmp_path / "out").exists()


def test_translate_with_an_english_only_model_is_a_clear_error(tmp_path):
    """--task translate with tiny.en exits 2 naming the model and the fix, instead of transcribing."""
    done = whisperdrop("transcribe", str(JFK), "-o", "out", "--task", "translate", cwd=tmp_path)
    no_traceback(done)
    assert done.returncode == 2
    assert "bundled:tiny.en is English-only and cannot translate" in done.stderr
    assert "multilingual model" in done.stderr and done.stdout == ""
    assert not (tmp_path / "out").exists()


def test_a_profile_gives_its_options_and_outputs_and_flags_go_over_it(tmp_path):
    """--profile bjj takes the profile's prompt, hotwords and outputs and names it in the Result; a flag
    beats the profile."""
    config = write_config(tmp_path, {"profiles": [
        {"name": "bjj", "match": ["bjj/**"], "initial_prompt": "Jiu-jitsu class.", "hotwords": "kimura",
         "outputs": ["txt"]}]})
    done = whisperdrop("transcribe", "-c", str(config), str(JFK), "-o", "out", "--profile", "bjj",
                       "--hotwords", "Kennedy", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["jfk.json", "jfk.txt"]
    result = json.loads((tmp_path / "out" / "jfk.json").read_text())
    assert result["profile"] == "bjj"
    assert (result["options"]["initial_prompt"], result["options"]["hotwords"]) == ("Jiu-jitsu class.", "Kennedy")


def test_an_unknown_profile_lists_the_known_ones(tmp_path):
    """--profile judo exits 2 and names the profiles the config has."""
    config = write_config(tmp_path, {"profiles": [{"name": "bjj", "match": ["bjj/**"]}]})
    done = whisperdrop("transcribe", "-c", str(config), str(JFK), "-o", "out", "--profile", "judo", cwd=tmp_path)
    no_traceback(done)
    assert done.returncode == 2
    assert "unknown profile 'judo'" in done.stderr and "'bjj'" in done.stderr


def test_transcribe_files_and_transcribe_one_for_other_front_ends(tmp_path):
    """The plain functions: transcribe_files writes the plan's files and returns them; transcribe_one
    returns the Result and writes nothing; a missing file is a reason, not an exception."""
    from whisperdrop.cli.oneshot import transcribe_files, transcribe_one
    from whisperdrop.shared import config as config_module, profiles

    config = config_module.validate({}, tmp_path)
    plan = profiles.plan(config, overrides={"initial_prompt": PROMPT, "outputs": ["vtt"]})
    outcome = transcribe_files(config, [JFK, tmp_path / "gone.wav"], tmp_path / "out", plan, install_signals=False)
    assert outcome.written == {"jfk.flac": [tmp_path / "out" / "jfk.vtt", tmp_path / "out" / "jfk.json"]}
    assert outcome.failed == {"gone.wav": "no such file"} and not outcome.interrupted
    result, problem = transcribe_one(config, JFK, plan.options, install_signals=False)
    assert problem is None and result["options"]["initial_prompt"] == PROMPT and "country" in result["text"]
    assert transcribe_one(config, tmp_path / "gone.wav", plan.options, install_signals=False) == (None, "no such file")


def test_the_engine_refuses_to_translate_with_an_english_only_model():
    """At job time too (an API request, a fallback): the engine raises an error naming the model, kind `model`."""
    from whisperdrop.engine.engine import Engine, EngineError
    from whisperdrop.shared.spool import TranscribeOptions

    with pytest.raises(EngineError, match="bundled:tiny.en is English-only and cannot translate") as caught:
        Engine().transcribe(JFK, TranscribeOptions(task="translate"))
    assert caught.value.kind == "model"


def test_other_speech_through_an_english_only_model_is_warned_on_the_terminal(tmp_path):
    """German speech through the bundled English-only tiny.en: `transcribe` prints the Result's
    language_warning on stderr beside "done", not only inside the JSON."""
    import shutil

    from sshd import skip_or_fail
    from test_daemon_first_day import GERMAN

    if shutil.which("espeak-ng") is None:
        skip_or_fail("espeak-ng is not installed (it speaks the German clip)")
    subprocess.run(["espeak-ng", "-v", "de", "-w", str(tmp_path / "german.wav"), GERMAN], check=True,
                   capture_output=True, timeout=120)
    done = whisperdrop("transcribe", "german.wav", "-o", "out", cwd=tmp_path)
    no_traceback(done)
    assert done.returncode == 0, done.stderr
    warning = json.loads((tmp_path / "out" / "german.json").read_text())["language_warning"]
    assert f"german.wav: warning: {warning}" in done.stderr
