"""Histograms read from the server's /metrics text, and differences between two scrapes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

BATCH_SIZE = "resnet_serve_batch_size"
STAGES = {
    "request": "resnet_serve_request_duration_seconds",
    "preprocess": "resnet_serve_preprocess_duration_seconds",
    "queue": "resnet_serve_queue_duration_seconds",
    "inference": "resnet_serve_inference_duration_seconds",
}
"""Where a request's time goes inside the server (inference: per session run)."""


@dataclass
class Histogram:
    """Cumulative bucket counts by upper bound, plus sum and count (Prometheus semantics)."""

    buckets: dict[float, float] = field(default_factory=dict)
    total: float = 0.0
    count: float = 0.0

    def __sub__(self, earlier: Histogram) -> Histogram:
        return Histogram(
            {le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.total - earlier.total,
            self.count - earlier.count,
        )

    def __add__(self, other: Histogram) -> Histogram:
        return Histogram(
            {
                le: self.buckets.get(le, 0.0) + other.buckets.get(le, 0.0)
                for le in self.buckets.keys() | other.buckets.keys()
            },
            self.total + other.total,
            self.count + other.count,
        )

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def per_bucket(self) -> list[tuple[str, int]]:
        """Counts per bucket (not cumulative), labelled by the range of integer values held."""
        rows, lower, below = [], 0.0, 0.0
        for le in sorted(self.buckets):
            count = self.buckets[le] - below
            below = self.buckets[le]
            if math.isinf(le):
                label = f">{lower:g}"
            elif le - lower <= 1:
                label = f"{le:g}"
            else:
                label = f"{math.floor(lower) + 1}–{le:g}"
            rows.append((label, round(count)))
            lower = le
        return rows


def read(text: str, name: str, model: str) -> Histogram:
    """The histogram `name` of `model` (all versions summed); empty when absent."""
    found = Histogram()
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == name + "_bucket":
                le = float(sample.labels["le"])
                found.buckets[le] = found.buckets.get(le, 0.0) + sample.value
            elif sample.name == name + "_sum":
                found.total += sample.value
            elif sample.name == name + "_count":
                found.count += sample.value
    return found


def read_all(text: str, model: str) -> dict[str, Histogram]:
    """The batch-size histogram and each stage's duration histogram of `model`."""
    return {name: read(text, name, model) for name in (BATCH_SIZE, *STAGES.values())}
