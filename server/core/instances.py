"""A model version's instances: each one's inference thread, the session runs on it, and
their results handed back to the callers on the event loop.

- ``session.run`` runs in the instance's own inference thread, and its outputs come back
  to the event loop in one ``call_soon_threadsafe``. (An executor's hand-off, a concurrent
  future chained to an asyncio one, cost several loop callbacks per batch: on a fast
  model, paid per request, it was the largest piece of the loop's own time.)
- On the CPU provider, a run expected to take less than `INLINE_RUN_SECONDS` runs on the
  event loop itself: below that, the hand-off's two thread wake-ups cost about as much as
  the run. The expectation is per batch size, the decaying mean of that size's runs on
  the instance (each run counting at most `RECENT_CAP` bounds, so that one preempted run
  moves it by a bounded step); a size not seen yet runs on the thread, which measures it.
  So a run holds the loop at most about that long (a model that costs next to nothing),
  never a real model's. A GPU run always goes to the thread, where a run that hangs is
  the watchdog's to report, not a loop that stops answering.
- Each run's outputs are split among the batch's items in the callback that receives
  them (no task per batch); the number of rows is checked against the batch. Each item's
  ``on_done`` is called as it is settled, and the instance is free again, in that same
  callback.
- A failing batch is retried item by item, so one bad request fails alone.
- Every run is told to the version's `server.core.health.Watchdog` (its time, whether it
  failed).
- With tracing on (`server.tracing`), every run is a ``batch`` span linked to the requests
  it serves, each of which gets a ``queue`` span from its arrival to the run's start.

What runs when is the batcher's to decide (`server.core.batcher`); it hands a batch to a
free instance (`Instances.execute`) and is told when the instance is free again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from server import threads, tracing
from server.core.health import Watchdog
from server.metrics import VersionMetrics
from server.providers import CPU
from server.sessions import Runner

log = logging.getLogger(__name__)


class Item:
    """A request's images (at most a batch of them) waiting for their outputs.

    The batcher and the instances settle its future through `resolve`, `fail` and
    `cancel`, each of which then calls ``on_done(item)`` at once (no loop callback in
    between): how `server.engine` answers a front end in the same callback that delivers
    the batch. An item with an ``on_done`` is never awaited, so nothing else settles it.
    """

    __slots__ = ("arrival", "deadline", "future", "inputs", "on_done", "request_id", "size",
                 "trace")  # fmt: skip

    def __init__(
        self,
        inputs: np.ndarray,
        future: asyncio.Future[np.ndarray],
        arrival: float,
        deadline: float | None,
        request_id: str,
        trace: Any = None,  # the request's span context (`server.tracing`), None untraced
        on_done: Callable[[Item], None] | None = None,
    ) -> None:
        self.inputs, self.future, self.arrival = inputs, future, arrival
        self.deadline, self.request_id, self.trace = deadline, request_id, trace
        self.on_done = on_done
        self.size = len(inputs)

    def resolve(self, rows: np.ndarray) -> None:
        if not self.future.done():
            self.future.set_result(rows)
            self._done()

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
            self._done()

    def cancel(self) -> None:
        """Dropped before compute if still queued; a run that has it discards its rows."""
        if self.future.cancel():
            self._done()

    def _done(self) -> None:
        """``on_done``, once, whose failure is logged and goes no further: the batch that
        settles this item goes on with its other items. Dropped once called: an
        ``on_done`` that holds the item (the engine's request holds its items) would
        otherwise keep both, and the inputs' memory (a front end's shared-memory
        segment), alive until the garbage collector's next pass."""
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            try:
                on_done(self)
            except Exception:
                log.exception("answering request %s failed", self.request_id)


# A CPU run expected to take less than this many seconds runs on the event loop: the
# hand-off to the inference thread and back costs about as much (decision 0006).
INLINE_RUN_SECONDS = 100e-6
# The weight of a run in its batch size's decaying mean of run seconds, and the most one
# run counts there, in multiples of INLINE_RUN_SECONDS: a run the kernel preempted, or one
# on the thread that waited for the GIL after it, moves the mean by a bounded step, while
# a model that always takes longer still settles above the bound.
RECENT_WEIGHT = 0.25
RECENT_CAP = 2.0

# How often a close waiting for runs looks for inference threads that died.
DEATH_CHECK_SECONDS = 0.5


class InstanceDied(RuntimeError):
    """An inference thread ended while it held a run (the run will never answer)."""


# What an inference thread hands back: the outputs, or the run's exception.
Done = Callable[[np.ndarray | None, BaseException | None], None]


