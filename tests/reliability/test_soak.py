"""Soak: steady load for `SOAK_SECONDS` (10 minutes); RSS grows less than 5% after warm-up.

Marked ``soak``, so the default run skips it. Run it alone::

    .venv/bin/pytest -m soak tests/reliability/test_soak.py

(``-m soak tests/reliability`` also runs the 30-second bursts of
test_overload.py). ``RESNET_SERVE_SOAK_SECONDS`` shortens or lengthens the
run for a try; the assertion is meant for the full 10 minutes.

Four workers call back to back, alternating Classify with a JPEG and v2
ModelInfer with a float32 tensor, on resnet18 with its default batching.
RSS is sampled every `SAMPLE_SECONDS`; the baseline is the median of the
samples in the minute after `WARMUP_SECONDS`, the end the median of the
last minute's. Every call must succeed and the model must be idle at
the end.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from bench import serving
from tests.fixtures.messages import CHELSEA
from tests.reliability.load import Outcomes, closed_loop, rss, until_idle
from tests.reliability.repos import derive
from tests.reliability.wire import classify, infer_floats

FULL_SOAK_SECONDS = 600.0
SOAK_SECONDS = float(os.environ.get("RESNET_SERVE_SOAK_SECONDS", FULL_SOAK_SECONDS))
# a minute each in the full run; a fifth of a shorter try
WARMUP_SECONDS = min(60.0, SOAK_SECONDS / 5)
WINDOW_SECONDS = min(60.0, SOAK_SECONDS / 5)
SAMPLE_SECONDS = min(5.0, WINDOW_SECONDS / 4)
GROWTH_BOUND = 0.05
WORKERS = 4
MODEL = "resnet18"


async def _sample(server: serving.Server, into: list[tuple[float, int]]) -> None:
    while True:
        into.append((time.monotonic(), rss(server)))
        await asyncio.sleep(SAMPLE_SECONDS)


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS + 600)
async def test_steady_load_keeps_memory_flat(
    model_repo: Path, tmp_path: Path, server_factory: Callable[..., serving.Server]
) -> None:
    derive(tmp_path / "repo", model_repo / MODEL)
    server = server_factory(tmp_path / "repo")
    batch = np.random.default_rng(2).standard_normal((1, 3, 224, 224), np.float32)
    samples: list[tuple[float, int]] = []
    async with grpc.aio.insecure_channel(server.address) as channel:
        classifier = pb_grpc.ClassifierStub(channel)
        v2 = v2_grpc.GRPCInferenceServiceStub(channel)
        turn = iter(range(1 << 62))

        def call() -> grpc.aio.UnaryUnaryCall:
            if next(turn) % 2:
                return v2.ModelInfer(infer_floats(MODEL, batch), timeout=120)
            return classifier.Classify(classify(MODEL, CHELSEA), timeout=120)

        started = time.monotonic()
        sampler = asyncio.ensure_future(_sample(server, samples))
        try:
            outcomes: Outcomes = await closed_loop(call, WORKERS, SOAK_SECONDS)
        finally:
            sampler.cancel()
        await until_idle(server, MODEL)

    warm = started + WARMUP_SECONDS
    first = [r for t, r in samples if warm <= t < warm + WINDOW_SECONDS]
    last = [r for t, r in samples if t >= samples[-1][0] - WINDOW_SECONDS]
    baseline, end = statistics.median(first), statistics.median(last)
    print(f"\nsoak {outcomes.report()}; RSS {baseline / 2**20:.0f} -> {end / 2**20:.0f} MiB")
    assert set(outcomes.codes) == {"OK"}, outcomes.report()
    assert end < baseline * (1 + GROWTH_BOUND)
