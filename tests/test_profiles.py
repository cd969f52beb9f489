"""Per-folder profiles: the glob matcher, the Plan of a job (options, formats, profile), check-config's
checks of profiles and the translate task, and a running daemon giving a file in inbox/bjj/ its
profile's prompt and hotwords while a file in inbox/ keeps the defaults."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon_helpers import Daemon
from test_remote import gpu_host  # noqa: F401  (a fixture: a real sshd and a runner behind it)
from media import JFK
from whisperdrop.shared import config as config_module, profiles, spool
from whisperdrop.shared.spool import job_id

BJJ = {"name": "bjj", "match": ["bjj/**"], "initial_prompt": "Jiu-jitsu class: kimura, berimbolo.",
       "hotwords": "kimura berimbolo", "outputs": ["srt"]}


def load(tmp_path: Path, data: dict) -> config_module.Config:
    return config_module.validate(data, tmp_path)


# the glob matcher


@pytest.mark.parametrize("pattern, path, expected", [
    ("bjj/**", "bjj/a.mp3", True),
    ("bjj/**", "bjj/x/y.mp4", True),
    ("bjj/**", "a.mp3", False),
    ("bjj/**", "bjjx/a.mp3", False),
    ("bjj/**", "other/bjj/a.mp3", False),
    ("**/*.mp3", "a.mp3", True),
    ("**/*.mp3", "x/y/a.mp3", True),
    ("**/*.mp3", "x/a.mp4", False),
    ("*.mp3", "a.mp3", True),
    ("*.mp3", "x/a.mp3", False),
    ("a/**/b.wav", "a/b.wav", True),
    ("a/**/b.wav", "a/x/y/b.wav", True),
    ("a/**/b.wav", "a/x/c.wav", False),
    ("class-?.wav", "class-1.wav", True),
    ("class-?.wav", "class-12.wav", False),
    ("[ab]*/**", "art/x.wav", True),
    ("[!ab]*/**", "art/x.wav", False),
    ("[!ab]*/**", "cat/x.wav", True),
    ("talks (2024)/*.m4a", "talks (2024)/one.m4a", True),
    ("a+b/*", "a+b/c", True),
    ("a+b/*", "aab/c", False),
    ("BJJ/**", "bjj/a.mp3", False),
    ("**", "anything/at/all.wav", True),
])
def test_globs_match_whole_inbox_relative_paths(pattern, path, expected):
    """`*` and `?` stay in one folder level, `**` spans folders (also none), regex characters are literal."""
    assert profiles.glob_matches(pattern, path) is expected


@pytest.mark.parametrize("pattern", ["/inbox/bjj/**", "../bjj/**", "./bjj/**", "bjj//**", "bjj/", "bjj\\**"])
def test_globs_that_can_never_match_are_named(pattern):
    """An absolute path, '.', '..', an empty folder name or a backslash can never match a relative path."""
    assert profiles.glob_problem(pattern)
    assert profiles.glob_problem("bjj/**") is None


def test_the_output_formats_are_the_outboxes():
    """The formats a profile or a request may name are the ones the outbox renders."""
    from whisperdrop.daemon.outbox import FORMATS

    assert profiles.OUTPUT_FORMATS == FORMATS


# the Plan


def test_the_first_matching_profile_wins_and_overrides_transcription(tmp_path):
    """A file's Plan has the first matching profile's options and outputs, and names it; others keep the defaults."""
    second = {"name": "all-mp3", "match": ["**/*.mp3"], "language": "de", "model": "small"}  # multilingual: German
    config = load(tmp_path, {"transcription": {"language": "en", "outputs": ["srt", "vtt", "txt"]},
                             "profiles": [BJJ, second]})
    plan = profiles.plan(config, relpath="bjj/class 1.mp3")
    assert plan.profile == "bjj"
    assert (plan.options.initial_prompt, plan.options.hotwords, plan.options.language) == (
        BJJ["initial_prompt"], BJJ["hotwords"], "en")
    assert plan.formats == ("srt",)
    assert profiles.plan(config, relpath="talk.mp3").profile == "all-mp3"
    plain = profiles.plan(config, relpath="talk.wav")
    assert (plain.profile, plain.options.initial_prompt, plain.formats) == (None, None, ("srt", "vtt", "txt"))


def test_a_profile_changes_the_job_id_unless_it_changes_only_outputs(tmp_path):
    """The job id is hashed over the effective options: bjj/ and the inbox's top are two jobs; outputs alone are not."""
    outputs_only = {"name": "txt", "match": ["txt/**"], "outputs": ["txt"]}
    config = load(tmp_path, {"profiles": [BJJ, outputs_only]})
    digest = "0" * 64
    top = job_id(digest, profiles.plan(config, relpath="a.wav").options)
    assert job_id(digest, profiles.plan(config, relpath="bjj/a.wav").options) != top
    assert job_id(digest, profiles.plan(config, relpath="txt/a.wav").options) == top


