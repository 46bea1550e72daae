"""What wraps the server's handlers: which methods are probes, how every handler is
wrapped once as it is registered (`wrap_registrations`), and how to put a new behaviour
into a handler of the same shape.

Probes are the calls a load balancer, Kubernetes or a v2 client makes to see
whether the server is up: grpc.health.v1 and the v2 protocol's ServerLive,
ServerReady and ModelReady. They need no token (`server.auth`) and are
answered while the server drains (`server.interceptors`), so a balancer sees
the drain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


Wrap = Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]
"""Turns a method's handler (and its full name) into the handler that answers its calls."""


def wrap_registrations(server: grpc.aio.Server, wrap: Wrap) -> None:
    """Make every handler later added to `server` pass through `wrap`, once per method, as
    it is registered (both of the ways generated code registers one).

    This does what a server interceptor would, without one: gRPC runs an interceptor chain
    (coroutines, a fresh handler object) on every call, a wrapped handler costs the one
    function it is.

    Methods that generated code registers one by one (``add_registered_method_handlers``)
    are served as one generic handler per service instead: grpc.aio keeps a pending
    request-call future per registered method and, for every call it accepts, waits on
    all of them at once (``asyncio.wait``: a done-callback added to and removed from each),
    so each registered method costs every call; a generic handler is one future, and
    finding the method is one dictionary lookup.
    """
    add_generic = server.add_generic_rpc_handlers

    def add_generic_rpc_handlers(generic: Sequence[grpc.GenericRpcHandler]) -> None:
        add_generic(tuple(_Wrapped(handler, wrap) for handler in generic))

    def add_registered_method_handlers(
        service: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        wrapped = {m: wrap(h, f"/{service}/{m}") for m, h in method_handlers.items()}
        add_generic((grpc.method_handlers_generic_handler(service, wrapped),))

    # instance attributes: `server` stays the grpc.aio.Server that services expect
    server.add_generic_rpc_handlers = add_generic_rpc_handlers  # type: ignore[method-assign]
    server.add_registered_method_handlers = add_registered_method_handlers  # type: ignore[method-assign]


class _Wrapped(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped, each once, when first asked for."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrap: Wrap) -> None:
        self._inner, self._wrap = inner, wrap
        self._done: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        try:
            return self._done[method]
        except KeyError:
            pass
        handler = self._inner.service(handler_call_details)
        if handler is not None:
            handler = self._wrap(handler, method)
            self._done[method] = handler  # unknown methods are not kept: any name may come
        return handler


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
    handler: grpc.RpcMethodHandler,
    answer: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s shape and (de)serializers that answers with `answer` (aio
    takes a coroutine function for every shape, an async generator for streamed answers),
    its requests read by `request_deserializer` if one is given."""
    factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        answer,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
