"""The request path's own rules, apart from any protocol: a failed image stops its siblings;
float tensors go to the batcher without a wait."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from server.config import Settings
from server.errors import InvalidInput
from server.metrics import Metrics
from server.preprocess import Preprocessor
from server.request_path import RequestPath

SIBLINGS = 20
DECODE_SECONDS = 0.05


async def test_a_failed_image_cancels_the_decodes_of_its_siblings(tmp_path: Path) -> None:
    settings = Settings(repo=tmp_path, decode_workers=1)
    preprocessor = Preprocessor(settings)
    started = 0
    lock = threading.Lock()

    def decode() -> np.ndarray:  # a decode that takes a worker for a while
        nonlocal started
        with lock:
            started += 1
        time.sleep(DECODE_SECONDS)
        return np.zeros((3, 2, 2), np.float32)

    async def encoded(data: bytes, config: object) -> np.ndarray:
        if data == b"bad":
            raise InvalidInput("not an image")
        return await preprocessor.read(decode)

    preprocessor.encoded = encoded  # type: ignore[method-assign]
    images: list[Any] = [b"good", b"bad", *[b"good"] * SIBLINGS]
    path = RequestPath(settings, None, preprocessor, None)  # type: ignore[arg-type]
    served = SimpleNamespace(name="m", version="1", config=None)
    try:
        with pytest.raises(InvalidInput, match="image 1: not an image"):
            await path._prepare(images, served)  # type: ignore[arg-type]
        # long enough for every sibling to have run, had they not been cancelled
        await asyncio.sleep(DECODE_SECONDS * (SIBLINGS + 1) * 2)
        assert started <= 2, f"{started} of {SIBLINGS + 1} decodes ran after image 1 failed"
        assert preprocessor.backlog == 0
    finally:
        preprocessor.close()


async def test_float_tensors_reach_the_batcher_in_the_step_that_admitted_them(
    tmp_path: Path,
) -> None:
    """Nothing to prepare, nothing awaited: a full queue refuses such a call before the loop
    runs anything else, so no call admitted in a burst waits to be refused."""
    settings = Settings(repo=tmp_path)
    preprocessor = Preprocessor(settings)
    metrics = Metrics()
    path = RequestPath(settings, None, preprocessor, metrics)  # type: ignore[arg-type]
    served = SimpleNamespace(name="m", version="1", config=None)
    images = [np.full((3, 4, 4), i, np.float32) for i in range(3)]
    try:
        step = path._prepare(images, served)  # type: ignore[arg-type]
        with pytest.raises(StopIteration) as done:  # ended on its first step
            step.send(None)
        batch = done.value.value
        assert batch.shape == (3, 3, 4, 4)
        assert [float(image[0, 0, 0]) for image in batch] == [0.0, 1.0, 2.0]
        observed = metrics.version("m", "1").preprocess_duration.collect()[0].samples
        assert next(s.value for s in observed if s.name.endswith("_count")) == 1
    finally:
        preprocessor.close()
