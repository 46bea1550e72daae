"""The one place where exceptions become gRPC statuses, for every service.

Domain errors (`server.errors`) keep their message; anything else is logged
with its traceback and the caller gets INTERNAL with a generic message. While
the server drains, new calls other than probes (`server.handlers.PROBES`) get
UNAVAILABLE, and `Calls` counts the ones still being answered so shutdown can
wait for them; beyond ``max_concurrent_calls`` of them a new call is answered
RESOURCE_EXHAUSTED at once (probes are never refused).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from server.drain import Drain
from server.errors import Draining, QueueFull, to_status, to_trailers
from server.handlers import HandlerInterceptor, behavior, is_probe, replace_behavior

log = logging.getLogger(__name__)


async def abort_with(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    code, message = to_status(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message, trailing_metadata=to_trailers(exc))


def _guard_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, method, exc)

    return guarded


def _guard_streaming(
    behavior: Callable[..., AsyncIterator[Any]], method: str
) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, method, exc)

    return guarded


class Calls:
    """Calls being answered, gRPC and HTTP (probes and refusals excluded), at most `limit`
    at once."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()

    def unary(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._enter()
            try:
                return await behavior(request, context)
            finally:
                self._exit()

        return counted

    def streaming(self, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            self._enter()
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                self._exit()

        return counted

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count one call while the block runs (the HTTP adapter's calls count here too)."""
        self._enter()
        try:
            yield
        finally:
            self._exit()

    def _enter(self) -> None:
        if self.limit is not None and self.active >= self.limit:
            raise QueueFull(
                f"the server is answering {self.active} calls, its limit "
                f"(max_concurrent_calls {self.limit}); retry later or on another instance"
            )
        self.active += 1
        self._idle.clear()

    def _exit(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()


class ErrorInterceptor(HandlerInterceptor):
    """Wraps every handler: errors to statuses, and refusal while draining."""

    def __init__(self, draining: Drain, calls: Calls) -> None:
        self._draining = draining
        self._calls = calls

    def wrap(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        method = details.method
        answer = behavior(handler)
        if is_probe(method):  # answered while draining too: balancers poll them to see it
            counted = answer
        elif self._draining.is_set():
            counted = self._refuse
        elif inspect.isasyncgenfunction(answer):
            counted = self._calls.streaming(answer)
        else:
            counted = self._calls.unary(answer)
        if inspect.isasyncgenfunction(counted):
            return replace_behavior(handler, _guard_streaming(counted, method))
        return replace_behavior(handler, _guard_unary(counted, method))

    async def _refuse(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Stands in for any handler while draining (aio accepts coroutines for every shape)."""
        raise Draining(
            "server is shutting down; retry on another instance", self._draining.pushback_ms()
        )
