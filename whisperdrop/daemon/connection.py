"""The SSH connection to one GPU host: SFTP only, never a remote command.

A `Connection` holds one SSH connection and one SFTP client, reused by every call and reopened on
demand after a drop (`transfer.Host` builds the spool operations on it). The host key is checked
against known_hosts and never accepted without a person; AES-GCM is preferred.

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
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any, Awaitable, TypeVar

import asyncssh

from whisperdrop.shared import log, spool
from whisperdrop.shared.config_checks import is_public_key, private_key_hint
from whisperdrop.shared.errors import WhisperdropError

T = TypeVar("T")

KEEPALIVE_COUNT_MAX = 3
MAX_DOCUMENT_BYTES = 1 << 20
"""The most read of a job's state, progress, failure or heartbeat document (the runner's own cap)."""

_PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
    "aes128-ctr", "aes256-ctr",
)


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


def _ssh_host_spec(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


_NETWORK_ERRORS = (
    asyncssh.DisconnectError, asyncssh.ChannelOpenError, asyncssh.SFTPConnectionLost,
    asyncssh.SFTPNoConnection, OSError, asyncio.TimeoutError, EOFError, BrokenPipeError,
)


class Connection:
    """One SSH connection and its SFTP client to one GPU host, opened on demand and shared by every call.

    `settings` is one `remote.hosts` item (name, host, port, user, key, known_hosts, spool).
    `operation_timeout` bounds every SFTP request (default: connect_timeout plus the time three
    missed keepalives take). Subclassed by `transfer.Host`, which adds the spool operations.
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

    # -- SFTP files -------------------------------------------------------------------------------

    async def _size(self, sftp: asyncssh.SFTPClient, path: str, operation: str) -> int | None:
        try:
            attrs = await self._timed(operation, sftp.stat(path))
        except HostError as error:
            if isinstance(error.__cause__, asyncssh.SFTPNoSuchFile):
                return None
            raise
        return attrs.size

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

    async def _close_quietly(self, remote: asyncssh.SFTPClientFile) -> None:
        """Close a remote file while another error propagates, without hiding that error."""
        try:
            await asyncio.wait_for(remote.close(), self.connect_timeout)
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as error:
            self._log.debug("transfer.close_failed", error=str(error))

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
