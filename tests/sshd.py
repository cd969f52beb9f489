"""A real OpenSSH sshd for tests: its own host key, client key, authorized_keys and known_hosts.

`SSHServer` runs `sshd -D -e -f <config>` on loopback (or inside a network namespace, see
netns.py) from a temporary directory. With `chroot_user=True` it also creates a system user whose
account is chrooted and SFTP-only (`ForceCommand internal-sftp`), the way a GPU host should be set
up for the daemon. `stop()` ends sshd; `cleanup()` also deletes the user and the directories.

`require_root_and_sshd()` skips a test when the machine lacks root or sshd, and fails it instead
when CI=true (a CI run must not pass by skipping).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)


def skip_or_fail(reason: str) -> None:
    """Skip the test with `reason`, or fail it when CI=true."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a missing prerequisite is a failure, not a skip)")
    pytest.skip(reason)


def require_root_and_sshd() -> str:
    """Return the sshd path; skip (fail under CI) without root or sshd."""
    if os.geteuid() != 0:
        skip_or_fail("needs root to run sshd and create test users")
    if SSHD is None:
        skip_or_fail("needs OpenSSH sshd (apt-get install openssh-server)")
    return SSHD


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def keygen(path: Path, comment: str) -> Path:
    """Create an unencrypted ed25519 key pair at `path` (and path.pub); return `path`."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path


def known_hosts_line(host: str, port: int, public_key_file: Path) -> str:
    """A known_hosts line for host:port with the key in `public_key_file`."""
    algorithm, blob = public_key_file.read_text().split()[:2]
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {algorithm} {blob}\n"


def _descendants(pid: int) -> list[int]:
    """The pids of every process below `pid` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat_file:
                parent = int(stat_file.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _root_only_directory() -> Path:
    """A new directory whose every path component is root-owned and not group/other writable
    (sshd's rule for ChrootDirectory; /tmp is world-writable, so it cannot hold a chroot)."""
    for parent in ("/run", "/var/lib", "/srv"):
        components = [Path(parent), *Path(parent).parents]
        if all(os.stat(c).st_uid == 0 and not os.stat(c).st_mode & (stat.S_IWGRP | stat.S_IWOTH)
               for c in components if c.exists()) and os.access(parent, os.W_OK):
            path = Path(tempfile.mkdtemp(prefix="wd-chroot-", dir=parent))
            path.chmod(0o755)
            return path
    raise RuntimeError("no root-owned, non-world-writable directory found for a chroot")


class SSHServer:
    """One OpenSSH sshd with its own keys, for one test (or one module).

    Attributes: host, port, client_key, known_hosts, user, spool (the spool on the server's file
    system), remote_spool (the spool as the SFTP session names it), log (sshd's stderr).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, chroot_user: bool = False,
                 netns: str | None = None):
        self.sshd = require_root_and_sshd()
        self.host = host
        self.port = port or free_port(host)
        self.netns = netns
        self.base = Path(tempfile.mkdtemp(prefix="wd-sshd-"))
        self.base.chmod(0o755)  # the chroot user's sshd reads its authorized_keys with its own uid
        self.host_key = keygen(self.base / "host_ed25519", "wd-test-host")
        self.client_key = keygen(self.base / "client_ed25519", "wd-test-client")
        self.known_hosts = self.base / "known_hosts"
        self.known_hosts.write_text(known_hosts_line(host, self.port, self.host_key.with_suffix(".pub")))
        self.log = self.base / "sshd.log"
        self.process: subprocess.Popen | None = None
        self.chroot: Path | None = None
        authorized = self.base / "authorized"
        authorized.mkdir(mode=0o755)
        if chroot_user:
            self.user = f"wdtest{secrets.token_hex(4)}"
            subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/", "--shell",
                            "/usr/sbin/nologin", self.user], check=True, capture_output=True)
            # A locked account ('!' password) is refused by sshd without PAM; '*' is "no password".
            subprocess.run(["usermod", "-p", "*", self.user], check=True, capture_output=True)
            self.chroot = _root_only_directory()
            self.spool = self.chroot / "spool"
            self.spool.mkdir()
            shutil.chown(self.spool, self.user, self.user)
            self.remote_spool = "spool"  # the session starts in the chroot's /
        else:
            self.user = "root"
            self.spool = self.base / "spool"
            self.spool.mkdir()
            self.remote_spool = str(self.spool)
        public = self.client_key.with_suffix(".pub").read_text()
        (authorized / self.user).write_text(public)
        (authorized / self.user).chmod(0o644)
        self.config = self.base / "sshd_config"
        self.config.write_text(self._config(authorized))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory

    def _config(self, authorized: Path) -> str:
        lines = [
            f"Port {self.port}", f"ListenAddress {self.host}", f"HostKey {self.host_key}",
            f"PidFile {self.base / 'sshd.pid'}", f"AuthorizedKeysFile {authorized}/%u",
            "UsePAM no", "StrictModes no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", "Subsystem sftp internal-sftp", "LogLevel VERBOSE",
            "MaxStartups 100:30:200", "MaxSessions 50", "UseDNS no",
            # A session whose client vanished (a cut link) ends within seconds, not TCP's two hours.
            "ClientAliveInterval 2", "ClientAliveCountMax 3",
        ]
        if self.chroot is not None:
            lines += [
                f"Match User {self.user}", f"    ChrootDirectory {self.chroot}", "    ForceCommand internal-sftp",
                "    AllowTcpForwarding no", "    X11Forwarding no", "    PermitTTY no",
            ]
        return "\n".join(lines) + "\n"

    def host_settings(self, spool: str | None = None, **overrides) -> dict:
        """A remote.hosts item (config format) that reaches this sshd."""
        settings = {
            "name": "testhost", "host": self.host, "port": self.port, "user": self.user,
            "key": str(self.client_key), "known_hosts": str(self.known_hosts),
            "spool": spool if spool is not None else self.remote_spool,
        }
        settings.update(overrides)
        return settings

    def start(self, timeout: float = 10.0) -> None:
        """Start sshd and wait until its port accepts connections."""
        if self.process is not None and self.process.poll() is None:
            return
        command = [self.sshd, "-D", "-e", "-f", str(self.config)]
        if self.netns:
            command = ["ip", "netns", "exec", self.netns, *command]
        with open(self.log, "ab") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not listen on {self.host}:{self.port} within {timeout} s: "
                           f"{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Stop sshd: its session processes (by pid) and then the listener."""
        if self.process is None:
            return
        for pid in _descendants(self.process.pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def cleanup(self) -> None:
        """Stop sshd, delete the test user and every directory this server made."""
        self.stop()
        if self.user != "root":
            # userdel refuses while a session of the user is still ending; wait a little, then force.
            deadline = time.monotonic() + 5
            while subprocess.run(["userdel", self.user], capture_output=True).returncode == 8:
                if time.monotonic() > deadline:
                    subprocess.run(["userdel", "--force", self.user], capture_output=True)
                    break
                time.sleep(0.1)
        if self.chroot is not None:
            shutil.rmtree(self.chroot, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "SSHServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.cleanup()
