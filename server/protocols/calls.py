"""What the gRPC adapters share: a call's deadline, and a stream's messages answered in order.

`answer_in_order` serves ClassifyStream and ModelStreamInfer. Each message
starts as soon as it is read (at most `window` ahead of the answers), so a
stream's requests share batches; answers go out in request order. A message
that fails is answered with its status (`server.errors.to_status`, INTERNAL
ones logged with their traceback) and the stream goes on. When the server
starts draining, the stream stops reading, answers everything already read,
and ends with UNAVAILABLE so the caller reopens it on another instance and
resends what was not answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from server.drain import Drain
from server.errors import Draining, to_status

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as a `time.monotonic()` value, if it set one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def answer_in_order(
    requests: AsyncIterator[Request],
    answer: Callable[[Request, int], Awaitable[Response]],
    failed: Callable[[Request, int, grpc.StatusCode, str], Response],
    draining: Drain,
    window: int,
    rpc: str,
) -> AsyncIterator[Response]:
    """Yield ``await answer(request, index)`` for every request, in order, or
    ``failed(request, index, code, message)`` for one that raised."""
    started: asyncio.Queue[asyncio.Task[Response] | None] = asyncio.Queue(window)

    async def handle(request: Request, index: int) -> Response:
        try:
            return await answer(request, index)
        except Exception as exc:
            code, message = to_status(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error("%s request %d failed", rpc, index, exc_info=exc)
            return failed(request, index, code, message)

    reader = asyncio.ensure_future(_start_in_order(requests, handle, started, draining))
    try:
        while (task := await started.get()) is not None:
            yield await task
        drained = await reader  # a broken request stream ends the call with its error
        if drained:
            raise Draining(
                "server is shutting down; reopen the stream on another instance",
                draining.pushback_ms(),
            )
    finally:
        reader.cancel()
        while not started.empty():
            if (task := started.get_nowait()) is not None:
                task.cancel()


async def _start_in_order(
    requests: AsyncIterator[Request],
    handle: Callable[[Request, int], Awaitable[Response]],
    started: asyncio.Queue[asyncio.Task[Response] | None],
    draining: Drain,
) -> bool:
    """Read `requests`, putting ``handle(request, index)`` for each, started, into
    `started`, then None. True if reading stopped because the server began draining."""
    iterator = aiter(requests)
    stop = asyncio.ensure_future(draining.wait())
    index = 0
    try:
        while True:
            following = asyncio.ensure_future(anext(iterator))
            await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                following.cancel()
                return True
            try:
                request = following.result()
            except StopAsyncIteration:
                return False
            await started.put(asyncio.ensure_future(handle(request, index)))
            index += 1
    finally:
        stop.cancel()
        await started.put(None)
