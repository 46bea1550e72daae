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
checked) and answers each call with one function. With tracing on (`server.tracing`), a
call that is not a probe is a SERVER span, its parent the caller's ``traceparent``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from server import tracing
from server.auth import TokenCheck
from server.drain import Drain
from server.errors import Draining, QueueFull, Unauthenticated, to_status, to_trailers
from server.handlers import behavior, is_probe, replace_behavior
from server.shm import Held

log = logging.getLogger(__name__)


async def abort_with(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    code, message = to_status(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    elif not isinstance(exc, Unauthenticated):  # those are logged rate-limited (TokenCheck)
        log.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message, trailing_metadata=to_trailers(exc))


class Calls:
    """Calls being answered, gRPC and HTTP (probes and refusals excluded), at most `limit`
    at once in the whole server (`Held`: with front ends, over all of them)."""

    def __init__(self, limit: int | None = None, held: Held | None = None) -> None:
        self.limit = limit
        self._held = held or Held()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        """This process's calls being answered."""
        return self._held.count

    async def idle(self) -> None:
        await self._idle.wait()

    def enter(self) -> None:
        if self.limit is not None and (held := self._held.total()) >= self.limit:
            raise QueueFull(
                f"the server is answering {held} calls, its limit "
                f"(max_concurrent_calls {self.limit}); retry later or on another instance"
            )
        self._held.add(1)
        self._idle.clear()

    def exit(self) -> None:
        self._held.add(-1)
        if self._held.count == 0:
            self._idle.set()


class Admission:
    """Whether a call (gRPC or HTTP) may start, the one rule for both: refused while
    draining (UNAVAILABLE, with a pushback), without an accepted token when tokens are
    set (UNAUTHENTICATED, counted and logged rate-limited by `TokenCheck.refused`), and
    beyond the concurrent-call limit (RESOURCE_EXHAUSTED); else counted in `Calls`
    until `done`. Probes never come here. `bodies`: the HTTP request bodies being read,
    which the HTTP port's gate counts before a call is admitted (`http_max_body_reads`)."""

    def __init__(
        self, draining: Drain, calls: Calls, tokens: TokenCheck | None = None,
        bodies: Held | None = None,
    ) -> None:  # fmt: skip
        self.draining = draining
        self.calls = calls
        self.tokens = tokens
        self.bodies = bodies or Held()

    def admit(self, method: str, metadata: Callable[[], Sequence[tuple[str, Any]] | None]) -> None:
        """Count the call in, or raise why it is refused. `metadata` is called only when
        tokens are checked."""
        self.check(method, metadata)
        self.enter()

    def check(self, method: str, metadata: Callable[[], Sequence[tuple[str, Any]] | None]) -> None:
        """Raise why the call may not start (draining, token); count nothing. HTTP checks
        this before it reads a request's body, and `enter`s once the body is in."""
        self._draining()
        if self.tokens is not None:
            refusal = self.tokens.accepts(metadata())
            if refusal is not None:
                self.tokens.refused(method, refusal)
                raise Unauthenticated(refusal)

    def enter(self) -> None:
        """Count a checked call in: refused if the drain began since, or at the call limit."""
        self._draining()
        self.calls.enter()

    def _draining(self) -> None:
        if self.draining.is_set():
            raise Draining(
                "server is shutting down; retry on another instance", self.draining.pushback_ms()
            )

    def done(self) -> None:
        self.calls.exit()


class Guard:
    """Wraps every handler (see the module docstring)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        answer = behavior(handler)
        # probes are answered while draining too: balancers poll them to see it
        admit = None if is_probe(method) else self._admission
        if inspect.isasyncgenfunction(answer):
            streaming = _streaming(answer, method, admit)
            if tracing.ENABLED and admit is not None:  # decided once per method
                streaming = _traced_streaming(streaming, method)
            return replace_behavior(handler, streaming)
        unary = _unary(answer, method, admit)
        if tracing.ENABLED and admit is not None:
            unary = _traced_unary(unary, method)
        return replace_behavior(handler, unary)


async def _admit(admission: Admission, method: str, context: grpc.aio.ServicerContext) -> None:
    """Count the call in, or abort it with why it is refused."""
    try:
        admission.admit(method, context.invocation_metadata)
    except Exception as exc:
        await abort_with(context, method, exc)


def _unary(
    answer: Callable[..., Awaitable[Any]], method: str, admission: Admission | None
) -> Callable[..., Awaitable[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if admission is not None:
            await _admit(admission, method, context)
        try:
            return await answer(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, method, exc)
        finally:
            if admission is not None:
                admission.done()

    return guarded


def _streaming(
    answer: Callable[..., AsyncIterator[Any]], method: str, admission: Admission | None
) -> Callable[..., AsyncIterator[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if admission is not None:
            await _admit(admission, method, context)
        try:
            async for response in answer(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, method, exc)
        finally:
            if admission is not None:
                admission.done()

    return guarded


def _code(context: grpc.aio.ServicerContext, failed: bool) -> int:
    """The call's status code as a number (OK unless one was set, UNKNOWN if it raised)."""
    code = context.code()
    if code is None:
        return grpc.StatusCode.UNKNOWN.value[0] if failed else 0
    return code.value[0] if isinstance(code, grpc.StatusCode) else int(code)


def _traced_unary(
    answer: Callable[..., Awaitable[Any]], method: str
) -> Callable[..., Awaitable[Any]]:
    async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with tracing.grpc_span(method, context.invocation_metadata(), context.peer()) as span:
            failed = True
            try:
                response = await answer(request, context)
                failed = False
                return response
            finally:
                tracing.grpc_status(span, _code(context, failed))

    return traced


def _traced_streaming(
    answer: Callable[..., AsyncIterator[Any]], method: str
) -> Callable[..., AsyncIterator[Any]]:
    async def traced(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        with tracing.grpc_span(method, context.invocation_metadata(), context.peer()) as span:
            failed = True
            try:
                async for response in answer(request, context):
                    yield response
                failed = False
            finally:
                tracing.grpc_status(span, _code(context, failed))

    return traced