def test_a_named_profile_and_request_overrides(tmp_path):
    """A request names a profile (whatever the path) and may override options on top; `auto` detects the language."""
    config = load(tmp_path, {"transcription": {"language": "en"}, "profiles": [BJJ]})
    plan = profiles.plan(config, relpath="elsewhere.wav", profile="bjj",
                         overrides={"language": "auto", "task": "translate", "model": "small", "beam_size": 2,
                                    "outputs": ["json", "vtt"]})
    assert plan.profile == "bjj"
    assert (plan.options.language, plan.options.task, plan.options.beam_size) == (None, "translate", 2)
    assert plan.options.hotwords == BJJ["hotwords"]
    assert plan.formats == ("vtt",)  # json is always written


def test_an_unknown_profile_names_the_known_ones(tmp_path):
    """Naming a profile the config lacks is a clear error that lists the profiles there are."""
    config = load(tmp_path, {"profiles": [BJJ]})
    with pytest.raises(profiles.ProfileError, match="unknown profile 'judo'.*'bjj'"):
        profiles.plan(config, profile="judo")
    with pytest.raises(profiles.ProfileError, match="no `profiles`"):
        profiles.plan(load(tmp_path, {}), profile="judo")


def test_bad_overrides_are_named(tmp_path):
    """An unknown option, task or output format in a request is an error that names it."""
    config = load(tmp_path, {})
    with pytest.raises(profiles.ProfileError, match="unknown option"):
        profiles.plan(config, overrides={"patience": 2})
    with pytest.raises(profiles.ProfileError, match="temperature must be"):
        profiles.plan(config, overrides={"temperature": 1.5})
    assert profiles.plan(config, overrides={"temperature": 0.4}).options.temperature == 0.4
    with pytest.raises(profiles.ProfileError, match="task 'summarise'"):
        profiles.plan(config, overrides={"task": "summarise"})
    with pytest.raises(profiles.ProfileError, match="output format.*docx"):
        profiles.plan(config, overrides={"outputs": ["docx"]})
    with pytest.raises(profiles.ProfileError, match="bundled:tiny.en is English-only and cannot translate"):
        profiles.plan(config, overrides={"task": "translate"})


def test_a_temperature_is_another_job_and_reaches_the_runner_whole(tmp_path):
    """No temperature keeps the job id a job had before the option existed; a sampling temperature is
    another job, and the job document the runner reads carries it; one out of range is refused there."""
    config = load(tmp_path, {})
    plain = profiles.plan(config).options
    sampled = profiles.plan(config, overrides={"temperature": 0.4}).options
    canonical = json.dumps(plain.to_dict(), sort_keys=True, separators=(",", ":"))
    assert "temperature" not in plain.to_dict()
    assert spool.job_id("f" * 64, plain) == hashlib.sha256(f"{'f' * 64}\n{canonical}".encode()).hexdigest()
    assert spool.job_id("f" * 64, sampled) != spool.job_id("f" * 64, plain)
    document = spool.make_job_document("a" * 64, sampled, 1, "b" * 64, 1.0, "talk.opus", 0.0)
    assert spool.parse_job(json.loads(json.dumps(document))).options == sampled
    document["options"]["temperature"] = 3
    with pytest.raises(spool.ProtocolError, match="temperature must be"):
        spool.parse_job(document)


def test_a_route_plan_puts_the_local_model_in(tmp_path):
    """`planned` (the router's) has the last word on the options, as for every other job."""
    config = load(tmp_path, {"profiles": [{**BJJ, "model": "large-v3"}]})
    plan = profiles.plan(config, relpath="bjj/a.wav", planned=lambda options: options.__class__(
        **{**options.to_dict(), "model": "bundled:tiny.en"}))
    assert plan.options.model == "bundled:tiny.en"
    assert plan.options.hotwords == BJJ["hotwords"]


# check-config


def test_match_takes_one_glob_or_a_list_and_each_mistake_gets_one_message(tmp_path):
    """`match: "bjj/**"` is read as the list ["bjj/**"]; a match of the wrong type or empty, or none at all,
    gets exactly one message that names profiles[0].match."""
    one = load(tmp_path, {"profiles": [{**BJJ, "match": "bjj/**"}]})
    assert one.profiles[0].match == ["bjj/**"]
    assert profiles.plan(one, relpath="bjj/a.mp3").profile == "bjj"
    assert profiles.plan(one, relpath="a.mp3").profile is None
    for wrong in (5, True, {"glob": "bjj/**"}, [], "", ["bjj/**", 7], None):
        with pytest.raises(config_module.ConfigError) as caught:
            load(tmp_path, {"profiles": [{"name": "bjj", "match": wrong}]})
        assert len(caught.value.problems) == 1, (wrong, caught.value.problems)
        assert caught.value.problems[0].startswith("At 'profiles[0].match': "), caught.value.problems


