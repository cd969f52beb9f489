"""Shared fixtures. SSH/netns: a real OpenSSH sshd on loopback (`sshd`), one with a chrooted
SFTP-only account (`chroot_sshd`), and one inside a network namespace (`netns_sshd`); all skip
without root or sshd, and fail instead when CI=true (see tests/sshd.py)."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from netns import NetNamespace
from sshd import SSHServer, require_root_and_sshd, skip_or_fail


# Threads that are process-wide by design and outlive any one test: tqdm's monitor, started once by
# faster-whisper's first transcription.
LONG_LIVED_THREADS = ("tqdm_monitor",)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail any test that leaves a thread running (observers, heartbeats, serve loops, SSH clients)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10
    while True:
        leaked = [thread for thread in threading.enumerate()
                  if thread not in before and thread.is_alive() and thread.name not in LONG_LIVED_THREADS]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if leaked:
        pytest.fail(f"threads left running: {leaked}")


@pytest.fixture
def sshd():
    """A running OpenSSH sshd on 127.0.0.1 that lets root in with its own client key."""
    server = SSHServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def chroot_sshd():
    """A running OpenSSH sshd with a chrooted, SFTP-only test user (deleted afterwards)."""
    server = SSHServer(chroot_user=True)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def netns_sshd():
    """(namespace, sshd): sshd listening on port 22 inside a fresh network namespace."""
    require_root_and_sshd()
    if not os.path.exists("/usr/sbin/ip") and not os.path.exists("/sbin/ip"):
        skip_or_fail("needs iproute2 (ip, tc)")
    namespace = NetNamespace()
    server = None
    try:
        try:
            namespace.create()
        except (subprocess.CalledProcessError, OSError) as error:
            detail = getattr(error, "stderr", b"") or b""
            skip_or_fail(f"cannot create a network namespace: {error} {detail.decode(errors='replace')}")
        server = SSHServer(host=namespace.inner_address, port=22, netns=namespace.name)
        server.start()
        yield namespace, server
    finally:
        if server is not None:
            server.cleanup()
        namespace.cleanup()


@pytest.fixture
def batches(monkeypatch):
    """The number of chunks in every batch the engine decodes."""
    sizes: list[int] = []
    from whisperdrop.engine import batched

    original = batched.BatchDecoder.decode

    def decode(self, chunks):
        sizes.append(len(chunks))
        return original(self, chunks)

    monkeypatch.setattr(batched.BatchDecoder, "decode", decode)
    return sizes
