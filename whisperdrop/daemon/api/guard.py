"""The API's front door: one ASGI layer in front of every route (the page at `/` included) that says
who may call, from which page, and how much, before a byte of the body is read.

In order, on the request head:
1. `Host` must name this daemon (`Hosts`), else 421: a page on another site that rebinds its own
   name to this machine's address (DNS rebinding) still sends its own name.
2. The caller (`Callers`): an address in `api.trusted_networks` needs no token; any other sends
   `api.token` (401), or, where no token is configured, must be on loopback (403). The page's own
   files (`public`: GET of `/` and its script and style, which hold no data) pass without, so a
   browser can open the page and be asked for the token.
3. `Origin`, on any method but GET, HEAD and OPTIONS: the daemon's own (`scheme://Host`) or one of
   `api.allowed_origins`, else 403: a web page on another site posting to the daemon (CSRF). Clients
   that send no Origin (curl, the SDKs, Bazarr, Open WebUI's server) are not browsers and pass.
4. An upload (POST): past `api.max_uploads_in_flight` or `api.max_uploads_in_flight_mb` (`InFlight`)
   503 with Retry-After; a Content-Length over `api.max_upload_mb` 413.
Then the body is counted as it is read: past the upload limit 413, past the bytes in flight 503. An
answer to a request whose body was not read to its end closes the connection, so a client that goes
on sending is not read.

Refusals here, and every 4xx a route answers, are `api.rejected` lines through `Rejections` (one a
reason per interval); other answers one `api.request` line each. The client address is the
connection's, or X-Forwarded-For's where `api.forwarded_allow` names the proxy (uvicorn's
ProxyHeadersMiddleware runs before this layer).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from whisperdrop.shared import log
from whisperdrop.daemon.api import errors
from whisperdrop.daemon.api.rejections import Rejections

FORM_SLACK = 1 << 20  # multipart framing and the text fields, on top of the file's own limit
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
UPLOADS_RETRY_AFTER_S = 30
LOOPBACK_NAMES = ("localhost",)
REJECTED_5XX = frozenset({"uploads_full"})  # 5xx answers that are a refusal, logged as api.rejected
# A 4xx answer's reason in the log, when its body names no error code.
STATUS_REASONS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 408: "head_timeout", 413: "too_large", 415: "not_media",
                  421: "wrong_host", 422: "invalid_field", 429: "too_many_requests"}


def address_of(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client or local address as an ip_address (IPv4-mapped IPv6 as the IPv4 one); None when it is
    not an address (a Unix socket, nothing)."""
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def host_name(value: str) -> str:
    """The name in a Host header, lowercased, without port, brackets or a final dot."""
    text = value.strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text[1:]
    if text.count(":") == 1:
        text = text.rsplit(":", 1)[0]
    return text.rstrip(".")


class Hosts:
    """The names a request's Host may give: localhost names, loopback addresses, the listen address,
    the address the request came in on, and `allowed` (exact names, `*.domain`, or `*` for any)."""

    def __init__(self, listen_host: str, allowed: list[str]):
        self.listen = host_name(listen_host) if listen_host else ""
        self.any = "*" in allowed
        self.names = {host_name(item) for item in allowed if not item.startswith("*")}
        self.suffixes = tuple("." + host_name(item[2:]) for item in allowed if item.startswith("*.") and len(item) > 2)

    def allows(self, host: str, local_address: str | None) -> bool:
        """Whether Host `host` (the header's value) names this daemon for a connection to `local_address`."""
        name = host_name(host)
        if self.any or name in LOOPBACK_NAMES or name.endswith(".localhost") or name == self.listen:
            return True
        if name in self.names or (self.suffixes and name.endswith(self.suffixes)):
            return True
        address = address_of(name)
        return address is not None and (address.is_loopback or address == address_of(local_address))


class Callers:
    """Who may call: `trusted` networks without a token; others with `token`, or, with no token
    configured, from loopback only."""

    def __init__(self, token: str | None, trusted: list[str]):
        self.token = token.encode() if token else None
        self.trusted = [ipaddress.ip_network(item, strict=False) for item in trusted]

    def is_trusted(self, client: str | None) -> bool:
        address = address_of(client)
        return address is not None and any(address in network for network in self.trusted)

    def refusal(self, client: str | None, authorization: bytes | None) -> tuple[int, str, str] | None:
        """None when the caller may go on; else (status, reason, message)."""
        if self.is_trusted(client):
            return None
        if self.token is not None:
            scheme, _, value = (authorization or b"").partition(b" ")
            if scheme.lower() == b"bearer" and secrets.compare_digest(value.strip(), self.token):
                return None
            return 401, "invalid_api_key", ("missing or wrong bearer token: send 'Authorization: Bearer <api.token>' "
                                         "(the token in the daemon's config.yaml)")
        address = address_of(client)
        if address is not None and address.is_loopback:
            return None
        return 403, "not_trusted", (f"requests from {client} are not served: the daemon has no api.token and {client} "
                                    "is not in api.trusted_networks; add its network there, or set api.token and "
                                    "send it as 'Authorization: Bearer <token>'")


