"""One base for whisperdrop's own errors, so every layer reports a failure the same way.

`WhisperdropError` carries the message (`str(error)`), `kind` (a short word that the Result, a failed
job's record and the log use: `media`, `audio`, `model`, `oom`, `host`, `checksum`...), `retryable`
(True when trying again, later or elsewhere, may help) and `hint` (what a person can do about it).
Each layer's errors are subclasses with their own evidence: `daemon.extract.MediaError` (a file that
is not usable media), `daemon.stages.Permanent` (a job no retry fixes), `engine.EngineError`,
`daemon.connection.HostError` (one failed operation on a GPU host) and the runner's job failures.
"""

from __future__ import annotations


class WhisperdropError(Exception):
    """A failure with `kind`, `retryable` and `hint`; subclasses set their defaults as class attributes."""

    kind: str = "error"
    retryable: bool = False
    hint: str = ""

    def __init__(self, message: str, *, kind: str | None = None, retryable: bool | None = None,
                 hint: str | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        if retryable is not None:
            self.retryable = retryable
        if hint is not None:
            self.hint = hint
