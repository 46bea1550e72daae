"""Logging: one line per event, text or JSON, with the request id carried along.

Servicers set `REQUEST_ID` for the duration of a request; every record
logged in that context carries it (``request_id`` field, ``-`` outside). With tracing on
(`server.tracing`), a JSON line logged while a span is active carries its ``trace_id``.

Messages carry what callers sent (model names, tensor names, datatypes, request ids).
In the text format every character that is not printable (newlines, carriage returns,
escape sequences, other control and separator characters) is written as Python's
``repr`` writes it (``\\n``, ``\\x1b``, ``\\u2028``), so one event stays one line
and no caller can forge a line or colour a terminal; a traceback, which is ours, keeps
its lines. The JSON format escapes them by being JSON.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

from server import tracing
from server.errors import InvalidInput

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")

_TEXT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def one_line(exc: BaseException) -> str:
    """`exc`'s message on one line, its whitespace runs made single spaces (a reason a log
    line or a listing shows)."""
    return " ".join(str(exc).split())


def escape(text: str) -> str:
    """`text` with every non-printable character written as ``repr`` writes it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class TextFormatter(logging.Formatter):
    """The text format: the message and request id escaped (`escape`), one line each."""

    def __init__(self) -> None:
        super().__init__(_TEXT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        record.request_id = escape(str(getattr(record, "request_id", "-")))
        return super().formatMessage(record)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        if tracing.ENABLED:
            record.trace_id = tracing.trace_id()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def handler(log_format: str, stream: TextIO) -> logging.Handler:
    """A handler writing our lines, text or JSON, with the request id, to `stream`."""
    lines = logging.StreamHandler(stream)
    lines.addFilter(_RequestIdFilter())
    lines.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    return lines


def configure(log_format: str, level: str) -> None:
    """The process's logging: every record at `level` or above to stderr."""
    root = logging.getLogger()
    root.handlers[:] = [handler(log_format, sys.stderr)]
    root.setLevel(level)


# The logging extension (Triton's LogSettings, gRPC and HTTP): the settings a client reads
# and changes at run time. Records go to stderr in the format the server started with.
LOG_FILE, LOG_FORMAT, LOG_VERBOSE = "log_file", "log_format", "log_verbose_level"
LOG_LEVELS = {"log_error": logging.ERROR, "log_warning": logging.WARNING, "log_info": logging.INFO}
LOG_FORMATS = ("default",)


def log_settings() -> dict[str, bool | int | str]:
    """The settings as Triton names them, read from the root logger."""
    level = logging.getLogger().level
    return {
        LOG_FILE: "", **{key: level <= value for key, value in LOG_LEVELS.items()},
        LOG_VERBOSE: int(level <= logging.DEBUG), LOG_FORMAT: LOG_FORMATS[0],
    }  # fmt: skip


def update_log_settings(changes: dict[str, object]) -> dict[str, bool | int | str]:
    """Apply `changes` (every key checked first, nothing applied unless all are valid) and
    return the settings now: the root logger's level is the lowest one enabled (DEBUG with
    a verbose level above 0, none enabled: CRITICAL)."""
    settings = log_settings()
    for key, value in changes.items():
        settings[key] = _checked_setting(key, value)
    if int(settings[LOG_VERBOSE]) > 0:
        level = logging.DEBUG
    else:
        enabled = [value for key, value in LOG_LEVELS.items() if settings[key]]
        level = min(enabled, default=logging.CRITICAL)
    logging.getLogger().setLevel(level)
    return log_settings()


def _checked_setting(key: str, value: object) -> bool | int | str:
    if key in LOG_LEVELS:
        if not isinstance(value, bool):
            raise InvalidInput(f"log setting {key!r} must be true or false")
        return value
    if key == LOG_VERBOSE:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(f"log setting {key!r} must be an integer >= 0")
        return value
    if key == LOG_FORMAT and value in LOG_FORMATS:
        return str(value)
    if key == LOG_FILE and value == "":
        return ""
    allowed = {LOG_FORMAT: f"{LOG_FORMATS}", LOG_FILE: '"" (the server logs to stderr)'}
    if key in allowed:
        raise InvalidInput(f"log setting {key!r} is {value!r}; allowed: {allowed[key]}")
    known = ", ".join([LOG_FILE, *LOG_LEVELS, LOG_VERBOSE, LOG_FORMAT])
    raise InvalidInput(f"unknown log setting {key!r}; known: {known}")