def origin_of(value: str) -> str | None:
    """`scheme://host[:port]` lowercased, the default port left out; None for `null` or a non-URL."""
    try:
        parts = urlsplit(value.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


class Origins:
    """Which web pages may change state: the daemon's own origin (`scheme://Host`) and `allowed`."""

    def __init__(self, allowed: list[str]):
        self.allowed = {origin_of(item) for item in allowed} - {None}

    def allows(self, origin: str, scheme: str, host: str | None) -> bool:
        given = origin_of(origin)
        if given is None:
            return False
        return given in self.allowed or (host is not None and given == origin_of(f"{scheme}://{host.strip()}"))


class InFlight:
    """Uploads arriving (counted here as their bodies are read) and stored but not yet transcribed
    (the folders under `folder`): how many and how many bytes, against `max_count` and `max_bytes`."""

    def __init__(self, folder: Path, max_count: int, max_bytes: int):
        self.folder = Path(folder)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.receiving: dict[int, int] = {}  # request -> bytes reserved (Content-Length) or read so far
        self._stored_bytes = 0

    def stored(self) -> tuple[int, int]:
        """(count, bytes) of the stored uploads: the folders under `folder` (not `.incoming`, the parser's spool)."""
        count = size = 0
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return 0, 0
        for entry in entries:
            if entry.name.startswith("."):
                continue
            count += 1
            try:
                with os.scandir(entry.path) as files:
                    size += sum(item.stat(follow_symlinks=False).st_size for item in files)
            except OSError:
                continue  # removed while counted: delivered
        return count, size

    def admit(self, request: int, declared: int | None) -> str | None:
        """Reserve room for an upload of `declared` bytes (None: unknown); the reason it does not fit, or None."""
        count, size = self.stored()
        self._stored_bytes = size
        if count + len(self.receiving) >= self.max_count:
            return f"{count + len(self.receiving)} uploads in flight (api.max_uploads_in_flight: {self.max_count})"
        if size + sum(self.receiving.values()) + (declared or 0) > self.max_bytes:
            return (f"{(size + sum(self.receiving.values())) / 1e6:.0f} MB of uploads in flight, "
                    f"{(declared or 0) / 1e6:.0f} MB more asked (api.max_uploads_in_flight_mb: {self.max_bytes / 1e6:g})")
        self.receiving[request] = declared or 0
        return None

    def read(self, request: int, total: int) -> bool:
        """`total` bytes of the upload read so far; False once the uploads in flight pass `max_bytes`."""
        if request not in self.receiving:
            return True
        self.receiving[request] = max(self.receiving[request], total)
        return self._stored_bytes + sum(self.receiving.values()) <= self.max_bytes

    def done(self, request: int) -> None:
        """The upload's body is read (or the request is over): from now on its stored folder counts."""
        self.receiving.pop(request, None)

    def snapshot(self) -> dict:
        count, size = self.stored()
        return {"in_flight": count + len(self.receiving), "max": self.max_count,
                "bytes": size + sum(self.receiving.values()), "max_bytes": self.max_bytes}


class Guard:
    """ASGI middleware: host, caller, origin, uploads in flight, size limit, request log (see the module's doc)."""

    def __init__(self, app: Any, api: Any, limit: int, in_flight: InFlight, rejections: Rejections,
                 public: frozenset = frozenset()):
        self.app = app
        self.public = public  # paths whose GET holds no data (the page's own files): no caller check
        self.hosts = Hosts(api.listen.rpartition(":")[0] if api.listen else "", list(api.allowed_hosts))
        self.callers = Callers(api.token, list(api.trusted_networks))
        self.origins = Origins(list(api.allowed_origins))
        self.limit = limit + FORM_SLACK
        self.in_flight = in_flight
        self.rejections = rejections
        self.log = log.get("api")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        answer: dict = {"status": 0, "code": None, "closes": False}
        body_done = [scope["method"] in SAFE_METHODS]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                headers = list(message.get("headers") or [])
                if not body_done[0] and not any(key.lower() == b"connection" for key, _ in headers):
                    headers.append((b"connection", b"close"))  # the rest of the body is never read
                    message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and answer["status"] >= 400 and answer["code"] is None:
                answer["code"] = _error_code(message.get("body", b""))
            await send(message)

        request = id(scope)
        refusal = None
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                status, reason, message, headers = refusal
                answer["code"] = reason
                await _send_json(sending, status, errors.body(status, message, code=reason), headers)
                return
            await self.app(scope, self._counted(request, receive, body_done), sending)
        finally:
            self.in_flight.done(request)
            client = (scope.get("client") or ("", 0))[0]
            status = answer["status"]
            if 400 <= status < 500 or refusal is not None or answer["code"] in REJECTED_5XX:
                reason = answer["code"] or STATUS_REASONS.get(status, f"http_{status}")
                self.rejections.note(reason, status=status, client=client, method=scope["method"], path=scope["path"],
                                     detail=refusal[2] if refusal else None)
            else:
                quiet = scope["path"] == "/health" and status == 200  # a monitor's polls stay out of the info log
                (self.log.debug if quiet else self.log.info)("api.request", method=scope["method"], path=scope["path"],
                                                             status=status, seconds=round(time.monotonic() - started, 3),
                                                             client=client)

    def _refusal(self, scope: dict) -> tuple[int, str, str, dict] | None:
        """(status, reason, message, headers) when the request is refused on its head; None to serve it."""
        headers = _headers(scope)
        host = headers.get(b"host")
        local = (scope.get("server") or (None,))[0]
        if host is not None and not self.hosts.allows(host.decode("latin-1"), local):
            shown = host.decode("latin-1", "replace")[:200]
            return 421, "wrong_host", (f"this daemon does not serve the host name {shown!r}: use its address, or add "
                                       "the name to api.allowed_hosts in config.yaml"), {}
        client = (scope.get("client") or (None,))[0]
        public = scope["method"] in ("GET", "HEAD") and scope["path"] in self.public
        refused = None if public else self.callers.refusal(client, headers.get(b"authorization"))
        if refused is not None:
            status, reason, message = refused
            return status, reason, message, {"www-authenticate": "Bearer"} if status == 401 else {}
        origin = headers.get(b"origin")
        if origin is not None and scope["method"] not in SAFE_METHODS and not self.origins.allows(
                origin.decode("latin-1"), scope.get("scheme", "http"), host.decode("latin-1") if host else None):
            shown = origin.decode("latin-1", "replace")[:200]
            return 403, "foreign_origin", (f"a page from {shown!r} may not send requests that change anything here: "
                                           "only the daemon's own pages and api.allowed_origins may"), {}
        if scope["method"] == "POST":
            length = headers.get(b"content-length")
            declared = int(length) if length is not None and length.isdigit() else None
            if declared is not None and declared > self.limit:
                return 413, "too_large", (f"the upload ({declared / 1e6:.1f} MB) is larger than api.max_upload_mb "
                                          f"({(self.limit - FORM_SLACK) / 1e6:g} MB); send a smaller file, or raise "
                                          "api.max_upload_mb"), {}
            full = self.in_flight.admit(id(scope), declared)
            if full is not None:
                return 503, "uploads_full", f"too many uploads in flight: {full}; try again later", {
                    "retry-after": str(UPLOADS_RETRY_AFTER_S)}
        return None

    def _counted(self, request: int, receive: Any, body_done: list[bool]) -> Any:
        seen = [0]

        async def counted() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.limit:
                    raise errors.BodyTooLarge(self.limit - FORM_SLACK)
                if not self.in_flight.read(request, seen[0]):
                    raise errors.UploadsFull(f"past api.max_uploads_in_flight_mb ({self.in_flight.max_bytes / 1e6:g} MB)",
                                             UPLOADS_RETRY_AFTER_S)
                if not message.get("more_body", False):
                    body_done[0] = True
                    self.in_flight.done(request)
            elif message["type"] == "http.disconnect":
                body_done[0] = True
            return message

        return counted


def _headers(scope: dict) -> dict[bytes, bytes]:
    return dict(scope.get("headers") or [])


def _error_code(body: bytes) -> str | None:
    """The `error.code` of a JSON error body (OpenAI's shape), or None."""
    if not body or len(body) > 8192 or not body.startswith(b"{"):
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    error = document.get("error") if isinstance(document, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and code else None


async def _send_json(send: Any, status: int, body: dict, headers: dict) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(key.encode(), value.encode()) for key, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
