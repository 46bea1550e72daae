"""Logging: one line per event, text or JSON, with the request id carried along.

Servicers set `REQUEST_ID` for the duration of a request; every record
logged in that context carries it (``request_id`` field, ``-`` outside).

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
