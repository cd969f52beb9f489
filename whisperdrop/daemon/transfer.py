"""The spool on one GPU host over SFTP: resumable upload, submit, a job's state, fetch, heartbeats, cleanup.

`Host` is a `connection.Connection` (one SSH connection and SFTP client, the timeouts and the
HostError mapping) with the daemon's operations on the spool (`spool.Layout`): everything the
daemon does on a GPU host is a file operation there, so the account can be chrooted and SFTP-only
(`ForceCommand internal-sftp`).

Upload resumes: the audio goes to `incoming/<id>.opus.part`, opened without truncation; a later
call stats it and restarts a safety margin below its size (pipelined writes may complete out of
order, so the last window of blocks may have holes below the reported size), writing at explicit
offsets with a window of requests in flight. Then fsync, close and posix-rename to
`incoming/<id>.opus`. The runner checks size and sha256 against the job document, so the upload
needs no remote checksum command.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import asyncssh

from whisperdrop.daemon.connection import Connection, HostError
from whisperdrop.shared import spool
from whisperdrop.shared.files import write_atomic

BLOCK_SIZE = 255 * 1024
"""Bytes per SFTP write request: OpenSSH's largest (limits@openssh.com says 261120); less if the
server's limit is lower. 255 KiB x 8 measured 99 MiB/s on loopback, 128 KiB x 16 86, 64 KiB x 32 74."""
WINDOW = 7
"""SFTP write requests in flight at once on one file. 7 keeps a resume's re-sent bytes
(SAFETY_MARGIN + BLOCK_SIZE) within 2 MiB; 8 was no faster within the noise."""
SAFETY_MARGIN = BLOCK_SIZE * WINDOW
"""The largest resume margin (see resume_offset): a resume re-sends at most (WINDOW + 1) blocks,
2040 KiB for the largest block, under 2 MiB."""
MAX_RESULT_BYTES = 64 << 20
"""The most read of a Result: hours of audio with word timestamps come to a few MiB."""

_WRITE_PFLAGS = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT  # no FXF_TRUNC: the .part is resumed


@dataclass(frozen=True)
class UploadStats:
    """What one `Host.upload` call did: bytes written by this call, the offset it resumed from
    (0 for a fresh upload; the size when the complete audio was already there), its duration and
    the audio's size."""

    bytes_sent: int
    resumed_from: int
    seconds: float
    audio_bytes: int


MIN_BLOCK_SIZE = 16 * 1024


