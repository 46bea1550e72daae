"""Prometheus metrics: the families, their labels, and the /metrics HTTP server.

All families live on one `CollectorRegistry` owned by a `Metrics` object, so
several servers can run in one process (tests) without clashing. Labels:
``model`` and ``version`` everywhere, ``code`` (gRPC status name) on
``resnet_serve_requests_total``, ``instance`` and ``provider`` on
``resnet_serve_execution_provider``. A version that is unloaded for good loses its series
(`Metrics.forget`), so versions that come and go leave no stale ones behind; the counts
of loads and unloads stay.
"""

from __future__ import annotations

import bisect
import itertools
import operator
import platform
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from importlib.metadata import version
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import onnxruntime as ort
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from server.errors import to_status
from server.threads import ThreadCpuCollector

# 1 ms … 10 s, roughly three buckets per decade.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
METRICS_PATH = "/metrics"

_MV = ("model", "version")
# gRPC's deadline timer and time.monotonic() may disagree by a few milliseconds.
_DEADLINE_SLACK = 0.01


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        # each version's requests, counted in plain numbers (`RequestCounts`)
        self._versions: dict[tuple[str, str], VersionMetrics] = {}
        r.register(_RequestFamilies(self._versions))
        self.queue_duration = Histogram(
            "resnet_serve_queue_duration_seconds",
            "Time a batch item waited in its model's queue.",
            _MV, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_duration = Histogram(
            "resnet_serve_inference_duration_seconds",
            "Time of one session run over a batch.",
            _MV, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "resnet_serve_batch_size",
            "Images per session run.",
            _MV, buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "resnet_serve_queue_depth", "Images waiting in the model's queue.", _MV, registry=r
        )
        self.load_seconds = Gauge(
            "resnet_serve_model_load_seconds",
            "Time to load and warm up a model version.",
            _MV, registry=r,
        )  # fmt: skip
        self.execution_provider = Gauge(
            "resnet_serve_execution_provider",
            "1 for the ONNX Runtime execution provider each instance (session) of a READY "
            "model version runs on.",
            (*_MV, "instance", "provider"), registry=r,
        )  # fmt: skip
        self.loads = Counter(
            "resnet_serve_model_loads",
            "Loads of a model version by outcome (ok, failed).",
            (*_MV, "outcome"), registry=r,
        )  # fmt: skip
        self.unloads = Counter(
            "resnet_serve_model_unloads",
            "Unloads of a model version by reason (removed, policy, request).",
            (*_MV, "reason"), registry=r,
        )  # fmt: skip
        self.auth_failures = Counter(
            "resnet_serve_auth_failures",
            "Calls refused UNAUTHENTICATED (missing or wrong bearer token).",
            registry=r,
        )
        # In a front end: the families of every process of the server (`server.frontend`).
        self.others: Callable[[], Awaitable[list[Metric]]] | None = None
        # In the engine: told each version `forget` drops, so every front end drops it too.
        self.on_forget: Callable[[str, str], None] | None = None
        # the families whose series belong to one loaded version, with their label names
        # (the request families' series go with the version's `RequestCounts`)
        self._per_version = (
            (self.queue_duration, _MV),
            (self.inference_duration, _MV),
            (self.batch_size, _MV),
            (self.queue_depth, _MV),
            (self.load_seconds, _MV),
            (self.execution_provider, (*_MV, "instance", "provider")),
        )
        self.build = Info(
            "resnet_serve_build", "Versions of the server and its runtime.", registry=r
        )
        self.build.info(
            {
                "version": version("resnet-serve"),
                "onnxruntime": ort.__version__,
                "python": platform.python_version(),
            }
        )
        r.register(ThreadCpuCollector())

    def version(self, model: str, version: str) -> VersionMetrics:
        """The children of every family for one model version, made once and kept."""
        key = (model, version)
        found = self._versions.get(key)
        if found is None:
            found = self._versions[key] = VersionMetrics(self, model, version)
        return found

    def track_request(
        self, model: str, version: str, images: int, deadline: float | None = None
    ) -> _Tracked:
        """Count one request of a known model version: in flight, duration, outcome, images.

        A request cancelled after its `deadline` (a `time.monotonic()` value) counts as
        DEADLINE_EXCEEDED, any other cancellation as CANCELLED.
        """
        return self.version(model, version).track_request(images, deadline)

    async def every_process(self) -> list[Metric]:
        """The families of the whole server: this process's, or in a front end every
        process's as the engine's /metrics shows them."""
        if self.others is not None:
            return await self.others()
        return list(self.registry.collect())

    def forget(self, model: str, version: str) -> None:
        """Remove every series of the version (it was unloaded and is not serving)."""
        self._versions.pop((model, version), None)  # its children are gone with the series
        for family, names in self._per_version:
            found = {
                tuple(sample.labels[n] for n in names)
                for metric in family.collect()
                for sample in metric.samples
                if sample.labels.get("model") == model and sample.labels.get("version") == version
            }
            for values in found:
                family.remove(*values)
        if self.on_forget is not None:
            self.on_forget(model, version)

    def serve(self, host: str, port: int, registry: CollectorRegistry | None = None) -> WSGIServer:
        """Expose /metrics (of `registry`, this object's own by default) over HTTP from a
        daemon thread; `shutdown()` the result to stop.

        Every other path answers 404, so a load balancer's health check pointed at this
        port by mistake fails instead of seeing a healthy server (health is on the HTTP
        and gRPC ports)."""
        exposition = make_wsgi_app(self.registry if registry is None else registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == METRICS_PATH:
                return exposition(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"not found; the metrics are at {METRICS_PATH}\n".encode()]

        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        server_class = type(
            "MetricsServer", (ThreadingWSGIServer,), {"address_family": family[0][0]}
        )
        http = make_server(host, port, app, server_class, handler_class=_Quiet)
        threading.Thread(target=http.serve_forever, name="metrics", daemon=True).start()
        return http


# How one series of several processes becomes one (the engine's /metrics, `server.engine`):
# counters, histograms and summaries add up, and so does a gauge unless it is named here.
_GAUGES_COMBINED: dict[str, Callable[[float, float], float]] = {
    "resnet_serve_last_success_timestamp_seconds": max,
    "process_start_time_seconds": min,
    "process_max_fds": min,
    "python_info": max,  # an info family that prometheus_client makes a gauge
}


def merge_families(sources: Iterable[Iterable[Metric]]) -> list[Metric]:
    """The families of several processes as one process's: a series present in several
    adds up (`_GAUGES_COMBINED` for the gauges that do not); an info family is shown once."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in sources:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            series = values[family.name]
            combine = (
                _GAUGES_COMBINED.get(family.name, operator.add)
                if family.type == "gauge"
                else max if family.type in ("info", "stateset") else operator.add
            )
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                found = series.get(key)
                series[key] = sample.value if found is None else combine(found, sample.value)
    for name, into in merged.items():
        for (sample_name, labels), value in values[name].items():
            into.add_sample(sample_name, dict(labels), value)
    return list(merged.values())


class VersionMetrics:
    """One model version's children of the families, resolved once (``.labels()`` takes a
    lock and builds a key on every call), and its `RequestCounts`."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        labels = (model, version)
        self.queue_duration = metrics.queue_duration.labels(*labels)
        self.inference_duration = metrics.inference_duration.labels(*labels)
        self.batch_size = metrics.batch_size.labels(*labels)
        self.queue_depth = metrics.queue_depth.labels(*labels)
        self.requests = RequestCounts()

    def track_request(self, images: int, deadline: float | None = None) -> _Tracked:
        """See `Metrics.track_request`."""
        return _Tracked(self.requests, images, deadline)

    def observe_preprocess(self, seconds: float) -> None:
        """One request's images decoded and transformed in `seconds`."""
        counts = self.requests
        counts.preprocess[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        counts.preprocess_sum += seconds


# The families of `RequestCounts`, as `_RequestFamilies` shows them.
REQUEST_DURATION = "resnet_serve_request_duration_seconds"
PREPROCESS_DURATION = "resnet_serve_preprocess_duration_seconds"
REQUESTS = "resnet_serve_requests"
IMAGES = "resnet_serve_images"
REQUEST_SECONDS = "resnet_serve_request_seconds"
LAST_SUCCESS = "resnet_serve_last_success_timestamp_seconds"
INFLIGHT = "resnet_serve_inflight_requests"


class RequestCounts:
    """One version's requests, counted in plain numbers: the families of each request, with
    no lock and no Prometheus child per update (those cost the request path ~4 µs a call).
    Only the thread that answers calls (the event loop's) writes them; /metrics reads them
    from its own thread (`_RequestFamilies`), each number as it was before or after an
    update, as Prometheus's own children are read."""

    __slots__ = (
        "codes", "duration_sum", "durations", "failed_seconds", "images", "inflight",
        "last_success", "ok_seconds", "preprocess", "preprocess_sum",
    )  # fmt: skip

    def __init__(self) -> None:
        self.inflight = 0
        self.codes: dict[str, int] = {}  # requests by gRPC status code name
        self.images = 0  # of successful requests
        self.ok_seconds = self.failed_seconds = 0.0
        self.last_success = 0.0  # Unix time
        # histograms: a count per bucket of LATENCY_BUCKETS (not cumulative), then +Inf
        self.durations = [0] * (len(LATENCY_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.preprocess = [0] * (len(LATENCY_BUCKETS) + 1)
        self.preprocess_sum = 0.0


class _RequestFamilies:
    """The request families of every version's `RequestCounts`, made at collect time."""

    def __init__(self, versions: dict[tuple[str, str], VersionMetrics]) -> None:
        self._versions = versions

    def describe(self) -> list[Metric]:
        return self._families()

    def collect(self) -> list[Metric]:
        families = self._families()
        for labels, found in list(self._versions.items()):
            self._add(families, list(labels), found.requests)
        return families

    @staticmethod
    def _families() -> list[Metric]:
        return [
            HistogramMetricFamily(
                REQUEST_DURATION, "Time from receiving a classification request to its "
                "response.", labels=_MV,
            ),
            HistogramMetricFamily(
                PREPROCESS_DURATION, "Time to decode and transform one request's images.",
                labels=_MV,
            ),
            CounterMetricFamily(
                REQUESTS, "Classification requests by outcome (gRPC status code name).",
                labels=(*_MV, "code"),
            ),
            CounterMetricFamily(IMAGES, "Images classified.", labels=_MV),
            CounterMetricFamily(
                REQUEST_SECONDS, "Summed request durations by outcome (ok, failed); the v2 "
                "ModelStatistics reads it.", labels=(*_MV, "outcome"),
            ),
            GaugeMetricFamily(
                LAST_SUCCESS, "When a request of the model version last succeeded (Unix "
                "time).", labels=_MV,
            ),
            GaugeMetricFamily(
                INFLIGHT, "Requests received and not yet answered.", labels=_MV
            ),
        ]  # fmt: skip

    @staticmethod
    def _add(families: list[Metric], labels: list[str], counts: RequestCounts) -> None:
        durations, preprocess, requests, images, seconds, last, inflight = families
        durations.add_metric(labels, _buckets(counts.durations), counts.duration_sum)
        preprocess.add_metric(labels, _buckets(counts.preprocess), counts.preprocess_sum)
        for code, count in list(counts.codes.items()):
            requests.add_metric([*labels, code], count)
        images.add_metric(labels, counts.images)
        seconds.add_metric([*labels, "ok"], counts.ok_seconds)
        seconds.add_metric([*labels, "failed"], counts.failed_seconds)
        last.add_metric(labels, counts.last_success)
        inflight.add_metric(labels, counts.inflight)


_BOUNDS = [*map(floatToGoString, LATENCY_BUCKETS), "+Inf"]  # the buckets' ``le`` labels


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    """A histogram's cumulative buckets from its counts per bucket."""
    return list(zip(_BOUNDS, itertools.accumulate(counts), strict=True))


class _Tracked:
    """One request being counted (a plain context manager: no generator per request)."""

    __slots__ = ("_counts", "_deadline", "_images", "_started")

    def __init__(self, counts: RequestCounts, images: int, deadline: float | None) -> None:
        self._counts, self._images, self._deadline = counts, images, deadline

    def __enter__(self) -> None:
        self._counts.inflight += 1
        self._started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: Any) -> None:
        elapsed = time.perf_counter() - self._started
        if exc is None:
            code = "OK"
        elif isinstance(exc, Exception):
            code = to_status(exc)[0].name
        elif self._deadline is not None and time.monotonic() >= self._deadline - _DEADLINE_SLACK:
            code = "DEADLINE_EXCEEDED"
        else:
            code = "CANCELLED"
        counts = self._counts
        counts.inflight -= 1
        counts.durations[bisect.bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        counts.duration_sum += elapsed
        counts.codes[code] = counts.codes.get(code, 0) + 1
        if code == "OK":
            counts.ok_seconds += elapsed
            counts.images += self._images
            counts.last_success = time.time()
        else:
            counts.failed_seconds += elapsed


class _Quiet(WSGIRequestHandler):
    """No line per scrape in the server's log."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
