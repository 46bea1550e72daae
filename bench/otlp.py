"""An OTLP/gRPC trace receiver on loopback: the OpenTelemetry collector's TraceService
``Export``, answered in this process, for a server started with ``--trace-endpoint``
(`Receiver.endpoint`).

``Receiver()`` keeps every span it receives, with the resource attributes of the process
that sent it (`Received`), for the tracing tests to read; ``Receiver(keep=False)`` is the
bench's sink: it counts the export calls and their bytes and parses nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
SERVER, INTERNAL = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_INTERNAL


def value(any_value: common_pb2.AnyValue) -> Any:
    """An attribute's value as Python (str, int, float, bool; arrays as lists)."""
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class Received:
    """One span as it arrived: the span and the attributes of its resource (the process)."""

    span: trace_pb2.Span
    resource: dict[str, Any]

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.span.attributes)

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def links(self) -> list[tuple[str, str]]:
        """(trace id, span id) of each link, in hex."""
        return [(link.trace_id.hex(), link.span_id.hex()) for link in self.span.links]

    @property
    def process(self) -> str:
        """Which of the server's processes sent it (``resnet_serve.process``)."""
        return str(self.resource.get("resnet_serve.process", ""))


class Receiver:
    """A TraceService on ``127.0.0.1:<free port>``, started at once; `close` stops it."""

    def __init__(self, keep: bool = True) -> None:
        self._keep = keep
        self._spans: list[Received] = []
        self._changed = threading.Condition()
        self.exports = 0  # Export calls answered
        self.bytes = 0  # their request bytes
        handler = grpc.unary_unary_rpc_method_handler(
            self._export,
            request_deserializer=otlp.ExportTraceServiceRequest.FromString if keep else None,
            response_serializer=otlp.ExportTraceServiceResponse.SerializeToString,
        )
        service, method = EXPORT.lstrip("/").split("/")
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(service, {method: handler})]
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        """What ``--trace-endpoint`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` names (plain text)."""
        return f"http://127.0.0.1:{self.port}"

    def _export(self, request: Any, _context: grpc.ServicerContext) -> Any:
        received: list[Received] = []
        if self._keep:
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    received += [Received(span, resource) for span in scope_spans.spans]
            size = request.ByteSize()
        else:
            size = len(request)
        with self._changed:
            self._spans += received
            self.exports += 1
            self.bytes += size
            self._changed.notify_all()
        return otlp.ExportTraceServiceResponse()

    def spans(self) -> list[Received]:
        with self._changed:
            return list(self._spans)

    def __iter__(self) -> Iterator[Received]:
        return iter(self.spans())

    def wait(
        self, found: Callable[[list[Received]], bool], timeout: float = 30.0
    ) -> list[Received]:
        """Every span received once `found` says the spans are there; AssertionError with
        what did arrive after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not found(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({(r.process, r.span.name) for r in self._spans})
                    raise AssertionError(
                        f"spans not there after {timeout:.0f} s; {len(self._spans)} received: "
                        f"{names}"
                    )
                self._changed.wait(min(left, 0.5))
            return list(self._spans)

    def close(self) -> None:
        self._server.stop(grace=None).wait(5)

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
