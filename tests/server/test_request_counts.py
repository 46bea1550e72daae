"""A version's request counts (`server.metrics.RequestCounts`) as /metrics shows them: the
families of one process, as the text exposition a Prometheus server scrapes and parses."""

from __future__ import annotations

import contextlib
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.errors import InvalidInput
from server.metrics import LATENCY_BUCKETS, Metrics


def scraped(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_requests_are_counted_by_outcome_with_durations_in_cumulative_buckets() -> None:
    metrics = Metrics()
    version = metrics.version("cifar", "1")
    with version.track_request(3):
        time.sleep(0.003)  # above the 2.5 ms bound, within 5 ms
    with contextlib.suppress(InvalidInput), version.track_request(2):
        raise InvalidInput("refused")
    with version.track_request(1):
        pass
    # on a bound counts in its bucket (le), past the last one only in +Inf
    for seconds in (LATENCY_BUCKETS[0], 20.0):
        version.observe_preprocess(seconds)
    found = scraped(metrics)
    v1 = (("model", "cifar"), ("version", "1"))

    def value(name: str, *more: tuple[str, str]) -> float:
        return found[(name, tuple(sorted((*v1, *more))))]

    assert value("resnet_serve_requests_total", ("code", "OK")) == 2
    assert value("resnet_serve_requests_total", ("code", "INVALID_ARGUMENT")) == 1
    assert value("resnet_serve_images_total") == 4  # of the successful requests only
    assert value("resnet_serve_inflight_requests") == 0
    assert time.time() - value("resnet_serve_last_success_timestamp_seconds") < 60
    durations = "resnet_serve_request_duration_seconds"
    assert value(f"{durations}_count") == 3
    assert value(f"{durations}_bucket", ("le", "0.0025")) == 2  # the two quick ones
    assert value(f"{durations}_bucket", ("le", "0.005")) == 3
    assert value(f"{durations}_bucket", ("le", "+Inf")) == 3
    assert 0.003 <= value(f"{durations}_sum") < 1
    ok = value("resnet_serve_request_seconds_total", ("outcome", "ok"))
    failed = value("resnet_serve_request_seconds_total", ("outcome", "failed"))
    assert ok + failed == pytest.approx(value(f"{durations}_sum"))
    preprocess = "resnet_serve_preprocess_duration_seconds"
    assert value(f"{preprocess}_bucket", ("le", "0.001")) == 1
    assert value(f"{preprocess}_bucket", ("le", "10.0")) == 1
    assert value(f"{preprocess}_bucket", ("le", "+Inf")) == 2
    assert value(f"{preprocess}_count") == 2


def test_a_request_in_flight_shows_and_a_forgotten_version_leaves_no_series() -> None:
    metrics = Metrics()
    version = metrics.version("cifar", "2")
    tracked = version.track_request(1)
    tracked.__enter__()
    assert scraped(metrics)[
        ("resnet_serve_inflight_requests", (("model", "cifar"), ("version", "2")))
    ] == 1
    tracked.__exit__(None, None, None)
    metrics.forget("cifar", "2")
    assert not [key for key in scraped(metrics) if ("version", "2") in key[1]]
