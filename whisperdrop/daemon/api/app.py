"""The FastAPI app and its server, uvicorn on the daemon's own asyncio loop (no thread of its own).

Layers, outermost first: `connections.GuardedProtocol` (uvicorn's h11 protocol with a bound on open
connections and deadlines for a request's head and body), uvicorn's ProxyHeadersMiddleware (only
where `api.forwarded_allow` names proxies), `guard.Guard` (host, caller, origin, uploads in flight,
size limit, the request log; the page's own files at `/` pass without the token, so the page
can ask for it) and the routes. `ApiServer.start()` binds the socket itself (so a port
in use is a clear error, not uvicorn's exit) and serves it as a task; `stop()` closes it within a
bound. A client's misbehaviour, wherever it is seen, is an `api.rejected` line (see `rejections`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import resource
import socket
import tempfile
from collections import Counter
from typing import Any

import uvicorn
from fastapi import FastAPI

from whisperdrop.daemon.api import errors, routes_asr, routes_native, routes_openai, routes_page, uploads
from whisperdrop.daemon.api.connections import (ACCEPT_BATCH, MAX_HEAD_BYTES, Connections, GuardedProtocol,
                                                connection_limit)
from whisperdrop.daemon.api.guard import Guard, InFlight
from whisperdrop.daemon.api.rejections import Rejections
from whisperdrop.daemon.api.service import ApiService
from whisperdrop.shared import log

STOP_S = 3.0
KEEP_ALIVE_S = 5  # uvicorn closes a keep-alive connection idle this long after an answer
SWEEP_S = 1.0

def create_app(service: ApiService) -> FastAPI:
    """The app over `service`: every route, the error handlers, and the Guard around them."""
    app = FastAPI(title="whisperdrop", docs_url="/docs", redoc_url=None)
    app.state.service = service
    errors.install(app)
    for module in (routes_native, routes_openai, routes_asr, routes_page):
        app.include_router(module.router)
    return app


# uvicorn's warnings that are about what a client sent: counted as refusals, not logged one by one.
CLIENT_FAULTS = {"Invalid HTTP request received.": None,  # GuardedProtocol.send_400_response notes it
                 "Exceeded concurrency limit.": "connections_full", "Unsupported upgrade request.": "upgrade",
                 "No supported WebSocket library detected.": None}


class _ToLog(logging.Handler):
    """uvicorn's own warnings and errors as JSON lines, like every other line the daemon writes: what
    a client did wrong through `rejections` (one line per reason per interval), anything else as
    `api.server`, each message at most once per interval (`suppressed`: how many were left out since
    the last); tracebacks stay out."""

    def __init__(self, rejections: Rejections) -> None:
        super().__init__(logging.WARNING)
        self.rejections = rejections
        self.log = log.get("api")
        self.written: dict[str, float] = {}  # message -> when last written
        self.suppressed: Counter = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for start, reason in CLIENT_FAULTS.items():
            if message.startswith(start):
                if reason is not None:
                    self.rejections.note(reason, detail=message)
                return
        key, now = message[:200], self.rejections.clock()
        if now - self.written.get(key, float("-inf")) < self.rejections.interval:
            self.suppressed[key] += 1
            return
        if len(self.written) > 1000:  # bounded, whatever uvicorn says
            self.written.clear()
        self.written[key] = now
        (self.log.error if record.levelno >= logging.ERROR else self.log.warning)(
            "api.server", message=message, source=record.name, suppressed=self.suppressed.pop(key, 0))


UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def _route_uvicorn_logs(rejections: Rejections) -> _ToLog:
    handler = _ToLog(rejections)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    return handler


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the daemon's own handle SIGTERM and stop the server."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def split_listen(listen: str) -> tuple[str, int]:
    """("127.0.0.1", 8765) from "127.0.0.1:8765" (also "[::1]:8765" and "localhost:8765")."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or "localhost") is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiUnavailable(Exception):
    """The API cannot listen where `api.listen` says (the message names the address and the fix)."""


