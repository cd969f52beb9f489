"""The FastAPI app and its server, uvicorn on the daemon's own asyncio loop (no thread of its own).

`Guard`, the outermost layer, runs before anything reads a body: the bearer token (401; the
page's own files at `/` are served without it, so the page can ask for it), the upload limit (413
from Content-Length at once, or as soon as the bytes read pass it), and one `api.request` log line
per request. `ApiServer.start()` binds the socket itself (so a port in use
is a clear error, not uvicorn's exit) and serves it as a task; `stop()` closes it within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import socket
import tempfile
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from whisperdrop.daemon.api import errors, routes_asr, routes_native, routes_openai, routes_page, uploads
from whisperdrop.daemon.api.service import ApiService
from whisperdrop.shared import log

FORM_SLACK = 1 << 20  # multipart framing and the text fields, on top of the file's own limit
STOP_S = 3.0


def create_app(service: ApiService) -> FastAPI:
    """The app over `service`: every route, the error handlers, and the Guard around them."""
    app = FastAPI(title="whisperdrop", docs_url="/docs", redoc_url=None)
    app.state.service = service
    errors.install(app)
    for module in (routes_native, routes_openai, routes_asr, routes_page):
        app.include_router(module.router)
    return app


class Guard:
    """ASGI middleware: token, size limit, request log (see the module's doc)."""

    def __init__(self, app: Any, token: str | None, limit: int):
        self.app = app
        self.token = token.encode() if token else None
        self.limit = limit + FORM_SLACK
        self.log = log.get("api")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        status = [0]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, sending)
        finally:
            client = scope.get("client") or ("", 0)
            quiet = scope["path"] == "/health" and status[0] == 200  # a monitor's polls stay out of the info log
            (self.log.debug if quiet else self.log.info)("api.request", method=scope["method"], path=scope["path"], status=status[0],
                          seconds=round(time.monotonic() - started, 3), client=client[0])

    async def _guarded(self, scope: dict, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        if self.token is not None and not _public(scope):
            given = headers.get(b"authorization", b"")
            scheme, _, value = given.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(value.strip(), self.token):
                return await _send_json(send, 401, errors.body(
                    401, "missing or wrong bearer token: send 'Authorization: Bearer <api.token>' (the token in "
                         "the daemon's config.yaml)", code="invalid_api_key"), {"www-authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, errors.body(
                413, f"the upload ({int(length) / 1e6:.1f} MB) is larger than api.max_upload_mb "
                     f"({(self.limit - FORM_SLACK) / 1e6:g} MB); send a smaller file, or raise api.max_upload_mb",
                code="too_large"), {"connection": "close"})
        seen = [0]

        async def counted() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.limit:
                    raise errors.BodyTooLarge(self.limit - FORM_SLACK)
            return message

        await self.app(scope, counted, send)


def _public(scope: dict) -> bool:
    """The page's own files (no data in them): a browser opening the page cannot send the token yet."""
    return scope["method"] in ("GET", "HEAD") and scope["path"] in routes_page.PUBLIC_PATHS


async def _send_json(send: Any, status: int, body: dict, headers: dict) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(key.encode(), value.encode()) for key, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class _ToLog(logging.Handler):
    """uvicorn's own warnings and errors (a malformed request, a connection cut) as JSON lines
    (`api.server`), like every other line the daemon writes; the tracebacks stay out."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.log = log.get("api")

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.log.error("api.server", message=record.getMessage(), source=record.name)
        else:
            self.log.warning("api.server", message=record.getMessage(), source=record.name)


UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def _route_uvicorn_logs() -> None:
    handler = _ToLog()
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.WARNING)
        logger.propagate = False


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
        self.listen = config.api.listen
        self.service = ApiService(config, pipeline, remote)
        self.app = Guard(create_app(self.service), config.api.token, self.service.limit)
        self.server: _Server | None = None
        self.task: asyncio.Task | None = None
        self.socket: socket.socket | None = None
        self.log = log.get("api")

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
                sock.listen(128)
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
        _route_uvicorn_logs()
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=STOP_S, server_header=False)
        self.server = _Server(config)
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.socket]), name="api")
        while not self.server.started and not self.task.done():
            await asyncio.sleep(0.01)  # uvicorn sets `started` without an event to wait on; it takes a few ms
        if self.task.done():
            self.task.result()
        host, port = self.socket.getsockname()[:2]
        self.log.info("api.listening", listen=self.listen, port=port, token=self.config.api.token is not None,
                      max_upload_mb=self.config.api.max_upload_mb)

    def begin_stop(self) -> None:
        """Stop taking connections; the requests in flight finish (or are cut after STOP_S)."""
        if self.server is not None:
            self.server.should_exit = True

    async def stop(self, timeout: float = STOP_S + 1.0) -> bool:
        """Stop and wait up to `timeout` s for the server task; True when it ended in time."""
        self.begin_stop()
        if self.task is None:
            return True
        done, _ = await asyncio.wait({self.task}, timeout=timeout)
        if not done:
            self.server.force_exit = True
            done, _ = await asyncio.wait({self.task}, timeout=1.0)
        if self.socket is not None:
            self.socket.close()
        return bool(done)
