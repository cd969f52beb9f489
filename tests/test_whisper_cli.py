"""The whisper-cli drop-in (`whisperdrop whisper-cli`, `whisperdrop-whisper-cli`): whisper.cpp's flags,
file names and formats, run as an application runs whisper-cli, on the real engine with tiny.en."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_helpers import jfk_reference, normalise, word_error_rate
from media import JFK
from whisperdrop.cli import whisper_cli_flags
from whisperdrop.outputs import whisper_cpp as output

SCRIPT = Path(sys.executable).with_name("whisperdrop-whisper-cli")


# flags and model names


@pytest.mark.parametrize("argument, expected", [
    ("ggml-large-v3.bin", "large-v3"),
    ("/opt/whisper.cpp/models/ggml-base.en.bin", "base.en"),
    ("models/ggml-large-v3-turbo.bin", "large-v3-turbo"),
    ("ggml-medium-q5_0.bin", "medium"),
    ("large-v2", "large-v2"),
    ("bundled:tiny.en", "bundled:tiny.en"),
    ("models/ggml-tiny.en.bin", "bundled:tiny.en"),  # the config's bundled copy of the same model
])
def test_whisper_cpp_model_names_map_to_faster_whisper(argument, expected):
    """whisper.cpp's model file names (bare or as paths, quantized too) map to faster-whisper names, and a
    name the config already has as `bundled:NAME` maps to that."""
    model, warnings = whisper_cli_flags.map_model(argument, ("bundled:tiny.en",))
    assert model == expected
    assert bool(warnings) == ("q5_0" in argument)  # a quantized file is named in a warning


def test_a_model_folder_is_used_as_it_is(tmp_path):
    """`-m` naming a folder (a CTranslate2 model) passes its absolute path on."""
    assert whisper_cli_flags.map_model(str(tmp_path)) == (str(tmp_path.resolve()), [])


def test_an_unknown_model_is_an_error_that_names_the_choices():
    """`-m ggml-nonsense.bin` is refused with status 3 (whisper-cli's for a model it cannot load), naming what works."""
    with pytest.raises(whisper_cli_flags.UsageError) as caught:
        whisper_cli_flags.map_model("models/ggml-nonsense.bin")
    assert caught.value.status == 3
    assert "ggml-nonsense.bin" in str(caught.value) and "ggml-large-v3.bin" in str(caught.value)


def test_flags_parse_like_whisper_cli():
    """Several -f and bare files, -of per file, output flags (-ojf implies -oj), values, and the
    language lower-cased; an accepted flag it cannot honour becomes a warning naming it."""
    params = whisper_cli_flags.parse(["-m", "ggml-base.bin", "-f", "a.wav", "b.mp3", "--file", "c.ogg", "-of", "one",
                                "-osrt", "-ojf", "-otxt", "-l", "PT", "--prompt", "armbar, kimura", "-bs", "3",
                                "-t", "8", "-ml", "40", "-sow", "-np", "-fa", "-tp", "0.4"])
    assert params.files == ["a.wav", "b.mp3", "c.ogg"] and params.output_files == ["one"]
    assert params.formats == ["txt", "srt", "json"] and params.json_full
    assert (params.language, params.prompt, params.beam_size, params.threads, params.max_len) == \
        ("pt", "armbar, kimura", 3, 8, 40)
    assert params.no_prints and params.split_on_word
    flagged = " ".join(params.warnings)
    assert "-fa (--flash-attn) is not honoured" in flagged and "-tp (--temperature) is not honoured" in flagged
    assert "-ojf" in flagged  # words stand in for tokens: said, not silently


@pytest.mark.parametrize("argv, message", [
    (["-f", "a.wav", "--frobnicate"], "error: unknown argument: --frobnicate"),
    (["-f"], "error: argument -f requires value"),
    (["-bs", "many", "a.wav"], "error: argument -bs needs a whole number, not 'many'"),
])
def test_bad_arguments_are_usage_errors(argv, message):
    """An unknown flag, a missing value or a bad number is a usage error (status 2) with whisper-cli's wording."""
    with pytest.raises(whisper_cli_flags.UsageError) as caught:
        whisper_cli_flags.parse(argv)
    assert str(caught.value) == message and caught.value.status == 2


def _options(tmp_path, argv: list[str], **data):
    from whisperdrop.cli import whisper_cli
    from whisperdrop.shared import config as config_module

    config = config_module.validate(data, tmp_path)
    options, warnings = whisper_cli.options_for(whisper_cli_flags.parse(argv), config)
    return options, warnings, config


def test_flags_override_the_config_and_m_holds_on_every_route(tmp_path):
    """Flags given override the config's options (and -m the local fallback's model too); flags not
    given leave the config's, not whisper-cli's built-in defaults."""
    data = {"remote": {"hosts": [{"name": "gpu1", "host": "127.0.0.1"}]},
            "transcription": {"model": "large-v3", "initial_prompt": "guard pass, sweep"}}
    options, warnings, config = _options(tmp_path, ["a.wav"], **data)
    assert (options.model, options.language, options.initial_prompt, options.task) == \
        ("large-v3", None, "guard pass, sweep", "transcribe")
    assert config.local.model == "bundled:tiny.en" and not warnings
    options, warnings, config = _options(tmp_path, ["-m", "models/ggml-small.bin", "-l", "PT", "--prompt", "armbar",
                                                    "-bs", "2", "-tr", "a.wav"], **data)
    assert (options.model, options.language, options.initial_prompt, options.beam_size, options.task) == \
        ("small", "pt", "armbar", 2, "translate")
    assert config.local.model == "small" and options.word_timestamps and not warnings


def test_an_english_only_model_ignores_language_and_translate_with_a_warning(tmp_path):
    """-m ggml-base.en.bin -l de -tr: transcribed as English, with whisper-cli's warning; an unknown language is refused."""
    options, warnings, _config = _options(tmp_path, ["-m", "ggml-base.en.bin", "-l", "de", "-tr", "a.wav"],
                                          remote={"hosts": [{"name": "gpu1", "host": "127.0.0.1"}]})
    assert (options.model, options.language, options.task) == ("base.en", "en", "transcribe")
    assert any("model base.en is not multilingual" in warning for warning in warnings)
    with pytest.raises(whisper_cli_flags.UsageError, match="unknown language 'xx'"):
        _options(tmp_path, ["-l", "xx", "a.wav"])


# formats, on a Result made by hand

RESULT = {
    "model": "large-v3", "language": "en", "text": "...",
    "executed_on": {"route": "remote", "host": "gpu1", "device": "cuda", "compute_type": "float16"},
    "segments": [
        {"start": 0.0, "end": 3.456, "text": " Hello, \"world\".", "words": [
            {"start": 0.0, "end": 1.2, "word": " Hello,", "probability": 0.91},
            {"start": 1.3, "end": 3.456, "word": " \"world\".", "probability": 0.8}]},
        {"start": 3661.5, "end": 3662.25, "text": " Bye.", "words": [
            {"start": 3661.5, "end": 3662.25, "word": " Bye.", "probability": 0.7}]},
    ],
}


def test_text_formats_are_whisper_cpps():
    """txt, vtt, srt (numbered from -on), csv (ms, quotes doubled), lrc and the printed transcript read
    byte for byte as whisper.cpp writes them."""
    segments = output.segments_of(RESULT)
    assert output.render_txt(segments) == ' Hello, "world".\n Bye.\n'
    assert output.render_vtt(segments) == ('WEBVTT\n\n00:00:00.000 --> 00:00:03.460\n Hello, "world".\n\n'
                                           '01:01:01.500 --> 01:01:02.250\n Bye.\n\n')
    assert output.render_srt(segments, offset_n=2) == ('3\n00:00:00,000 --> 00:00:03,460\n Hello, "world".\n\n'
                                                       '4\n01:01:01,500 --> 01:01:02,250\n Bye.\n\n')
    assert output.render_csv(segments) == 'start,end,text\n0,3460," Hello, ""world""."\n3661500,3662250," Bye."\n'
    assert output.render_lrc(segments) == '[by:whisper.cpp]\n[00:00.00] Hello, "world".\n[61:01.50] Bye.\n'
    assert output.printed(segments) == ('\n[00:00:00.000 --> 00:00:03.460]   Hello, "world".\n'
                                        '[01:01:01.500 --> 01:01:02.250]   Bye.\n\n')
    assert output.printed(segments, no_timestamps=True) == '\n Hello, "world". Bye.\n'


def test_json_has_whisper_cpps_shape():
    """-oj: systeminfo, model, params, result.language, transcription[] with timestamps and offsets; -ojf adds tokens."""
    segments = output.segments_of(RESULT)
    document = json.loads(output.render_json(RESULT, segments, model_argument="models/ggml-large-v3.bin",
                                             language_argument="auto", translate=False))
    assert list(document) == ["systeminfo", "model", "params", "result", "transcription"]
    assert "host = gpu1" in document["systeminfo"]
    assert document["model"]["type"] == "large" and document["model"]["mels"] == 128
    assert document["params"] == {"model": "models/ggml-large-v3.bin", "language": "auto", "translate": False}
    assert document["result"] == {"language": "en"}
    assert document["transcription"][1] == {"timestamps": {"from": "01:01:01,500", "to": "01:01:02,250"},
                                            "offsets": {"from": 3661500, "to": 3662250}, "text": " Bye."}
    full = json.loads(output.render_json(RESULT, segments, model_argument="m", language_argument="en",
                                         translate=False, full=True))
    token = full["transcription"][0]["tokens"][1]
    assert token["text"] == ' "world".' and token["offsets"] == {"from": 1300, "to": 3460} and token["p"] == 0.8


def test_max_len_cuts_segments_between_words():
    """-ml N: each segment holds at most N characters, cut between words; a longer word stands alone."""
    segments = output.segments_of(RESULT, max_len=8)
    assert [segment.text for segment in segments] == [" Hello,", ' "world".', " Bye."]
    assert (segments[1].t0, segments[1].t1) == (130, 346)


# end to end: the drop-in run as an application runs whisper-cli, on the real engine

def _config(tmp_path: Path, **sections) -> Path:
    """A config file for the drop-in (found through $WHISPERDROP_CONFIG): the local CPU unless `sections` say otherwise."""
    import yaml

    path = tmp_path / "whisperdrop.yaml"
    path.write_text(yaml.safe_dump({"transcription": {"provider": "local"}, **sections}))
    path.chmod(0o600)
    return path


def drop_in(*arguments: str, cwd: Path, config: Path, subcommand: bool = False) -> subprocess.CompletedProcess:
    """Run the console script (or `whisperdrop whisper-cli`) as an application would, in `cwd`."""
    command = ([sys.executable, "-m", "whisperdrop", "whisper-cli"] if subcommand else [str(SCRIPT)])
    environment = {**os.environ, "WHISPERDROP_CONFIG": str(config)}
    return subprocess.run([*command, *arguments], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=300)


def read_like_whisper_cpp_user(path: Path) -> list[tuple[int, int, str]]:
    """What an application written for whisper.cpp takes from its JSON: (from ms, to ms, text) per segment."""
    with open(path) as stream:
        data = json.load(stream)
    return [(item["offsets"]["from"], item["offsets"]["to"], item["text"].strip()) for item in data["transcription"]]


def test_jfk_json_reads_like_whisper_cpps(tmp_path):
    """`-m ggml-tiny.en.bin -l en -oj -pp -f jfk.flac` writes jfk.flac.json whose segments' offsets and
    text give the speech, read as whisper.cpp's JSON is read; the transcript is printed on stdout as
    whisper-cli prints it, the progress on stderr, and the status is 0."""
    shutil.copy(JFK, tmp_path / "jfk.flac")
    done = drop_in("-m", "models/ggml-tiny.en.bin", "-l", "en", "-oj", "-pp", "-f", "jfk.flac",
                   cwd=tmp_path, config=_config(tmp_path))
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["jfk.flac", "jfk.flac.json", "whisperdrop.yaml"]
    segments = read_like_whisper_cpp_user(tmp_path / "jfk.flac.json")
    assert segments and all(0 <= start < end <= 11_100 for start, end, _text in segments)
    assert all(earlier[1] <= later[0] for earlier, later in zip(segments, segments[1:]))
    assert word_error_rate(jfk_reference(), " ".join(text for _start, _end, text in segments)) <= 0.10
    document = json.loads((tmp_path / "jfk.flac.json").read_text())
    assert document["params"] == {"model": "models/ggml-tiny.en.bin", "language": "en", "translate": False}
    assert document["result"]["language"] == "en" and document["model"]["type"] == "tiny"
    printed = [line for line in done.stdout.splitlines() if line]
    assert len(printed) == len(segments) and printed[0].startswith("[00:00:00.000 --> ")
    assert normalise(" ".join(line.split("]", 1)[1] for line in printed)) == \
        normalise(" ".join(text for _start, _end, text in segments))
    assert "output_json: saving output to 'jfk.flac.json'" in done.stderr
    assert "whisper_print_progress_callback: progress = 100%" in done.stderr  # -pp


def test_output_file_names_the_srt_and_unhonoured_flags_warn(tmp_path):
    """`whisperdrop whisper-cli -osrt -of out jfk.flac -fa -nf` writes out.srt (and nothing named after the
    input), warns naming -fa and -nf, and with -np prints only the transcript."""
    shutil.copy(JFK, tmp_path / "jfk.flac")
    done = drop_in("-osrt", "-of", "out", "jfk.flac", "-fa", "-nf", "-np",
                   cwd=tmp_path, config=_config(tmp_path), subcommand=True)
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["jfk.flac", "out.srt", "whisperdrop.yaml"]
    srt = (tmp_path / "out.srt").read_text()
    blocks = [block.split("\n") for block in srt.strip("\n").split("\n\n")]
    assert [block[0] for block in blocks] == [str(number) for number in range(1, len(blocks) + 1)]
    assert blocks[0][1].startswith("00:00:00,000 --> ") and all(" --> " in block[1] for block in blocks)
    assert word_error_rate(jfk_reference(), " ".join(" ".join(block[2:]) for block in blocks)) <= 0.10
    assert "-fa (--flash-attn) is not honoured" in done.stderr and "-nf (--no-fallback) is not honoured" in done.stderr
    assert "saving output" not in done.stderr and "[00:00:00.000 --> " in done.stdout


def test_a_non_media_file_fails_with_a_nonzero_status(tmp_path):
    """A file that is not media: an error naming it on stderr and status 1, after the good file is done."""
    shutil.copy(JFK, tmp_path / "jfk.flac")
    (tmp_path / "notes.wav").write_text("not audio")
    done = drop_in("-otxt", "-f", "notes.wav", "-f", "jfk.flac", cwd=tmp_path, config=_config(tmp_path))
    assert done.returncode == 1
    assert "error: failed to process audio file 'notes.wav'" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "jfk.flac.txt").exists() and not (tmp_path / "notes.wav.txt").exists()


