"""Dynamic batching for one model version, the way Triton forms batches.

A request of k images becomes items of at most ``max_batch_size`` images
each, queued oldest first. Whenever a session instance is free the scheduler
takes queued items, oldest first, while they fit in ``max_batch_size``; it
sends at once when the batch reaches the maximum or a preferred size (the
largest reachable one), otherwise it waits at most ``max_queue_delay_us``
from the oldest item's arrival for more.

With delay 0 (the default), batches grow by themselves while every instance
is busy, and an instance that has just answered a batch of n images, with q
more queued by then, waits for n + q images to queue (at most a full batch)
for at most ``refill_wait`` × that batch's run time: the n callers it has
just answered are expected back. Without a wait, a closed loop of n clients
splits into alternating batches of 1 and n − 1: the first request back after
a batch runs alone while the others arrive, and a batch of 1 is the least
efficient run there is. Waiting for n alone is not enough either: a loop
split evenly (8 + 8 of 16 clients) stays split, since the 8 queued when one
half's run ends are already as many as it ran, and every request then waits
for two runs where one would do (a p99 twice the p50). A lone client (n = 1)
never waits, and nothing waits while another instance is idle; when traffic
drops, one wait of at most that fraction is lost before the target follows
it down.

- The queue is bounded in images: `submit` raises `QueueFull` at once.
- Items whose caller cancelled or whose deadline passed are dropped before
  compute (the latter fail with `DeadlineExceeded`).
- A failing batch is retried item by item, so one bad request fails alone.
- ``session.run`` runs in the instance's own inference thread, and its outputs
  come back to the event loop in one ``call_soon_threadsafe``; the event loop
  never blocks. (An executor's hand-off, a concurrent future chained to an
  asyncio one, cost several loop callbacks per batch: on a fast model, paid
  per request, it was the largest piece of the loop's own time.)
- asyncio objects are made in `start()`, inside the running loop.
- Health: `on_unhealthy(reason)` is called once when the scheduler task dies,
  when ``max_failed_batches`` session runs fail in a row, or when one session run
  takes longer than ``run_timeout`` seconds (that run goes on; its callers still
  get its answer). The model version then stops serving (`server.models`).

Deadlines are absolute `time.monotonic()` values (the event loop's clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from server import threads
from server.errors import DeadlineExceeded, InvalidInput, QueueFull
from server.metrics import Metrics
from server.repository import Batching
from server.sessions import Runner

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Item:
    inputs: np.ndarray
    future: asyncio.Future[np.ndarray]
    arrival: float
    deadline: float | None
    request_id: str
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.inputs)


# What an inference thread hands back: the outputs, or the run's exception.
Done = Callable[[np.ndarray | None, BaseException | None], None]


class _Worker:
    """One instance's inference thread: runs the batches given to it in order and hands
    each result to `done` on the event loop given with it. Started on first use."""

    def __init__(self, runner: Runner, name: str) -> None:
        self.runner = runner
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[np.ndarray, asyncio.AbstractEventLoop, Done] | None]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, inputs: np.ndarray, loop: asyncio.AbstractEventLoop, done: Done) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put((inputs, loop, done))

    def stop(self) -> None:
        """End the thread once its queued runs are done."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _work(self) -> None:
        threads.name_current("inference")
        while (job := self._jobs.get()) is not None:
            inputs, loop, done = job
            outputs: np.ndarray | None = None
            error: BaseException | None = None
            try:
                outputs = self.runner.run(inputs)
            except BaseException as exc:  # the loop's callback decides; the thread goes on
                error = exc
            # RuntimeError: the loop has closed, nobody waits for this run any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(done, outputs, error)
            del job, inputs, outputs, error


def _settle(future: asyncio.Future[np.ndarray], outputs: np.ndarray | None,
            error: BaseException | None) -> None:  # fmt: skip
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(outputs)  # type: ignore[arg-type]


