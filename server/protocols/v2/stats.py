"""ModelStatistics (Triton's statistics extension) read from the Prometheus metrics.

The metrics are the one record of what the server did, for both APIs; this
module only translates them per model version:

- ``success`` / ``fail``: requests by outcome and their summed durations;
- ``queue``: batch items and the time they waited in the model's queue;
- ``compute_input``, ``compute_infer``, ``compute_output``: counted per session run
  (batch), as Triton counts them and as perf_analyzer checks (it refuses statistics
  whose three counts differ); their times: decoding and transforming the images, the
  session runs, and nothing (the logits are read in place);
- ``inference_count``: images of successful requests; ``execution_count``: session runs;
- ``last_inference``: when a request last succeeded, in milliseconds since the epoch.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from resnet_serve_client.proto.inference import grpc_service_pb2 as pb

from server.core.registry import Model, ModelRegistry, ModelVersion, State, by_version
from server.metrics import (
    IMAGES,
    LAST_SUCCESS,
    PREPROCESS_DURATION,
    REQUEST_SECONDS,
    REQUESTS,
    Metrics,
)

_NS = 1_000_000_000


def selected(registry: ModelRegistry, name: str, version: str) -> list[ModelVersion]:
    """The versions a statistics request asks for: that version (READY), every READY
    version of the model, or of every model when no name is given."""
    if name and version:
        return [registry.get(name, version)]
    models = [registry.model(name)] if name else registry.models()
    return _ready_versions(models)


def _ready_versions(models: Iterable[Model]) -> list[ModelVersion]:
    return [
        v
        for m in models
        for v in by_version(m.versions.values())
        if v.state is State.READY
    ]


def model_statistics(
    metrics: Metrics, families: Iterable[Metric], versions: Iterable[ModelVersion]
) -> pb.ModelStatisticsResponse:
    """The statistics of `versions` from `families`: every process's
    (`Metrics.every_process`), named as `metrics` names them."""
    found = _Families(metrics, families)
    return pb.ModelStatisticsResponse(model_stats=[_one(found, v) for v in versions])


class _Families:
    def __init__(self, metrics: Metrics, families: Iterable[Metric]) -> None:
        self.metrics = metrics
        self._by_name = {family.name: family for family in families}

    def __call__(self, family: MetricWrapperBase | str) -> Metric | None:
        """A family by its Prometheus object or its name."""
        return self._by_name.get(family if isinstance(family, str) else family._name)


def _one(families: _Families, mv: ModelVersion) -> pb.ModelStatistics:
    metrics = families.metrics
    labels = {"model": mv.name, "version": mv.version}

    def _value(
        family: MetricWrapperBase | str, suffix: str, labels: dict[str, str], **more: str
    ) -> float:
        return _sum(families(family), suffix, labels, **more)

    def _histogram(family: Histogram, labels: dict[str, str]) -> pb.StatisticDuration:
        return _duration(_value(family, "_count", labels), _value(family, "_sum", labels))

    ok = _value(REQUESTS, "_total", labels, code="OK")
    executions = _value(metrics.batch_size, "_count", labels)
    failed = _value(REQUESTS, "_total", labels) - ok
    return pb.ModelStatistics(
        name=mv.name,
        version=mv.version,
        last_inference=int(_value(LAST_SUCCESS, "_seconds", labels) * 1000),
        inference_count=int(_value(IMAGES, "_total", labels)),
        execution_count=int(executions),
        inference_stats=pb.InferStatistics(
            success=_duration(ok, _value(REQUEST_SECONDS, "_total", labels, outcome="ok")),
            fail=_duration(
                failed, _value(REQUEST_SECONDS, "_total", labels, outcome="failed")
            ),
            queue=_histogram(metrics.queue_duration, labels),
            compute_input=_duration(
                executions, _value(PREPROCESS_DURATION, "_sum", labels)
            ),
            compute_infer=_duration(
                executions, _value(metrics.inference_duration, "_sum", labels)
            ),
            compute_output=_duration(executions, 0.0),
        ),
    )


def _sum(family: Metric | None, suffix: str, labels: dict[str, str], **more: str) -> float:
    """The sum of the family's samples named ``*<suffix>`` whose labels include these."""
    if family is None:
        return 0.0
    wanted = {**labels, **more}.items()
    return sum(
        sample.value
        for sample in family.samples
        if sample.name.endswith(suffix) and wanted <= sample.labels.items()
    )


def _duration(count: float, seconds: float) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=int(count), ns=round(seconds * _NS))
