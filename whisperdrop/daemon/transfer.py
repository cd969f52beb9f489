"""SSH transport to one GPU host: spool files over SFTP, never a remote command.

One `Host` holds one SSH connection and one SFTP client, reused by every job and reopened on demand
after a drop. Everything the daemon does on a GPU host is a file operation in the spool
(`spool.Layout`), so the account can be chrooted and SFTP-only (`ForceCommand internal-sftp`).

Every network call has a timeout. Every failure is raised as a `HostError` that names the host, the
operation and the asyncssh/OS cause, says whether retrying can help (`transient`) and how to fix
it (`hint`):

- network trouble, a timeout, a dropped connection: transient; the connection is dropped and the
  next call reconnects.
- disk full on the GPU host (SFTP "Failure" or "no space" while writing): transient, hint
  "free space on HOST"; a runner expiring old spool files frees it without a person.
- permission denied in the spool, a missing spool, another SFTP refusal: not transient; a person
  has to fix the account or the spool, and retrying would only repeat the error.
- host key unknown or changed (`HostKeyError`), authentication refused or key unreadable
  (`AuthError`): not transient; a key is never accepted without a person.

Upload resumes: the audio goes to `incoming/<id>.opus.part`, opened without truncation; a later
call stats it and restarts a safety margin below its size (pipelined writes may complete out of
order, so the last window of blocks may have holes below the reported size), writing at explicit
offsets with a window of requests in flight. Then fsync, close and posix-rename to
`incoming/<id>.opus`. The runner checks size and sha256 against the job document, so the upload
needs no remote checksum command.

One thing over 400 lines: every SFTP operation on a host shares the one connection, the timeouts and
the error mapping above, so they stay in the one `Host` class.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import asyncssh

from whisperdrop.shared import log, spool
from whisperdrop.shared.config_checks import is_public_key, private_key_hint
from whisperdrop.shared.errors import WhisperdropError
from whisperdrop.shared.files import write_atomic

T = TypeVar("T")

BLOCK_SIZE = 255 * 1024
"""Bytes per SFTP write request: OpenSSH's largest (limits@openssh.com says 261120); less if the
server's limit is lower. 255 KiB x 8 measured 99 MiB/s on loopback, 128 KiB x 16 86, 64 KiB x 32 74."""
WINDOW = 7
"""SFTP write requests in flight at once on one file. 7 keeps a resume's re-sent bytes
(SAFETY_MARGIN + BLOCK_SIZE) within 2 MiB; 8 was no faster within the noise."""
SAFETY_MARGIN = BLOCK_SIZE * WINDOW
"""The largest resume margin (see resume_offset): a resume re-sends at most (WINDOW + 1) blocks,
2040 KiB for the largest block, under 2 MiB."""
KEEPALIVE_COUNT_MAX = 3
MAX_DOCUMENT_BYTES = 1 << 20
"""The most read of a job's state, progress, failure or heartbeat document (the runner's own cap)."""
MAX_RESULT_BYTES = 64 << 20
"""The most read of a Result: hours of audio with word timestamps come to a few MiB."""

_PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
    "aes128-ctr", "aes256-ctr",
)
_WRITE_PFLAGS = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT  # no FXF_TRUNC: the .part is resumed


def encryption_algs() -> list[str]:
    """AES-GCM first (about 1.7x chacha20 on AES-NI CPUs), then asyncssh's other defaults."""
    available = {alg.decode() for alg in asyncssh.encryption.get_encryption_algs()}
    preferred = [alg for alg in _PREFERRED_CIPHERS if alg in available]
    rest = [alg.decode() for alg in asyncssh.encryption.get_default_encryption_algs()]
    return preferred + [alg for alg in rest if alg not in preferred]


class HostError(WhisperdropError):
    """A failed operation on a GPU host (kind `host`), with the evidence.

    `host` (the host's name), `operation` (connect, upload, submit...), `cause` (the asyncssh or OS
    error text), `transient` (True: retrying later may work; the same as `retryable`) and `hint` (how
    to fix it).
    """

    kind = "host"

    def __init__(self, host: str, operation: str, cause: str, *, transient: bool, hint: str = ""):
        self.host = host
        self.operation = operation
        self.cause = cause
        self.transient = transient
        lasting = "transient" if transient else "permanent"
        message = f"host {host}: {operation} failed ({lasting}): {cause}"
        super().__init__(f"{message}; {hint}" if hint else message, retryable=transient, hint=hint)


class HostKeyError(HostError):
    """The host key is unknown or does not match known_hosts. Never transient, never auto-accepted."""


class AuthError(HostError):
    """The host refused our key, or the key file cannot be read. Never transient."""


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