class Instance:
    """One instance's inference thread: runs the batches given to it in order and hands
    each result to `done` on the event loop given with it. Started on first use."""

    def __init__(self, runner: Runner, name: str) -> None:
        self.runner = runner
        self.name = name
        self._jobs: queue.SimpleQueue[
            tuple[list[np.ndarray], asyncio.AbstractEventLoop, Done] | None
        ]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # batch size → decaying mean of its runs' seconds, each at most RECENT_CAP bounds
        # (written by whichever thread ran)
        self.recent: dict[int, float] = {}
        self._inline = runner.provider == CPU  # runs may go on the loop (module docstring)
        # its runs not answered yet → what each calls once it is (`Instances._ended`)
        self.in_flight: dict[asyncio.Future[None], Callable[[asyncio.Future[None]], None] | None]
        self.in_flight = {}

    def died(self) -> bool:
        """Its thread was started and is gone without `stop`: its runs never end."""
        return self._thread is not None and not self._thread.is_alive()

    def submit(
        self, parts: list[np.ndarray], loop: asyncio.AbstractEventLoop, done: Done
    ) -> None:
        """Run the batch made of `parts`: on the inference thread (joined there, off the
        loop), or here when its size has run in less than `INLINE_RUN_SECONDS`."""
        expected = self.recent.get(sum(len(part) for part in parts)) if self._inline else None
        if expected is not None and expected < INLINE_RUN_SECONDS:
            try:
                outputs = self._run(parts)
            except Exception as exc:
                done(None, exc)
            else:
                done(outputs, None)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put((parts, loop, done))

    def stop(self) -> None:
        """End the thread once its queued runs are done."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _work(self) -> None:
        threads.name_current("inference")
        while (job := self._jobs.get()) is not None:
            parts, loop, done = job
            outputs: np.ndarray | None = None
            error: BaseException | None = None
            try:
                outputs = self._run(parts)
            except BaseException as exc:  # the loop's callback decides; the thread goes on
                error = exc
            # RuntimeError: the loop has closed, nobody waits for this run any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(done, outputs, error)
            del job, parts, loop, done, outputs, error  # (nothing of a batch kept while idle)

    def _run(self, parts: list[np.ndarray]) -> np.ndarray:
        batch, size = self.runner.join(parts)  # into the array the session reads
        started = time.perf_counter()
        try:
            return self.runner.run_joined(batch, size)
        finally:
            seconds = min(time.perf_counter() - started, RECENT_CAP * INLINE_RUN_SECONDS)
            mean = self.recent.get(size)
            self.recent[size] = (
                seconds if mean is None else mean + RECENT_WEIGHT * (seconds - mean)
            )


def settle(future: asyncio.Future[np.ndarray], outputs: np.ndarray | None,
           error: BaseException | None) -> None:  # fmt: skip
    """A `Done` for one future: its outputs, or the run's exception."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(outputs)  # type: ignore[arg-type]


