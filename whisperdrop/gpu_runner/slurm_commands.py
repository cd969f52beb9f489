"""The Slurm side of the Slurm backend: its commands, the batch script and sbatch's arguments.

`Slurm` runs sbatch, squeue, scontrol and scancel, each as an argument list with a timeout (never a
shell). `batch_script` writes the script a batch of jobs runs: fixed text, job ids checked by
`strict_job_id`, values quoted with `shlex.quote`, and `runner.slurm.setup` (shell lines the operator
writes into the config on purpose). `sbatch_arguments` turns runner.slurm's site options into one
list item each.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from typing import Any, Callable

from whisperdrop.shared.config import defaults as config_defaults
from whisperdrop.shared.spool import ProtocolError, check_job_id

COMMAND_TIMEOUT = 60.0           # seconds for one sbatch, squeue, scontrol or scancel
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                           "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
                           "RESV_DEL_HOLD"})


def strict_job_id(value: Any) -> str:
    """`check_job_id`, and not one character more: its pattern's `$` lets a trailing newline through,
    which must never reach a batch script. Raises ProtocolError."""
    check_job_id(value)
    if len(value) != 64:
        raise ProtocolError(f"not a job id: {value!r}")
    return value

class SlurmError(Exception):
    """A Slurm command that failed: which command, its exit status and what it printed."""

def settings_of(runner: dict) -> dict:
    """The `runner` config mapping with every missing key (also under `slurm`) at its default."""
    merged = {**config_defaults()["runner"], **dict(runner)}
    merged["slurm"] = {**config_defaults()["runner"]["slurm"], **dict(runner.get("slurm") or {})}
    return merged

class Slurm:
    """The Slurm commands, each an argument list run with a timeout (never a shell). `env` is the
    environment they run with (tests point SLURM_CONF at their own cluster)."""

    def __init__(self, env: dict | None = None, on_sbatch: Callable[[list[str]], None] | None = None):
        self.env = env
        self.on_sbatch = on_sbatch or (lambda argv: None)

    def run(self, argv: list[str]) -> str:
        """Run `argv`; its stdout. Raises SlurmError (command, status, output) on failure or timeout."""
        command = [shutil.which(argv[0]) or argv[0], *argv[1:]]
        try:
            done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise SlurmError(f"{argv[0]}: {type(error).__name__}: {error}") from error
        if done.returncode != 0:
            raise SlurmError(f"{' '.join(map(shlex.quote, argv))} exited with {done.returncode}: "
                             f"{(done.stderr or done.stdout).strip()[-1000:]}")
        return done.stdout

    def sbatch(self, argv: list[str]) -> str:
        """Submit (`argv` starts after `sbatch`); the job id sbatch --parsable printed."""
        self.on_sbatch(argv)
        output = self.run(["sbatch", "--parsable", *argv]).strip()
        slurm_id = output.split(";")[0].strip()
        if not slurm_id.isdigit():
            raise SlurmError(f"sbatch printed {output!r}, not a job id")
        return slurm_id

    def jobs(self, user: str) -> dict[str, dict]:
        """`user`'s jobs Slurm still knows, one per array task: {"1234_0": {state, reason, name}}."""
        output = self.run(["squeue", "-h", "-r", "-t", "all", "-u", user, "-o", "%i|%T|%r|%j"])
        jobs = {}
        for line in output.splitlines():
            parts = line.split("|", 3)
            if len(parts) == 4:
                jobs[parts[0]] = {"state": parts[1], "reason": parts[2], "name": parts[3]}
        return jobs

    def pending_count(self, partition: str | None) -> int:
        """How many jobs (array tasks counted one by one) wait in `partition` (all partitions: None)."""
        argv = ["squeue", "-h", "-r", "-t", "PENDING", "-o", "%i"]
        if partition:
            argv += ["-p", partition]
        return len(self.run(argv).split())

    def state_of(self, slurm_id: str) -> str | None:
        """`scontrol show job`'s JobState for one job, None when Slurm no longer knows it."""
        try:
            output = self.run(["scontrol", "-o", "show", "job", slurm_id])
        except SlurmError as error:
            if "Invalid job id" in str(error):
                return None
            raise
        for field in output.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return None

    def cancel(self, slurm_id: str) -> None:
        self.run(["scancel", slurm_id])

def batch_script(batch: str, job_ids: list[str], *, python: str, spool: str, config_path: str | None,
                 setup: str) -> str:
    """The batch script for `job_ids` (array index i does job_ids[i]): fixed text, checked ids and
    shlex-quoted values; `setup` (operator-written shell lines) runs first. Raises ProtocolError for
    a bad id or batch name."""
    if not batch.isalnum():
        raise ProtocolError(f"not a batch name: {batch!r}")
    lines = ["#!/bin/sh", f"# whisperdrop batch {batch}: generated by the Slurm runner; do not edit", "set -e"]
    if setup.strip():
        lines += ["# runner.slurm.setup", setup.rstrip("\n")]
    lines.append('case "${SLURM_ARRAY_TASK_ID:-0}" in')
    for index, job_id in enumerate(job_ids):
        lines.append(f"    {index}) job={strict_job_id(job_id)} ;;")
    lines += ['    *) echo "whisperdrop: no job for array index ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;', "esac"]
    command = [python, "-m", "whisperdrop", "slurm-task", "--spool", spool]
    if config_path:
        command += ["--config", config_path]
    lines.append("exec " + " ".join(shlex.quote(part) for part in command) + ' --job "$job"')
    return "\n".join(lines) + "\n"


def sbatch_arguments(options: dict, *, name: str, output: str, count: int, script: str) -> list[str]:
    """sbatch's arguments (after `sbatch --parsable`) for a batch of `count` jobs: site options from
    `options` (runner.slurm), each one list item, and the script's path last."""
    argv = [f"--job-name={name}", f"--output={output}", "--open-mode=append"]
    for key in ("partition", "account", "qos", "gres"):
        if options.get(key):
            argv.append(f"--{key}={options[key]}")
    if options.get("time_limit"):
        argv.append(f"--time={options['time_limit']}")
    argv += [str(item) for item in options.get("extra_args") or []]
    if count > 1:
        argv.append(f"--array=0-{count - 1}")
    argv.append(script)
    return argv


def claim_of(data: Any) -> dict | None:
    """The `claim` mapping of a work/ document, or None."""
    claim = data.get("claim") if isinstance(data, dict) else None
    return claim if isinstance(claim, dict) else None
