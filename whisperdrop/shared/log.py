"""Structured logging: JSON lines (structlog) on stdout, a readable renderer on a terminal.

Every stage that ends logs one event carrying its figures, so the log is the metrics feed:
`journalctl -u whisperdrop -o cat | jq`. `logging.file` adds a JSON-lines file, reopened on SIGHUP.
On a terminal (`logging.format` auto or console) `ConsoleRenderer` writes lines a person reads:
local time first, short job ids, no empty fields, wrapped to the terminal's width.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import textwrap
import threading
import time
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


JOB_ID_SHOWN = 12  # hex digits of a job id on a terminal, as `status` shows them
_JOB_ID = re.compile(r"[0-9a-f]{64}")
_PROSE = ("error", "hint", "reason", "fallback_reason", "note", "action", "message", "cause")  # own lines
_LAST = ("stacks", "exception")  # printed as they are, after everything else
_FIRST = ("path", "job_id", "job", "host")  # what a person looks for first, right after the event
_LEVELS = {"debug": "debug", "info": "info ", "warning": "WARN ", "error": "ERROR", "critical": "ERROR"}
_COLOURS = {"debug": "\033[2m", "warning": "\033[33m", "error": "\033[31;1m", "critical": "\033[31;1m"}


class ConsoleRenderer:
    """structlog renderer for a person at a terminal: `HH:MM:SS level event  path job=<12 hex>
    key=value ...`, local time; None values left out; job ids cut to JOB_ID_SHOWN digits; numbers
    with three significant digits; prose fields (error, hint...) on lines of their own; every line
    wrapped to the terminal's width (COLUMNS, else the stream's terminal, else 100); a traceback or
    stack dump last, as it is. The JSON log and `logging.file` keep every field in full."""

    def __init__(self, colors: bool = False, width: int | None = None, stream: TextIO | None = None):
        self.colors = colors
        self.width = width
        self.stream = stream

    def _columns(self) -> int:
        if self.width:
            return self.width
        if os.environ.get("COLUMNS", "").isdigit():
            return max(40, int(os.environ["COLUMNS"]))
        try:
            return max(40, os.get_terminal_size(self.stream.fileno()).columns) if self.stream else 100
        except (OSError, ValueError, AttributeError):
            return shutil.get_terminal_size((100, 24)).columns

    def __call__(self, logger: Any, method: str, event: dict) -> str:
        event = dict(event)
        name = str(event.pop("event", ""))
        level = str(event.pop("level", method))
        for key in ("ts", "timestamp", "logger"):
            event.pop(key, None)
        last = [(key, str(event.pop(key))) for key in _LAST if event.get(key)]
        prose = [(key, _text(event.pop(key))) for key in _PROSE if key in event and event[key] not in (None, "")]
        ordered = [key for key in _FIRST if key in event] + sorted(key for key in event if key not in _FIRST)
        fields = []
        for key in ordered:
            value = event[key]
            if value is None:
                continue
            if key == "path":
                fields.append(_text(value))
            else:
                fields.append(f"{'job' if key == 'job_id' else key}={_value(value)}")
        width = self._columns()
        clock = time.strftime("%H:%M:%S")
        tag = _LEVELS.get(level, level[:5].ljust(5))
        head = f"{clock} {tag} {name}"
        indent = " " * (len(clock) + 1)
        lines = [head]
        for field in fields:  # pack the fields after the event, wrapping between fields
            if len(lines[-1]) + 2 + len(field) <= width:
                lines[-1] += "  " + field
            else:
                lines += textwrap.wrap(field, width, initial_indent=indent + "  ", subsequent_indent=indent + "    ",
                                       break_on_hyphens=False) or [indent]
        for key, text in prose:
            lines += textwrap.wrap(f"{key}: {text}", width, initial_indent=indent + "  ",
                                   subsequent_indent=indent + "    ", break_on_hyphens=False)
        if self.colors:
            colour = _COLOURS.get(level, "")
            lines[0] = (f"\033[2m{clock}\033[0m {colour}{tag}\033[0m \033[1m{name}\033[0m"
                        + lines[0][len(head):])
        text = "\n".join(lines)
        for key, block in last:
            text += f"\n{indent}{key}:\n{block.rstrip()}"
        return text


def _text(value: Any) -> str:
    return " ".join(str(value).split())  # one line: a newline inside a value would break the layout


def _value(value: Any) -> str:
    """A field's value, short: job ids cut, numbers to three significant digits, lists as a,b."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    if isinstance(value, str):
        if _JOB_ID.fullmatch(value):
            return value[:JOB_ID_SHOWN]
        return repr(value) if (" " in value or not value) else value
    if isinstance(value, (list, tuple, set)):
        return ",".join(_value(item) for item in value) if value else "none"
    if isinstance(value, dict):
        shown = [f"{key}={_value(item)}" for key, item in value.items() if item is not None]
        return "{" + " ".join(shown) + "}"
    return _text(value)


def configure(level: str = "info", fmt: str = "auto", file: str | None = None, stream: TextIO | None = None) -> None:
    """Set up structlog for the process. `fmt` is json, console or auto (console on a TTY)."""
    global _file_sink
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    _file_sink = _FileSink(file) if file else None
    renderer: Any
    if fmt == "console":
        renderer = ConsoleRenderer(colors=stream.isatty(), stream=stream)
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
