"""The one wrapper around every handler: errors to statuses, refusal while draining, the
calls being answered, and (when tokens are set) the bearer-token check.

Domain errors (`server.errors`) keep their message; anything else is logged
with its traceback and the caller gets INTERNAL with a generic message. While
the server drains, new calls other than probes (`server.handlers.PROBES`) get
UNAVAILABLE, and `Calls` counts the ones still being answered so shutdown can
wait for them; beyond ``max_concurrent_calls`` of them a new call is answered
RESOURCE_EXHAUSTED at once (probes are never refused). With a
`server.auth.TokenCheck`, a call that is not a probe must carry an accepted
token or is refused with UNAUTHENTICATED.

`Guard.wrap` is applied to each method's handler once, when it is registered
(`server.handlers.wrap_registrations`), not by an interceptor on every call; it
decides once per method what the call needs (a probe is neither counted nor
checked) and answers each call with one function.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from server.auth import TokenCheck
from server.drain import Drain
from server.errors import Draining, QueueFull, Unauthenticated, to_status, to_trailers
from server.handlers import behavior, is_probe, replace_behavior

log = logging.getLogger(__name__)


async def abort_with(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    code, message = to_status(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message, trailing_metadata=to_trailers(exc))


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

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count one call while the block runs (the HTTP adapter's calls count here too)."""
        self.enter()
        try:
            yield
        finally:
            self.exit()

    def enter(self) -> None:
        if self.limit is not None and self.active >= self.limit:
            raise QueueFull(
                f"the server is answering {self.active} calls, its limit "
                f"(max_concurrent_calls {self.limit}); retry later or on another instance"
            )
        self.active += 1
        self._idle.clear()

    def exit(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()


class Guard:
    """Wraps every handler (see the module docstring)."""

    def __init__(self, draining: Drain, calls: Calls, tokens: TokenCheck | None = None) -> None:
        self._draining = draining
        self._calls = calls
        self._tokens = tokens

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        answer = behavior(handler)
        probe = is_probe(method)  # answered while draining too: balancers poll them to see it
        check = None if probe else self._tokens
        if inspect.isasyncgenfunction(answer):
            return replace_behavior(handler, self._streaming(answer, method, probe, check))
        return replace_behavior(handler, self._unary(answer, method, probe, check))

    def _admit(self) -> Exception | None:
        """Count the call in, or why it is refused: draining, or too many calls."""
        if self._draining.is_set():
            return Draining(
                "server is shutting down; retry on another instance", self._draining.pushback_ms()
            )
        try:
            self._calls.enter()
        except QueueFull as exc:
            return exc
        return None

    def _unary(
        self,
        answer: Callable[..., Awaitable[Any]],
        method: str,
        probe: bool,
        check: TokenCheck | None,
    ) -> Callable[..., Awaitable[Any]]:
        calls = self._calls

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not probe and (refused := self._admit()) is not None:
                await abort_with(context, method, refused)
            try:
                if check is not None:
                    await _authenticate(context, check, method)
                return await answer(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort_with(context, method, exc)
            finally:
                if not probe:
                    calls.exit()

        return guarded

    def _streaming(
        self,
        answer: Callable[..., AsyncIterator[Any]],
        method: str,
        probe: bool,
        check: TokenCheck | None,
    ) -> Callable[..., AsyncIterator[Any]]:
        calls = self._calls

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if not probe and (refused := self._admit()) is not None:
                await abort_with(context, method, refused)
            try:
                if check is not None:
                    await _authenticate(context, check, method)
                async for response in answer(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort_with(context, method, exc)
            finally:
                if not probe:
                    calls.exit()

        return guarded


async def _authenticate(context: grpc.aio.ServicerContext, tokens: TokenCheck, method: str) -> None:
    """UNAUTHENTICATED unless the call carries an accepted token (counted and logged by
    `TokenCheck.refused`); the status comes from the one error map."""
    refusal = tokens.accepts(context.invocation_metadata())
    if refusal is not None:
        tokens.refused(method, refusal)
        code, details = to_status(Unauthenticated(refusal))
        await context.abort(code, details)
