"""The HTTP adapter's answers to what went wrong: errors as ``{"error": "..."}`` with the
HTTP status of `server.errors.to_http` (messages cut by `server.errors.bounded`), and aiohttp's
connection log, where a request it could not parse or a client that left is the client's
doing: one rate-limited line, no traceback."""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from server.auth import RateLimitedLog
from server.errors import INTERNAL_MESSAGE, Draining, Unauthenticated, bounded, to_http
from server.protocols.v2.rest import JSON_TYPE, dumps

log = logging.getLogger("server.protocols.http")

class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's log of a connection: a request it could not parse (answered 400 by aiohttp)
    or a client that left is the client's doing, one more event of the port's rate-limited
    line, no traceback; anything else as aiohttp logs it."""

    def __init__(self, faults: RateLimitedLog) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._faults = faults

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError | ConnectionError):
            self._faults.event(f"400, a request aiohttp could not read: {brief(exc)}")
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


def brief(exc: BaseException) -> str:
    """An exception in one short line: its type and the first line of its message."""
    text = str(getattr(exc, "message", "") or exc).strip()
    return f"{type(exc).__name__}: {(text.splitlines() or [''])[0][:200]}"


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(value), status=status, content_type=JSON_TYPE)


def error(status: int, message: str, headers: Any = None) -> web.Response:
    response = json_response({"error": bounded(message)}, status)
    for key in ("Allow", "Retry-After", "WWW-Authenticate", "Connection"):
        if headers is not None and key in headers:
            response.headers[key] = headers[key]
    return response


def authorization(request: web.Request) -> list[tuple[str, str]]:
    """The Authorization headers as the token check reads gRPC metadata."""
    return [("authorization", value) for value in request.headers.getall("Authorization", [])]


def failure(request: web.Request, exc: Exception) -> web.Response:
    status, message = to_http(exc)
    where = f"{request.method} {request.path}"
    if status == 500:
        log.error("%s failed", where, exc_info=exc)
        message = INTERNAL_MESSAGE
    elif not isinstance(exc, Unauthenticated):  # those are logged rate-limited (TokenCheck)
        log.info("%s -> %d: %s", where, status, message)
    headers: dict[str, str] = {}
    if isinstance(exc, Draining):
        pushback = exc.pushback_ms if exc.pushback_ms is not None else 1000
        headers["Retry-After"] = str(max(1, math.ceil(pushback / 1000)))
        headers["Connection"] = "close"
    elif isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return error(status, message, headers)
