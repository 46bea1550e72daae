"""What the server's interceptors share: which methods are probes, the interceptor
shape that swaps a method's handler, and how to put a new behaviour into a handler
of the same shape.

Probes are the calls a load balancer, Kubernetes or a v2 client makes to see
whether the server is up: grpc.health.v1 and the v2 protocol's ServerLive,
ServerReady and ModelReady. They need no token (`server.auth`) and are
answered while the server drains (`server.interceptors`), so a balancer sees
the drain.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE

PROBES = (
    f"/{HEALTH_SERVICE}/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
)

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that gives each method's handler, once per call, to `wrap`, whose
    result answers the call (unknown methods stay unknown)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self.wrap(handler, handler_call_details)

    def wrap(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        raise NotImplementedError


def is_probe(method: str) -> bool:
    """True for a full method name (``/package.Service/Method``) that is a probe."""
    return method.startswith(PROBES)


def behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The function that answers the calls of `handler`, whatever its shape."""
    return {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[(handler.request_streaming, handler.response_streaming)]


def replace_behavior(
    handler: grpc.RpcMethodHandler, answer: Callable[..., Any]
) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s shape and (de)serializers that answers with `answer` (aio
    takes a coroutine function for every shape, an async generator for streamed answers)."""
    factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        answer,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
