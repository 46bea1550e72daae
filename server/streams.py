"""Bidirectional streams answered in request order, shared by ClassifyStream and ModelStreamInfer.

Each request starts as soon as it is read (at most `window` ahead of the
answers), so a stream's requests share batches; answers go out in request
order. When the server starts draining, the stream stops reading, answers
everything already read, and ends with UNAVAILABLE so the caller reopens it
on another instance and resends what was not answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from server.drain import Drain
from server.errors import Draining

Request = TypeVar("Request")
Response = TypeVar("Response")


async def answer_in_order(
    requests: AsyncIterator[Request],
    handle: Callable[[Request, int], Awaitable[Response]],
    draining: Drain,
    window: int,
) -> AsyncIterator[Response]:
    """Yield ``await handle(request, index)`` for every request, in order."""
    started: asyncio.Queue[asyncio.Task[Response] | None] = asyncio.Queue(window)
    drained = False

    async def read() -> None:
        nonlocal drained
        iterator = aiter(requests)
        stop = asyncio.ensure_future(draining.wait())
        index = 0
        try:
            while True:
                following = asyncio.ensure_future(anext(iterator))
                await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    following.cancel()
                    drained = True
                    return
                try:
                    request = following.result()
                except StopAsyncIteration:
                    return
                await started.put(asyncio.ensure_future(handle(request, index)))
                index += 1
        finally:
            stop.cancel()
            await started.put(None)

    reader = asyncio.ensure_future(read())
    try:
        while (task := await started.get()) is not None:
            yield await task
        await reader  # a broken request stream ends the call with its error
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
