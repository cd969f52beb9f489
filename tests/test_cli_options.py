"""The command line as people type it (issue 22, item 4): `--help` lists every command, and the
common options (-c, -v, --log-format) are taken before the command as well as after it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from whisperdrop.cli import commands


def whisperdrop(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisperdrop", *arguments], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def every_command() -> list[str]:
    """The commands the parser dispatches, read from the parser itself."""
    parser = commands.build_parser()
    action = next(action for action in parser._actions if action.dest == "command")
    return list(action.choices)


def test_help_synopsis_lists_every_command(tmp_path):
    """The synopsis at the top of `whisperdrop --help` (before the per-command list) names every
    command, default-config, whisper-cli and slurm-task included."""
    done = whisperdrop("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    synopsis = done.stdout.split("positional arguments:")[0]
    names = every_command()
    assert {"default-config", "whisper-cli", "slurm-task", "run", "status"} <= set(names)
    listed = " ".join(synopsis.split()).split(" | ")
    assert all(any(name in part.split() for part in listed) for name in names), synopsis


def write_config(folder: Path, name: str) -> Path:
    """A config file whose inbox is a folder of its own, so its check-config verdict names it."""
    (folder / f"inbox-{name}").mkdir()
    path = folder / f"{name}.yaml"
    path.write_text(f"inbox: inbox-{name}\noutbox: outbox-{name}\nstate_dir: state-{name}\n")
    return path


def test_config_option_before_or_after_the_command(tmp_path):
    """`whisperdrop -c FILE check-config` and `whisperdrop -c FILE status` read FILE, as the same
    option after the command does; given on both sides, the one after the command wins."""
    first, second = write_config(tmp_path, "first"), write_config(tmp_path, "second")
    before = whisperdrop("-c", str(first), "check-config", cwd=tmp_path)
    after = whisperdrop("check-config", "-c", str(first), cwd=tmp_path)
    assert before.returncode == 0, before.stderr
    assert before.stdout == after.stdout and "inbox-first" in before.stdout
    both = whisperdrop("-c", str(first), "check-config", "-c", str(second), cwd=tmp_path)
    assert both.returncode == 0 and "inbox-second" in both.stdout and "inbox-first" not in both.stdout
    status = whisperdrop("-c", str(first), "status", cwd=tmp_path)
    assert "invalid choice" not in status.stderr and "state-first" in status.stderr, status.stderr
    assert status.stderr == whisperdrop("status", "-c", str(first), cwd=tmp_path).stderr


def test_verbose_and_log_format_before_the_command(tmp_path):
    """-v and --log-format before the command are accepted like -c (check-config runs with them)."""
    config = write_config(tmp_path, "only")
    done = whisperdrop("-v", "--log-format", "json", "-c", str(config), "check-config", cwd=tmp_path)
    assert done.returncode == 0 and "inbox-only" in done.stdout, done.stderr


def test_config_option_before_whisper_cli(tmp_path):
    """`whisperdrop -c FILE whisper-cli ...` makes the drop-in read FILE (here a broken one, named in its error)."""
    (tmp_path / "broken.yaml").write_text("inbox: [unclosed\n")
    done = whisperdrop("-c", "broken.yaml", "whisper-cli", "-f", "talk.wav", cwd=tmp_path)
    assert done.returncode == 2 and "invalid choice" not in done.stderr
    assert "broken.yaml, line 2, column 1: not valid YAML" in done.stderr, done.stderr
