"""Done notifications (`notify`): a webhook and/or a command told when a source is done or failed.

Not systemd's sd_notify (that is `whisperdrop.notify`). The payload, schema `whisperdrop.notify/1`:

    {"schema", "event": "done" | "failed", "path" (inbox-relative), "job_id", "route", "host",
     "fallback_reason", "language", "duration_s", "outputs" (absolute paths), "source" (where the
     file is now; null once deleted), "error": null | {"kind", "message", "hint"}, "at"}

- Webhook: an HTTP POST of that JSON (`Content-Type: application/json`); a 2xx answer is success.
  A 4xx other than 408 and 429 is not tried again (the request itself is wrong).
- Command: argv, no shell; the JSON on its stdin and the main fields in `WHISPERDROP_*` variables
  (see `environment`); exit status 0 is success.

Never in the pipeline's way: `done` and `failed` only put the payload on a bounded queue per target
(a full queue drops it, logged); one asyncio task per target sends them in order, each call bounded
by `notify.timeout_seconds` and tried again `notify.retries` times with a doubling pause, so a dead
webhook delays neither the jobs nor the command. The webhook's blocking urllib call runs in a daemon
thread (a server that hangs cannot hold the daemon's exit); the command is an asyncio subprocess,
killed at its timeout or at the stop. `close()` at the stop cancels both tasks; what was still
queued is logged (`notify.dropped`) and not sent. Delivery is at least once: a crash between the
outputs and the ledger delivers the source again, and notifies again.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from whisperdrop import __version__
from whisperdrop.daemon.health import backoff
from whisperdrop.shared import log as logging

SCHEMA = "whisperdrop.notify/1"
QUEUE_SIZE = 1000  # notifications waiting per target; beyond that they are dropped, logged
RETRY_PAUSE_S = 1.0  # the first pause between tries; doubled after each
RETRY_MAX_PAUSE_S = 60.0  # and never longer than this
CLOSE_WAIT_S = 2.0  # how long close() waits for the cancelled senders (a command being killed)
OUTPUT_TAIL = 400  # characters of a failed command's output (or a refused webhook's body) kept as evidence


class SendError(Exception):
    """One try at a target failed; `retryable` False when trying again cannot help."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