class Batcher:
    def __init__(
        self,
        model: str,
        version: str,
        runners: Sequence[Runner],
        batching: Batching,
        metrics: Metrics,
        *,
        on_unhealthy: Callable[[str], None] | None = None,
        max_failed_batches: int = 5,
        run_timeout: float = 120.0,
    ) -> None:
        self.model = model
        self._on_unhealthy = on_unhealthy
        self._max_failed = max_failed_batches
        self._run_timeout = run_timeout
        self._failed_in_a_row = 0
        self.unhealthy = ""  # why it stopped being healthy; "" while it is
        self.version = version
        self.batching = batching
        self._runners = list(runners)
        self._metrics = metrics.version(model, version)
        self._queue: deque[_Item] = deque()
        self._queued = 0  # images
        self._workers = {
            id(runner): _Worker(runner, f"infer-{model}-{version}_{i}")
            for i, runner in enumerate(self._runners)
        }
        self._running: set[asyncio.Future[None]] = set()  # runs and retries in flight
        # id(runner) → (images expected back: those it answered and those queued by then,
        # its run's seconds)
        self._last_run: dict[int, tuple[int, float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._free: asyncio.Queue[Runner] | None = None
        self._scheduler: asyncio.Task[None] | None = None

    # lifecycle

    def start(self) -> None:
        """Start scheduling; call from inside the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._free = asyncio.Queue()
        for runner in self._runners:
            self._free.put_nowait(runner)
        self._scheduler = self._loop.create_task(
            self._schedule(), name=f"batcher-{self.model}-{self.version}"
        )
        self._scheduler.add_done_callback(self._log_crash)
        self._scheduler.add_done_callback(self._scheduler_ended)

    async def close(self) -> None:
        """Stop scheduling after in-flight batches finish; queued items are cancelled."""
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        while self._running:  # a failed run may start a retry as it ends
            await asyncio.gather(*self._running, return_exceptions=True)
        for item in self._queue:
            item.future.cancel()
        self._queue.clear()
        self._set_queued(0)
        for worker in self._workers.values():
            worker.stop()

    async def run_direct(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch on every instance, bypassing the queue (warm-up)."""
        loop = asyncio.get_running_loop()
        outputs = []
        for runner in self._runners:
            ran: asyncio.Future[np.ndarray] = loop.create_future()
            self._workers[id(runner)].submit(batch, loop, functools.partial(_settle, ran))
            outputs.append(await ran)
        return outputs[0]

    # the caller's side

    async def submit(
        self, inputs: np.ndarray, *, deadline: float | None = None, request_id: str = ""
    ) -> np.ndarray:
        """Queue `inputs` (k images), wait for their outputs (k rows), in order."""
        assert self._loop is not None and self._wakeup is not None, "start() first"
        count = len(inputs)
        limit = self.batching.max_queue_size
        if count > limit:
            raise InvalidInput(
                f"{count} images in one request; model {self.model} queues at most {limit}"
            )
        if self._queued + count > limit:
            self._drop_stale()
        if self._queued + count > limit:
            raise QueueFull(
                f"model {self.model} version {self.version} has {self._queued} of {limit} "
                f"images queued; retry later"
            )
        now = self._loop.time()
        step = self.batching.max_batch_size
        items = [
            _Item(inputs[i : i + step], self._loop.create_future(), now, deadline, request_id)
            for i in range(0, count, step)
        ]
        self._queue.extend(items)
        self._set_queued(self._queued + count)
        self._wakeup.set()
        try:
            if len(items) == 1:  # the usual case: no gathering future around one future
                return await items[0].future
            outputs = await asyncio.gather(*(item.future for item in items))
        finally:
            for item in items:  # a failed or cancelled sibling leaves nothing to compute
                if not item.future.done():
                    item.future.cancel()
        return np.concatenate(outputs)

    # the scheduler's side

    async def _schedule(self) -> None:
        assert self._free is not None
        while True:
            runner = await self._free.get()
            try:
                batch = await self._next_batch(runner)
            except BaseException:
                self._free.put_nowait(runner)
                raise
            self._dispatch(runner, batch)

    async def _next_batch(self, runner: Runner) -> list[_Item]:
        assert self._loop is not None
        delay = self.batching.max_queue_delay_us / 1e6
        while True:
            await self._wait_for_items()
            if delay == 0:
                await self._wait_for_refill(runner)
                self._drop_stale()
                if self._queue:
                    return self._take(self._ready_count(final=True))
                continue
            while self._queue:
                if ready := self._ready_count(final=False):
                    return self._take(ready)
                remaining = self._queue[0].arrival + delay - self._loop.time()
                if remaining <= 0 or not await self._wait_wakeup(remaining):
                    self._drop_stale()
                    if self._queue:
                        return self._take(self._ready_count(final=True))
                self._drop_stale()

    async def _wait_for_items(self) -> None:
        assert self._wakeup is not None
        while True:
            self._drop_stale()
            if self._queue:
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _wait_for_refill(self, runner: Runner) -> None:
        """Wait until as many images are queued as `runner` answered last time plus those
        queued by then (at most a full batch), or its time is up.

        Never while another instance is idle: the wait keeps one instance's batches
        whole, and holding work back from an idle instance would cost more than it saves.
        """
        assert self._loop is not None and self._free is not None
        last = self._last_run.get(id(runner))
        if last is None or self.batching.refill_wait == 0:
            return
        target = min(last[0], self.batching.max_batch_size)
        until = self._loop.time() + self.batching.refill_wait * last[1]
        while self._queued < target and self._free.empty():
            remaining = until - self._loop.time()
            if remaining <= 0 or not await self._wait_wakeup(remaining):
                return

    async def _wait_wakeup(self, timeout: float) -> bool:
        assert self._wakeup is not None
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _ready_count(self, *, final: bool) -> int:
        """How many queued items to send now: 0 means wait for more.

        Items are counted oldest first while they fit. The batch is ready at
        the maximum, or at the largest preferred size a prefix reaches; when
        `final` (no delay, or the delay expired) whatever fits goes.
        """
        preferred = set(self.batching.preferred_batch_sizes)
        total, fitting, at_preferred = 0, 0, 0
        for item in self._queue:
            if total + item.size > self.batching.max_batch_size:
                break
            total += item.size
            fitting += 1
            if total in preferred:
                at_preferred = fitting
        if total == self.batching.max_batch_size or final:
            return fitting
        return at_preferred

    def _take(self, count: int) -> list[_Item]:
        batch = [self._queue.popleft() for _ in range(count)]
        self._set_queued(self._queued - sum(item.size for item in batch))
        return batch

    def _drop_stale(self) -> None:
        """Forget cancelled items and fail expired ones, before any compute."""
        assert self._loop is not None
        now = self._loop.time()
        kept: deque[_Item] = deque()
        for item in self._queue:
            if item.future.done():
                continue
            if item.deadline is not None and item.deadline <= now:
                item.future.set_exception(
                    DeadlineExceeded(
                        f"deadline passed after {now - item.arrival:.3f} s in the queue of "
                        f"model {self.model} version {self.version}; nothing was computed"
                    )
                )
                continue
            kept.append(item)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._set_queued(sum(item.size for item in kept))

    def _dispatch(self, runner: Runner, batch: list[_Item]) -> None:
        """Send `batch` to `runner`'s inference thread; the outputs are delivered by a
        callback (no task per batch). A batch that fails is retried item by item in a task."""
        assert self._loop is not None
        now = self._loop.time()
        for item in batch:
            self._metrics.queue_duration.observe(now - item.arrival)
        try:
            running = self._start_run(runner, batch)
        except Exception as exc:
            self._after_failure(runner, batch, exc)
            return
        if running is None:
            self._release(runner)
            return
        running.add_done_callback(lambda done: self._finish_run(runner, batch, done))

    def _start_run(self, runner: Runner, batch: list[_Item]) -> asyncio.Future[None] | None:
        """Start one session run over the live items of `batch` (None when none is live); the
        future is done once their futures have their outputs, or fails with the run."""
        assert self._loop is not None
        live = [item for item in batch if not item.future.done()]
        if not live:
            return None
        inputs = live[0].inputs if len(live) == 1 else np.concatenate([i.inputs for i in live])
        size = len(inputs)
        self._metrics.batch_size.observe(size)
        started = self._loop.time()
        overrun = f"a session run has taken more than {self._run_timeout:g} s (session_run_timeout)"
        # the timer reports a run still going past the bound; `deliver` one that ended past it
        # before the loop got to the timer
        watch = self._loop.call_later(self._run_timeout, self._report, overrun)
        delivered = self._loop.create_future()
        self._running.add(delivered)
        delivered.add_done_callback(self._running.discard)

        def deliver(outputs: np.ndarray | None, error: BaseException | None) -> None:
            watch.cancel()
            if self._loop.time() - started > self._run_timeout:  # type: ignore[union-attr]
                self._report(overrun)
            try:
                if error is not None:
                    raise error
                assert outputs is not None
                if len(outputs) != size:
                    raise RuntimeError(
                        f"session returned {len(outputs)} rows for a batch of {size}"
                    )
            except Exception as exc:
                self._failed_in_a_row += 1
                if self._failed_in_a_row >= self._max_failed:
                    self._report(f"{self._failed_in_a_row} session runs in a row failed "
                                 f"(max_failed_batches {self._max_failed})")  # fmt: skip
                delivered.set_exception(exc)
                return
            self._failed_in_a_row = 0
            seconds = self._loop.time() - started  # type: ignore[union-attr]
            self._metrics.inference_duration.observe(seconds)
            self._last_run[id(runner)] = (size + self._queued, seconds)
            offset = 0
            for item in live:
                if not item.future.done():
                    item.future.set_result(outputs[offset : offset + item.size])
                offset += item.size
            delivered.set_result(None)

        self._workers[id(runner)].submit(inputs, self._loop, deliver)
        return delivered

    def _finish_run(self, runner: Runner, batch: list[_Item], done: asyncio.Future[None]) -> None:
        exc = done.exception()
        if exc is None:
            self._release(runner)
        else:
            self._after_failure(runner, batch, exc)  # type: ignore[arg-type]

    def _after_failure(self, runner: Runner, batch: list[_Item], exc: Exception) -> None:
        """A failed batch: one item fails alone; several are retried one by one."""
        if len(batch) == 1:
            _fail(batch[0], exc)
            self._release(runner)
            return
        log.warning(
            "batch of %d requests failed on model %s version %s; retrying one by one",
            len(batch), self.model, self.version, exc_info=exc,
        )  # fmt: skip
        assert self._loop is not None
        task = self._loop.create_task(self._retry(runner, batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        task.add_done_callback(self._log_crash)

    async def _retry(self, runner: Runner, batch: list[_Item]) -> None:
        try:
            for item in batch:
                try:
                    running = self._start_run(runner, [item])
                    if running is not None:
                        await running
                except Exception as exc:
                    _fail(item, exc)
        finally:
            self._release(runner)

    def _release(self, runner: Runner) -> None:
        assert self._free is not None
        self._free.put_nowait(runner)
        if self._wakeup is not None:  # a refill wait ends when an instance comes free
            self._wakeup.set()

    def _set_queued(self, images: int) -> None:
        self._queued = images
        self._metrics.queue_depth.set(images)

    def _report(self, reason: str) -> None:
        """Unhealthy, once: the first reason is the one reported."""
        if self.unhealthy:
            return
        self.unhealthy = reason
        if self._on_unhealthy is not None:
            self._on_unhealthy(reason)

    def _scheduler_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():  # close() cancels it; anything else is a death
            error = task.exception()
            why = type(error).__name__ if error is not None else "returned"
            self._report(f"its batch scheduler stopped ({why})")

    def _log_crash(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "batcher task of model %s version %s crashed",
                self.model, self.version, exc_info=task.exception(),
            )  # fmt: skip


def _fail(item: _Item, exc: Exception) -> None:
    if not item.future.done():
        log.error("inference failed for request %s", item.request_id, exc_info=exc)
        item.future.set_exception(exc)
