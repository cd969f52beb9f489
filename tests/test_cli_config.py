"""`check-config` and `run` agree (issue 13, items 2 and 6): one validation, run through the CLI as a
user would; checking writes nothing; a runner config is checked as one; key files are checked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon_helpers import REPO


def whisperdrop(*arguments: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisperdrop", *arguments], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def tree(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def readme_runner_yaml() -> dict:
    """The runner.yaml of the GPU host guide (docs/gpu-host.md), parsed."""
    guide = (REPO / "docs" / "gpu-host.md").read_text()
    block = re.search(r"`/etc/whisperdrop/runner.yaml`:\n\n```yaml\n(.*?)```", guide, re.S)
    assert block, "docs/gpu-host.md no longer shows runner.yaml"
    return yaml.safe_load(block.group(1))


def test_default_config_in_a_new_folder_checks_ok_and_writes_nothing(tmp_path):
    """`default-config > dc.yaml; check-config -c dc.yaml` in a new folder is OK (run would make the
    default inbox) and leaves the folder exactly as it was."""
    (tmp_path / "dc.yaml").write_text(whisperdrop("default-config", cwd=tmp_path).stdout)
    done = whisperdrop("check-config", "-c", "dc.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout and "inbox" in done.stdout
    assert tree(tmp_path) == ["dc.yaml"]


def test_check_config_with_problems_writes_nothing(tmp_path):
    """A config whose named inbox is missing fails check-config, names the inbox, and creates no folder."""
    (tmp_path / "config.yaml").write_text("inbox: /nonexistent/whisperdrop-inbox\noutbox: out\nstate_dir: st\n")
    done = whisperdrop("check-config", "-c", "config.yaml", cwd=tmp_path)
    assert done.returncode == 1
    assert "At 'inbox'" in done.stderr and "/nonexistent/whisperdrop-inbox" in done.stderr
    assert tree(tmp_path) == ["config.yaml"]


def test_folder_that_cannot_be_created_fails_both(tmp_path):
    """An outbox under a file (it can never be made) fails check-config and run alike, naming 'outbox'."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / "blocker").write_text("")
    (tmp_path / "config.yaml").write_text("outbox: blocker/out\n")
    checked = whisperdrop("check-config", "-c", "config.yaml", cwd=tmp_path)
    ran = whisperdrop("run", "-c", "config.yaml", cwd=tmp_path)
    assert checked.returncode == 1 and ran.returncode == 2
    for done in (checked, ran):
        assert "At 'outbox'" in done.stderr and "blocker" in done.stderr, done.stderr
    assert tree(tmp_path) == ["blocker", "config.yaml", "inbox"]


