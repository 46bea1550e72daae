"""Building requests and reading responses: the part both clients share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from .errors import ResnetServeError, code_from_number, from_status
from .images import split, to_image
from .proto.resnet_serve.v1 import classifier_pb2 as pb
from .resize import Resize
from .results import Classification, HealthStatus, classifications

DEFAULT_TOP_K = 5

# Client-side failures of one image in bulk work: unreadable file, undecodable
# bytes when resizing, an array of the wrong shape or type.
LOCAL_ERRORS = (OSError, ValueError, TypeError)


def classify_request(
    images: Any,
    *,
    model: str | None,
    version: str,
    top_k: int,
    resize: Resize | None,
    request_id: str = "",
) -> pb.ClassifyRequest:
    if not model:
        raise ValueError("no model given: pass model=... here or to the client")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1; got {top_k}")
    wire = [to_image(image, resize) for image in split(images)]
    if not wire:
        raise ValueError("no images to classify")
    return pb.ClassifyRequest(
        model=model, version=version, images=wire, top_k=top_k, request_id=request_id
    )


def stream_result(response: pb.ClassifyStreamResponse) -> Classification | ResnetServeError:
    """The classification carried by a stream response, or the error in its place."""
    if response.HasField("error"):
        return from_status(code_from_number(response.error.code), response.error.message)
    return classifications(response.response)[0]


def health_status(response: health_pb2.HealthCheckResponse) -> HealthStatus:
    return HealthStatus(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


@dataclass(frozen=True, slots=True)
class Failed:
    """An input that failed on the client, holding its place in the output order."""

    error: Exception


def requests_of(images: Iterable[Any], **fields: Any) -> Iterable[pb.ClassifyRequest | Failed]:
    """One single-image request per input, or the client-side error that input raised."""
    for image in images:
        try:
            yield classify_request([image], **fields)
        except LOCAL_ERRORS as error:
            yield Failed(error)


def is_retryable(error: ResnetServeError) -> bool:
    return error.code is grpc.StatusCode.UNAVAILABLE
