"""The one place where exceptions become gRPC statuses, for every service.

Domain errors (`server.errors`) keep their message; anything else is logged
with its traceback and the caller gets INTERNAL with a generic message. While
the server drains, new calls (other than health checks) get UNAVAILABLE.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE

from server.errors import Draining, to_status

log = logging.getLogger(__name__)

_HEALTH_PREFIX = f"/{HEALTH_SERVICE}/"


async def abort_with(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    code, message = to_status(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message)


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


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    """Stands in for any handler while draining (aio accepts coroutines for every shape)."""
    raise Draining("server is shutting down; retry on another instance")


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler: errors to statuses, and refusal while draining."""

    def __init__(self, draining: Callable[[], bool]) -> None:
        self._draining = draining

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
        behavior = {
            (False, False): handler.unary_unary,
            (False, True): handler.unary_stream,
            (True, False): handler.stream_unary,
            (True, True): handler.stream_stream,
        }[(streaming_in, streaming_out)]
        if self._draining() and not method.startswith(_HEALTH_PREFIX):
            wrapped = _guard_unary(_refuse, method)
        elif inspect.isasyncgenfunction(behavior):
            wrapped = _guard_streaming(behavior, method)
        else:
            wrapped = _guard_unary(behavior, method)
        return _FACTORIES[(streaming_in, streaming_out)](
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

