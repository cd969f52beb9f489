"""Security: nothing from outside (file names, spool documents, a GPU host) reaches a shell or a path
outside the outbox, and files that others could change are reported.

Covered elsewhere, not repeated here:
- a changed or unknown host key is refused and never added: tests/test_transfer.py
  (test_unknown_host_key_is_refused_and_never_added, test_changed_host_key_is_refused,
  test_missing_known_hosts_file_is_a_host_key_error) and, end to end with a fallback to the local
  CPU, tests/test_remote.py::test_host_key_mismatch_is_refused_and_falls_back;
- a chrooted, SFTP-only account (ForceCommand internal-sftp) takes uploads and cannot run a command:
  tests/test_transfer.py::test_chrooted_sftp_only_account_uploads_and_cannot_run_commands;
- remote paths carry only checked job ids: tests/test_transfer.py::test_remote_paths_carry_only_job_ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon_helpers import Daemon, jfk_reference, word_error_rate, write_variant_wav
from whisperdrop.daemon.transfer import Host
from whisperdrop.shared import config as config_module, config_checks, spool

JOB = hashlib.sha256(b"security job").hexdigest()

# Each name, if it ever reached `sh -c`, would create a canary file (or remove the canary folder).
# A name cannot hold '/', so the one with an absolute path is a nested path: the folders "$(touch ",
# "<tmp>" ... and the file "pwned-abs).wav"; its relative path reads as the command.
SHELL_NAMES = [
    "$(touch pwned-dollar).wav",
    "`touch pwned-backtick`.wav",
    "x; rm -rf canary-dir; touch pwned-semicolon.wav",
    "it's \"quoted\" 'twice'.wav",
    "a | touch pwned-pipe.wav",
    "a & touch pwned-amp &.wav",
    "*.wav",
    "$(touch ${HOME}/pwned-home) && echo > pwned-redirect.wav",
]
CANARIES = ["pwned-dollar", "pwned-backtick", "pwned-semicolon", "pwned-pipe", "pwned-amp", "pwned-home",
            "pwned-redirect", "pwned-abs"]


def drop_named(daemon: Daemon, relative: str, index: int) -> None:
    """Write a distinct jfk WAV under a temporary name, then rename it to `relative` in the inbox."""
    target = daemon.inbox / relative
    temporary = write_variant_wav(daemon.root / "staging" / f"{index}.wav", 100 + index)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(temporary, target)


def canaries_found(places: list[Path]) -> list[str]:
    """Canary files that exist in any of `places` (searched recursively, outbox and archive excluded)."""
    found = []
    for place in places:
        for name in CANARIES:
            if (place / name).exists():
                found.append(str(place / name))
    return found


def check_transcripts(daemon: Daemon, names: list[str]) -> None:
    """Every name gives `<stem>.json` (right words, right source path) in the outbox and is archived."""
    for name in names:
        stem = name[: -len(".wav")]
        path = daemon.outbox / f"{stem}.json"
        daemon.wait_for(path.exists, timeout=240, what=f"outbox/{stem}.json")
        result = json.loads(path.read_text())
        assert result["source"]["path"] == name
        assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
        daemon.wait_for(lambda: (daemon.archive / name).exists(), what=f"archive/{name}")


def test_shell_metacharacters_in_names_never_reach_a_shell(tmp_path):
    """Names with $(), backticks, ;, quotes, |, & and * are transcribed under the same stems and run nothing."""
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon")
    (daemon.root / "canary-dir").mkdir()
    absolute = f"$(touch {tmp_path}/pwned-abs).wav"  # nested folders; the relative path reads as a command
    names = SHELL_NAMES + [absolute]
    daemon.start()
    try:
        for index, name in enumerate(names):
            drop_named(daemon, name, index)
        check_transcripts(daemon, names)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    places = [daemon.root, daemon.inbox, tmp_path, Path.cwd(), Path.home(), Path("/tmp"), Path("/")]
    assert canaries_found(places) == []
    assert (daemon.root / "canary-dir").is_dir()
    assert sorted(path.relative_to(daemon.outbox).as_posix() for path in daemon.outputs()) == sorted(
        name[: -len(".wav")] + ".json" for name in names)


@pytest.mark.slow
@pytest.mark.needs_sshd
def test_shell_metacharacters_in_names_never_reach_a_shell_on_the_remote_route(sshd, tmp_path):
    """Over the remote route (real sshd, real runner) the same names give transcripts and run nothing."""
    from test_remote import FAST_REMOTE, RunnerProcess  # the runner process used by the remote end-to-end tests

    runner = RunnerProcess(tmp_path, sshd.spool).start()
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", remote={**FAST_REMOTE, "hosts": [sshd.host_settings()]},
                    transcription={"provider": "remote"})
    (daemon.root / "canary-dir").mkdir()
    names = SHELL_NAMES[:4] + [SHELL_NAMES[7]]
    try:
        daemon.start()
        for index, name in enumerate(names):
            drop_named(daemon, name, 20 + index)
        check_transcripts(daemon, names)
        for name in names:
            result = json.loads((daemon.outbox / f"{name[:-len('.wav')]}.json").read_text())
            assert result["executed_on"]["route"] == "remote", result["executed_on"]
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        runner.stop()
    assert len(runner.events("runner.job_done")) == len(names)
    places = [daemon.root, daemon.inbox, tmp_path, sshd.spool, sshd.base, Path.cwd(), Path.home(), Path("/tmp")]
    assert canaries_found(places) == []
    assert (daemon.root / "canary-dir").is_dir()


# -- documents from outside cannot name a path outside their folder ----------------------------------


UNSAFE_PATHS = ["../x", "../../etc/x", "/etc/passwd", "a/../../b", "a/./b", "./a", "a//b", "a/", "", "..",
                "a\x00b", "/"]


@pytest.mark.parametrize("value", UNSAFE_PATHS)
def test_check_relative_path_rejects_escapes(value):
    """check_relative_path() refuses absolute paths, '..' and '.' components, empty parts and NUL bytes."""
    with pytest.raises(spool.ProtocolError):
        spool.check_relative_path(value)


@pytest.mark.parametrize("value", ["a.wav", "sub/a.wav", "..a.wav", "a..b/c...wav", "$(x)/`y`.wav"])
def test_check_relative_path_accepts_names_below_the_base(value):
    """check_relative_path() accepts paths that stay below their base, dots and metacharacters included."""
    assert spool.check_relative_path(value) == value


def result_with_path(path) -> dict:
    return {"schema": spool.RESULT_SCHEMA, "job_id": JOB, "text": "hello",
            "segments": [{"start": 0.0, "end": 1.0, "text": "hello"}],
            "source": {"path": path, "size": 1, "sha256": "0" * 64}}


@pytest.mark.parametrize("value", ["../../etc/x", "/etc/x", "a/../../x", ""])
def test_result_with_an_escaping_source_path_is_rejected(value):
    """check_result() rejects a Result whose source.path is absolute or climbs out with '..'."""
    with pytest.raises(spool.ProtocolError):
        spool.check_result(result_with_path(value), JOB)


def job_document(**changes) -> dict:
    document = spool.make_job_document(JOB, spool.TranscribeOptions(), 10, "0" * 64, 1.0, "talk.mp4", 0.0)
    document.update(changes)
    return document


@pytest.mark.parametrize("changes", [
    {"source_name": "../../etc/x"},
    {"source_name": "/etc/passwd"},
    {"source_name": "a\x00b"},
    {"job_id": "../../etc/passwd"},
    {"job_id": "/" + "0" * 63},
    {"job_id": JOB.upper()},
    {"job_id": JOB + "\n"},  # a regex "$" matches before a trailing newline
    {"schema": "whisperdrop.job/0"},
    {"options": {"model": "tiny", "evil": "$(id)"}},
])
def test_job_document_with_unsafe_fields_is_rejected(changes):
    """parse_job() rejects a job document whose id or source_name could name a path, or with unknown options."""
    with pytest.raises(spool.ProtocolError):
        spool.parse_job(job_document(**changes))


@pytest.mark.parametrize("value", ["../runner", "a/b", "", ".hidden", "x" * 65, "a\x00", "gpu0\n"])
def test_runner_names_that_could_escape_runners_are_rejected(value):
    """check_runner_name() allows only plain names, so a heartbeat stays in runners/."""
    with pytest.raises(spool.ProtocolError):
        spool.check_runner_name(value)


@pytest.mark.needs_sshd
@pytest.mark.parametrize("value", ["../../etc/x", "/etc/x"])
def test_malicious_result_fetched_from_a_host_is_rejected(sshd, tmp_path, value):
    """A Result on the GPU host whose source.path escapes is refused by fetch_result(); nothing is written."""
    results = sshd.spool / "results"
    results.mkdir()
    (results / f"{JOB}.json").write_text(json.dumps(result_with_path(value)))
    local = tmp_path / "local"
    local.mkdir()

    async def scenario():
        host = Host(sshd.host_settings(), connect_timeout=5.0, keepalive_interval=5.0)
        try:
            with pytest.raises(spool.ProtocolError, match="unsafe path"):
                await host.fetch_result(JOB, local / "result.json")
        finally:
            await host.close()

    asyncio.run(scenario())
    assert list(local.iterdir()) == []
    assert not Path("/etc/x").exists()


# -- files that others can change ------------------------------------------------------------------


def secured_config(tmp_path: Path) -> Path:
    """A config file naming a key and a known_hosts file, all with safe modes (600 / 644)."""
    key, known_hosts = tmp_path / "id_ed25519", tmp_path / "known_hosts"
    key.write_text("not really a key\n")
    known_hosts.write_text("[127.0.0.1]:2222 ssh-ed25519 AAAA\n")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"remote": {"hosts": [{"name": "gpu1", "host": "127.0.0.1", "key": str(key),
                                                          "known_hosts": str(known_hosts)}]}}))
    key.chmod(0o600)
    known_hosts.chmod(0o644)
    path.chmod(0o644)
    return path


def test_secure_files_give_no_warning(tmp_path):
    """insecure_files() is empty when the config and known_hosts are 644 and the key 600."""
    assert config_checks.insecure_files(config_module.load(secured_config(tmp_path))) == []


@pytest.mark.parametrize("name, mode, fix", [
    ("config.yaml", 0o666, "chmod go-w"),
    ("config.yaml", 0o664, "chmod go-w"),
    ("known_hosts", 0o646, "chmod go-w"),
    ("id_ed25519", 0o644, "chmod 600"),
    ("id_ed25519", 0o620, "chmod 600"),
])
def test_insecure_files_are_named_with_the_fix(tmp_path, name, mode, fix):
    """A group/world-writable config or known_hosts, or a key others can read, gives one warning naming it and the chmod."""
    path = secured_config(tmp_path)
    (tmp_path / name).chmod(mode)
    warnings = config_checks.insecure_files(config_module.load(path))
    assert len(warnings) == 1, warnings
    assert str(tmp_path / name) in warnings[0] and f"{fix} {tmp_path / name}" in warnings[0]


def test_check_config_prints_the_warning(tmp_path):
    """`whisperdrop check-config` prints the insecure-file warning on stderr."""
    path = secured_config(tmp_path)
    path.chmod(0o666)
    completed = subprocess.run([sys.executable, "-m", "whisperdrop", "check-config", "-c", str(path)],
                               capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert f"chmod go-w {path}" in completed.stderr, completed.stderr


def test_run_prints_the_warning_at_start_up(tmp_path):
    """`whisperdrop run` with a world-writable config warns on stderr at start-up, then runs."""
    daemon = Daemon(tmp_path)
    daemon.config_path.chmod(0o666)
    try:
        daemon.start()
        assert f"chmod go-w {daemon.config_path}" in daemon.tail(200)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
