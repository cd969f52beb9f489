"""Languages through the commands, as a user runs them: `whisperdrop transcribe --model bundled:base`
on German speech (the text and `language: de`) and with `--task translate`; the whisper-cli drop-in's
`-l auto` and `-tr`; and, where the install extra `base` is missing, `transcribe`, `check-config` and
`doctor` naming it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import yaml

from daemon_helpers import word_error_rate
from media import SPOKEN, without_base
from test_whisper_cli import _config, drop_in

EXTRA = "pip install 'whisperdrop[base]'"


def whisperdrop(*arguments: str, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "whisperdrop", *arguments], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_transcribe_with_bundled_base_writes_german_and_translates_it(base_model, clips, tmp_path):
    """`transcribe german.wav --model bundled:base` gives the German text with language de; with
    `--task translate` the same speech comes out in English."""
    shutil.copy(clips["de"], tmp_path / "german.wav")
    done = whisperdrop("transcribe", "german.wav", "--model", base_model, "-o", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out" / "german.json").read_text())
    assert result["language"] == "de" and result["model"] == "bundled:base"
    assert word_error_rate(SPOKEN["de"], result["text"]) < 0.35, result["text"]
    done = whisperdrop("transcribe", "german.wav", "--model", base_model, "--task", "translate", "-o", "english",
                       cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = json.loads((tmp_path / "english" / "german.json").read_text())["text"].lower()
    assert "germany" in text and "deutschland" not in text, text


def test_whisper_cli_detects_with_l_auto_and_translates_with_tr(base_model, clips, tmp_path):
    """The drop-in with local.model bundled:base: `-l auto -oj` on German writes result.language de and
    German text; `-tr -otxt` writes English."""
    shutil.copy(clips["de"], tmp_path / "german.wav")
    config = _config(tmp_path, local={"model": base_model})
    done = drop_in("-l", "auto", "-oj", "-np", "german.wav", cwd=tmp_path, config=config)
    assert done.returncode == 0, done.stderr
    document = json.loads((tmp_path / "german.wav.json").read_text())
    assert document["result"]["language"] == "de"
    assert "Entwicklung" in " ".join(item["text"] for item in document["transcription"])
    done = drop_in("-tr", "-otxt", "-np", "-of", "english", "german.wav", cwd=tmp_path, config=config)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "english.txt").read_text().lower()
    assert "germany" in text and "deutschland" not in text, text


def test_without_the_extra_transcribe_check_config_and_doctor_name_it(clips, tmp_path):
    """With the packages of `base` missing, `transcribe --model bundled:base` fails naming the extra,
    `check-config` reports local.model with it (exit 1) and `doctor` fails its local-model check with it."""
    environment = without_base(tmp_path / "no-base")
    shutil.copy(clips["en"], tmp_path / "english.wav")
    done = whisperdrop("transcribe", "english.wav", "--model", "bundled:base", "-o", "out", cwd=tmp_path,
                       env=environment)
    assert done.returncode != 0 and EXTRA in done.stderr and "Traceback" not in done.stderr, done.stderr
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"local": {"model": "bundled:base"}}))
    done = whisperdrop("check-config", "-c", str(config), cwd=tmp_path, env=environment)
    assert done.returncode == 1 and "At 'local.model': model 'bundled:base' needs the install extra base" in done.stderr
    assert EXTRA in done.stderr
    done = whisperdrop("doctor", "-c", str(config), cwd=tmp_path, env=environment)
    assert done.returncode != 0 and EXTRA in done.stdout + done.stderr, done.stdout + done.stderr
