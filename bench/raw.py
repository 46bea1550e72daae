"""Raw ONNX Runtime in this process: the throughput and latency a server can approach.

One CPU session with ONNX Runtime's defaults (intra-op threads = physical
cores, spinning on): what a user gets from ``onnxruntime.InferenceSession``
out of the box. Each batch size is warmed up, then run back to back for at
least a window of seconds and a minimum number of runs; latency is per batch.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from server.model_config import InputSpec

WARMUP_RUNS = 2
MIN_RUNS = 5


@dataclass(frozen=True)
class RawResult:
    batch: int
    runs: int
    seconds: float
    img_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    cpu_ms_per_image: float  # this process's CPU time (all threads) per image

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_batch(spec: InputSpec, batch: int, rng: np.random.Generator) -> np.ndarray:
    shape = spec.shape(batch)
    if spec.dtype == "uint8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.standard_normal(shape, dtype=np.float32)


def sweep(
    model_file: Path, spec: InputSpec, batch_sizes: list[int], *, seconds: float
) -> list[RawResult]:
    """Measure each batch size on one session (see the module docstring)."""
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    try:
        return [_measure(session, spec, batch, seconds, rng) for batch in batch_sizes]
    finally:
        del session
        gc.collect()


def _measure(
    session: ort.InferenceSession,
    spec: InputSpec,
    batch: int,
    seconds: float,
    rng: np.random.Generator,
) -> RawResult:
    feed = {spec.name: random_batch(spec, batch, rng)}
    for _ in range(WARMUP_RUNS):
        session.run(None, feed)
    latencies = []
    cpu = _cpu_seconds()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < MIN_RUNS:
        began = time.perf_counter()
        session.run(None, feed)
        latencies.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    ms = np.asarray(latencies) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return RawResult(
        batch=batch,
        runs=len(latencies),
        seconds=round(elapsed, 3),
        img_per_s=round(batch * len(latencies) / elapsed, 2),
        p50_ms=round(float(p50), 2),
        p90_ms=round(float(p90), 2),
        p99_ms=round(float(p99), 2),
        mean_ms=round(float(ms.mean()), 2),
        cpu_ms_per_image=round(1000 * cpu / (batch * len(latencies)), 2),
    )


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system