def test_check_names_a_glob_that_can_never_match_and_translate_with_an_english_model(tmp_path):
    """check() flags an absolute glob, and translate where the model doing it is English-only."""
    config = load(tmp_path, {"profiles": [{"name": "abs", "match": ["/srv/inbox/bjj/**"]},
                                          {"name": "fr", "match": ["fr/**"], "task": "translate"}]})
    problems = profiles.check(config)
    assert any("profiles[0].match[0]" in problem and "absolute" in problem for problem in problems), problems
    assert any("profiles[1]" in problem and "English-only" in problem and "local.model" in problem
               for problem in problems), problems
    assert profiles.check(load(tmp_path, {"profiles": [BJJ]})) == []


def test_translate_with_a_multilingual_host_model_but_english_only_fallback_is_accepted(tmp_path):
    """With GPU hosts, a multilingual transcription.model may translate; an English-only one is named."""
    host = {"name": "gpu", "host": "gpu.example.org"}
    good = load(tmp_path, {"transcription": {"task": "translate", "model": "large-v3"}, "remote": {"hosts": [host]}})
    assert profiles.check(good) == []
    bad = load(tmp_path, {"transcription": {"task": "translate", "model": "medium.en"}, "remote": {"hosts": [host]}})
    assert any("medium.en" in problem and "transcription.model" in problem for problem in profiles.check(bad))


def test_check_config_reports_profile_problems(tmp_path):
    """`whisperdrop check-config` lists a profile's impossible glob and exits non-zero, without a traceback."""
    (tmp_path / "inbox").mkdir()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"profiles": [{"name": "abs", "match": ["/bjj/**"]}],
                                    "transcription": {"task": "translate"}}))
    done = subprocess.run([sys.executable, "-m", "whisperdrop", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "profiles[0].match[0]" in done.stderr and "absolute" in done.stderr
    assert "English-only" in done.stderr and "Traceback" not in done.stderr


# the daemon


def test_a_file_in_a_profiles_folder_gets_its_prompt_and_hotwords(tmp_path):
    """inbox/bjj/ gets the bjj profile's prompt, hotwords and outputs, and the Result names it; inbox/ does not."""
    daemon = Daemon(tmp_path, transcription={"provider": "local"}, profiles=[BJJ], after_success="keep")
    (daemon.inbox / "bjj").mkdir()
    shutil.copy(JFK, daemon.inbox / "bjj" / "jfk.flac")
    shutil.copy(JFK, daemon.inbox / "jfk.flac")
    daemon.start()
    try:
        daemon.wait_for(lambda: len(daemon.outputs()) == 2, timeout=300, what="both Results in the outbox")
    finally:
        daemon.stop()
    bjj = json.loads((daemon.outbox / "bjj" / "jfk.json").read_text())
    top = json.loads((daemon.outbox / "jfk.json").read_text())
    assert bjj["profile"] == "bjj"
    assert (bjj["options"]["initial_prompt"], bjj["options"]["hotwords"]) == (BJJ["initial_prompt"], BJJ["hotwords"])
    assert top["profile"] is None
    assert (top["options"]["initial_prompt"], top["options"]["hotwords"]) == (None, None)
    assert bjj["job_id"] != top["job_id"]
    assert sorted(path.name for path in (daemon.outbox / "bjj").iterdir()) == ["jfk.json", "jfk.srt"]
    assert {path.name for path in daemon.outbox.iterdir() if path.is_file()} == {
        "jfk.json", "jfk.srt", "jfk.vtt", "jfk.txt"}
    assert "country" in bjj["text"] and "country" in top["text"]


def test_a_profiles_options_travel_to_the_gpu_host(gpu_host, tmp_path):
    """Through the remote route (real sshd, real runner) the profile's prompt and hotwords reach the
    runner in the job document: the runner's Result shows them, and names the profile."""
    from test_remote import remote_daemon, result_of

    server, runner = gpu_host
    (tmp_path / "daemon").mkdir()
    daemon = remote_daemon(tmp_path, server.host_settings())
    daemon.config_path.write_text(yaml.safe_dump({**yaml.safe_load(daemon.config_path.read_text()),
                                                  "profiles": [BJJ]}))
    daemon.start()
    try:
        (daemon.inbox / "bjj").mkdir()
        shutil.copy(JFK, daemon.inbox / "bjj" / "jfk.flac")
        result = result_of(daemon, "bjj/jfk", timeout=300)
    finally:
        assert daemon.stop() == 0
    assert result["executed_on"]["route"] == "remote" and result["profile"] == "bjj"
    assert (result["options"]["initial_prompt"], result["options"]["hotwords"]) == (BJJ["initial_prompt"], BJJ["hotwords"])
    assert len(runner.events("runner.job_done")) == 1
