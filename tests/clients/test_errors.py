"""Every status becomes its typed exception, keeping the code and the server's message."""

from __future__ import annotations

import grpc
import pytest
import resnet_serve_client as rsc
from resnet_serve_client.errors import from_status

from tests.fixtures.fake_classifier import MODEL, FakeServer

NO_RETRY = rsc.ChannelOptions(retry=None)

def _name(value: object) -> str:
    return getattr(value, "name", None) or getattr(value, "__name__", "")


TYPED = [
    (grpc.StatusCode.INVALID_ARGUMENT, "top_k is 0; allowed: 1 to 1000", rsc.InvalidArgument),
    (grpc.StatusCode.INVALID_ARGUMENT, "image 0: image data is truncated or corrupt",
     rsc.InvalidImage),
    (grpc.StatusCode.NOT_FOUND, "model 'nope' not found", rsc.ModelNotFound),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue of resnet18 is full", rsc.Overloaded),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed in the queue", rsc.DeadlineExceeded),
    (grpc.StatusCode.UNAVAILABLE, "server is draining", rsc.Unavailable),
    (grpc.StatusCode.UNAUTHENTICATED, "missing bearer token", rsc.Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, "token may not classify", rsc.PermissionDenied),
    (grpc.StatusCode.UNIMPLEMENTED, "no such method", rsc.Unimplemented),
    (grpc.StatusCode.INTERNAL, "internal error; the server logged the details", rsc.InternalError),
    (grpc.StatusCode.UNKNOWN, "unexpected", rsc.InternalError),
]


@pytest.mark.parametrize(("code", "message", "expected"), TYPED, ids=_name)
def test_sync_call_raises_typed_error(
    fake: FakeServer, code: grpc.StatusCode, message: str, expected: type[Exception]
) -> None:
    fake.script.failures.append((code, message))
    with (
        rsc.Client(fake.target, model=MODEL, options=NO_RETRY) as client,
        pytest.raises(expected) as caught,
    ):
        client.classify(b"jpeg")
    assert type(caught.value) is expected
    assert caught.value.code is code
    assert caught.value.message == message
    assert isinstance(caught.value, rsc.ResnetServeError)


@pytest.mark.parametrize(("code", "message", "expected"), TYPED, ids=_name)
async def test_async_call_raises_typed_error(
    fake: FakeServer, code: grpc.StatusCode, message: str, expected: type[Exception]
) -> None:
    fake.script.failures.append((code, message))
    async with rsc.AsyncClient(fake.target, model=MODEL, options=NO_RETRY) as client:
        with pytest.raises(expected) as caught:
            await client.classify(b"jpeg")
    assert type(caught.value) is expected
    assert (caught.value.code, caught.value.message) == (code, message)


def test_deadline_of_an_unreachable_server_waiting_for_ready() -> None:
    options = rsc.ChannelOptions(wait_for_ready=True)
    with (
        rsc.Client("127.0.0.1:1", model=MODEL, options=options) as client,
        pytest.raises(rsc.DeadlineExceeded),
    ):
        client.classify(b"x", timeout=0.2)


def test_unreachable_server_fails_fast_as_unavailable() -> None:
    with rsc.Client("127.0.0.1:1", model=MODEL, options=NO_RETRY) as client:
        with pytest.raises(rsc.Unavailable):
            client.classify(b"x")
        with pytest.raises(rsc.Unavailable):
            client.health()


def test_invalid_image_needs_the_servers_image_prefix() -> None:
    code = grpc.StatusCode.INVALID_ARGUMENT
    assert type(from_status(code, "image 12: unsupported image format TIFF")) is rsc.InvalidImage
    assert type(from_status(code, "request has 9 images; at most 8")) is rsc.InvalidArgument
