"""Raw ONNX Runtime in this process: the throughput and latency a server can approach.

One CPU session with ONNX Runtime's defaults (intra-op threads = physical
cores, spinning on): what a user gets from ``onnxruntime.InferenceSession``
out of the box. Each batch size is warmed up, then run back to back for at
least a window of seconds and a minimum number of runs; latency is per batch.

`Raw.measure` can add to the samples of an earlier window: the run measures
raw ONNX Runtime again next to every server level (`bench.run`), in slices
alternating with the server's, and reports them as one figure.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from server.repository import InputSpec

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


@dataclass
class Samples:
    """Session runs of one batch size, over one or more windows."""

    batch: int
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    window_img_per_s: list[float] = field(default_factory=list)  # one per `Raw.measure`

    def result(self) -> RawResult:
        ms = np.asarray(self.latencies) * 1000
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        images = self.batch * len(self.latencies)
        return RawResult(
            batch=self.batch,
            runs=len(self.latencies),
            seconds=round(self.seconds, 3),
            img_per_s=round(images / self.seconds, 2),
            p50_ms=round(float(p50), 2),
            p90_ms=round(float(p90), 2),
            p99_ms=round(float(p99), 2),
            mean_ms=round(float(ms.mean()), 2),
            cpu_ms_per_image=round(1000 * self.cpu_seconds / images, 2),
        )


def random_batch(spec: InputSpec, batch: int, rng: np.random.Generator) -> np.ndarray:
    shape = spec.shape(batch)
    if spec.dtype == "uint8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.standard_normal(shape, dtype=np.float32)


class Raw:
    """One CPU session with ONNX Runtime's defaults, and random inputs per batch size."""

    def __init__(
        self, model_file: Path, spec: InputSpec, providers: list[Any] | None = None
    ) -> None:
        """`providers`: ONNX Runtime's execution providers (default: the CPU alone)."""
        self.session = ort.InferenceSession(
            str(model_file), providers=providers or ["CPUExecutionProvider"]
        )
        self.spec = spec
        self._rng = np.random.default_rng(0)
        self._feeds: dict[int, dict[str, np.ndarray]] = {}

    def measure(
        self,
        batch: int,
        seconds: float,
        into: Samples | None = None,
        *,
        warmup_runs: int = WARMUP_RUNS,
        min_runs: int = MIN_RUNS,
    ) -> Samples:
        """Run `batch` back to back for `seconds` (and `min_runs`), adding to `into`."""
        samples = into if into is not None else Samples(batch)
        if batch not in self._feeds:
            self._feeds[batch] = {self.spec.name: random_batch(self.spec, batch, self._rng)}
        feed = self._feeds[batch]
        for _ in range(warmup_runs):
            self.session.run(None, feed)
        runs, cpu = 0, time.process_time()  # every thread's CPU, to the nanosecond
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or runs < min_runs:
            began = time.perf_counter()
            self.session.run(None, feed)
            samples.latencies.append(time.perf_counter() - began)
            runs += 1
        elapsed = time.perf_counter() - start
        samples.seconds += elapsed
        samples.cpu_seconds += time.process_time() - cpu
        samples.window_img_per_s.append(round(batch * runs / elapsed, 2))
        return samples

    def close(self) -> None:
        del self.session
        gc.collect()


def sweep(
    model_file: Path, spec: InputSpec, batch_sizes: list[int], *, seconds: float
) -> list[RawResult]:
    """Measure each batch size on one session (see the module docstring)."""
    raw = Raw(model_file, spec)
    try:
        return [raw.measure(batch, seconds).result() for batch in batch_sizes]
    finally:
        raw.close()


def reference_round(session: Raw, samples: dict[int, Samples], seconds: float) -> None:
    """One round of raw ORT next to a level: each batch size of `samples` (in its order),
    briefly, added to its samples."""
    for batch, into in samples.items():
        session.measure(batch, seconds, into, warmup_runs=1, min_runs=3)
