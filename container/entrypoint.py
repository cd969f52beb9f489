"""The container's first process: prepare /config, run sshd and the runner, stop both on SIGTERM.

Goes in: a folder mounted at /config holding `authorized_keys` (the daemon's public key) and,
optionally, `runner.yaml` (replaces the image's /etc/whisperdrop/runner.yaml). On first start it
makes the SSH host key /config/ssh_host_ed25519_key (kept from then on), the SFTP chroot
/config/sftp with the spool /config/sftp/spool in it (seen as /spool by the account `whisperdrop`),
and the model cache /config/cache; at every start it prints the host key's fingerprint.

Then it starts `sshd -D -e` and the runner (its console script `whisperdrop-runner`, as
whisperdrop-runner with umask 0002, the README's unit in small) and waits on both; it is no
supervisor and restarts nothing. It reaps every child, as a PID 1 must. The first SIGTERM or SIGINT
goes to the runner, which parks the job in hand between two batches and exits; then sshd gets
SIGTERM, and the exit status is the runner's. A second signal is passed on too: the runner exits at
once and its claim goes back at the next start. If either child ends on its own, the other is stopped
the same way and the container exits non-zero, for a restart policy to act on.

Exit status: the runner's; 2 when /config is not usable (the log line says what to fix); 1 when sshd
ended unasked. Only the standard library and PyYAML (in the runner's virtual environment) are used,
so the package's module layout can change freely.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

CONFIG = Path("/config")
HOST_KEY = CONFIG / "ssh_host_ed25519_key"
AUTHORIZED_KEYS = CONFIG / "authorized_keys"
CHROOT = CONFIG / "sftp"            # sshd's ChrootDirectory for the account whisperdrop
SPOOL = CHROOT / "spool"            # /spool in the SFTP session
CACHE = CONFIG / "cache"            # the runner's HOME and Hugging Face cache (large-v3 downloads land here)
USER_RUNNER_CONFIG = CONFIG / "runner.yaml"
IMAGE_RUNNER_CONFIG = Path("/etc/whisperdrop/runner.yaml")
INSTALLED_KEYS = Path("/etc/ssh/authorized_keys/whisperdrop")
RUNNER = "/opt/whisperdrop/venv/bin/whisperdrop-runner"
SSHD = "/usr/sbin/sshd"
RUNNER_ACCOUNT = "whisperdrop-runner"


class Unusable(Exception):
    """/config cannot serve: the message names the file and the fix."""


def say(event: str, level: str = "info", **fields) -> None:
    """One JSON line on stdout, in the runner's log format."""
    print(json.dumps({"event": event, "level": level, "logger": "container", "timestamp": time.time(), **fields}),
          flush=True)