def test_remote_provider_without_hosts_fails_check_config_like_run(tmp_path):
    """`provider: remote` with no GPU host fails check-config with the same message run gives."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / "config.yaml").write_text("transcription:\n  provider: remote\n")
    checked = whisperdrop("check-config", "-c", "config.yaml", cwd=tmp_path)
    ran = whisperdrop("run", "-c", "config.yaml", cwd=tmp_path)
    assert checked.returncode == 1 and ran.returncode == 2
    expected = "At 'transcription.provider': 'remote' needs at least one entry in 'remote.hosts'"
    assert expected in checked.stderr and expected in ran.stderr


def test_readme_runner_yaml_is_checked_as_a_runner_config(tmp_path):
    """The GPU host guide's runner.yaml (spool pointed here) checks OK as a runner config, says so, and says
    nothing about an inbox; `run` with it refuses and points at `whisperdrop runner`."""
    settings = readme_runner_yaml()
    settings["runner"]["spool"] = str(tmp_path / "spool")
    (tmp_path / "runner.yaml").write_text(yaml.safe_dump(settings))
    checked = whisperdrop("check-config", "-c", "runner.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "runner" in checked.stdout and str(tmp_path / "spool") in checked.stdout
    assert "inbox" not in checked.stdout + checked.stderr
    assert tree(tmp_path) == ["runner.yaml"]
    ran = whisperdrop("run", "-c", "runner.yaml", cwd=tmp_path)
    assert ran.returncode == 2 and "whisperdrop runner -c" in ran.stderr
    assert tree(tmp_path) == ["runner.yaml"]


def test_runner_spool_that_cannot_be_created_fails_the_runner_check(tmp_path):
    """A runner config whose spool lies under a file fails check-config naming 'runner.spool'."""
    (tmp_path / "blocker").write_text("")
    (tmp_path / "runner.yaml").write_text("runner:\n  spool: blocker/spool\n")
    done = whisperdrop("check-config", "-c", "runner.yaml", cwd=tmp_path)
    assert done.returncode == 1 and "At 'runner.spool'" in done.stderr


def _host_config(tmp_path: Path, **host) -> Path:
    (tmp_path / "inbox").mkdir(exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"remote": {"hosts": [{"name": "gpu1", "host": "127.0.0.1", "port": 9, **host}]}}))
    path.chmod(0o600)
    return path


def test_public_key_given_as_key_is_named_as_such(tmp_path):
    """A `.pub` file given as a host's key is reported as a public key, naming the private key beside it,
    by check-config, run and doctor, not as "a private key that others can read"."""
    private, public = tmp_path / "id_ed25519", tmp_path / "id_ed25519.pub"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n...\n-----END OPENSSH PRIVATE KEY-----\n")
    private.chmod(0o600)
    public.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummy user@host\n")
    public.chmod(0o644)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    config = _host_config(tmp_path, key=str(public), known_hosts=str(known_hosts))
    checked = whisperdrop("check-config", "-c", str(config), cwd=tmp_path)
    ran = whisperdrop("run", "-c", str(config), cwd=tmp_path)
    doctor = whisperdrop("doctor", "-c", str(config), "--timeout", "2", cwd=tmp_path)
    assert checked.returncode == 1 and ran.returncode == 2 and doctor.returncode == 1
    for output in (checked.stderr, ran.stderr, doctor.stdout):
        assert "At 'remote.hosts[0].key'" in output and "is a public key" in output, output
        assert f"the private key is probably {private}" in output, output
        assert "private key that group or others can access" not in output


def test_missing_key_and_known_hosts_files_are_flagged_at_once(tmp_path):
    """A key file and a known_hosts file that do not exist fail check-config and run, each named, and
    doctor lists them among its config checks."""
    config = _host_config(tmp_path, key=str(tmp_path / "no-key"), known_hosts=str(tmp_path / "no-known-hosts"))
    checked = whisperdrop("check-config", "-c", str(config), cwd=tmp_path)
    ran = whisperdrop("run", "-c", str(config), cwd=tmp_path)
    doctor = whisperdrop("doctor", "-c", str(config), "--timeout", "2", cwd=tmp_path)
    assert checked.returncode == 1 and ran.returncode == 2 and doctor.returncode == 1
    for output in (checked.stderr, ran.stderr, doctor.stdout):
        assert f"At 'remote.hosts[0].key': {str(tmp_path / 'no-key')!r} does not exist" in output, output
        assert f"At 'remote.hosts[0].known_hosts': {str(tmp_path / 'no-known-hosts')!r} does not exist" in output


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_named_inbox_that_is_missing_fails_both(tmp_path, command):
    """An inbox the config names (not the default) that is missing fails both commands: a typo or an
    unmounted disk must not be papered over with a fresh empty folder."""
    (tmp_path / "config.yaml").write_text(f"inbox: {tmp_path / 'drop'}\n")
    done = whisperdrop(command, "-c", "config.yaml", cwd=tmp_path)
    assert done.returncode != 0 and "At 'inbox'" in done.stderr and "does not exist" in done.stderr
    assert not (tmp_path / "drop").exists()


def test_runner_refuses_the_spool_check_config_refuses(tmp_path):
    """`whisperdrop runner` with a spool that can never be made exits 2 with check-config's message."""
    (tmp_path / "blocker").write_text("")
    (tmp_path / "runner.yaml").write_text("runner:\n  spool: blocker/spool\n  model: bundled:tiny.en\n  device: cpu\n")
    checked = whisperdrop("check-config", "-c", "runner.yaml", cwd=tmp_path)
    ran = whisperdrop("runner", "-c", "runner.yaml", cwd=tmp_path)
    assert checked.returncode == 1 and ran.returncode == 2
    message = next(line for line in checked.stderr.splitlines() if "At 'runner.spool'" in line)
    assert message in ran.stderr, ran.stderr
