"""sd_notify: tell systemd we are ready, alive, and what we are doing (Type=notify units).

A datagram to $NOTIFY_SOCKET, a few lines instead of a dependency. Outside systemd (no
NOTIFY_SOCKET) every call does nothing. `tick()` is the whole watchdog for a loop that cannot
await: call it often (every second or so) and it sends WATCHDOG=1 at half of WatchdogSec. This
module imports nothing from whisperdrop, so the GPU runner can use it too.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable


class Notifier:
    """Sends READY=1, WATCHDOG=1, STATUS=... and STOPPING=1 to systemd when it is listening."""

    def __init__(self, environ: dict | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace socket
        self.address = address or None
        watchdog_usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        owned = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_interval = int(watchdog_usec) / 2_000_000 if watchdog_usec.isdigit() and owned else None
        self._last_ping = float("-inf")
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send `fields` (e.g. "READY=1") in one datagram; True if sent. Errors are not fatal."""
        if not self.address:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(message, self.address)
            except OSError:
                return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def tick(self, status: str | Callable[[], str] | None = None, now: float | None = None) -> bool:
        """Send WATCHDOG=1 when half of WatchdogSec has passed since the last ping, and STATUS= when
        `status` (a text, or a callable giving one) differs from the last one sent. Returns True
        when a ping went out. Cheap enough to call on every turn of a loop."""
        now = time.monotonic() if now is None else now
        pinged = False
        if self.watchdog_interval and now - self._last_ping >= self.watchdog_interval:
            pinged = self.watchdog()
            self._last_ping = now
        if status is not None and self.enabled:
            text = status() if callable(status) else status
            if text != self._last_status:
                self.status(text)
                self._last_status = text
        return pinged
