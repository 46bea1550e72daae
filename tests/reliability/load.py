"""Load for the fault tests: closed and open loops of real calls, their outcomes, server gauges.

Every loop is bounded in time and in calls in flight, and goes to loopback
only. Outcomes are counted by status code name, with each call's latency
kept for the report (never asserted).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil

from bench import serving
from tests.fixtures.messages import sample

Call = Callable[[], Awaitable[Any]]


@dataclass
class Outcomes:
    codes: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    finished_at: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    details: dict[str, str] = field(default_factory=dict)  # the first message of each code
    seconds: float = 0.0

    def add(self, code: str, started: float, details: str = "") -> None:
        now = time.monotonic()
        self.details.setdefault(code, details)
        self.codes[code] += 1
        self.latencies[code].append(now - started)
        self.finished_at[code].append(now)

    def rate(self, code: str = "OK") -> float:
        return self.codes[code] / self.seconds if self.seconds else 0.0

    def median(self, code: str) -> float:
        values = sorted(self.latencies[code])
        return values[len(values) // 2] if values else float("nan")

    def report(self) -> str:
        parts = [f"{code} {n} (median {self.median(code) * 1000:.0f} ms) {self.details[code]!r}"
                 for code, n in sorted(self.codes.items())]  # fmt: skip
        return f"{self.seconds:.1f} s: " + ", ".join(parts)


async def record_call(call: Call, outcomes: Outcomes) -> None:
    """Make one call and add its outcome (status, latency, details) to `outcomes`."""
    started = time.monotonic()
    try:
        await call()
    except grpc.aio.AioRpcError as error:
        outcomes.add(error.code().name, started, error.details() or "")
    else:
        outcomes.add("OK", started)


async def closed_loop(call: Call, concurrency: int, seconds: float) -> Outcomes:
    """``concurrency`` workers, each sending its next call when the last is answered."""
    outcomes = Outcomes()
    started = time.monotonic()
    end = started + seconds

    async def worker() -> None:
        while time.monotonic() < end:
            await record_call(call, outcomes)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    outcomes.seconds = time.monotonic() - started
    return outcomes


async def open_loop(call: Call, rate: float, seconds: float, max_in_flight: int) -> Outcomes:
    """Calls started at ``rate`` per second whatever the answers, at most ``max_in_flight``."""
    outcomes = Outcomes()
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    sent = 0

    async def one() -> None:
        try:
            await record_call(call, outcomes)
        finally:
            slots.release()

    while (now := time.monotonic()) < started + seconds:
        due = int((now - started) * rate) + 1
        while sent < due:
            await slots.acquire()
            task = asyncio.ensure_future(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(min(0.005, 1 / rate))
    await asyncio.gather(*tasks)
    outcomes.seconds = time.monotonic() - started
    return outcomes


def rss(server: serving.Server) -> int:
    """Resident memory of the server: its process and, with ``--frontends``, its front ends."""
    process = psutil.Process(server.process.pid)
    total = 0
    for each in [process, *process.children()]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += each.memory_info().rss
    return total


def gauges(server: serving.Endpoints, model: str, version: str = "1") -> tuple[float, float]:
    """(queue depth in images, requests in flight) of one model version, from /metrics."""
    text = server.metrics()
    labels = {"model": model, "version": version}
    return (
        sample(text, "resnet_serve_queue_depth", **labels),
        sample(text, "resnet_serve_inflight_requests", **labels),
    )


def computed(server: serving.Endpoints, model: str, version: str = "1") -> float:
    """Images the model has run (the batch-size histogram's sum)."""
    return sample(server.metrics(), "resnet_serve_batch_size_sum", model=model, version=version)


async def until_idle(server: serving.Endpoints, model: str, deadline: float = 60.0) -> None:
    """Wait (generously) until the model has nothing queued and no request in flight."""
    end = time.monotonic() + deadline
    while True:
        depth, inflight = await asyncio.to_thread(gauges, server, model)
        if depth == 0 and inflight == 0:
            return
        if time.monotonic() > end:
            raise AssertionError(f"{model}: queue depth {depth}, in flight {inflight} after "
                                 f"{deadline:.0f} s")  # fmt: skip
        await asyncio.sleep(0.1)


async def until_gauges(
    server: serving.Endpoints, model: str, *, depth: float = 0, inflight: float = 0,
    deadline: float = 60.0,
) -> None:
    """Wait (generously) until the queue holds at least ``depth`` images or ``inflight`` calls."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        now_depth, now_inflight = await asyncio.to_thread(gauges, server, model)
        if now_depth >= depth and now_inflight >= inflight:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{model} never had {depth} images queued and {inflight} in flight")
