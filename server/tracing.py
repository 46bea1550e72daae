"""Distributed tracing: OpenTelemetry spans exported over OTLP/gRPC, off unless configured.

On when `configure` finds an endpoint: ``--trace-endpoint`` (``RESNET_SERVE_TRACE_ENDPOINT``)
or the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``
(``OTEL_SDK_DISABLED=true`` turns it off again). The SDK then reads the other standard
variables as it does anywhere: the sampler (``OTEL_TRACES_SAMPLER``, parent-based and
always-on by default; ``parentbased_traceidratio`` with ``OTEL_TRACES_SAMPLER_ARG`` for a
ratio), the batch span processor (``OTEL_BSP_*``), the exporter (``OTEL_EXPORTER_OTLP_*``:
headers, TLS, timeout, compression), the propagators (``OTEL_PROPAGATORS``, W3C
``traceparent``/``tracestate`` and baggage by default) and the resource
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``; the service name is ``resnet-serve``
unless they set one). Every process configures it the same way: one process, the engine
and each front end of ``--frontends N``, each exporting its own spans.

The spans of one call:

- a SERVER span per call that is not a probe, its parent the caller's ``traceparent``
  (gRPC metadata: `server.interceptors`; HTTP headers: `server.protocols.http_gate`),
  named and given attributes as the semantic conventions for RPC and HTTP say;
- its children: ``preprocess`` (validation, decoding and resizing the images or reading
  the tensor: `server.request_path`), ``queue`` (from the batcher's queue to the start of
  the batch that serves it: `server.core.instances`) and ``encode`` (the response written
  by the adapter);
- one ``batch`` span per session run, the root of a trace of its own, linked to the
  server span of every request it served, with the batch's size, requests, instance and
  execution provider. It is sampled when any request it serves is (`_linked_sampler`).

With front ends, a request's span context (trace id, span id, flags) crosses to the engine
in its ``infer`` message (`carried`, `received`): the engine's ``queue`` and ``batch``
spans then point at the front end's server span.

Off (the default) costs a test of `ENABLED` where a span would start: no OpenTelemetry
object is made per request, and the SDK is not even imported.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

log = logging.getLogger(__name__)

# The one check: False until `configure` turns tracing on in this process.
ENABLED = False

DEFAULT_SERVICE_NAME = "resnet-serve"
PREPROCESS, QUEUE, ENCODE, BATCH = "preprocess", "queue", "encode", "batch"
# The resource attribute naming which of the server's processes exported a span.
PROCESS_ATTRIBUTE = "resnet_serve.process"

_tracer: Any = None
_provider: Any = None


def endpoint_configured(flag: str) -> str:
    """Where spans go: the flag's endpoint, else the standard variables' ("" when none)."""
    if flag:
        return flag
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )


def configure(trace_endpoint: str, process: str) -> bool:
    """Turn tracing on in this process when an endpoint is configured (see the module
    docstring); `process` names it in the resource (``server``, ``engine``, ``frontend-0``).
    True when on."""
    global ENABLED, _tracer, _provider
    endpoint = endpoint_configured(trace_endpoint)
    if not endpoint or ENABLED:
        return ENABLED
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

    detected = OTELResourceDetector().detect().attributes
    attributes: dict[str, Any] = {PROCESS_ATTRIBUTE: process}
    if SERVICE_NAME not in detected:  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
        attributes[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    provider = TracerProvider(
        sampler=_linked_sampler(_get_from_env_or_default()),
        resource=Resource.create(attributes),
    )
    # the flag's endpoint as given; otherwise the exporter reads the OTEL_* variables
    exporter = OTLPSpanExporter(endpoint=trace_endpoint or None)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider
    _tracer = provider.get_tracer("resnet-serve")
    ENABLED = True
    log.info(
        "tracing on: spans to %s over OTLP/gRPC, sampler %s",
        endpoint, provider.sampler.get_description(),
    )  # fmt: skip
    return True


def shutdown() -> None:
    """Export what is still buffered and stop (the process is exiting)."""
    global ENABLED, _tracer, _provider
    if _provider is not None:
        ENABLED = False
        provider, _provider, _tracer = _provider, None, None
        provider.shutdown()


def _linked_sampler(inner: Any) -> Any:
    """The configured sampler, except that a root span linked to a sampled span is sampled:
    a batch is recorded whenever a request it served is."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class LinkedSampler(Sampler):
        def should_sample(
            self,
            parent_context: Any,
            trace_id: int,
            name: str,
            kind: Any = None,
            attributes: Any = None,
            links: Sequence[Any] | None = None,
            trace_state: Any = None,
        ) -> SamplingResult:
            root = not trace.get_current_span(parent_context).get_span_context().is_valid
            if links and root and any(link.context.trace_flags.sampled for link in links):
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
            return inner.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"LinkedSampler{{{inner.get_description()}}}"

    return LinkedSampler()


# the server span of a call