class Instances:
    """The instances of one model version and the runs on them. `start` inside the loop."""

    def __init__(
        self,
        model: str,
        version: str,
        runners: Sequence[Runner],
        metrics: VersionMetrics,
        watchdog: Watchdog,
        *,
        on_ran: Callable[[Instance, int, float], None],
        on_free: Callable[[Instance], None],
    ) -> None:
        """`on_ran(instance, images, seconds)` is told each successful run, `on_free(instance)`
        when an instance can take another batch."""
        self.model, self.version = model, version
        self.all = [
            Instance(runner, f"infer-{model}-{version}_{i}") for i, runner in enumerate(runners)
        ]
        self._metrics = metrics
        self._watchdog = watchdog
        self._on_ran, self._on_free = on_ran, on_free
        self._running: set[asyncio.Future[None]] = set()  # runs and retries in flight
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def finish(self) -> None:
        """Until no run or retry is in flight; the runs of an instance whose thread died
        fail (`InstanceDied`) rather than being waited for forever."""
        while self._running:  # a failed run may start a retry as it ends
            await asyncio.wait(set(self._running), timeout=DEATH_CHECK_SECONDS)
            for instance in self.all:
                if instance.died():
                    for run in list(instance.in_flight):
                        self._ended(instance, run, InstanceDied(
                            f"the inference thread of model {self.model} version "
                            f"{self.version} ended before its run did"))  # fmt: skip

    def stop(self) -> None:
        """End every inference thread (after `finish`)."""
        for instance in self.all:
            instance.stop()

    async def run_on_each(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch on every instance, bypassing the queue (warm-up)."""
        loop = asyncio.get_running_loop()
        outputs = []
        for instance in self.all:
            ran: asyncio.Future[np.ndarray] = loop.create_future()
            instance.submit([batch], loop, functools.partial(settle, ran))
            outputs.append(await ran)
        return outputs[0]

    def execute(self, instance: Instance, batch: list[Item]) -> None:
        """Send `batch` to `instance`'s inference thread; the outputs are delivered by a
        callback (no task per batch). A batch that fails is retried item by item in a task."""
        try:
            running = self._start(instance, batch, functools.partial(self._finish, instance, batch))
        except Exception as exc:
            self._after_failure(instance, batch, exc)
            return
        if running is None:
            self._on_free(instance)

    def _log_crash(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "the item-by-item retry of a failed batch of model %s version %s crashed",
                self.model, self.version, exc_info=task.exception(),
            )  # fmt: skip

    def _start(
        self,
        instance: Instance,
        batch: list[Item],
        then: Callable[[asyncio.Future[None]], None] | None = None,
    ) -> asyncio.Future[None] | None:
        """Start one session run over the live items of `batch` (None when none is live); the
        future is done once their futures have their outputs, or fails with the run; `then`
        is called with it when it is."""
        loop = self._loop
        assert loop is not None, "start() first"
        live = [item for item in batch if not item.future.done()]
        if not live:
            return None
        parts = [item.inputs for item in live]
        size = sum(item.size for item in live)
        self._metrics.batch_size.observe(size)
        started = loop.time()
        run = self._watchdog.run_started(loop)
        delivered: asyncio.Future[None] = loop.create_future()
        self._running.add(delivered)
        instance.in_flight[delivered] = then
        span = self._trace(instance, live, size, started) if tracing.ENABLED else None
        deliver = functools.partial(
            self._deliver, instance, live, size, started, run, delivered, span
        )
        instance.submit(parts, loop, deliver)
        return delivered

    def _deliver(
        self,
        instance: Instance,
        live: list[Item],
        size: int,
        started: float,
        run: int,
        delivered: asyncio.Future[None],
        span: Any,
        outputs: np.ndarray | None,
        error: BaseException | None,
    ) -> None:
        """On the loop, `instance`'s run of `live` ended: each item its rows, or the run's
        failure to `delivered`; the watchdog is told either way."""
        seconds = self._loop.time() - started  # type: ignore[union-attr]
        if error is None:
            assert outputs is not None
            if len(outputs) != size:
                error = RuntimeError(f"session returned {len(outputs)} rows for a batch of {size}")
        self._watchdog.run_ended(run, seconds, failed=error is not None)
        if span is not None:
            tracing.batch_ended(span, error)
        if error is not None:
            self._ended(instance, delivered, error)
            return
        self._metrics.inference_duration.observe(seconds)
        self._on_ran(instance, size, seconds)
        offset = 0
        for item in live:
            item.resolve(outputs[offset : offset + item.size])  # type: ignore[index]
            offset += item.size
        self._ended(instance, delivered)

    def _trace(self, instance: Instance, live: list[Item], size: int, started: float) -> Any:
        """The run's ``batch`` span and its requests' ``queue`` spans (`server.tracing`)."""
        return tracing.batch(
            [(item.trace, item.arrival) for item in live],
            started,
            {
                "resnet_serve.model": self.model,
                "resnet_serve.model.version": self.version,
                "resnet_serve.batch.size": size,
                "resnet_serve.batch.requests": len(live),
                "resnet_serve.instance": instance.name,
                "resnet_serve.provider": instance.runner.provider,
            },
        )

    def _ended(
        self,
        instance: Instance,
        delivered: asyncio.Future[None],
        error: BaseException | None = None,
    ) -> None:
        """A run is over: its future settled, then its bookkeeping and `then`, in this same
        callback (an instance freed here is given its next batch here)."""
        if delivered.done():
            return
        then = instance.in_flight.pop(delivered, None)
        self._running.discard(delivered)
        if error is None:
            delivered.set_result(None)
        else:
            delivered.set_exception(error)
        if then is not None:
            then(delivered)

    def _finish(self, instance: Instance, batch: list[Item], done: asyncio.Future[None]) -> None:
        exc = done.exception()
        if exc is None:
            self._on_free(instance)
        else:
            self._after_failure(instance, batch, exc)  # type: ignore[arg-type]

    def _after_failure(self, instance: Instance, batch: list[Item], exc: Exception) -> None:
        """A failed batch: one item fails alone; several are retried one by one."""
        if len(batch) == 1:
            _fail(batch[0], exc)
            self._on_free(instance)
            return
        log.warning(
            "batch of %d requests failed on model %s version %s; retrying one by one",
            len(batch), self.model, self.version, exc_info=exc,
        )  # fmt: skip
        assert self._loop is not None
        task = self._loop.create_task(self._retry(instance, batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        task.add_done_callback(self._log_crash)

    async def _retry(self, instance: Instance, batch: list[Item]) -> None:
        try:
            for item in batch:
                try:
                    running = self._start(instance, [item])
                    if running is not None:
                        await running
                except Exception as exc:
                    _fail(item, exc)
        finally:
            self._on_free(instance)


def _fail(item: Item, exc: Exception) -> None:
    if not item.future.done():
        log.error("inference failed for request %s", item.request_id, exc_info=exc)
        item.fail(exc)