def test_usage_errors_exit_nonzero_without_transcribing(tmp_path):
    """An unknown flag (status 2, with the usage), an unknown model (status 3) and a missing file (status 1)
    are refused with whisper-cli's wording, no traceback, nothing written; -h shows the usage with 0."""
    config = _config(tmp_path)
    unknown = drop_in("-f", "jfk.flac", "--frobnicate", cwd=tmp_path, config=config)
    assert unknown.returncode == 2 and "error: unknown argument: --frobnicate" in unknown.stderr
    assert "usage: whisperdrop-whisper-cli" in unknown.stderr
    model = drop_in("-m", "ggml-nonsense.bin", "-f", str(JFK), cwd=tmp_path, config=config)
    assert model.returncode == 3 and "ggml-nonsense.bin" in model.stderr
    missing = drop_in("-f", "gone.wav", cwd=tmp_path, config=config)
    assert missing.returncode == 1 and "error: input file not found 'gone.wav'" in missing.stderr
    helped = drop_in("-h", cwd=tmp_path, config=config, subcommand=True)
    assert helped.returncode == 0 and "--output-json-full" in helped.stderr and "--flash-attn" in helped.stderr
    for done in (unknown, model, missing, helped):
        assert "Traceback" not in done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["whisperdrop.yaml"]