def _ssh_host_spec(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


_NETWORK_ERRORS = (
    asyncssh.DisconnectError, asyncssh.ChannelOpenError, asyncssh.SFTPConnectionLost,
    asyncssh.SFTPNoConnection, OSError, asyncio.TimeoutError, EOFError, BrokenPipeError,
)


class Host:
    """One GPU host reached over SSH, used only through SFTP file operations in its spool.

    `settings` is one `remote.hosts` item (name, host, port, user, key, known_hosts, spool).
    `operation_timeout` bounds every SFTP request (default: connect_timeout plus the time three
    missed keepalives take); an upload fails when no write completes within it.
    """

    def __init__(self, settings: dict, *, connect_timeout: float, keepalive_interval: float,
                 operation_timeout: float | None = None):
        self.name: str = settings["name"]
        self.address: str = settings["host"]
        self.port: int = int(settings.get("port") or 22)
        self.user: str | None = settings.get("user")
        self.key: str | None = settings.get("key")
        self.known_hosts: str | None = settings.get("known_hosts")
        self.layout = spool.Layout(settings.get("spool") or "spool")
        self.connect_timeout = float(connect_timeout)
        self.keepalive_interval = float(keepalive_interval)
        self.bytes_written = 0  # audio bytes the host acknowledged, over every upload, cut ones too
        self.operation_timeout = float(
            operation_timeout or self.connect_timeout + self.keepalive_interval * KEEPALIVE_COUNT_MAX
        )
        self._connection: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._lock = asyncio.Lock()
        self._log = log.get("transfer", host=self.name)

    # -- errors ------------------------------------------------------------------------------------

    def _error(self, operation: str, error: BaseException) -> HostError:
        """Map an asyncssh/OS error to a HostError; drop the connection when the network failed."""
        if isinstance(error, HostError):
            return error
        cause = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if isinstance(error, asyncio.TimeoutError):
            cause = f"no answer within {self.operation_timeout:g} s"
        if isinstance(error, (asyncssh.SFTPFailure, asyncssh.SFTPNoSpaceOnFilesystem,
                              asyncssh.SFTPQuotaExceeded)) and operation in ("upload", "submit"):
            return HostError(self.name, operation, cause, transient=True,
                             hint=f"free space on {self.address} (the spool's file system may be full)")
        if isinstance(error, asyncssh.SFTPPermissionDenied):
            return HostError(self.name, operation, cause, transient=False,
                             hint=f"let the SSH user write the spool {self.layout.root!r} on {self.address}")
        if isinstance(error, asyncssh.PermissionDenied):
            return AuthError(self.name, operation, cause, transient=False, hint=self._auth_hint())
        if isinstance(error, _NETWORK_ERRORS):
            if isinstance(error, asyncio.TimeoutError) or self._connection is None or self._connection.is_closed():
                # A wedged or lost connection. (A late error from an older connection must not
                # abort the one a parallel call has opened since, hence the check.)
                self._drop()
            return HostError(self.name, operation, cause, transient=True,
                             hint=f"check that {self.address} port {self.port} is reachable; retried later")
        if isinstance(error, asyncssh.SFTPNoSuchFile):
            return HostError(self.name, operation, cause, transient=False,
                             hint=f"check that the spool {self.layout.root!r} exists on {self.address}")
        return HostError(self.name, operation, cause, transient=False)

    def _auth_hint(self) -> str:
        key = self.key or "the ssh-agent's and ~/.ssh/id_* keys"
        user = self.user or "the user from ~/.ssh/config or the local user"
        return f"add the public key of {key} to the authorized_keys of {user} on {self.address}"

    async def _timed(self, operation: str, awaitable: Awaitable[T], timeout: float | None = None) -> T:
        """Await one network call under a timeout; raise HostError on any failure."""
        try:
            return await asyncio.wait_for(awaitable, timeout or self.operation_timeout)
        except (asyncssh.Error, OSError, asyncio.TimeoutError, EOFError) as error:
            raise self._error(operation, error) from error

    # -- connection --------------------------------------------------------------------------------

    def _known_hosts_path(self) -> str:
        return self.known_hosts or os.path.expanduser("~/.ssh/known_hosts")

    @property
    def known_hosts_file(self) -> str:
        """The known_hosts file this host's key is checked against (remote.hosts[].known_hosts, or
        ~/.ssh/known_hosts when that is empty)."""
        return self._known_hosts_path()

    def _host_key_error(self, cause: str, offered: str | None) -> HostKeyError:
        """An unknown or changed host key, with the command that fixes it."""
        path = self._known_hosts_path()
        spec = _ssh_host_spec(self.address, self.port)
        offered_text = f" (it offers {offered})" if offered else ""
        try:
            trusted = asyncssh.read_known_hosts(path).match(self.address, "", self.port)[0]
        except (OSError, ValueError):
            trusted = []
        if trusted:
            return HostKeyError(
                self.name, "connect", cause, transient=False,
                hint=(f"the host key of {spec} changed{offered_text}; if that is expected, remove the old line "
                      f"with `ssh-keygen -R {shlex.quote(spec)} -f {shlex.quote(path)}`, verify the new "
                      f"fingerprint out of band and add it: `ssh-keyscan -p {self.port} {self.address} "
                      f">> {shlex.quote(path)}`"))
        return HostKeyError(
            self.name, "connect", cause, transient=False,
            hint=(f"{spec} is not in {path}{offered_text}; verify the fingerprint and add it: "
                  f"`ssh-keyscan -p {self.port} {self.address} >> {shlex.quote(path)}`"))

    async def _offered_key(self) -> str | None:
        """The fingerprint of the key the host offers, for the error message only (never trusted)."""
        try:
            key = await asyncio.wait_for(asyncssh.get_server_host_key(
                self.address, self.port), self.connect_timeout + 1)
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as error:
            self._log.debug("transfer.host_key_probe_failed", error=str(error))
            return None
        return f"{key.get_algorithm()} {key.get_fingerprint()}" if key else None

    def _connect_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            # () is asyncssh's default: ~/.ssh/known_hosts (or UserKnownHostsFile from ~/.ssh/config).
            # Never None, which would accept any key.
            "known_hosts": self.known_hosts if self.known_hosts else (),
            "connect_timeout": self.connect_timeout,
            "keepalive_interval": self.keepalive_interval,
            "keepalive_count_max": KEEPALIVE_COUNT_MAX,
            "encryption_algs": encryption_algs(),
            "compression_algs": ["none"],  # Opus does not compress
        }
        if self.key:
            options["client_keys"] = [self.key]
        if self.user:
            options["username"] = self.user
        if self.port != 22:  # 22 lets a Port in ~/.ssh/config apply
            options["port"] = self.port
        return options

    async def connect(self) -> None:
        """Open the SSH connection and the SFTP client if they are not open.

        Raises HostKeyError (unknown or changed host key, no known_hosts file), AuthError (key
        refused or unreadable) or HostError (unreachable, timeout: transient).
        """
        async with self._lock:
            if self._connection is not None and not self._connection.is_closed() and self._sftp is not None:
                return
            self._drop()
            await self._open()

    async def _open(self) -> None:
        if self.known_hosts and not os.path.isfile(self.known_hosts):
            raise HostKeyError(
                self.name, "connect", f"no known_hosts file at {self.known_hosts}", transient=False,
                hint=(f"verify the fingerprint of {self.address} and add it: `ssh-keyscan -p {self.port} "
                      f"{self.address} >> {shlex.quote(self.known_hosts)}`"))
        if self.key and not os.path.isfile(self.key):
            raise AuthError(self.name, "connect", f"key file {self.key} not found", transient=False,
                            hint="set remote.hosts[].key to an existing private key file, or leave it empty "
                                 "for the ssh-agent and ~/.ssh/id_* keys")
        if self.key and is_public_key(Path(self.key)):  # asyncssh would say "Invalid private key"
            raise AuthError(self.name, "connect", f"{self.key} is a public key; 'key' takes the private key",
                            transient=False, hint=f"set remote.hosts[].key to the private key: "
                                                  f"{private_key_hint(Path(self.key))}")
        started = time.monotonic()
        try:
            # asyncssh's connect_timeout covers TCP and the SSH handshake; wait_for guards a server
            # that accepts and never answers, whatever asyncssh does.
            connection = await asyncio.wait_for(
                asyncssh.connect(self.address, **self._connect_options()), self.connect_timeout + 1)
        except asyncssh.HostKeyNotVerifiable as error:
            raise self._host_key_error(str(error), await self._offered_key()) from error
        except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as error:
            raise AuthError(self.name, "connect", f"cannot load key {self.key}: {error}", transient=False,
                            hint="use an unencrypted key for the daemon, or load it into ssh-agent") from error
        except asyncio.TimeoutError as error:
            raise HostError(self.name, "connect", f"no SSH handshake within {self.connect_timeout:g} s",
                            transient=True, hint=f"check that an SSH server answers on {self.address} "
                                                 f"port {self.port}") from error
        except (asyncssh.Error, OSError) as error:
            raise self._error("connect", error) from error
        try:
            sftp = await asyncio.wait_for(connection.start_sftp_client(), self.operation_timeout)
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as error:
            connection.abort()
            raise HostError(self.name, "connect", f"SFTP subsystem: {type(error).__name__}: {error}",
                            transient=isinstance(error, _NETWORK_ERRORS),
                            hint=f"enable `Subsystem sftp internal-sftp` in sshd_config on {self.address}") from error
        self._connection, self._sftp = connection, sftp
        self._log.info("transfer.connected", seconds=round(time.monotonic() - started, 3),
                       cipher=connection.get_extra_info("send_cipher"))

    async def _client(self) -> asyncssh.SFTPClient:
        await self.connect()
        assert self._sftp is not None
        return self._sftp

    def _drop(self) -> None:
        """Forget the connection after a network failure; the next call reconnects."""
        if self._connection is not None:
            self._connection.abort()
        self._connection, self._sftp = None, None

    async def close(self) -> None:
        """Close the SFTP client and the SSH connection (waits at most connect_timeout)."""
        connection, sftp = self._connection, self._sftp
        self._connection, self._sftp = None, None
        if sftp is not None:
            sftp.exit()
        if connection is not None:
            connection.close()
            try:
                await asyncio.wait_for(connection.wait_closed(), self.connect_timeout)
            except asyncio.TimeoutError:
                connection.abort()

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

    async def _size(self, sftp: asyncssh.SFTPClient, path: str, operation: str) -> int | None:
        try:
            attrs = await self._timed(operation, sftp.stat(path))
        except HostError as error:
            if isinstance(error.__cause__, asyncssh.SFTPNoSuchFile):
                return None
            raise
        return attrs.size

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

    async def _rename(self, operation: str, sftp: asyncssh.SFTPClient, source: str, target: str) -> None:
        """Atomically replace `target` by `source` (posix-rename@openssh.com)."""
        try:
            await self._timed(operation, sftp.posix_rename(source, target))
        except HostError as error:
            if not isinstance(error.__cause__, asyncssh.SFTPOpUnsupported):
                raise
            # A server without the extension: plain SFTP rename refuses to replace, so remove first.
            try:
                await self._timed(operation, sftp.remove(target))
            except HostError as remove_error:
                if not isinstance(remove_error.__cause__, asyncssh.SFTPNoSuchFile):
                    raise
            await self._timed(operation, sftp.rename(source, target))

    async def submit(self, document: dict) -> None:
        """Submit a job: write jobs/<id>.json.tmp, fsync, and rename it to jobs/<id>.json."""
        job = spool.check_job_id(document.get("job_id"))
        target = self.layout.job(job)
        temporary = target + ".tmp"
        sftp = await self._client()
        await self._write_file("submit", sftp, temporary, spool.dumps(document))
        await self._rename("submit", sftp, temporary, target)
        self._log.debug("transfer.submitted", job_id=job)

    async def _close_quietly(self, remote: asyncssh.SFTPClientFile) -> None:
        """Close a remote file while another error propagates, without hiding that error."""
        try:
            await asyncio.wait_for(remote.close(), self.connect_timeout)
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as error:
            self._log.debug("transfer.close_failed", error=str(error))

    async def _write_file(self, operation: str, sftp: asyncssh.SFTPClient, path: str, data: bytes) -> None:
        remote = await self._timed(operation, sftp.open(path, "wb"))
        try:
            await self._timed(operation, remote.write(data, 0))
            try:
                await self._timed(operation, remote.fsync())
            except HostError as error:
                if not isinstance(error.__cause__, asyncssh.SFTPOpUnsupported):
                    raise
        except BaseException:
            await self._close_quietly(remote)
            raise
        await self._timed(operation, remote.close())

    async def _read(self, operation: str, sftp: asyncssh.SFTPClient, path: str,
                    limit: int = MAX_DOCUMENT_BYTES) -> bytes | None:
        """The bytes of a remote file, or None when it does not exist. Reads at most `limit` + 1 bytes
        and raises spool.ProtocolError when the file is larger than `limit`."""
        try:
            remote = await self._timed(operation, sftp.open(path, "rb"))
        except HostError as error:
            if isinstance(error.__cause__, asyncssh.SFTPNoSuchFile):
                return None
            raise
        try:
            data = await self._timed(operation, remote.read(limit + 1))
        except BaseException:
            await self._close_quietly(remote)
            raise
        await self._timed(operation, remote.close())
        if len(data) > limit:
            raise spool.ProtocolError(f"host {self.name}: {path} is larger than {limit} bytes; not read")
        return data

    async def _read_json(self, operation: str, sftp: asyncssh.SFTPClient, path: str) -> tuple[bool, Any]:
        """(exists, parsed document or None when unparsable or over MAX_DOCUMENT_BYTES)."""
        try:
            data = await self._read(operation, sftp, path)
        except spool.ProtocolError as error:
            self._log.warning("transfer.oversized_document", path=path, error=str(error))
            return True, None
        if data is None:
            return False, None
        try:
            return True, json.loads(data)
        except ValueError as error:
            self._log.warning("transfer.unparsable_document", path=path, error=str(error))
            return True, None

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
