"""The API's connections: how many may be open, how long a client may take to send a request, and
nothing a client sends ever reaching the log as a traceback.

uvicorn serves each connection with an h11 protocol object; `GuardedProtocol` is uvicorn's h11
protocol with a table of the open connections (`Connections`) behind it:

- At most `Connections.limit` connections. A new one past it closes the connection that has waited
  longest for a request head, so a flood of half-open connections only ever replaces its own (a
  real client's head follows its connection within a round trip); when every connection is busy
  with a request, the new one gets 503 at once and is closed.
- A request's head (request line and headers) must arrive within `head_timeout` of the connection
  (or of the previous answer on it); an upload's body may pause at most `body_timeout` (time the
  server itself stops reading is not the client's). `Connections.sweep()`, once a second, cuts the
  slow ones.
- An h11 error from a client's bytes (one that goes on sending after its answer) ends the
  connection quietly, and bytes that arrive once the answer said "close" are dropped unread.

Every cut is one `Rejections.note()`: one log line per reason per interval, whatever the count.

The limit leaves room in the open-file limit (`connection_limit`): the inbox, the ledger, the log,
SSH and the extraction keep `RESERVED_FILES` descriptors that the API can never take.

uvicorn's own settings do part of this (see `ApiServer.start`): `h11_max_incomplete_event_size`
bounds a request head to 16 KiB (400 past it), `timeout_keep_alive` closes a keep-alive connection
idle 5 s after an answer, `backlog` bounds the connections accepted per turn of the loop (so the
descriptors in flight before `connection_made` stay few). What they lack is added here: uvicorn
has no deadline for a request's head or body (its keep-alive timer starts only after an answer and
stops at the first byte), no bound on open connections (`limit_concurrency` answers 503 only once
a head has arrived, and counts the half-open connections too, so in a flood it turns away the real
request, not the flood), and a data_received error reaches asyncio's exception handler as a
traceback.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from whisperdrop.daemon.api.rejections import Rejections

RESERVED_FILES = 256  # descriptors the API never takes: inbox, ledger, log, SSH, extraction, engine
MIN_CONNECTIONS = 8
ACCEPT_BATCH = 64  # `backlog`: connections accepted per turn of the loop, before any is counted here
FULL_RETRY_AFTER_S = 5
MAX_HEAD_BYTES = 16 * 1024  # h11's own default, set explicitly: a request head larger than this is refused


def connection_limit(wanted: int, open_files: int, uploads_in_flight: int) -> int:
    """The open connections the API may hold: `wanted` (api.max_connections), lowered so that with
    `open_files` descriptors (the soft RLIMIT_NOFILE) the reserve, two turns of accepted connections
    (one accepted and not yet counted, one closed for them and not yet released: a connection's
    descriptor is closed on the loop's next turn) and two files per upload in flight (its spool and
    its stored copy) still fit; at least MIN_CONNECTIONS."""
    room = open_files - RESERVED_FILES - 2 * ACCEPT_BATCH - 2 * uploads_in_flight
    return max(MIN_CONNECTIONS, min(wanted, room))


def _raw_response(status: int, reason: str, body: dict | None = None, headers: dict | None = None) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for a client no request object exists for."""
    data = json.dumps(body).encode() if body is not None else b""
    lines = [f"HTTP/1.1 {status} {reason}", "connection: close", f"content-length: {len(data)}"]
    if body is not None:
        lines.append("content-type: application/json")
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


FULL = _raw_response(503, "Service Unavailable", {"error": {
    "message": "too many open connections to the API; try again in a few seconds",
    "type": "service_unavailable", "param": None, "code": "connections_full"}},
    {"retry-after": str(FULL_RETRY_AFTER_S)})
HEAD_TIMEOUT = _raw_response(408, "Request Timeout")


