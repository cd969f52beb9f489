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


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict:
    """The multilingual clip set (media.SPOKEN: de, es, en, pt) as WAVs, made once per session; skips
    (fails under CI) without espeak-ng."""
    import shutil

    from media import SPOKEN, speak

    if shutil.which("espeak-ng") is None:
        skip_or_fail("espeak-ng is not installed (it speaks the multilingual clips; bash scripts/test installs it as root)")
    folder = tmp_path_factory.mktemp("clips")
    return {language: speak(folder / f"{language}.wav", language) for language in SPOKEN}


@pytest.fixture(scope="session")
def base_model() -> str:
    """`bundled:base`, joined into the cache once; skips (fails under CI) without the install extra `base`."""
    from whisperdrop.shared.model_names import bundled_missing

    missing = bundled_missing("bundled:base")
    if missing:
        skip_or_fail(missing)
    from whisperdrop.engine.engine import resolve_model_path

    resolve_model_path("bundled:base")
    return "bundled:base"
