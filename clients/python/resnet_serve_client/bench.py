"""The load generator: closed-loop (fixed concurrency) or open-loop (fixed rate) runs.

Each level runs for a duration or a number of requests, after a warm-up that
is not recorded. Latency is measured per request; in open loop from the time
the request was due, so a client that falls behind does not hide the delay
(no coordinated omission). The client's own CPU use comes from
``time.process_time`` (user + system, all threads, to the nanosecond) over the
measured phase.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

Call = Callable[[int], Awaitable[object]]
"""Sends request number i of the run and returns when it is answered (raises on failure)."""


@dataclass(frozen=True, slots=True)
class Level:
    """One point of a run: a concurrency, and in open loop a rate too."""

    concurrency: int
    rate: float | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """When a phase ends: after ``seconds``, or after ``requests`` requests."""

    seconds: float | None = None
    requests: int | None = None


@dataclass(slots=True)
class LevelResult:
    concurrency: int
    rate: float | None
    images_per_request: int
    seconds: float = 0.0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0

    @property
    def requests(self) -> int:
        return self.ok + sum(self.errors.values())

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def images_per_second(self) -> float:
        return self.throughput * self.images_per_request

    @property
    def cpu_percent(self) -> float:
        """The client's CPU time over wall time; 100 is one core busy."""
        return 100 * self.cpu_seconds / self.seconds if self.seconds else 0.0

    def latency_ms(self) -> dict[str, float]:
        """p50, p90, p99, max and mean latency of the successful requests, in ms."""
        if not self.latencies:
            return dict.fromkeys(("p50", "p90", "p99", "max", "mean"), float("nan"))
        ms = np.asarray(self.latencies) * 1000
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return {"p50": p50, "p90": p90, "p99": p99, "max": ms.max(), "mean": ms.mean()}

    def record(self, latency: float, code: str | None) -> None:
        if code is None:
            self.ok += 1
            self.latencies.append(latency)
        else:
            self.errors[code] += 1

    def add(self, other: LevelResult) -> None:
        """Sum another measurement of the same level into this one (slices of a level)."""
        self.seconds += other.seconds
        self.ok += other.ok
        self.errors.update(other.errors)
        self.latencies += other.latencies
        self.cpu_seconds += other.cpu_seconds


async def run_level(
    call: Call, level: Level, stop: Stop, *, warmup: float, images_per_request: int
) -> LevelResult:
    """Warm up (unrecorded), then measure one level."""
    counter = itertools.count()
    if warmup > 0:
        scratch = LevelResult(level.concurrency, level.rate, images_per_request)
        await _phase(call, level, Stop(seconds=warmup), counter, scratch)
    result = LevelResult(level.concurrency, level.rate, images_per_request)
    cpu = time.process_time()
    start = time.perf_counter()
    await _phase(call, level, stop, counter, result)
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu
    return result


async def _attempt(call: Call, number: int, due: float, result: LevelResult) -> None:
    try:
        await call(number)
    except grpc.RpcError as error:
        code = error.code() if hasattr(error, "code") else None
        result.record(0.0, code.name if code else "UNKNOWN")
        return
    result.record(time.perf_counter() - due, None)


async def _phase(
    call: Call, level: Level, stop: Stop, counter: itertools.count[int], result: LevelResult
) -> None:
    start = time.perf_counter()
    end = start + stop.seconds if stop.seconds is not None else float("inf")
    budget = itertools.count() if stop.requests is None else iter(range(stop.requests))

    def next_request() -> int | None:
        if time.perf_counter() >= end or next(budget, None) is None:
            return None
        return next(counter)

    if level.rate is None:

        async def worker() -> None:
            while (number := next_request()) is not None:
                await _attempt(call, number, time.perf_counter(), result)

        await asyncio.gather(*(worker() for _ in range(level.concurrency)))
        return

    # Open loop: request i is due at start + i / rate, whatever happened before it;
    # at most `concurrency` are in flight (a due request waits for a free slot).
    slots = asyncio.Semaphore(level.concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def one(number: int, due: float) -> None:
        try:
            await _attempt(call, number, due, result)
        finally:
            slots.release()

    for index in itertools.count():
        due = start + index / level.rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if (number := next_request()) is None:
            break
        await slots.acquire()
        task = asyncio.create_task(one(number, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