def block_size_for(size: int) -> int:
    """The write size for an upload of `size` bytes: a 64th of the file, from 16 KiB to BLOCK_SIZE.

    Small files (minutes of Opus are a few hundred KiB) get small blocks, so the resume margin
    (WINDOW blocks) stays a fraction of the file and a cut upload really resumes. The same size
    always gives the same block, so a resume computes the margin the cut attempt used.
    """
    return max(MIN_BLOCK_SIZE, min(BLOCK_SIZE, size // 64 // 4096 * 4096))


def resume_offset(remote_size: int, size: int) -> int:
    """Where to resume an upload of `size` bytes whose .part has `remote_size` bytes.

    WINDOW blocks below the reported size (writes in flight may have completed out of order and
    left holes there), rounded down to a block; 0 when the .part is larger than the audio.
    """
    if remote_size > size:
        return 0
    block = block_size_for(size)
    return max(0, remote_size - WINDOW * block) // block * block


class Host(Connection):
    """One GPU host reached over SSH, used only through SFTP file operations in its spool.

    Takes `Connection`'s arguments; an upload fails when no write completes within `operation_timeout`.
    `bytes_written` counts the audio bytes the host acknowledged, over every upload, cut ones too.
    """

    def __init__(self, settings: dict, *, connect_timeout: float, keepalive_interval: float,
                 operation_timeout: float | None = None):
        super().__init__(settings, connect_timeout=connect_timeout, keepalive_interval=keepalive_interval,
                         operation_timeout=operation_timeout)
        self.bytes_written = 0

    # -- spool -------------------------------------------------------------------------------------

    async def ensure_spool(self) -> None:
        """Create the spool and its directories (spool.DIRECTORIES) where missing."""
        sftp = await self._client()
        for name in spool.DIRECTORIES:
            await self._timed("ensure_spool", sftp.makedirs(self.layout.directory(name), exist_ok=True))

    async def probe_spool(self) -> None:
        """Prove the account may write the spool: write, fsync and close a small hidden file in
        incoming/, then remove it. Raises HostError (hint: let the SSH user write the spool)."""
        sftp = await self._client()
        probe = f"{self.layout.directory('incoming')}/.probe-{os.urandom(6).hex()}.tmp"
        await self._write_file("spool write", sftp, probe, b"whisperdrop write probe\n")
        await self._timed("spool write", sftp.remove(probe))

    async def upload(self, job_id: str, local_path: Path, *, size: int, sha256: str,
                     progress: Callable[[int, int], None] | None = None) -> UploadStats:
        """Upload the audio of `job_id` to incoming/<id>.opus, resuming an earlier .part.

        `size` and `sha256` describe `local_path` (the runner checks both against the job
        document). `progress(done, size)` is called as writes complete. Skips the upload when a
        complete incoming/<id>.opus of that size is there. Raises HostError; a transient one leaves
        the .part for the next call to resume.
        """
        started = time.monotonic()
        part, final = self.layout.audio_part(job_id), self.layout.audio(job_id)
        local_size = os.stat(local_path).st_size
        if local_size != size:
            raise ValueError(f"{local_path} has {local_size} bytes, not {size}")
        sftp = await self._client()
        if await self._size(sftp, final, "upload") == size:
            self._log.info("transfer.upload_skipped", job_id=job_id, reason="complete audio already on the host", bytes=size)
            return UploadStats(bytes_sent=0, resumed_from=size, seconds=time.monotonic() - started, audio_bytes=size)

        # block_size=0: each write() is one SFTP request; _send does the pipelining itself.
        remote = await self._timed("upload", sftp.open(part, _WRITE_PFLAGS, encoding=None, block_size=0))
        block_size = min(block_size_for(size), sftp.limits.max_write_len or BLOCK_SIZE)
        closed = False
        try:
            remote_size = (await self._timed("upload", remote.stat())).size or 0
            offset = resume_offset(remote_size, size)
            if remote_size > size:
                await self._timed("upload", remote.truncate(0))
            sent = await self._send(remote, local_path, offset, size, block_size, progress)
            try:
                await self._timed("upload", remote.fsync())
            except HostError as error:
                if not isinstance(error.__cause__, asyncssh.SFTPOpUnsupported):
                    raise
            closed = True
            await self._timed("upload", remote.close())
        finally:
            if not closed:  # an error is propagating
                await self._close_quietly(remote)
        await self._rename("upload", sftp, part, final)
        stats = UploadStats(bytes_sent=sent, resumed_from=offset, seconds=time.monotonic() - started,
                            audio_bytes=size)
        self._log.debug("transfer.upload", job_id=job_id, bytes=sent, resumed_from=offset, audio_bytes=size,
                        sha256=sha256, seconds=round(stats.seconds, 3),
                        mbit_s=round(sent * 8 / stats.seconds / 1e6, 1) if stats.seconds > 0 else None)
        return stats

    async def _send(self, remote: asyncssh.SFTPClientFile, local_path: Path, offset: int, size: int,
                    block_size: int, progress: Callable[[int, int], None] | None) -> int:
        """Write local_path[offset:size] at explicit offsets, WINDOW requests in flight. Returns bytes sent."""
        pending: set[asyncio.Future] = set()
        position, done = offset, offset
        try:
            with open(local_path, "rb") as local:
                local.seek(offset)
                while position < size or pending:
                    while position < size and len(pending) < WINDOW:
                        block = local.read(min(block_size, size - position))
                        if not block:
                            raise ValueError(f"{local_path} ended at {position} bytes, before {size}")
                        pending.add(asyncio.ensure_future(remote.write(block, position)))
                        position += len(block)
                    finished, pending = await asyncio.wait(
                        pending, timeout=self.operation_timeout, return_when=asyncio.FIRST_COMPLETED)
                    if not finished:
                        raise asyncio.TimeoutError()
                    failure = None
                    for task in finished:  # retrieve every outcome, so no failure goes unreported
                        if task.exception() is None:
                            done += task.result()
                            self.bytes_written += task.result()
                        else:
                            failure = failure or task.exception()
                    if failure is not None:
                        raise failure
                    if progress is not None:
                        progress(done, size)
        except (asyncssh.Error, OSError, asyncio.TimeoutError, EOFError) as error:
            raise self._error("upload", error) from error
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        return done - offset

    async def submit(self, document: dict) -> None:
        """Submit a job: write jobs/<id>.json.tmp, fsync, and rename it to jobs/<id>.json."""
        job = spool.check_job_id(document.get("job_id"))
        target = self.layout.job(job)
        temporary = target + ".tmp"
        sftp = await self._client()
        await self._write_file("submit", sftp, temporary, spool.dumps(document))
        await self._rename("submit", sftp, temporary, target)
        self._log.debug("transfer.submitted", job_id=job)

    async def state(self, job_id: str) -> tuple[str, dict | None]:
        """Where a job is in the spool: ("queued", None), ("running", progress or None),
        ("done", None), ("failed", failure document) or ("missing", None).

        Checked in the order a job moves (jobs, work, results, failed), so a job moving on during
        the check is seen in its newer place; a job found nowhere is checked once more, in case a
        dead runner's claim went back to jobs/ meanwhile.
        """
        sftp = await self._client()
        for _attempt in range(2):
            if await self._size(sftp, self.layout.job(job_id, "jobs"), "state") is not None:
                return "queued", None
            if await self._size(sftp, self.layout.job(job_id, "work"), "state") is not None:
                _exists, progress = await self._read_json("state", sftp, self.layout.progress(job_id))
                return "running", progress if isinstance(progress, dict) else None
            if await self._size(sftp, self.layout.result(job_id), "state") is not None:
                return "done", None
            exists, failure = await self._read_json("state", sftp, self.layout.failure(job_id))
            if exists:
                if not isinstance(failure, dict):
                    failure = {"kind": "unreadable", "message": "failed/ document is not JSON", "retryable": True}
                return "failed", failure
        return "missing", None

    async def fetch_result(self, job_id: str, dest: Path | None = None) -> dict:
        """Read results/<id>.json, check it and return it parsed; with `dest`, also keep a copy there
        (files.write_atomic: a crash leaves no part of it).

        Raises HostError (network, missing result) or spool.ProtocolError (not a valid Result for
        this job, or over MAX_RESULT_BYTES; `dest` is then left untouched).
        """
        sftp = await self._client()
        data = await self._read("fetch_result", sftp, self.layout.result(job_id), MAX_RESULT_BYTES)
        if data is None:
            raise HostError(self.name, "fetch_result", f"no {self.layout.result(job_id)}", transient=False,
                            hint="the job has no result (yet); check state() first")
        try:
            document = spool.check_result(json.loads(data), job_id)
        except ValueError as error:  # json.JSONDecodeError and spool.ProtocolError
            raise spool.ProtocolError(f"host {self.name}: result of {job_id}: {error}") from error
        if dest is not None:
            write_atomic(dest, data)
        return document

    async def heartbeats(self) -> list[dict]:
        """The runner heartbeats in runners/*.json; unparsable ones are logged and skipped."""
        sftp = await self._client()
        directory = self.layout.directory("runners")
        names = await self._timed("heartbeats", sftp.listdir(directory))
        documents = []
        for name in sorted(names):
            if not name.endswith(".json"):
                continue
            exists, document = await self._read_json("heartbeats", sftp, f"{directory}/{name}")
            if isinstance(document, dict):
                documents.append(document)
            elif exists:
                self._log.warning("transfer.heartbeat_skipped", file=name, reason="not a JSON object")
        return documents

    async def cleanup(self, job_id: str) -> None:
        """Remove every file of the job from the spool (spool.Layout.job_files); missing ones are fine."""
        sftp = await self._client()

        async def remove(path: str) -> None:
            try:
                await self._timed("cleanup", sftp.remove(path))
            except HostError as error:
                if not isinstance(error.__cause__, asyncssh.SFTPNoSuchFile):
                    raise

        await asyncio.gather(*(remove(path) for path in self.layout.job_files(job_id)))
