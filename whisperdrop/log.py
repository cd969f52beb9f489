"""Structured logging: JSON lines (structlog) on stdout, a readable renderer on a terminal.

Every stage that ends logs one event carrying its figures, so the log is the metrics feed:
`journalctl -u whisperdrop -o cat | jq`. `logging.file` adds a JSON-lines file, reopened on SIGHUP.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _FileSink:
    """Appends JSON lines to a file; `reopen()` (on SIGHUP) starts a new file after logrotate moved it."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._stream: TextIO | None = None
        self.reopen()

    def reopen(self) -> None:
        with self._lock:
            if self._stream:
                self._stream.close()
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._stream = open(self.path, "a", encoding="utf-8", buffering=1)

    def write(self, line: str) -> None:
        with self._lock:
            if self._stream:
                self._stream.write(line + "\n")


_file_sink: _FileSink | None = None


def _tee_to_file(logger: Any, method: str, event: dict) -> dict:
    if _file_sink is not None:
        _file_sink.write(json.dumps(event, default=str, ensure_ascii=False))
    return event


def configure(level: str = "info", fmt: str = "auto", file: str | None = None, stream: TextIO | None = None) -> None:
    """Set up structlog for the process. `fmt` is json, console or auto (console on a TTY)."""
    global _file_sink
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    _file_sink = _FileSink(file) if file else None
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False, default=str)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            _tee_to_file,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def reopen() -> None:
    """Reopen the log file (SIGHUP, after logrotate). Does nothing without `logging.file`."""
    if _file_sink is not None:
        _file_sink.reopen()


def get(name: str | None = None, **context: Any) -> Any:
    """A bound structlog logger; `name` becomes the `logger` field."""
    logger = structlog.get_logger()
    if name:
        context["logger"] = name
    return logger.bind(**context) if context else logger
