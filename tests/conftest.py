"""Shared fixtures. SSH/netns: a real OpenSSH sshd on loopback (`sshd`), one with a chrooted
SFTP-only account (`chroot_sshd`), and one inside a network namespace (`netns_sshd`); all skip
without root or sshd, and fail instead when CI=true (see tests/sshd.py)."""

from __future__ import annotations

import os
import subprocess

import pytest

from netns import NetNamespace
from sshd import SSHServer, require_root_and_sshd, skip_or_fail


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
