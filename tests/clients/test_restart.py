"""Retries seen working: a real server is stopped and started again on the same port while
clients are in the middle of their work, and every image still gets its answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import resnet_serve_client as rsc

from bench import serving

# Calls wait for the server to come back; retries cover the calls refused while it drains.
RIDE_OUT = rsc.ChannelOptions(
    wait_for_ready=True, retry=rsc.Retry(initial_backoff=0.05, max_backoff=0.5)
)


class Restartable:
    """`resnet-serve serve` on a fixed port, so it can be stopped and started again there."""

    def __init__(self, repo: Path, log_dir: Path, grace: float) -> None:
        self.repo, self.log_dir, self.grace = repo, log_dir, grace
        log_dir.mkdir(parents=True, exist_ok=True)
        self.port, self.metrics_port = serving.free_port(), serving.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.starts = 0
        self.server = self.start()

    def start(self) -> serving.Server:
        self.starts += 1
        return serving.start(
            self.repo, self.log_dir / f"server-{self.starts}.log",
            ["--grace-period", str(self.grace)], port=self.port, metrics_port=self.metrics_port,
        )  # fmt: skip

    def restart(self) -> None:
        assert self.server.stop() == 0, self.server.log()
        self.server = self.start()


@pytest.fixture
def start_restartable(
    model_repo: Path, tmp_path: Path
) -> Iterator[Callable[[float], Restartable]]:
    """Starts a `Restartable` with a grace period: long enough for calls in flight at
    SIGTERM to finish, or short where the server must cut an open stream."""
    started: list[Restartable] = []

    def start(grace: float = 10.0) -> Restartable:
        started.append(Restartable(model_repo, tmp_path / f"logs-{len(started)}", grace))
        return started[-1]

    yield start
    for server in started:
        assert server.server.stop() == 0, server.server.log()


def _images(photos: Path) -> list[Path]:
    return sorted(photos.glob("*.jpg")) * 6


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_classify_many_rides_out_a_restart(
    start_restartable: Callable[[float], Restartable], photos: Path, stream: bool
) -> None:
    # A short grace period: the server cuts the open stream, which is reopened.
    restartable = start_restartable(2.0 if stream else 10.0)
    images = _images(photos)
    results: list[rsc.Classification | Exception] = []
    with rsc.Client(restartable.address, model="cifar", options=RIDE_OUT, timeout=120) as client:
        for result in client.classify_many(images, concurrency=4, stream=stream,
                                           return_exceptions=True):
            results.append(result)
            if len(results) == 10:
                restartable.restart()
    assert restartable.starts == 2
    assert [r for r in results if isinstance(r, Exception)] == []
    assert len(results) == len(images)


async def test_async_calls_ride_out_a_restart(
    start_restartable: Callable[[float], Restartable], photos: Path
) -> None:
    restartable = start_restartable(10.0)
    images = _images(photos)
    results: list[rsc.Classification | Exception] = []
    async with rsc.AsyncClient(restartable.address, model="cifar", options=RIDE_OUT,
                               timeout=120) as client:
        async for result in client.classify_many(images, concurrency=4, stream=False,
                                                 return_exceptions=True):
            results.append(result)
            if len(results) == 10:
                # Stopped for sure, then started while the remaining calls wait for it.
                assert await asyncio.to_thread(restartable.server.stop) == 0
                starting = asyncio.create_task(asyncio.to_thread(restartable.start))
        restartable.server = await starting
    assert restartable.starts == 2
    assert [r for r in results if isinstance(r, Exception)] == []
    assert len(results) == len(images)


async def test_repeated_restarts_under_load_lose_no_call(
    start_restartable: Callable[[float], Restartable], photos: Path
) -> None:
    # Eight clients retrying through every drain: without the server's pushback, some
    # retries met the port closing and came back CANCELLED (about one per two restarts).
    restartable = start_restartable(10.0)
    images = [path.read_bytes() for path in sorted(photos.glob("*.jpg"))]
    answered: list[int] = []
    failures: list[Exception] = []
    done = asyncio.Event()
    async with rsc.AsyncClient(restartable.address, model="cifar", options=RIDE_OUT,
                               timeout=120) as client:

        async def keep_calling(worker: int) -> None:
            while not done.is_set():
                try:
                    await client.classify(images[worker % len(images)])
                    answered.append(worker)
                except rsc.ResnetServeError as exc:
                    failures.append(exc)

        workers = [asyncio.ensure_future(keep_calling(w)) for w in range(8)]
        for _ in range(4):
            before = len(answered)
            while len(answered) < before + 20:  # busy again since the last start
                await asyncio.sleep(0.05)
            assert await asyncio.to_thread(restartable.server.stop) == 0
            restartable.server = await asyncio.to_thread(restartable.start)
        done.set()
        await asyncio.gather(*workers)
    assert restartable.starts == 5
    assert failures == []
    assert len(set(answered)) == 8


def test_without_waiting_a_stopped_server_is_unavailable(
    start_restartable: Callable[[float], Restartable],
) -> None:
    restartable = start_restartable(10.0)
    with rsc.Client(restartable.address, model="cifar") as client:
        assert client.health() is rsc.HealthStatus.SERVING
        assert restartable.server.stop() == 0
        with pytest.raises(rsc.Unavailable):
            client.classify(b"\xff\xd8\xff")
        restartable.server = restartable.start()
        assert _reconnected(client) is rsc.HealthStatus.SERVING


def _reconnected(client: rsc.Client, seconds: float = 30.0) -> rsc.HealthStatus:
    """The server's health once the client's channel has connected again: a channel whose
    connect was refused waits out gRPC's reconnect backoff (about a second, then longer),
    and a fail-fast call in that window is UNAVAILABLE however soon the server is back."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return client.health()
        except rsc.Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
