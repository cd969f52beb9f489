"""In-process servers for fault injection at an exact byte.

`FaultServer`: an asyncssh server on 127.0.0.1 (port 0) with its own host key and SFTP on a real
directory (chroot=), that can drop the connection once N bytes were written to files
(`drop_after`), or fail writes with SFTPFailure "No space left on device" once N bytes were
written (`fail_after`). Each fault fires once; `bytes_written` counts what reached the disk over
all connections.

`HungServer`: a TCP server that accepts connections and never says anything (no SSH banner).

Both are async context managers and must run in the test's event loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh

from sshd import known_hosts_line


class _Faults:
    def __init__(self, drop_after: int | None, fail_after: int | None):
        self.drop_after = drop_after
        self.fail_after = fail_after
        self.bytes_written = 0
        self.drops = 0
        self.failures = 0


class _FaultySFTPServer(asyncssh.SFTPServer):
    """SFTP on a real directory; writes go through the fault counters first."""

    def __init__(self, chan: asyncssh.SSHServerChannel, *, root: Path, faults: _Faults):
        super().__init__(chan, chroot=str(root).encode())
        self._faults = faults

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        faults = self._faults
        if faults.drop_after is not None and faults.bytes_written + len(data) > faults.drop_after:
            faults.drop_after = None
            faults.drops += 1
            self.connection.abort()  # the transport goes away; no reply to this write
            raise asyncssh.SFTPConnectionLost("connection dropped by the fault server")
        if faults.fail_after is not None and faults.bytes_written + len(data) > faults.fail_after:
            faults.fail_after = None
            faults.failures += 1
            raise asyncssh.SFTPFailure("No space left on device")
        written = super().write(file_obj, offset, data)
        faults.bytes_written += len(data)
        return written


class FaultServer:
    """An asyncssh SSH/SFTP server over `root` that accepts `client_public_key` only."""

    def __init__(self, root: Path, client_public_key: Path, *, drop_after: int | None = None,
                 fail_after: int | None = None, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root)
        self.client_public_key = Path(client_public_key)
        self.faults = _Faults(drop_after, fail_after)
        self.host = host
        self.port = port
        self._server: asyncssh.SSHAcceptor | None = None
        self._host_key = asyncssh.generate_private_key("ssh-ed25519")

    @property
    def bytes_written(self) -> int:
        return self.faults.bytes_written

    def write_known_hosts(self, path: Path) -> Path:
        """Write a known_hosts file that trusts this server's host key; return its path."""
        public = path.with_suffix(".hostkey.pub")
        self._host_key.write_public_key(str(public))
        path.write_text(known_hosts_line(self.host, self.port, public))
        return path

    async def __aenter__(self) -> "FaultServer":
        faults, root = self.faults, self.root
        self._server = await asyncssh.create_server(
            asyncssh.SSHServer, self.host, self.port, server_host_keys=[self._host_key],
            authorized_client_keys=str(self.client_public_key),
            sftp_factory=lambda chan: _FaultySFTPServer(chan, root=root, faults=faults),
            allow_scp=False,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class HungServer:
    """Accepts TCP connections on 127.0.0.1 and never answers."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)  # hold the socket open, say nothing

    async def __aenter__(self) -> "HungServer":
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def _serve(arguments) -> None:
    server = FaultServer(Path(arguments.root), Path(arguments.client_key), drop_after=arguments.drop_after,
                         fail_after=arguments.fail_after, host=arguments.listen, port=arguments.port)
    async with server:
        server.write_known_hosts(Path(arguments.known_hosts))
        print(server.port, flush=True)
        while True:
            await asyncio.sleep(0.5)
            print(f"bytes_written={server.faults.bytes_written} drops={server.faults.drops}", flush=True)


if __name__ == "__main__":
    # A fault server in its own process, e.g. inside a network namespace behind a shaped link:
    #   ip netns exec NS python tests/faultserver.py --root R --client-key K.pub --known-hosts F --listen ADDR
    # It prints its port, then a line of counters every half second.
    import argparse

    parser = argparse.ArgumentParser()
    for flag in ("--root", "--client-key", "--known-hosts", "--listen"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--drop-after", type=int)
    parser.add_argument("--fail-after", type=int)
    asyncio.run(_serve(parser.parse_args()))
