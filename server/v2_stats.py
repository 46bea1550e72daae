"""ModelStatistics (Triton's statistics extension) read from the Prometheus metrics.

The metrics are the one record of what the server did, for both APIs; this
module only translates them per model version:

- ``success`` / ``fail``: requests by outcome and their summed durations;
- ``queue``: batch items and the time they waited in the model's queue;
- ``compute_input``: requests whose images were decoded and transformed, and the time it took;
- ``compute_infer``: session runs (batches) and their time;
- ``inference_count``: images of successful requests; ``execution_count``: session runs;
- ``last_inference``: when a request last succeeded, in milliseconds since the epoch.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Histogram
from prometheus_client.metrics import MetricWrapperBase
from resnet_serve_client.proto.inference import grpc_service_pb2 as pb

from server.metrics import Metrics
from server.models import ModelVersion

_NS = 1_000_000_000


def model_statistics(
    metrics: Metrics, versions: Iterable[ModelVersion]
) -> pb.ModelStatisticsResponse:
    return pb.ModelStatisticsResponse(model_stats=[_one(metrics, v) for v in versions])


def _one(metrics: Metrics, mv: ModelVersion) -> pb.ModelStatistics:
    labels = {"model": mv.name, "version": mv.version}
    ok = _value(metrics.requests, "_total", labels, code="OK")
    failed = _value(metrics.requests, "_total", labels) - ok
    return pb.ModelStatistics(
        name=mv.name,
        version=mv.version,
        last_inference=int(_value(metrics.last_success, "_seconds", labels) * 1000),
        inference_count=int(_value(metrics.images, "_total", labels)),
        execution_count=int(_value(metrics.batch_size, "_count", labels)),
        inference_stats=pb.InferStatistics(
            success=_duration(ok, _value(metrics.request_seconds, "_total", labels, outcome="ok")),
            fail=_duration(
                failed, _value(metrics.request_seconds, "_total", labels, outcome="failed")
            ),
            queue=_histogram(metrics.queue_duration, labels),
            compute_input=_histogram(metrics.preprocess_duration, labels),
            compute_infer=_histogram(metrics.inference_duration, labels),
        ),
    )


def _value(family: MetricWrapperBase, suffix: str, labels: dict[str, str], **more: str) -> float:
    """The sum of the family's samples named ``*<suffix>`` whose labels include these."""
    wanted = {**labels, **more}.items()
    return sum(
        sample.value
        for metric in family.collect()
        for sample in metric.samples
        if sample.name.endswith(suffix) and wanted <= sample.labels.items()
    )


def _histogram(family: Histogram, labels: dict[str, str]) -> pb.StatisticDuration:
    return _duration(_value(family, "_count", labels), _value(family, "_sum", labels))


def _duration(count: float, seconds: float) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=int(count), ns=round(seconds * _NS))
