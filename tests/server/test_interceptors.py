"""The handler wrapper on an in-process grpc.aio server: domain errors, unknown errors, draining;
with the handlers added both ways generated code adds them (generic, registered)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from server import drain
from server.drain import Drain
from server.errors import InvalidInput, QueueFull
from server.handlers import wrap_registrations
from server.interceptors import Admission, Calls, Guard

SERVICE = "test.Echo"


def _identity(data: bytes) -> bytes:
    return data


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"invalid":
        raise InvalidInput("top_k is 0; allowed: 1 to 1000")
    if request == b"full":
        raise QueueFull("queue is full")
    if request == b"bug":
        raise RuntimeError("secret /opt/models/x.onnx exploded")
    if request == b"slow":
        await asyncio.sleep(0.5)
    return request


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    raise KeyError("secret")


class Harness:
    def __init__(self) -> None:
        self.draining = Drain()
        self.calls = Calls()


@pytest.fixture(params=["generic", "registered"])
async def served(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[grpc.aio.Channel, Harness]]:
    harness = Harness()
    server = grpc.aio.server()
    wrap_registrations(server, Guard(Admission(harness.draining, harness.calls)).wrap)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary, _identity, _identity),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream, _identity, _identity),
    }
    if request.param == "generic":
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    else:
        server.add_registered_method_handlers(SERVICE, handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, harness
    await server.stop(0)


def _call(channel: grpc.aio.Channel, method: str) -> Any:
    kind = channel.unary_stream if method == "Stream" else channel.unary_unary
    return kind(f"/{SERVICE}/{method}", request_serializer=_identity,
                response_deserializer=_identity)  # fmt: skip


@pytest.mark.parametrize(
    ("request_", "code", "details"),
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, "top_k is 0; allowed: 1 to 1000"),
        (b"full", grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full"),
        (b"bug", grpc.StatusCode.INTERNAL, "internal error; the server logged the details"),
    ],
)
async def test_errors_become_statuses(
    served: tuple[grpc.aio.Channel, Harness],
    request_: bytes,
    code: grpc.StatusCode,
    details: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _call(channel, "Unary")(request_, timeout=10)
    assert (error.value.code(), error.value.details()) == (code, details)
    if code is grpc.StatusCode.INTERNAL:
        assert "secret" in caplog.text  # logged for operators, never sent


async def test_stream_errors_are_mapped_after_partial_output(
    served: tuple[grpc.aio.Channel, Harness],
) -> None:
    channel, _ = served
    call = _call(channel, "Stream")(b"x", timeout=10)
    assert await call.read() == b"first"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call.read()
    assert error.value.code() is grpc.StatusCode.INTERNAL
    assert "secret" not in error.value.details()


async def test_new_calls_are_refused_while_draining(
    served: tuple[grpc.aio.Channel, Harness],
) -> None:
    channel, harness = served
    assert await _call(channel, "Unary")(b"ok", timeout=10) == b"ok"
    harness.draining.begin()
    for method in ("Unary", "Stream"):
        call = _call(channel, method)(b"ok", timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await (call.read() if method == "Stream" else call)
        assert error.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in error.value.details()
        # Retries come back soon while accepted calls are still being answered.
        assert _pushback_ms(error.value) == round(drain.PUSHBACK * 1000)


def _pushback_ms(error: grpc.aio.AioRpcError) -> int:
    (value,) = [v for k, v in error.trailing_metadata() or () if k == "grpc-retry-pushback-ms"]
    return int(value)


async def test_once_answered_refusals_push_callers_past_the_close(
    served: tuple[grpc.aio.Channel, Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    channel, harness = served
    monkeypatch.setattr(drain, "SETTLE", 2.0)
    harness.draining.begin()
    settling = asyncio.ensure_future(harness.draining.settle(budget=10.0))
    await asyncio.sleep(0)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _call(channel, "Unary")(b"ok", timeout=10)
    assert error.value.code() is grpc.StatusCode.UNAVAILABLE
    # Asked to come back after the port closes: the rest of SETTLE plus AFTER_CLOSE.
    pushback = _pushback_ms(error.value) / 1000
    assert drain.AFTER_CLOSE < pushback <= 2.0 + drain.AFTER_CLOSE + 0.001
    assert pushback > drain.AFTER_CLOSE + 1.0  # the settle has most of its 2 s to go
    assert not settling.done()
    settling.cancel()


async def test_settle_stays_within_the_grace_left(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(drain, "SETTLE", 60.0)
    await asyncio.wait_for(Drain().settle(budget=0.0), 10)  # not the 60 s


async def test_calls_count_what_is_being_answered_and_not_refusals(
    served: tuple[grpc.aio.Channel, Harness],
) -> None:
    channel, harness = served
    assert await _call(channel, "Unary")(b"ok", timeout=10) == b"ok"
    assert harness.calls.active == 0
    slow = asyncio.ensure_future(_call(channel, "Unary")(b"slow", timeout=10))
    while harness.calls.active == 0:
        await asyncio.sleep(0.01)
    idle = asyncio.ensure_future(harness.calls.idle())
    harness.draining.begin()
    with pytest.raises(grpc.aio.AioRpcError):
        await _call(channel, "Unary")(b"ok", timeout=10)
    assert harness.calls.active == 1 and not idle.done()
    assert await slow == b"slow"
    await asyncio.wait_for(idle, 10)
    assert harness.calls.active == 0
