"""`server.metrics.merge_families`: several processes' families as one process's (the
engine's /metrics with front ends).

Counters and histogram buckets, counts and sums add up, each label set apart; most
gauges add up (in flight, queue depth), the last-success timestamp takes the latest,
the process start time and the file descriptor limit the smallest; info families
(``resnet_serve_build``, and ``python_info``, which prometheus_client makes a gauge)
show once with value 1. The merged families expose as text that parses back.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics, merge_families


def value(families: Iterable[Metric], sample: str, **labels: str) -> float | None:
    found = [
        s.value
        for family in families
        for s in family.samples
        if s.name == sample and s.labels == labels
    ]
    assert len(found) <= 1, f"{sample} {labels} appears {len(found)} times"
    return found[0] if found else None


def processes() -> tuple[Metrics, Metrics, Metrics]:
    """An engine (batches) and two front ends (requests), as the split server counts."""
    engine, one, two = Metrics(), Metrics(), Metrics()
    for size in (1, 4, 4):
        engine.version("cifar", "1").batch_size.observe(size)
    engine.version("cifar", "2").batch_size.observe(16)
    for metrics, ok, invalid in ((one, 3, 1), (two, 2, 0)):
        v1 = metrics.version("cifar", "1")
        for _ in range(ok):
            with v1.track_request(2):
                pass
        if invalid:
            v1.requests.codes["INVALID_ARGUMENT"] = invalid
    for metrics, inflight, last_success in ((one, 2, 1000.0), (two, 3, 2000.0)):
        counts = metrics.version("cifar", "1").requests
        counts.inflight += inflight
        counts.last_success = last_success
    return engine, one, two


def test_counters_and_histograms_add_up_per_label_set() -> None:
    engine, one, two = processes()
    merged = merge_families(m.registry.collect() for m in (engine, one, two))
    v1 = {"model": "cifar", "version": "1"}
    assert value(merged, "resnet_serve_requests_total", **v1, code="OK") == 5
    assert value(merged, "resnet_serve_requests_total", **v1, code="INVALID_ARGUMENT") == 1
    assert value(merged, "resnet_serve_images_total", **v1) == 10
    assert value(merged, "resnet_serve_request_duration_seconds_count", **v1) == 5
    assert value(merged, "resnet_serve_batch_size_count", **v1) == 3
    assert value(merged, "resnet_serve_batch_size_sum", **v1) == 9
    assert value(merged, "resnet_serve_batch_size_bucket", **v1, le="1.0") == 1
    assert value(merged, "resnet_serve_batch_size_bucket", **v1, le="4.0") == 3
    assert value(merged, "resnet_serve_batch_size_bucket", **v1, le="+Inf") == 3
    v2 = {"model": "cifar", "version": "2"}
    assert value(merged, "resnet_serve_batch_size_count", **v2) == 1
    assert value(merged, "resnet_serve_batch_size_bucket", **v2, le="8.0") == 0
    assert value(merged, "resnet_serve_requests_total", **v2, code="OK") is None


def test_gauges_add_up_except_the_ones_combined_otherwise() -> None:
    engine, one, two = processes()
    merged = merge_families(m.registry.collect() for m in (engine, one, two))
    v1 = {"model": "cifar", "version": "1"}
    assert value(merged, "resnet_serve_inflight_requests", **v1) == 5
    assert value(merged, "resnet_serve_last_success_timestamp_seconds", **v1) == 2000.0

    def process(start: float, max_fds: float, open_fds: float) -> list[Metric]:
        return [
            GaugeMetricFamily("process_start_time_seconds", "start", value=start),
            GaugeMetricFamily("process_max_fds", "limit", value=max_fds),
            GaugeMetricFamily("process_open_fds", "open", value=open_fds),
        ]

    merged = merge_families([process(30.0, 1024, 10), process(10.0, 4096, 5),
                             process(20.0, 2048, 7)])  # fmt: skip
    assert value(merged, "process_start_time_seconds") == 10.0
    assert value(merged, "process_max_fds") == 1024
    assert value(merged, "process_open_fds") == 22


def test_info_families_show_once() -> None:
    engine, one, two = processes()
    merged = merge_families(m.registry.collect() for m in (engine, one, two))
    (build,) = [f for f in merged if f.name == "resnet_serve_build"]
    assert build.type == "info" and [s.value for s in build.samples] == [1.0]
    (python,) = [f for f in merged if f.name == "python_info"]
    assert [s.value for s in python.samples] == [1.0]


def test_families_keep_their_kind_and_expose_as_one_process_would() -> None:
    engine, one, two = processes()
    single = {f.name: f for f in engine.registry.collect()}
    merged = merge_families(m.registry.collect() for m in (engine, one, two))
    assert len({f.name for f in merged}) == len(merged)
    assert {f.name for f in merged} == set(single)
    for family in merged:
        original = single[family.name]
        assert (family.type, family.documentation, family.unit) == (
            original.type, original.documentation, original.unit,
        )  # fmt: skip

    class Merged:
        def collect(self) -> list[Metric]:
            return merged

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    text = generate_latest(registry).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    requests = parsed["resnet_serve_requests"]
    assert requests.type == "counter"
    assert sum(s.value for s in requests.samples if s.labels.get("code") == "OK") == 5


def test_one_source_and_none() -> None:
    engine, _, _ = processes()
    own = list(engine.registry.collect())
    merged = merge_families([own])
    v1 = {"model": "cifar", "version": "1"}
    assert value(merged, "resnet_serve_batch_size_count", **v1) == 3
    assert merge_families([]) == []
    assert value(merge_families([own, []]), "resnet_serve_batch_size_count", **v1) == 3