class Connections:
    """The open API connections and their deadlines (see the module's doc)."""

    def __init__(self, limit: int, head_timeout: float, body_timeout: float, rejections: Rejections,
                 clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.rejections = rejections
        self.clock = clock
        self.open: set[GuardedProtocol] = set()
        self.most_open = 0  # the most connections held at once since start

    def admit(self, connection: "GuardedProtocol") -> bool:
        """Count a new connection; past the limit, close the one waiting longest for a request head to
        make room. False when every connection is busy with a request (the caller refuses the new one)."""
        if len(self.open) >= self.limit:
            waiting = [other for other in self.open if other.waiting_for_head()]
            if not waiting:
                self.rejections.note("connections_full", status=503, client=connection.client_address(),
                                     detail=f"{len(self.open)} connections open, each in a request (api.max_connections)")
                return False
            oldest = min(waiting, key=lambda other: other.phase_started)
            oldest.cut("connection_evicted", detail=f"the oldest of {len(waiting)} connections without a whole "
                                                    f"request, closed for a new one ({self.limit} open)")
        self.open.add(connection)
        self.most_open = max(self.most_open, len(self.open))
        return True

    def sweep(self) -> int:
        """Cut each connection past its deadline: no whole request head within `head_timeout`, or a
        body silent for `body_timeout` while the server was reading. Returns how many were cut."""
        now = self.clock()
        cut = 0
        for connection in list(self.open):
            if connection.closing():
                continue
            state = connection.conn.their_state
            if state is h11.IDLE and now - connection.phase_started > self.head_timeout:
                connection.cut("head_timeout", status=408 if connection.head_bytes else None,
                               detail=f"no whole request head within api.head_timeout ({self.head_timeout:g} s)")
                cut += 1
            elif state is h11.SEND_BODY:
                if connection.flow.read_paused:  # the server stopped reading: not the client's pause
                    connection.last_read = now
                elif now - connection.last_read > self.body_timeout:
                    connection.cut("body_timeout", detail=f"the body stalled longer than api.body_timeout "
                                                          f"({self.body_timeout:g} s)")
                    cut += 1
        return cut


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol, counted and timed by `connections`, its `table` (see the module's doc)."""

    def __init__(self, *args: Any, connections: Connections, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.table = connections  # not `connections`: uvicorn's own set of them has that name
        self.phase_started = self.last_read = connections.clock()
        self.head_bytes = 0  # bytes received since the phase began (a head in progress)

    def client_address(self) -> str | None:
        return self.client[0] if self.client else None

    def waiting_for_head(self) -> bool:
        """True while no request is in progress: a new connection, or an idle one between requests."""
        return not self.closing() and self.conn.their_state is h11.IDLE

    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.phase_started = self.last_read = self.table.clock()
        if not self.table.admit(self):
            transport.write(FULL)
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.table.open.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.closing() or self.conn.our_state in (h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            return  # the answer said close: what the client still sends is not read
        self.last_read = self.table.clock()
        if self.conn.their_state is h11.IDLE:
            self.head_bytes += len(data)
        try:
            super().data_received(data)
        except (h11.LocalProtocolError, h11.RemoteProtocolError) as error:
            self.cut("protocol_error", detail=f"{type(error).__name__}: {error}")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.phase_started = self.table.clock()  # the next request's head is timed from here
        self.head_bytes = 0

    def send_400_response(self, msg: str) -> None:
        self.table.rejections.note("malformed", status=400, client=self.client_address(), detail=msg)
        self.table.open.discard(self)
        try:
            super().send_400_response(msg)
        except h11.LocalProtocolError:  # no answer can be framed in this state: just close
            self.transport.close()

    def cut(self, reason: str, status: int | None = None, detail: str | None = None) -> None:
        """Close this connection for `reason` (logged through Rejections), with a 408 first when a
        request head was under way."""
        self.table.open.discard(self)
        if self.closing():
            return
        method = path = None
        if self.conn.their_state is not h11.IDLE and self.scope:
            method, path = self.scope.get("method"), self.scope.get("path")
        self.table.rejections.note(reason, status=status, client=self.client_address(), method=method,
                                         path=path, detail=detail)
        if status == 408 and self.conn.our_state is h11.IDLE:
            self.transport.write(HEAD_TIMEOUT)
        self.transport.close()