def payload(event: str, job: Any, source: Any, *, outputs: tuple[str, ...] = (), where: str | None = None,
            error: dict | None = None, language: str | None = None) -> dict:
    """The notification for one source of `job` (a ledger Job and Source): `event` done or failed."""
    return {
        "schema": SCHEMA, "event": event, "path": source.relpath, "job_id": job.job_id, "route": job.route,
        "host": job.host, "fallback_reason": job.fallback_reason, "language": language,
        "duration_s": job.duration, "outputs": list(outputs), "source": where, "error": error,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def environment(document: dict) -> dict[str, str]:
    """The `WHISPERDROP_*` variables a command gets: EVENT, PATH, JOB_ID, ROUTE, HOST, FALLBACK_REASON,
    SOURCE, OUTPUTS (one path a line), ERROR_KIND and ERROR (empty when not failed)."""
    error = document.get("error") or {}
    values = {
        "EVENT": document["event"], "PATH": document["path"], "JOB_ID": document["job_id"],
        "ROUTE": document.get("route"), "HOST": document.get("host"),
        "FALLBACK_REASON": document.get("fallback_reason"), "SOURCE": document.get("source"),
        "OUTPUTS": "\n".join(document.get("outputs") or ()), "ERROR_KIND": error.get("kind"),
        "ERROR": error.get("message"),
    }
    return {f"WHISPERDROP_{name}": "" if value is None else str(value).replace("\0", "") for name, value in values.items()}


def post_json(url: str, body: bytes, timeout: float) -> int:
    """POST `body` to `url` as JSON; returns the HTTP status (2xx). Raises SendError."""
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"whisperdrop/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http/https checked by Hooks)
            response.read(OUTPUT_TAIL)
            return response.status
    except urllib.error.HTTPError as error:
        detail = error.read(OUTPUT_TAIL).decode("utf-8", "replace").strip()
        raise SendError(f"HTTP {error.code} {error.reason}" + (f": {detail}" if detail else ""),
                        retryable=error.code >= 500 or error.code in (408, 429)) from None
    except urllib.error.URLError as error:
        raise SendError(f"cannot reach it: {error.reason}") from None
    except (OSError, http.client.HTTPException) as error:  # a timeout, a reset, a garbled answer
        raise SendError(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__) from None


async def run_command(argv: list[str], body: bytes, env: dict[str, str], timeout: float) -> int:
    """Run `argv` (no shell) with `body` on stdin and `env` over the daemon's environment, for at most
    `timeout` s; returns its exit status (0). Raises SendError; a timeout or a cancellation kills it."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **env}, start_new_session=True)
    except OSError as error:
        raise SendError(f"cannot start {argv[0]!r}: {error.strerror or error}; fix notify.command",
                        retryable=False) from None
    try:
        output, _ = await asyncio.wait_for(process.communicate(body), timeout)
    except BaseException as error:  # the timeout, or the daemon's stop: never leave it running
        if process.returncode is None:
            process.kill()
            await asyncio.shield(process.wait())
        if isinstance(error, asyncio.TimeoutError):
            raise SendError(f"still running after {timeout:g} s (notify.timeout_seconds); killed") from None
        raise
    if process.returncode != 0:
        tail = output.decode("utf-8", "replace").strip()[-OUTPUT_TAIL:]
        raise SendError(f"exited with status {process.returncode}" + (f": {tail}" if tail else ""))
    return 0


async def in_daemon_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking `function(*args)` in a daemon thread of its own and await its value. A cancelled
    wait abandons the thread, which ends at its own timeout; being a daemon thread it never holds the exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(value)

    def run() -> None:
        try:
            value, error = function(*args), None
        except BaseException as caught:  # handed to the waiting coroutine, which reports it
            value, error = None, caught
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the loop closed meanwhile (the daemon stopped): nobody waits any more
            pass

    threading.Thread(target=run, name="whisperdrop-notify", daemon=True).start()
    return await future


@dataclass
class Target:
    """One place notifications go: `name` webhook or command, `to` what the log shows (the URL's
    scheme and host, never its path or query, which often hold a secret; argv[0]), `send(body, document)`."""

    name: str
    to: str
    send: Callable[[bytes, dict], Awaitable[Any]]
    queue: asyncio.Queue | None = None
    task: asyncio.Task | None = None
    sending: dict | None = None  # the notification on its way now


class Hooks:
    """The daemon's notifications from `config.notify`. `start()` on the running loop; `done` and
    `failed` from the loop's thread (they never wait); `await close()` at the stop."""

    def __init__(self, settings: Any, log: Any = None):
        self.log = log or logging.get("notify")
        self.events = set(getattr(settings, "events", None) or ())
        self.timeout = float(getattr(settings, "timeout_seconds", 10.0))
        self.retries = int(getattr(settings, "retries", 0))
        self.targets: list[Target] = []
        url = getattr(settings, "webhook", None)
        if url:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"notify.webhook: {url!r} is not an http:// or https:// URL")
            self.targets.append(Target("webhook", f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else ""),
                                       lambda body, document: in_daemon_thread(post_json, url, body, self.timeout)))
        argv = list(getattr(settings, "command", None) or ())
        if argv:
            self.targets.append(Target("command", argv[0], lambda body, document: run_command(
                argv, body, environment(document), self.timeout)))
        self._closed = False

    @property
    def enabled(self) -> bool:
        return bool(self.targets and self.events)

    def start(self) -> None:
        """Start one sender task per target on the running loop (none when nothing is configured)."""
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        for target in self.targets:
            target.queue = asyncio.Queue(QUEUE_SIZE)
            target.task = loop.create_task(self._serve(target), name=f"notify-{target.name}")

    def done(self, job: Any, source: Any, delivered: Any, language: str | None = None) -> None:
        """One source of `job` is done; `delivered` is what `delivery.deliver_source` returned."""
        if "done" in self.events and self.enabled:
            self.submit(payload("done", job, source, outputs=delivered.outputs, where=delivered.source,
                                language=language))

    def failed(self, job: Any, source: Any, record: dict, where: Any) -> None:
        """One source of `job` failed; `record` is its error record, `where` where the source is now."""
        if "failed" in self.events and self.enabled:
            error = {"kind": record.get("kind"), "message": record.get("error"), "hint": record.get("what_to_do")}
            self.submit(payload("failed", job, source, where=str(where) if where else None, error=error))

    def submit(self, document: dict) -> None:
        """Queue `document` for every target; never waits. Before `start` and after `close`, nothing happens."""
        if self._closed:
            return
        for target in self.targets:
            if target.queue is None:
                continue
            try:
                target.queue.put_nowait(document)
            except asyncio.QueueFull:
                self.log.warning("notify.dropped", target=target.name, count=1, job_id=document["job_id"],
                                 reason=f"{QUEUE_SIZE} notifications already wait for it; it is slow or down")

    async def _serve(self, target: Target) -> None:
        assert target.queue is not None
        while True:
            target.sending = await target.queue.get()
            await self.send(target, target.sending)
            target.sending = None

    async def send(self, target: Target, document: dict) -> bool:
        """Send `document` to `target`, trying again with a doubling pause; log `notify.sent` or
        `notify.failed`. Returns whether it arrived."""
        body = json.dumps(document, ensure_ascii=False).encode("utf-8")
        fields = {"job_id": document["job_id"], "path": document["path"], "outcome": document["event"],
                  "target": target.name, "to": target.to}
        started = time.monotonic()
        attempts = 1 + self.retries
        for attempt in range(1, attempts + 1):
            try:
                await asyncio.wait_for(target.send(body, document), self.timeout + 1.0)
            except (SendError, asyncio.TimeoutError) as error:
                message = str(error) if isinstance(error, SendError) else f"no answer within {self.timeout:g} s"
                last = attempt == attempts or not getattr(error, "retryable", True)
                if last:
                    self.log.error("notify.failed", **fields, attempts=attempt, error=message,
                                   hint=_hint(target.name))
                    return False
                pause = backoff(attempt, RETRY_PAUSE_S, RETRY_MAX_PAUSE_S)
                self.log.warning("notify.retry", **fields, attempt=attempt, retry_in_s=pause, error=message)
                await asyncio.sleep(pause)
                continue
            self.log.info("notify.sent", **fields, attempts=attempt, seconds=round(time.monotonic() - started, 3))
            return True
        return False

    async def close(self) -> None:
        """Stop the senders (a running command is killed); log what was left unsent (`notify.dropped`)."""
        self._closed = True
        tasks = [target.task for target in self.targets if target.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
        for target in self.targets:
            left = (target.queue.qsize() if target.queue is not None else 0) + (target.sending is not None)
            if left:
                self.log.warning("notify.dropped", target=target.name, count=left, job_id=None,
                                 reason="the daemon stopped before they were sent")


def _hint(target: str) -> str:
    if target == "webhook":
        return "check notify.webhook is right and its server is up; the job itself is done"
    return "check notify.command runs by hand with the JSON on its stdin; the job itself is done"
