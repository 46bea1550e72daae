"""Domain errors of the server and the one map from them to gRPC status codes.

Servicers and the model layer raise these; `server.interceptors` turns them
into statuses (and the per-request metrics use the same map for their `code`
label). The HTTP/REST adapter answers the same status as an HTTP one, from the
one table `HTTP_STATUSES`, as Triton does (queue full and draining are 503).
Messages are written for the caller: what was wrong and what is allowed, cut at
`MAX_MESSAGE_CHARS` (a request naming 100,000 bad inputs gets a short answer, and a gRPC
status message stays far below a client's 8 KiB metadata limit). Any other exception
becomes INTERNAL with a generic message.
"""

from __future__ import annotations

import grpc


class ServeError(Exception):
    """Base of every error whose message is safe to show a caller."""


class InvalidInput(ServeError):
    """The request itself is wrong: bad image, shape, dtype, top_k, too many images."""


class ModelNotFound(ServeError):
    """No such model, or no such version of it."""


class ModelNotReady(ServeError):
    """The model exists but no version of it can serve now (loading or failed)."""


class QueueFull(ServeError):
    """The model's queue holds its maximum; retry later or elsewhere."""


class DeadlineExceeded(ServeError):
    """The caller's deadline passed before the request was computed."""


class Draining(ServeError):
    """The server is shutting down and takes no new calls; ``pushback_ms`` says when the
    caller may try again (see `server.drain`)."""

    def __init__(self, message: str, pushback_ms: int | None = None) -> None:
        super().__init__(message)
        self.pushback_ms = pushback_ms


class Unauthenticated(ServeError):
    """The call carries no bearer token, or one the server does not accept."""


class NotOffered(ServeError):
    """A call this server does not offer as configured (e.g. model load and unload with
    ``--model-control-mode none``); the message says how to turn it on."""


class ControlRefused(ServeError):
    """A model load or unload that cannot be done: the model control mode does not allow it,
    or the version asked for cannot be loaded (the message says which and why)."""


class RegionNotFound(ServeError):
    """No shared-memory region of that name is registered."""


class AlreadyExists(ServeError):
    """A shared-memory region of that name is registered already."""


class LimitReached(ServeError):
    """A server-wide cap (shared-memory regions, their bytes) would be passed; the message
    names the setting."""


_CODES: dict[type[ServeError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Draining: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ControlRefused: grpc.StatusCode.FAILED_PRECONDITION,
    NotOffered: grpc.StatusCode.UNIMPLEMENTED,
    RegionNotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    LimitReached: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# gRPC's retry policy waits exactly this long before its next attempt (gRFC A6).
PUSHBACK_KEY = "grpc-retry-pushback-ms"

INTERNAL_MESSAGE = "internal error; the server logged the details"


MAX_MESSAGE_CHARS = 1000  # a message to a caller is cut here (and says how long it was)


def bounded(message: str) -> str:
    """`message` cut to at most `MAX_MESSAGE_CHARS`, saying how long it was; a message cut
    once stays as it is (the HTTP adapter bounds what `to_status` bounded already)."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    said = f"... (cut; {len(message)} characters in all)"
    return message[: MAX_MESSAGE_CHARS - len(said)] + said


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception and its message for the caller (`bounded`); unknown
    errors say nothing about internals."""
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls], bounded(str(exc))
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def to_trailers(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that goes with the status: the retry pushback, when there is one."""
    pushback = exc.pushback_ms if isinstance(exc, Draining) else None
    return () if pushback is None else ((PUSHBACK_KEY, str(pushback)),)


# The HTTP status for each gRPC status, as Triton's HTTP front end answers them (503 for a
# full queue too, with Retry-After); codes not listed are 500.
HTTP_STATUSES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.ALREADY_EXISTS: 400,  # a shared-memory region registered twice
    grpc.StatusCode.FAILED_PRECONDITION: 400,  # a load or unload the repository refuses
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def to_http(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and message for an exception (`to_status`, then `HTTP_STATUSES`)."""
    code, message = to_status(exc)
    return HTTP_STATUSES.get(code, 500), message
