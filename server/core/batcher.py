"""Dynamic batching for one model version, the way Triton forms batches: the queue policy.

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

- The queue is bounded in images: `submit` raises `QueueFull` at once (`check_queue`, the
  rule, also asked by a front end of the engine's queue as `on_queued` shows it).
- Items whose caller cancelled or whose deadline passed are dropped before
  compute (the latter fail with `DeadlineExceeded`).
- A batch runs on a free instance (`server.core.instances`: its inference thread, the
  results back to the callers, retries).
- Scheduling is callbacks on the event loop, no task: requests queued in one loop
  iteration are looked at once, at the end of it (`_kick`); an instance coming free is
  given its next batch in the callback that frees it; a wait (the delay, the refill) is
  one timer.
- `start()` runs inside the running loop.
- Health: `on_unhealthy(reason)` is called once when scheduling fails,
  when ``max_failed_batches`` session runs fail in a row, or when one session run
  takes longer than ``run_timeout`` seconds (that run goes on; its callers still
  get its answer): the version's `server.core.health.Watchdog`. The model version then
  stops serving (`server.core.health.Health.not_serving`).

Deadlines are absolute `time.monotonic()` values (the event loop's clock).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from server import tracing
from server.core.health import Watchdog
from server.core.instances import Instance, Instances, Item
from server.errors import DeadlineExceeded, QueueFull
from server.metrics import Metrics
from server.repository import Batching
from server.sessions import Runner

log = logging.getLogger(__name__)


def check_queue(queued: int, count: int, limit: int, model: str, version: str) -> None:
    """QueueFull unless `count` more images fit beside the `queued` ones (at most
    ``max_queue_size``, `limit`)."""
    if queued + count > limit:
        raise QueueFull(
            f"model {model} version {version} has {queued} of {limit} images queued; "
            f"retry later"
        )


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
        self.version = version
        self.batching = batching
        self._metrics = metrics.version(model, version)
        self._watchdog = Watchdog(
            on_unhealthy, max_failed_runs=max_failed_batches, run_timeout=run_timeout
        )
        self.instances = Instances(
            model, version, runners, self._metrics, self._watchdog,
            on_ran=self._ran, on_free=self._release,
        )  # fmt: skip
        self._queue: deque[Item] = deque()
        self._queued = 0  # images
        # per instance: (images expected back: those it answered and those queued by then,
        # its run's seconds)
        self._last_run: dict[Instance, tuple[int, float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._free: deque[Instance] = deque()  # idle instances, the longest idle first
        self._open = False  # scheduling: from start() until close() or a failure
        self._kicked = False  # a look at the queue is due at the end of this iteration
        self._pumping = False  # inside `_pump` (an instance freed there is just queued)
        self._timer: asyncio.TimerHandle | None = None  # the end of a wait for more
        self._refill_since: dict[Instance, float] = {}  # when its refill wait began
        # called with the queued images at each change (the engine shows them to the front
        # ends: `server.shm.Board`)
        self.on_queued: Callable[[int], None] | None = None

    # lifecycle

    def start(self) -> None:
        """Start scheduling; call from inside the running event loop."""
        self._loop = asyncio.get_running_loop()
        self.instances.start(self._loop)
        self._free.extend(self.instances.all)
        self._open = True

    async def close(self) -> None:
        """Stop scheduling after in-flight batches finish; queued items are cancelled."""
        self._open = False
        self._cancel_timer()
        await self.instances.finish()
        for item in self._queue:
            item.cancel()
        self._queue.clear()
        self._set_queued(0)
        self.instances.stop()

    # the caller's side

    async def submit(
        self, inputs: np.ndarray, *, deadline: float | None = None, request_id: str = ""
    ) -> np.ndarray:
        """Queue `inputs` (k images), wait for their outputs (k rows), in order."""
        items = self.enqueue(inputs, deadline=deadline, request_id=request_id)
        try:
            if len(items) == 1:  # the usual case: no gathering future around one future
                return await items[0].future
            outputs = await asyncio.gather(*(item.future for item in items))
        finally:
            for item in items:  # a failed or cancelled sibling leaves nothing to compute
                item.cancel()
        return np.concatenate(outputs)

    def enqueue(
        self,
        inputs: np.ndarray,
        *,
        deadline: float | None = None,
        request_id: str = "",
        trace: Any = None,
        on_done: Callable[[Item], None] | None = None,
    ) -> list[Item]:
        """`submit` without waiting: the queued items, each with the future of its rows.
        `Item.cancel` drops one before compute. `on_done(item)` is called as each item's
        future is settled, in the callback that settles it (`server.engine` answers from
        it). `trace`: the request's span context (`server.tracing`; the current span's when
        None)."""
        assert self._loop is not None, "start() first"
        count = len(inputs)
        self.check_room(count)
        now = self._loop.time()
        step = self.batching.max_batch_size
        if trace is None and tracing.ENABLED:
            trace = tracing.current()
        future = self._loop.create_future
        items = [
            Item(inputs[i : i + step], future(), now, deadline, request_id, trace, on_done)
            for i in range(0, count, step)
        ]
        self._queue.extend(items)
        self._set_queued(self._queued + count)
        self._kick()
        return items

    @property
    def queued(self) -> int:
        """Images queued now."""
        return self._queued

    def check_room(self, count: int) -> None:
        """QueueFull unless `count` more images fit in the queue now (cancelled and expired
        items dropped first): what `enqueue` asks, and what the request path asks before it
        decodes a call's images."""
        limit = self.batching.max_queue_size  # a request is never larger (server.validation)
        if self._queued + count > limit:
            self._drop_stale()
        check_queue(self._queued, count, limit, self.model, self.version)

    # the scheduler's side

    def _kick(self) -> None:
        """Look at the queue at the end of this loop iteration (once, however many requests
        it queues)."""
        if not self._kicked:
            self._kicked = True
            self._loop.call_soon(self._kicked_pump)  # type: ignore[union-attr]

    def _kicked_pump(self) -> None:
        self._kicked = False
        self._pump()

    def _pump(self) -> None:
        """Give free instances their batches; wait (one timer) where the rules say to. A
        failure here stops scheduling and is reported (the version stops serving)."""
        if not self._open or self._pumping:
            return
        self._pumping = True
        try:
            self._send_ready()
        except Exception as exc:
            self._open = False
            log.error("batch scheduling of model %s version %s failed",
                      self.model, self.version, exc_info=exc)  # fmt: skip
            self._watchdog.scheduler_stopped(exc)
        finally:
            self._pumping = False

    def _send_ready(self) -> None:
        until = self._dispatch_ready()
        if until is None:
            self._cancel_timer()
        elif self._timer is None or self._timer.when() != until:
            self._cancel_timer()  # (a wait that goes on keeps its timer)
            self._hold(until)

    def _dispatch_ready(self) -> float | None:
        """Give free instances the batches that are ready: when to look again (on the loop's
        clock) if a wait has begun, else None."""
        assert self._loop is not None
        if not self._free:  # every instance busy: one coming free looks again
            return None
        self._drop_stale()
        delay = self.batching.max_queue_delay_us / 1e6
        while self._free and self._queue:
            instance = self._free[0]
            now = self._loop.time()
            if delay == 0:
                until = self._refill_until(instance, now)
                if until is not None:
                    return until
                count = self._ready_count(final=True)
            else:
                count = self._ready_count(final=False)
                if not count:
                    until = self._queue[0].arrival + delay
                    if now < until:
                        return until
                    count = self._ready_count(final=True)
            self._free.popleft()
            self._refill_since.pop(instance, None)
            self._dispatch(instance, self._take(count))
        if not self._queue:
            self._refill_since.clear()  # a wait begins again with the next request
        return None

    def _refill_until(self, instance: Instance, now: float) -> float | None:
        """Until when `instance` waits for as many images as it answered last time plus those
        queued by then (at most a full batch): None when it does not wait, or no longer.

        Never while another instance is idle: the wait keeps one instance's batches
        whole, and holding work back from an idle instance would cost more than it saves.
        """
        last = self._last_run.get(instance)
        if last is None or self.batching.refill_wait == 0 or len(self._free) > 1:
            return None
        if self._queued >= min(last[0], self.batching.max_batch_size):
            return None
        until = self._refill_since.setdefault(instance, now) + self.batching.refill_wait * last[1]
        return until if now < until else None

    def _hold(self, until: float) -> None:
        """Look again at `until` (sooner if a request comes or an instance comes free)."""
        self._timer = self._loop.call_at(until, self._timer_fired)  # type: ignore[union-attr]

    def _timer_fired(self) -> None:
        self._timer = None
        self._pump()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

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

    def _take(self, count: int) -> list[Item]:
        batch = [self._queue.popleft() for _ in range(count)]
        self._set_queued(self._queued - sum(item.size for item in batch))
        return batch

    def _drop_stale(self) -> None:
        """Forget cancelled items and fail expired ones, before any compute."""
        assert self._loop is not None
        now = self._loop.time()
        kept: deque[Item] = deque()
        for item in self._queue:
            if item.future.done():
                continue
            if item.deadline is not None and item.deadline <= now:
                item.fail(
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

    def _dispatch(self, instance: Instance, batch: list[Item]) -> None:
        """`batch` leaves the queue for `instance`."""
        assert self._loop is not None
        now = self._loop.time()
        for item in batch:
            self._metrics.queue_duration.observe(now - item.arrival)
        self.instances.execute(instance, batch)

    def _ran(self, instance: Instance, images: int, seconds: float) -> None:
        """`instance` answered `images` in `seconds`: what its next refill waits for."""
        self._last_run[instance] = (images + self._queued, seconds)

    def _release(self, instance: Instance) -> None:
        """`instance` can take a batch: given one now, in this callback (inside `_pump`, the
        pump's loop gives it one)."""
        self._free.append(instance)
        self._pump()

    def _set_queued(self, images: int) -> None:
        self._queued = images
        self._metrics.queue_depth.set(images)
        if self.on_queued is not None:
            self.on_queued(images)
