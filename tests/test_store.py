"""The fast layer under the runner: `files` (atomic write, file hash) and the POSIX spool store.

Real files in a temporary folder, no engine, no threads.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from whisperdrop.gpu_runner.store import MAX_DOCUMENT_BYTES, SpoolStore, read_document
from whisperdrop.shared.files import Cancelled, sha256_file, write_atomic
from whisperdrop.shared.spool import ProtocolError, dumps

JOB = "a" * 64


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _store(root: Path, name: str) -> SpoolStore:
    store = SpoolStore(str(root), name, heartbeat_seconds=1.0)
    store.create()
    return store


def _queue(root: Path, job: str = JOB) -> None:
    (root / "jobs" / f"{job}.json").write_bytes(dumps({"job_id": job}))


@pytest.mark.parametrize("mask", [0o002, 0o027])
def test_write_atomic_follows_the_umask_even_over_a_stale_temporary(tmp_path, umask, mask):
    """write_atomic creates 0o666 less the umask, also where a crashed writer left its temporary at 0600."""
    umask(mask)
    target = tmp_path / "doc.json"
    target.write_bytes(b"old")
    stale = tmp_path / ".doc.json.runner-a.tmp"
    stale.write_bytes(b"crashed half-way")
    os.chmod(stale, 0o600)
    write_atomic(target, b"new", tag="runner-a")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert sorted(path.name for path in tmp_path.iterdir()) == ["doc.json"]


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path):
    """A write that fails leaves the old content in place and no temporary behind."""
    target = tmp_path / "doc.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(target, object())  # not bytes: fails after the temporary was created
    assert target.read_bytes() == b"old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["doc.json"]


def test_sha256_file_hashes_paths_and_descriptors_and_stops_when_cancelled(tmp_path):
    """sha256_file agrees with hashlib for a path and for a descriptor (read from offset 0), and raises Cancelled once cancel is set."""
    path = tmp_path / "blob"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == expected
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.lseek(descriptor, 100, os.SEEK_SET)
        assert sha256_file(descriptor) == expected
    finally:
        os.close(descriptor)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        sha256_file(path, cancel)


def test_only_one_of_two_stores_takes_a_job(tmp_path):
    """Two workers on one spool: the first take() renames the job into work/, the second finds nothing."""
    first, second = _store(tmp_path, "a"), _store(tmp_path, "b")
    _queue(tmp_path)
    assert first.take() == f"{JOB}.json"
    assert second.take() is None
    assert os.listdir(tmp_path / "work") == [f"{JOB}.json"] and os.listdir(tmp_path / "jobs") == []


def test_stamp_signs_the_claim_and_return_claim_restores_the_queued_document(tmp_path):
    """stamp() adds this worker's claim; return_claim() with another token leaves it, with ours puts the original back in jobs/."""
    store = _store(tmp_path, "a")
    _queue(tmp_path)
    os.utime(tmp_path / "jobs" / f"{JOB}.json", (1000, 1000))
    store.take()
    assert store.stamp(JOB, "token-1", claimed_at=time.time()) == {"job_id": JOB}
    claim = read_document(str(tmp_path / "work" / f"{JOB}.json"))["claim"]
    assert claim["claimed_by"] == "a" and claim["token"] == "token-1" and claim["queued_mtime"] == 1000
    assert store.owns(JOB, "token-1") and not store.owns(JOB, "token-2")

    assert store.return_claim(JOB, "token-2") is False
    assert os.listdir(tmp_path / "work") == [f"{JOB}.json"]
    assert store.return_claim(JOB, "token-1") is True
    assert read_document(str(tmp_path / "jobs" / f"{JOB}.json")) == {"job_id": JOB}
    assert (tmp_path / "jobs" / f"{JOB}.json").stat().st_mtime == 1000  # its old place in the queue
    assert os.listdir(tmp_path / "work") == []


def test_stamp_of_an_unreadable_document_is_a_protocol_error(tmp_path):
    """A claimed file that is not a JSON object raises ProtocolError, which the worker records as kind `protocol`."""
    store = _store(tmp_path, "a")
    (tmp_path / "jobs" / f"{JOB}.json").write_text("[1, 2]")
    store.take()
    with pytest.raises(ProtocolError, match="not a JSON object"):
        store.stamp(JOB, "t", claimed_at=0.0)


def test_publish_writes_the_result_and_drops_claim_progress_and_old_failure(tmp_path):
    """publish() writes results/<id>.json, removes an earlier failed/<id>.json, the claim and the progress file."""
    store = _store(tmp_path, "a")
    _queue(tmp_path)
    store.take()
    store.stamp(JOB, "t", claimed_at=0.0)
    store.write_progress(JOB, {"done_s": 1.0})
    (tmp_path / "failed" / f"{JOB}.json").write_text("{}")
    store.publish(JOB, {"text": "hi", "segments": []}, "t")
    assert read_document(str(tmp_path / "results" / f"{JOB}.json"))["text"] == "hi"
    assert store.has_result(JOB)
    for folder in ("failed", "work", "progress"):
        assert os.listdir(tmp_path / folder) == [], folder


def test_read_document_refuses_links_and_large_files(tmp_path):
    """read_document never follows a symlink and refuses a document over 1 MiB."""
    real = tmp_path / "real.json"
    real.write_text('{"a": 1}')
    (tmp_path / "link.json").symlink_to(real)
    with pytest.raises(OSError):
        read_document(str(tmp_path / "link.json"))
    (tmp_path / "big.json").write_bytes(b" " * (MAX_DOCUMENT_BYTES + 1))
    with pytest.raises(ValueError, match="larger than"):
        read_document(str(tmp_path / "big.json"))
    assert read_document(str(real)) == {"a": 1}
