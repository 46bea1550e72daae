"""Typed exceptions for failed calls; each keeps the gRPC status code and the server's message."""

from __future__ import annotations

import re
from collections.abc import Iterable

import grpc


class ResnetServeError(Exception):
    """A call to resnet-serve failed.

    ``code`` is the gRPC status code and ``message`` the server's own words
    (or gRPC's, when the failure happened before the server answered).
    ``pushback`` is how many seconds the server asked the caller to wait
    before trying again (its ``grpc-retry-pushback-ms``), or ``None``.
    """

    def __init__(self, code: grpc.StatusCode, message: str, pushback: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.pushback = pushback


class InvalidArgument(ResnetServeError):
    """The request was malformed: bad top_k, empty batch, wrong tensor shape, ..."""


class InvalidImage(InvalidArgument):
    """One image of the request could not be decoded or has a shape the model cannot take;
    the message starts with ``image <index>:``."""


class ModelNotFound(ResnetServeError):
    """No such model, or no such version, in the server's repository."""


class Overloaded(ResnetServeError):
    """The server's queue is full (RESOURCE_EXHAUSTED); back off and try again."""


class DeadlineExceeded(ResnetServeError):
    """The call's deadline passed before an answer came back."""


class Unavailable(ResnetServeError):
    """The server cannot be reached, is starting up, or is draining."""


class Unauthenticated(ResnetServeError):
    """The server wants credentials that were missing or wrong."""


class PermissionDenied(ResnetServeError):
    """The credentials are valid but do not allow this call."""


class Cancelled(ResnetServeError):
    """The call was cancelled before it finished."""


class Unimplemented(ResnetServeError):
    """The server does not offer this method (an older or different server)."""


class InternalError(ResnetServeError):
    """The server failed in a way it does not explain (INTERNAL, UNKNOWN, DATA_LOSS)."""


_BY_CODE: dict[grpc.StatusCode, type[ResnetServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}

# A server's "try again in this many milliseconds" (gRFC A6), read by gRPC's retries and ours.
PUSHBACK_KEY = "grpc-retry-pushback-ms"

# The server names the image at fault: "image 3: image data is truncated or corrupt; ...".
_ABOUT_AN_IMAGE = re.compile(r"^image \d+: ")


def from_status(
    code: grpc.StatusCode, message: str, pushback: float | None = None
) -> ResnetServeError:
    """The typed exception for a status code and message."""
    cls = _BY_CODE.get(code, ResnetServeError)
    if cls is InvalidArgument and _ABOUT_AN_IMAGE.match(message):
        cls = InvalidImage
    return cls(code, message, pushback)


def from_rpc_error(error: grpc.RpcError) -> ResnetServeError:
    """Wrap a ``grpc.RpcError`` (sync or aio) into its typed exception."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else None
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return from_status(
        code or grpc.StatusCode.UNKNOWN, details or str(error), _pushback(trailers or ())
    )


def _pushback(trailers: Iterable[tuple[str, str | bytes]]) -> float | None:
    """Seconds from a valid ``grpc-retry-pushback-ms`` trailer (a non-negative integer)."""
    for key, value in trailers:
        if key == PUSHBACK_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            return int(text) / 1000 if text.isdigit() else None
    return None


def code_from_number(number: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` for its numeric value (as carried in stream errors)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