class ApiServer:
    """The HTTP API on the running loop: `await start()`, later `await stop()`."""

    def __init__(self, config: Any, pipeline: Any, remote: Any | None = None):
        self.config = config
        api = config.api
        self.listen = api.listen
        self.service = ApiService(config, pipeline, remote)
        self.rejections = Rejections()
        self.open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = connection_limit(api.max_connections, self.open_files, api.max_uploads_in_flight)
        self.connections = Connections(limit, float(api.head_timeout), float(api.body_timeout), self.rejections)
        self.in_flight = InFlight(uploads.root(self.service.state_dir), api.max_uploads_in_flight,
                                  int(float(api.max_uploads_in_flight_mb) * 1_000_000))
        self.service.figures = self.figures
        self.app = Guard(create_app(self.service), api, self.service.limit, self.in_flight, self.rejections,
                         public=routes_page.PUBLIC_PATHS)
        self.server: _Server | None = None
        self.task: asyncio.Task | None = None
        self.sweeper: asyncio.Task | None = None
        self.socket: socket.socket | None = None
        self.log = log.get("api")

    def figures(self) -> dict:
        """The API's bounds and how full they are, for /health and the metrics: connections (open,
        most at once, max), uploads in flight (count, bytes, their max), refusals by reason since start."""
        return {"connections": {"open": len(self.connections.open), "most": self.connections.most_open,
                                "max": self.connections.limit},
                "uploads": self.in_flight.snapshot(), "rejected": dict(self.rejections.totals)}

    def bind(self) -> socket.socket:
        """Bind and listen on `api.listen`. Raises ApiUnavailable naming the address and the fix."""
        host, port = split_listen(self.listen)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, kind, protocol, _, address = infos[0]
            sock = socket.socket(family, kind, protocol)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
                sock.listen(ACCEPT_BATCH)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
        except OSError as error:
            raise ApiUnavailable(f"api.listen {self.listen}: cannot listen there ({error.strerror or error}); "
                                 "choose a free port or an address of this machine in config.yaml") from None
        return sock

    async def start(self) -> None:
        """Listen and serve as a task on the running loop. Raises ApiUnavailable."""
        self.socket = self.bind()
        ledger = self.service.pipeline.ledger
        pending = {source.relpath for job_id in {job.job_id for job in ledger.unfinished_jobs()}
                   | set(ledger.finished_with_pending_sources()) for source in ledger.sources_of(job_id)}
        swept = uploads.sweep(self.service.state_dir, pending)
        # Starlette's multipart parser spools each upload to a temporary file while it arrives: have
        # it do so on the state disk, not in /tmp, which is often memory (tmpfs). Process-wide, and
        # nothing else in the daemon uses tempfile.
        incoming = uploads.root(self.service.state_dir) / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        tempfile.tempdir = str(incoming)
        if swept:
            self.log.info("api.uploads_swept", removed=swept, reason="stored but never recorded (a cut request)")
        _route_uvicorn_logs(self.rejections)
        loop = asyncio.get_running_loop()
        self._quiet_loop_errors(loop)
        api = self.config.api
        forwarded = list(api.forwarded_allow)
        config = uvicorn.Config(
            self.app, http=functools.partial(GuardedProtocol, connections=self.connections), log_config=None,
            access_log=False, lifespan="off", timeout_graceful_shutdown=STOP_S, server_header=False,
            proxy_headers=bool(forwarded), forwarded_allow_ips=forwarded or None, backlog=ACCEPT_BATCH,
            timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEAD_BYTES)
        self.server = _Server(config)
        self.task = loop.create_task(self.server.serve(sockets=[self.socket]), name="api")
        while not self.server.started and not self.task.done():
            await asyncio.sleep(0.01)  # uvicorn sets `started` without an event to wait on; it takes a few ms
        if self.task.done():
            self.task.result()
        self.sweeper = loop.create_task(self._sweep(), name="api-sweeper")
        host, port = self.socket.getsockname()[:2]
        reduced = self.connections.limit < api.max_connections
        self.log.info("api.listening", listen=self.listen, port=port, token=api.token is not None,
                      trusted_networks=list(api.trusted_networks), max_upload_mb=api.max_upload_mb,
                      max_connections=self.connections.limit, open_files=self.open_files,
                      note=f"api.max_connections lowered from {api.max_connections} to fit the open-file limit "
                           f"({self.open_files}); raise LimitNOFILE" if reduced else None)

    async def _sweep(self) -> None:
        """Once a second: cut connections past their deadlines; log the refusals counted."""
        while True:
            await asyncio.sleep(SWEEP_S)
            self.connections.sweep()
            self.rejections.flush()

    def _quiet_loop_errors(self, loop: asyncio.AbstractEventLoop) -> None:
        """asyncio's errors about the API's own sockets (an accept that failed for lack of file
        descriptors, a client's connection that broke) as counted refusals instead of tracebacks;
        every other error goes to the handler that was there."""
        previous = loop.get_exception_handler()
        listening = self.socket

        def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
            message = str(context.get("message", ""))
            sock = context.get("socket")
            ours = sock is not None and listening is not None and listening.fileno() != -1 \
                and getattr(sock, "fileno", lambda: None)() == listening.fileno()
            if ours or isinstance(context.get("protocol"), GuardedProtocol):
                exception = context.get("exception")
                reason = "accept_failed" if message.startswith("socket.accept()") else "connection_error"
                self.rejections.note(reason, detail=f"{message} {type(exception).__name__}: {exception}"
                                     if exception else message)
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)

    def begin_stop(self) -> None:
        """Stop taking connections; the requests in flight finish (or are cut after STOP_S)."""
        if self.server is not None:
            self.server.should_exit = True

    async def stop(self, timeout: float = STOP_S + 1.0) -> bool:
        """Stop and wait up to `timeout` s for the server task; True when it ended in time."""
        self.begin_stop()
        if self.sweeper is not None:
            self.sweeper.cancel()
        if self.task is None:
            return True
        done, _ = await asyncio.wait({self.task}, timeout=timeout)
        if not done:
            self.server.force_exit = True
            done, _ = await asyncio.wait({self.task}, timeout=1.0)
        if self.socket is not None:
            self.socket.close()
        self.rejections.flush(force=True)
        return bool(done)
