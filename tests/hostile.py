"""Hostile HTTP clients, for the API's tests and its flood figures (bench/api_flood.py): a flood of
half-open connections, and a chunked upload that goes on sending after its answer. Plain sockets, so
nothing a client library would correct gets corrected."""

from __future__ import annotations

import errno
import os
import resource
import selectors
import socket
import time

HALF_OPEN_HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\n"  # the request head, never finished
PENDING_CONNECTS = 64  # connects in progress at once: past the listen backlog, SYNs are only dropped and retried


class HalfOpenFlood:
    """`count` connections to `address` that each send the start of a request head and never finish it."""

    def __init__(self, address: tuple[str, int], count: int, head: bytes = HALF_OPEN_HEAD):
        self.address = address
        self.count = count
        self.head = head
        self.sockets: list[socket.socket] = []
        self.failed = 0

    def open(self, timeout: float = 60.0) -> int:
        """Connect the sockets (PENDING_CONNECTS at a time) and send the unfinished head on each as it
        connects; returns how many connected within `timeout` seconds."""
        selector = selectors.DefaultSelector()
        deadline = time.monotonic() + timeout
        started = 0
        pending = 0
        try:
            while time.monotonic() < deadline and (started < self.count or pending):
                while started < self.count and pending < PENDING_CONNECTS:
                    sock = socket.socket(socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET)
                    sock.setblocking(False)
                    started += 1
                    code = sock.connect_ex(self.address)
                    if code not in (0, errno.EINPROGRESS):
                        sock.close()
                        self.failed += 1
                        continue
                    selector.register(sock, selectors.EVENT_WRITE)
                    pending += 1
                for key, _ in selector.select(timeout=0.2):
                    sock = key.fileobj
                    selector.unregister(sock)
                    pending -= 1
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                        sock.close()
                        self.failed += 1
                        continue
                    try:
                        sock.send(self.head)
                    except OSError:
                        sock.close()
                        self.failed += 1
                        continue
                    self.sockets.append(sock)
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()
            selector.close()
        return len(self.sockets)

    def held(self) -> int:
        """How many of the connected sockets the server has not closed yet."""
        alive = 0
        for sock in self.sockets:
            try:
                data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                alive += 1
                continue
            except OSError:
                continue
            if data and not data.startswith(b"H"):  # anything but an answer: still open
                alive += 1
        return alive

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []


def raise_open_file_limit(wanted: int) -> bool:
    """Raise this process's soft RLIMIT_NOFILE to at least `wanted` (within the hard limit); True when it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return True
    if hard != resource.RLIM_INFINITY and hard < wanted:
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return True


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything `sock` receives until the peer closes it (or resets it, or `timeout` passes)."""
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        received += chunk
    return received


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP answer (0 when there is none)."""
    line = answer.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit() else 0


def chunked_upload_that_keeps_sending(address: tuple[str, int], path: str, host: str, megabytes: int,
                                      framed_megabytes: int | None = None,
                                      timeout: float = 120.0) -> tuple[bytes, int]:
    """POST a multipart upload of `megabytes` MB, chunked (no Content-Length), that goes on sending
    after the answer comes, until the server closes the connection or everything is sent; past
    `framed_megabytes` (when given) the bytes go out raw, without chunk framing, as a client that
    ignores the answer streams the rest of its file. Returns (the answer, bytes sent)."""
    boundary = b"wdboundary"
    start = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="audio"; filename="big.wav"\r\n'
             b"Content-Type: audio/wav\r\n\r\n")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary.decode()}\r\n\r\n").encode()
    block = os.urandom(1 << 16)
    sent = 0
    answer = b""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(head)
        sock.sendall(b"%x\r\n%s\r\n" % (len(start), start))
        deadline = time.monotonic() + timeout
        try:
            while sent < megabytes << 20 and time.monotonic() < deadline:
                framed = framed_megabytes is None or sent < framed_megabytes << 20
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block) if framed else block)
                sent += len(block)
                sock.setblocking(False)
                try:
                    answer += sock.recv(65536)
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
                    sock.settimeout(timeout)
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass  # the server closed the connection: what it answered is in `answer` or still readable
        answer += read_until_closed(sock, 10.0)
    return answer, sent