def test_gpu_host_first_then_the_local_fallback(sshd, tmp_path):
    """With a GPU host (real sshd, real runner) the drop-in's JSON comes from it; with its sshd down the
    same command is served by the local CPU, and both the JSON's systeminfo and stderr name the fallback."""
    from test_remote import FAST_REMOTE, RunnerProcess

    runner = RunnerProcess(tmp_path, sshd.spool).start()
    try:
        shutil.copy(JFK, tmp_path / "jfk.flac")
        config = _config(tmp_path, transcription={"provider": "auto"},
                         remote={**FAST_REMOTE, "hosts": [sshd.host_settings()]})
        remote = drop_in("-m", "ggml-tiny.en.bin", "-oj", "-of", "remote", "jfk.flac", cwd=tmp_path, config=config)
        assert remote.returncode == 0, remote.stderr
        document = json.loads((tmp_path / "remote.json").read_text())
        assert "route = remote" in document["systeminfo"] and "host = testhost" in document["systeminfo"]
        assert "transcribed on GPU host testhost" in remote.stderr
        assert len(runner.events("runner.job_done")) == 1
        sshd.stop()
        local = drop_in("-m", "ggml-tiny.en.bin", "-oj", "-of", "local", "jfk.flac", cwd=tmp_path, config=config)
        assert local.returncode == 0, local.stderr
        fallback = json.loads((tmp_path / "local.json").read_text())
        assert "route = local" in fallback["systeminfo"] and "fallback = " in fallback["systeminfo"]
        assert "transcribed on the local CPU" in local.stderr and "(fallback: " in local.stderr
        for made in (document, fallback):
            text = " ".join(item["text"] for item in made["transcription"])
            assert word_error_rate(jfk_reference(), text) <= 0.10
    finally:
        runner.stop()