def _carrier(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """gRPC metadata as a carrier for the propagators (text values only)."""
    return {key: value for key, value in metadata or () if isinstance(value, str)}


@contextmanager
def server_span(
    name: str, carrier: Mapping[str, Any], attributes: dict[str, Any]
) -> Iterator[Any]:
    """A SERVER span, current while the block runs, its parent the caller's ``traceparent``
    in `carrier` (gRPC metadata as a dict, or HTTP headers). Ends with the block; an
    exception that leaves the block is recorded."""
    from opentelemetry import context, propagate, trace

    parent = propagate.extract(carrier)
    span = _tracer.start_span(name, parent, trace.SpanKind.SERVER, attributes)
    token = context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    except BaseException as exc:
        if not _is_abort(exc):
            span.record_exception(exc)
        raise
    finally:
        span.end()
        context.detach(token)


def _is_abort(exc: BaseException) -> bool:
    """grpc.aio's AbortError: the status was set (and recorded) already."""
    return type(exc).__name__ == "AbortError"


def grpc_span(method: str, metadata: Iterable[tuple[str, Any]] | None, peer: str) -> Any:
    """`server_span` for a gRPC call: ``/package.Service/Method``, RPC conventions."""
    service, _, rpc = method.lstrip("/").partition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
    address, port = _peer(peer)
    if address:
        attributes["network.peer.address"] = address
    if port:
        attributes["network.peer.port"] = port
    return server_span(f"{service}/{rpc}", _carrier(metadata), attributes)


def _peer(peer: str) -> tuple[str, int | None]:
    """grpc's ``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000`` as address and port."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return "", None
    address, _, port = rest.rpartition(":")
    return address.strip("[]"), int(port) if port.isdigit() else None


# grpc status codes a server span counts as errors (the RPC semantic conventions)
_GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})


def grpc_status(span: Any, code: int) -> None:
    """The call's status code on its span."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("rpc.grpc.status_code", code)
    if code in _GRPC_SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR))


def http_status(span: Any, status: int) -> None:
    """The answer's status on its span (5xx are a server span's errors)."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


_OFF = nullcontext()  # what `step` gives when tracing is off: one object for every call


def step(name: str) -> AbstractContextManager[Any]:
    """An INTERNAL span under the current one while the block runs; with tracing off, or
    under a span that is not recorded (a call the sampler left out), a shared no-op
    (nothing is made: its span would have no recorded parent)."""
    if not ENABLED:
        return _OFF
    from opentelemetry import trace

    if not trace.get_current_span().is_recording():
        return _OFF
    return _child(name)


@contextmanager
def _child(name: str) -> Iterator[Any]:
    from opentelemetry import trace

    with _tracer.start_as_current_span(name, kind=trace.SpanKind.INTERNAL) as span:
        yield span


# a request's span context: queued with its items, carried to the engine


def current() -> Any:
    """The current span's context (a SpanContext), None when there is no valid one."""
    from opentelemetry import trace

    found = trace.get_current_span().get_span_context()
    return found if found.is_valid else None


def carried() -> tuple[int, int, int] | None:
    """The current span's context as an ``infer`` message carries it to the engine:
    (trace id, span id, flags); None without one."""
    found = current()
    if found is None:
        return None
    return (found.trace_id, found.span_id, int(found.trace_flags))


def received(carried: tuple[int, int, int] | None) -> Any:
    """What `carried` sent, as a remote SpanContext (None when there is none or tracing is
    off in this process)."""
    if carried is None or not ENABLED:
        return None
    from opentelemetry.trace import SpanContext, TraceFlags

    trace_id, span_id, flags = carried
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))


def trace_id() -> str:
    """The current span's trace id in hex, "" without a valid one (the JSON log lines)."""
    found = current()
    return format(found.trace_id, "032x") if found is not None else ""


# a batch run


def batch(
    requests: Sequence[tuple[Any, float]], now: float, attributes: dict[str, Any]
) -> Any:
    """A session run starts at `now` (the loop's clock) over items queued by `requests`
    ((span context or None, arrival on the loop's clock) each): a ``queue`` span for each
    traced request, from its arrival to now, and the ``batch`` span linked to them, which
    the caller ends (`batch_ended`). None when no request is traced; a request whose span
    the sampler left out gets no queue span and no link."""
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Link

    wall = time.time_ns()
    links = []
    for parent, arrival in requests:
        if parent is None or not parent.trace_flags.sampled:
            continue
        context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        started = wall - int((now - arrival) * 1e9)
        queued = _tracer.start_span(QUEUE, context, trace.SpanKind.INTERNAL, start_time=started)
        queued.end(end_time=wall)
        links.append(Link(parent))
    if not links:
        return None
    return _tracer.start_span(
        BATCH, Context(), trace.SpanKind.INTERNAL, attributes, links, start_time=wall
    )


def batch_ended(span: Any, error: BaseException | None) -> None:
    if error is not None:
        span.record_exception(error)
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()