def run(*command: str) -> str:
    """Run a command to its end; its stdout. Raises Unusable with its stderr when it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise Unusable(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def directory(path: Path, uid: int, gid: int, mode: int) -> None:
    """Make `path` (if missing) and give it this owner and mode."""
    path.mkdir(exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(mode)


def prepare() -> Path:
    """Make /config ready for sshd and the runner; the runner config to use. Raises Unusable."""
    if not CONFIG.is_dir():
        raise Unusable("no folder at /config: start the container with -v <dir>:/config, "
                       "<dir> holding authorized_keys (the daemon's public key)")
    # sshd's ChrootDirectory rule: every component of /config/sftp root-owned and writable by root only.
    status = CONFIG.stat()
    if (status.st_uid, status.st_gid) != (0, 0) or status.st_mode & 0o7777 != 0o755:
        say("container.config_folder_fixed", was_uid=status.st_uid, was_mode=oct(status.st_mode & 0o7777),
            note="/config made root:root 0755, as sshd's chroot rule needs")
        os.chown(CONFIG, 0, 0)
        CONFIG.chmod(0o755)
    if not HOST_KEY.exists():
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "whisperdrop-runner-container", "-f", str(HOST_KEY))
        say("container.host_key_created", path=str(HOST_KEY))
    os.chown(HOST_KEY, 0, 0)
    HOST_KEY.chmod(0o600)
    public = HOST_KEY.with_name(HOST_KEY.name + ".pub")
    if not public.exists():
        public.write_text(run("ssh-keygen", "-y", "-f", str(HOST_KEY)))
    public.chmod(0o644)
    say("container.host_key", fingerprint=run("ssh-keygen", "-l", "-f", str(public)).strip(),
        hint="check this fingerprint before adding the key to the daemon's known_hosts")

    fix = (f"put the daemon's public key (e.g. /var/lib/whisperdrop/.ssh/id_ed25519.pub) in authorized_keys in the "
           f"folder mounted at /config, then start the container again")
    if not AUTHORIZED_KEYS.is_file():
        raise Unusable(f"{AUTHORIZED_KEYS} is missing: {fix}")
    keys = [line for line in AUTHORIZED_KEYS.read_text(errors="replace").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise Unusable(f"{AUTHORIZED_KEYS} holds no key: {fix}")
    try:
        run("ssh-keygen", "-l", "-f", str(AUTHORIZED_KEYS))
    except Unusable as error:
        raise Unusable(f"{AUTHORIZED_KEYS} is not an authorized_keys file ({error}): {fix}") from None
    # Copied, not used in place: sshd's StrictModes wants it root-owned, whoever wrote /config's copy.
    INSTALLED_KEYS.parent.mkdir(mode=0o755, exist_ok=True)
    INSTALLED_KEYS.write_text("\n".join(keys) + "\n")
    INSTALLED_KEYS.chmod(0o644)
    say("container.authorized_keys", keys=len(keys), note="read at start: restart the container after changing it")

    runner = pwd.getpwnam(RUNNER_ACCOUNT)
    directory(CHROOT, 0, 0, 0o755)
    directory(SPOOL, runner.pw_uid, runner.pw_gid, 0o2775)   # the README's spool: setgid, group-writable
    directory(CACHE, runner.pw_uid, runner.pw_gid, 0o750)

    runner_config = USER_RUNNER_CONFIG if USER_RUNNER_CONFIG.exists() else IMAGE_RUNNER_CONFIG
    try:
        spool = ((yaml.safe_load(runner_config.read_text()) or {}).get("runner") or {}).get("spool")
    except (OSError, yaml.YAMLError, AttributeError) as error:
        raise Unusable(f"{runner_config} cannot be read as a runner config: {error}") from None
    if spool is None or Path(spool) != SPOOL:
        raise Unusable(f"{runner_config}: runner.spool is {spool!r}; in this container it must be {str(SPOOL)!r}, "
                       f"the folder the SFTP account sees as /spool")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)       # sshd's privilege separation folder
    run(SSHD, "-t")
    return runner_config


class Init:
    """sshd and the runner as children of PID 1, stopped in order on a signal (see the module docstring)."""

    def __init__(self) -> None:
        self.signals = 0
        self.runner: subprocess.Popen | None = None
        self.sshd: subprocess.Popen | None = None

    def on_signal(self, number: int, frame: object) -> None:
        """Count the signal and pass SIGTERM on to the runner (the handler does nothing else)."""
        self.signals += 1
        if self.runner is not None and self.runner.returncode is None:
            os.kill(self.runner.pid, signal.SIGTERM)

    def start(self, runner_config: Path) -> None:
        self.sshd = subprocess.Popen([SSHD, "-D", "-e"])
        account = pwd.getpwnam(RUNNER_ACCOUNT)
        environment = {**os.environ, "HOME": str(CACHE), "HF_HOME": str(CACHE / "huggingface"),
                       "PYTHONUNBUFFERED": "1", "USER": RUNNER_ACCOUNT, "LOGNAME": RUNNER_ACCOUNT}
        self.runner = subprocess.Popen([RUNNER, "-c", str(runner_config)], user=account.pw_uid,
                                       group=account.pw_gid, extra_groups=[account.pw_gid], umask=0o002,
                                       env=environment, cwd=str(CACHE))
        say("container.started", sshd_pid=self.sshd.pid, runner_pid=self.runner.pid, runner_config=str(runner_config))
        if self.signals:  # a signal that came while the children were starting
            os.kill(self.runner.pid, signal.SIGTERM)

    def wait(self) -> int:
        """Reap children until the runner and sshd have both ended; the container's exit status."""
        status = {}
        sshd_failed = False
        while self.runner.pid not in status or self.sshd.pid not in status:
            try:
                pid, raw = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            code = os.waitstatus_to_exitcode(raw)
            if pid == self.runner.pid:
                self.runner.returncode = code
                status[pid] = code
                say("container.runner_exited", code=code, asked=bool(self.signals))
                if self.sshd.pid not in status:
                    os.kill(self.sshd.pid, signal.SIGTERM)
            elif pid == self.sshd.pid:
                self.sshd.returncode = code
                status[pid] = code
                if self.runner.pid not in status:
                    sshd_failed = not self.signals
                    say("container.sshd_exited", level="error", code=code,
                        note="stopping the runner: without sshd no daemon can reach the spool")
                    os.kill(self.runner.pid, signal.SIGTERM)
            # any other pid: an orphan handed to PID 1, now reaped
        if sshd_failed:
            return 1
        return status.get(self.runner.pid, 1)


def main() -> int:
    init = Init()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, init.on_signal)
    try:
        runner_config = prepare()
    except (Unusable, OSError) as error:
        say("container.cannot_start", level="error", error=str(error))
        return 2
    init.start(runner_config)
    code = init.wait()
    say("container.stopped", code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
