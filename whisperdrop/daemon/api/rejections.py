"""What a client did wrong, as `api.rejected` log lines: one per reason per interval, never a
traceback, so the log stays bounded whatever a client (or a thousand of them) sends.

`Rejections.note(reason, ...)` logs the first refusal of a reason at once, with what it was about
(client address, method, path, status, detail); the ones after it within `interval` seconds are
only counted. `flush()` (each second from the API's sweeper, and at stop) writes one line per reason
whose interval is over with the count and the last one's details, and starts the next interval.
`totals` counts every refusal since start, by reason, for /health and the metrics.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from whisperdrop.shared import log

INTERVAL_S = 60.0


@dataclass
class _Window:
    """One reason's current interval: when it began, refusals counted but not logged, the last one's details."""

    since: float
    count: int = 0
    last: dict = field(default_factory=dict)


class Rejections:
    """Counts and logs refusals (see the module's doc). Not thread-safe: the event loop's only."""

    def __init__(self, interval: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 logger: Any | None = None):
        self.interval = interval
        self.clock = clock
        self.log = logger or log.get("api")
        self.totals: Counter = Counter()
        self._windows: dict[str, _Window] = {}

    def note(self, reason: str, *, status: int | None = None, client: str | None = None, method: str | None = None,
             path: str | None = None, detail: str | None = None) -> None:
        """Count one refusal of `reason`; log it now when it is the first of its interval."""
        self.totals[reason] += 1
        last = {"status": status, "client": client, "method": method, "path": path, "detail": detail}
        window = self._windows.get(reason)
        if window is None:
            self._windows[reason] = _Window(self.clock())
            self.log.warning("api.rejected", reason=reason, count=1, **last)
            return
        window.count += 1
        window.last = last

    def flush(self, force: bool = False) -> None:
        """Log the refusals counted in each interval that is over (every one, with `force`): one line a
        reason, `count` refusals in the last `seconds`. A reason with nothing counted is forgotten, so
        its next refusal is logged at once."""
        now = self.clock()
        for reason, window in list(self._windows.items()):
            if not force and now - window.since < self.interval:
                continue
            if window.count == 0:
                del self._windows[reason]
                continue
            self.log.warning("api.rejected", reason=reason, count=window.count, seconds=round(now - window.since, 1),
                             **window.last)
            self._windows[reason] = _Window(now)
