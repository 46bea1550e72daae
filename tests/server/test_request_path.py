"""The request path's own rules, apart from any protocol: a failed image stops its siblings;
a call takes its places in the decode backlog, or is refused, before it waits; a full model
queue refuses images before they are decoded; float tensors go to the batcher without a
wait."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from server import shm
from server.config import Settings
from server.errors import InvalidInput, QueueFull
from server.metrics import Metrics
from server.preprocess import Preprocessor
from server.request_path import RequestPath, Timeouts

SIBLINGS = 20
DECODE_SECONDS = 0.05
# a served version whose queue has room for anything
ROOMY = SimpleNamespace(check_room=lambda count: None)


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

    def encoded(data: bytes, config: object) -> asyncio.Future[np.ndarray]:
        if data == b"bad":
            return preprocessor.read(not_an_image)
        return preprocessor.read(decode)

    def not_an_image() -> np.ndarray:
        raise InvalidInput("not an image")

    preprocessor.encoded = encoded  # type: ignore[method-assign]
    images: list[Any] = [b"good", b"bad", *[b"good"] * SIBLINGS]
    path = RequestPath(settings, None, preprocessor, None)  # type: ignore[arg-type]
    served = SimpleNamespace(name="m", version="1", config=None, scheduler=lambda: ROOMY)
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
        observed = metrics.registry.get_sample_value(
            "resnet_serve_preprocess_duration_seconds_count", {"model": "m", "version": "1"}
        )
        assert observed == 1
    finally:
        preprocessor.close()


async def test_one_prepared_image_is_its_batch_without_a_copy(tmp_path: Path) -> None:
    """A call of one image hands on the decoded image itself as a batch of one (the array a
    front end copies into its slot, or the session reads in one process); several images
    are stacked into one array."""
    settings = Settings(repo=tmp_path)
    preprocessor = Preprocessor(settings)
    decoded: list[np.ndarray] = []

    def decode() -> np.ndarray:
        decoded.append(np.full((3, 2, 2), len(decoded), np.float32))
        return decoded[-1]

    preprocessor.encoded = lambda data, config: preprocessor.read(decode)  # type: ignore[method-assign]
    path = RequestPath(settings, None, preprocessor, Metrics())  # type: ignore[arg-type]
    served = SimpleNamespace(name="m", version="1", config=None, scheduler=lambda: ROOMY)
    try:
        one = await path._prepare([b"a"], served)  # type: ignore[arg-type]
        assert one.shape == (1, 3, 2, 2) and np.shares_memory(one, decoded[0])
        two = await path._prepare([b"b", b"c"], served)  # type: ignore[arg-type]
        assert two.shape == (2, 3, 2, 2) and [float(i[0, 0, 0]) for i in two] == [1.0, 2.0]
        assert not any(np.shares_memory(two, image) for image in decoded[1:])
    finally:
        preprocessor.close()


async def test_a_full_decode_backlog_refuses_the_call_in_the_step_that_admitted_it(
    tmp_path: Path,
) -> None:
    """Places in the backlog are taken as the call is made: a burst admitted in one loop
    step never holds more calls than the backlog has places, even for a moment."""
    settings = Settings(repo=tmp_path, decode_workers=1, max_decode_backlog=2,
                        max_images_per_request=2)  # fmt: skip
    preprocessor = Preprocessor(settings)
    release = threading.Event()

    def decode() -> np.ndarray:
        release.wait(10)
        return np.zeros((3, 2, 2), np.float32)

    preprocessor.encoded = lambda data, config: preprocessor.read(decode)  # type: ignore[method-assign]
    path = RequestPath(settings, None, preprocessor, Metrics())  # type: ignore[arg-type]
    served = SimpleNamespace(name="m", version="1", config=None, scheduler=lambda: ROOMY)
    try:
        first = path._prepare([b"a"], served)  # type: ignore[arg-type]
        first.send(None)  # its place taken, waiting for its decode
        assert preprocessor.backlog == 1
        second = path._prepare([b"b", b"c"], served)  # type: ignore[arg-type]
        with pytest.raises(QueueFull, match=r"at most 2"):
            second.send(None)  # refused on its first step, the place it took given back
        await asyncio.sleep(0)
        assert preprocessor.backlog == 1
        release.set()
        await asyncio.sleep(0.2)
        with pytest.raises(StopIteration) as done:
            first.send(None)
        assert done.value.value.shape == (1, 3, 2, 2)
        assert preprocessor.backlog == 0
    finally:
        release.set()
        preprocessor.close()


async def test_the_decode_backlog_holds_over_front_ends_sharing_a_tally(tmp_path: Path) -> None:
    """Two front ends' preprocessors, each with its row of one tally: the backlog bound is
    the server's, so an image one of them holds leaves the other one place fewer, and its
    refusal counts both; a place given back is free for either."""
    settings = Settings(repo=tmp_path, decode_workers=1, max_decode_backlog=2,
                        max_images_per_request=2)  # fmt: skip
    engine = shm.Tally(2)
    rows = [shm.Tally(fd=engine.fd, row=row).share("decodes") for row in (0, 1)]
    first, second = (Preprocessor(settings, shm.Held(share)) for share in rows)
    release = threading.Event()

    def decode() -> np.ndarray:
        release.wait(10)
        return np.zeros((3, 2, 2), np.float32)

    try:
        held = [first.read(decode), second.read(decode)]  # one place taken on each
        assert (first.backlog, second.backlog, engine.total("decodes")) == (1, 1, 2)
        for preprocessor in (first, second):
            with pytest.raises(QueueFull, match=r"^2 images are waiting to be decoded \(at most 2"):
                preprocessor.read(decode)
        release.set()
        await asyncio.gather(*held)
        await asyncio.sleep(0)  # the done callbacks give the places back
        assert engine.total("decodes") == 0
        assert (await second.read(decode)).shape == (3, 2, 2)
    finally:
        release.set()
        first.close()
        second.close()


async def test_a_full_model_queue_refuses_images_before_they_are_decoded(tmp_path: Path) -> None:
    """Images to decode ask the model's queue for room first: a call that could not be
    queued costs no decode and takes no place in the backlog."""
    settings = Settings(repo=tmp_path, decode_workers=1)
    preprocessor = Preprocessor(settings)
    decoded: list[bytes] = []

    def encoded(data: bytes, config: object) -> asyncio.Future[np.ndarray]:
        decoded.append(data)
        return preprocessor.read(lambda: np.zeros((3, 2, 2), np.float32))

    asked: list[int] = []

    def check_room(count: int) -> None:
        asked.append(count)
        raise QueueFull("model m version 1 has 16 of 16 images queued; retry later")

    preprocessor.encoded = encoded  # type: ignore[method-assign]
    full = SimpleNamespace(check_room=check_room)
    served = SimpleNamespace(name="m", version="1", config=None, scheduler=lambda: full)
    path = RequestPath(settings, None, preprocessor, Metrics())  # type: ignore[arg-type]
    try:
        step = path._prepare([b"a", b"b"], served)  # type: ignore[arg-type]
        with pytest.raises(QueueFull, match="16 of 16 images queued"):
            step.send(None)  # on its first step
        assert asked == [2] and decoded == [] and preprocessor.backlog == 0
        served.scheduler = lambda: ROOMY  # room again: both decoded
        batch = await path._prepare([b"a", b"b"], served)  # type: ignore[arg-type]
        assert batch.shape == (2, 3, 2, 2) and decoded == [b"a", b"b"]
    finally:
        preprocessor.close()


async def test_calls_of_one_tick_share_one_timer_and_expire_after_the_timeout() -> None:
    """Calls without a deadline that start within a tick share one timer; each is cancelled
    no sooner than the timeout and at most a tick after it, and reported as expired."""
    timeouts = Timeouts(0.064)  # a 1 ms tick
    started = time.monotonic()
    results: list[str] = []

    async def call() -> None:
        task = asyncio.current_task()
        assert task is not None
        deadline = timeouts.start(task)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            results.append("expired" if timeouts.expired(task) else "cancelled")
        finally:
            timeouts.stop(task, deadline)

    tasks = [asyncio.create_task(call()) for _ in range(50)]
    await asyncio.sleep(0)  # every call started, within a tick or across two
    assert 1 <= len(timeouts._running) <= 2  # a timer each, not one per call
    await asyncio.gather(*tasks)
    took = time.monotonic() - started
    assert results == ["expired"] * 50
    assert 0.064 <= took < 0.064 + 0.5  # the tick is 1 ms; the rest is this host's noise


async def test_a_call_answered_in_time_or_cancelled_by_its_caller_is_not_expired() -> None:
    timeouts = Timeouts(0.05)
    outcomes: dict[str, str] = {}

    async def call(name: str, seconds: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        deadline = timeouts.start(task)
        try:
            await asyncio.sleep(seconds)
            outcomes[name] = "answered"
        except asyncio.CancelledError:
            outcomes[name] = "expired" if timeouts.expired(task) else "cancelled"
            raise
        finally:
            timeouts.stop(task, deadline)

    quick = asyncio.create_task(call("quick", 0.001))
    slow = asyncio.create_task(call("slow", 10))
    await asyncio.sleep(0.01)
    slow.cancel()  # the caller's own cancel, before the timeout
    with pytest.raises(asyncio.CancelledError):
        await slow
    await quick
    # the timer of their tick fires and finds nothing to cancel
    await asyncio.sleep(0.1)
    assert outcomes == {"quick": "answered", "slow": "cancelled"}
    assert not timeouts._expired and not any(timeouts._running.values())
