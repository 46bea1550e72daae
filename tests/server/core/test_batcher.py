"""The batcher in-process, with a fake session runner that records its batches."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from server.core import instances
from server.core.batcher import Batcher
from server.errors import DeadlineExceeded, QueueFull
from server.metrics import Metrics
from server.repository import Batching


class FakeRunner:
    """Rows are the inputs' first value; a batch holding -1 fails; `gate` holds runs."""

    provider = "CPUExecutionProvider"

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def join(self, parts: list[np.ndarray]) -> tuple[np.ndarray, int]:
        return np.concatenate(parts), sum(len(part) for part in parts)

    def run_joined(self, batch: np.ndarray, size: int) -> np.ndarray:
        return self.run(batch)

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.gate.wait(10)
        self.batches.append(len(batch))
        if (batch == -1).any():
            raise RuntimeError("bad input in batch")
        return batch[:, :1].copy()


def _images(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32).reshape(-1, 1)


async def _started(runner: FakeRunner, **batching: int) -> Batcher:
    batcher = Batcher("m", "1", [runner], Batching(**batching), Metrics())
    batcher.start()
    return batcher


async def _blocked(runner: FakeRunner, batcher: Batcher) -> asyncio.Task[np.ndarray]:
    """Occupy the one instance with a request until `runner.gate` is set."""
    runner.gate.clear()
    task = asyncio.create_task(batcher.submit(_images(0)))
    while not runner.batches and batcher._queued:  # wait until it is taken
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    return task


async def test_concurrent_requests_share_batches_in_order() -> None:
    runner = FakeRunner()
    batcher = await _started(runner, max_batch_size=8)
    first = await _blocked(runner, batcher)
    calls = [asyncio.create_task(batcher.submit(_images(i, i + 0.5))) for i in range(1, 5)]
    await asyncio.sleep(0.05)
    runner.gate.set()
    results = await asyncio.gather(first, *calls)
    for i, out in enumerate(results[1:], start=1):
        assert out[:, 0].tolist() == [i, i + 0.5]
    assert runner.batches == [1, 8]
    await batcher.close()


async def test_large_request_is_split_and_reassembled() -> None:
    runner = FakeRunner()
    batcher = await _started(runner, max_batch_size=4)
    values = np.arange(10, dtype=np.float32)
    out = await batcher.submit(values.reshape(-1, 1))
    assert out[:, 0].tolist() == values.tolist()
    assert sorted(runner.batches) == [2, 4, 4]
    await batcher.close()


async def test_full_queue_refuses_at_once() -> None:
    runner = FakeRunner()
    batcher = await _started(runner, max_batch_size=2, max_queue_size=3)
    first = await _blocked(runner, batcher)
    queued = asyncio.create_task(batcher.submit(_images(1, 2, 3)))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull, match="3 of 3 images queued"):
        await batcher.submit(_images(4))
    runner.gate.set()
    await asyncio.gather(first, queued)
    await batcher.close()


async def test_check_room_answers_what_a_request_of_that_size_would_get() -> None:
    runner = FakeRunner()
    batcher = await _started(runner, max_batch_size=2, max_queue_size=3)
    first = await _blocked(runner, batcher)
    batcher.check_room(3)  # an empty queue takes a whole queue's worth
    queued = asyncio.create_task(batcher.submit(_images(1, 2)))
    await asyncio.sleep(0.01)
    batcher.check_room(1)
    with pytest.raises(QueueFull, match="2 of 3 images queued"):
        batcher.check_room(2)
    queued.cancel()  # a cancelled request's images make room again
    with pytest.raises(asyncio.CancelledError):
        await queued
    batcher.check_room(3)
    runner.gate.set()
    await first
    assert runner.batches == [1]  # the cancelled request was never computed
    await batcher.close()


async def test_expired_and_cancelled_requests_are_not_computed() -> None:
    runner = FakeRunner()
    batcher = await _started(runner, max_batch_size=8)
    first = await _blocked(runner, batcher)
    expired = asyncio.create_task(batcher.submit(_images(7), deadline=time.monotonic() + 0.01))
    cancelled = asyncio.create_task(batcher.submit(_images(8)))
    alive = asyncio.create_task(batcher.submit(_images(9)))
    await asyncio.sleep(0.05)
    cancelled.cancel()
    runner.gate.set()
    with pytest.raises(DeadlineExceeded):
        await expired
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert (await alive)[:, 0].tolist() == [9]
    await first
    assert runner.batches == [1, 1]
    await batcher.close()


async def test_one_bad_request_fails_alone() -> None:
    runner = FakeRunner()
    batcher = await _started(runner, max_batch_size=8)
    first = await _blocked(runner, batcher)
    good = asyncio.create_task(batcher.submit(_images(1)))
    bad = asyncio.create_task(batcher.submit(_images(-1)))
    also_good = asyncio.create_task(batcher.submit(_images(2)))
    await asyncio.sleep(0.05)
    runner.gate.set()
    await first
    assert (await good)[:, 0].tolist() == [1]
    assert (await also_good)[:, 0].tolist() == [2]
    with pytest.raises(RuntimeError, match="bad input"):
        await bad
    await batcher.close()


async def test_preferred_size_sends_without_waiting_for_the_delay() -> None:
    runner = FakeRunner()
    batcher = await _started(
        runner, max_batch_size=8, max_queue_delay_us=60_000_000, preferred_batch_sizes=(2,)
    )
    out = await asyncio.wait_for(batcher.submit(_images(1, 2)), 30)
    assert out[:, 0].tolist() == [1, 2]
    await batcher.close()


async def test_delay_expiry_sends_a_partial_batch() -> None:
    runner = FakeRunner()
    batcher = await _started(runner, max_batch_size=8, max_queue_delay_us=20_000)
    out = await asyncio.wait_for(batcher.submit(_images(3)), 30)
    assert out[:, 0].tolist() == [3]
    await batcher.close()


async def test_instances_run_batches_side_by_side() -> None:
    runners = [FakeRunner(), FakeRunner()]
    for runner in runners:
        runner.gate.clear()
    batcher = Batcher("m", "1", runners, Batching(max_batch_size=1), Metrics())
    batcher.start()
    calls = [asyncio.create_task(batcher.submit(_images(i))) for i in (1, 2, 3)]
    while batcher._queued > 1:  # two taken at once, one waits for a free instance
        await asyncio.sleep(0.01)
    for runner in runners:
        runner.gate.set()
    results = await asyncio.gather(*calls)
    assert [r[0, 0] for r in results] == [1, 2, 3]
    assert sorted(len(r.batches) for r in runners) == [1, 2], "both instances took work"
    await batcher.close()


class SlowRunner(FakeRunner):
    """Every batch takes `seconds`, like a session whose run time barely depends on size."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def run(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        return super().run(batch)


async def _closed_loop(batcher: Batcher, clients: int, rounds: int) -> None:
    """`clients` callers, each sending its next image a little after its answer (i × 2 ms)."""

    async def client(i: int) -> None:
        for r in range(rounds):
            out = await batcher.submit(_images(100 * i + r))
            assert out[0, 0] == 100 * i + r
            await asyncio.sleep(0.002 * i)

    await asyncio.gather(*(client(i) for i in range(clients)))


async def test_closed_loop_batches_stay_whole_with_the_refill_wait() -> None:
    runner = SlowRunner(0.05)
    batcher = await _started(runner, max_batch_size=8, refill_wait=0.5)
    await _closed_loop(batcher, clients=6, rounds=8)
    await batcher.close()
    assert runner.batches[-5:] == [6] * 5, runner.batches


async def test_closed_loop_splits_without_the_refill_wait() -> None:
    runner = SlowRunner(0.05)
    batcher = await _started(runner, max_batch_size=8, refill_wait=0)
    await _closed_loop(batcher, clients=6, rounds=8)
    await batcher.close()
    assert 1 in runner.batches[2:], runner.batches  # the first one back runs alone


async def test_an_even_split_closed_loop_merges_into_whole_batches() -> None:
    """Half of six clients start while the other half's batch runs: waiting only for the
    batch's own 3 to come back, the 3 queued meanwhile would run alone, and the split would
    last; waiting for those answered plus those queued, the batches merge."""
    runner = SlowRunner(0.05)
    batcher = await _started(runner, max_batch_size=8, refill_wait=0.5)

    async def client(i: int, start: float) -> None:
        await asyncio.sleep(start)
        for r in range(8):
            out = await batcher.submit(_images(100 * i + r))
            assert out[0, 0] == 100 * i + r
            await asyncio.sleep(0.003)  # the round trip back to the client and in again

    await asyncio.gather(*(client(i, 0.0 if i < 3 else 0.01) for i in range(6)))
    await batcher.close()
    # the late half's last round runs alone: the early half has finished
    assert runner.batches == [3] + [6] * 7 + [3], runner.batches


def _record_holds(batcher: Batcher, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The length of every wait the scheduler begins for more requests, from now on."""
    holds: list[float] = []
    hold = batcher._hold

    def recorded(until: float) -> None:
        holds.append(until - asyncio.get_running_loop().time())
        hold(until)

    monkeypatch.setattr(batcher, "_hold", recorded)
    return holds


async def test_a_lone_client_is_never_held(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = SlowRunner(0.05)
    batcher = await _started(runner, max_batch_size=8, refill_wait=1.0)
    holds = _record_holds(batcher, monkeypatch)
    await _closed_loop(batcher, clients=1, rounds=5)
    assert runner.batches == [1] * 5
    assert holds == [], "a batch of 1 waited for company"
    # after a batch of 3, the next request waits for 2 more, at most 1.0 × 50 ms
    await asyncio.gather(*(batcher.submit(_images(i)) for i in range(3)))
    [(size, seconds)] = batcher._last_run.values()
    await batcher.submit(_images(9))
    assert (size, runner.batches[-2:]) == (3, [3, 1])
    assert len(holds) == 1 and 0 < holds[0] <= seconds, (holds, seconds)
    await batcher.close()


async def test_no_refill_wait_while_another_instance_is_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runners = [SlowRunner(0.2), SlowRunner(0.2)]
    batcher = Batcher("m", "1", runners, Batching(max_batch_size=4, refill_wait=1.0), Metrics())
    batcher.start()
    # Both instances run a batch of 4 at once, so each would wait for 4 images next.
    await asyncio.gather(*(batcher.submit(_images(*range(k, k + 4))) for k in (0, 4)))
    assert sorted(len(r.batches) for r in runners) == [1, 1]
    assert [size for size, _ in batcher._last_run.values()] == [4, 4]
    await asyncio.sleep(0.05)
    holds = _record_holds(batcher, monkeypatch)
    out = await batcher.submit(_images(9))
    assert out[0, 0] == 9
    assert holds == [], "a request waited for company while an instance sat idle"
    await batcher.close()


async def test_a_run_past_its_bound_is_reported_even_when_its_answer_comes_first() -> None:
    """The run ends past `run_timeout` while the loop is busy, so its answer is queued on the
    loop before the watchdog's timer: the overrun is still reported, once, and the caller
    still gets the answer."""
    started = threading.Event()

    class Marking(SlowRunner):
        def run(self, batch: np.ndarray) -> np.ndarray:
            started.set()
            return super().run(batch)

    runner = Marking(0.02)
    reasons: list[str] = []
    batcher = Batcher("m", "1", [runner], Batching(max_batch_size=1), Metrics(),
                      on_unhealthy=reasons.append, run_timeout=0.01)  # fmt: skip
    batcher.start()
    call = asyncio.ensure_future(batcher.submit(_images(7)))
    while not started.is_set():  # well within the 10 ms: the run has begun
        await asyncio.sleep(0)
    time.sleep(0.05)  # the loop is busy until well after the run ended
    out = await call
    assert out[0, 0] == 7
    assert reasons == ["a session run has taken more than 0.01 s (session_run_timeout)"]
    await batcher.close()


async def test_a_failure_in_scheduling_stops_it_and_reports_the_version_unhealthy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = FakeRunner()
    reasons: list[str] = []
    batcher = Batcher("m", "1", [runner], Batching(max_batch_size=4), Metrics(),
                      on_unhealthy=reasons.append)  # fmt: skip
    batcher.start()
    assert (await batcher.submit(_images(1)))[0, 0] == 1

    def broken(*, final: bool) -> int:
        raise RuntimeError("a bug in batch forming")

    monkeypatch.setattr(batcher, "_ready_count", broken)
    call = asyncio.ensure_future(batcher.submit(_images(2)))
    await asyncio.sleep(0.05)
    assert reasons == ["its batch scheduler stopped (RuntimeError)"]
    assert not call.done() and runner.batches == [1], "nothing more is run"
    await batcher.close()  # the queued request is cancelled, not left waiting
    with pytest.raises(asyncio.CancelledError):
        await call


class Recording(FakeRunner):
    """Records the thread each run is on; every run takes `seconds`."""

    def __init__(self, seconds: float = 0.0, provider: str = "CPUExecutionProvider") -> None:
        super().__init__()
        self.seconds, self.provider = seconds, provider
        self.threads: list[threading.Thread] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.threads.append(threading.current_thread())
        time.sleep(self.seconds)
        return super().run(batch)


async def test_a_batch_size_that_runs_in_next_to_no_time_runs_on_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A size's first run goes to the inference thread, which measures it; once that size
    runs under the bound it runs on the loop itself. A size not seen yet, a slower model
    and a GPU session stay on the thread."""
    monkeypatch.setattr(instances, "INLINE_RUN_SECONDS", 0.02)  # the fake runs take µs
    here = threading.current_thread()
    fast, slow, gpu = Recording(), Recording(0.05), Recording(provider="CUDAExecutionProvider")
    for runner in (fast, slow, gpu):
        batcher = await _started(runner, max_batch_size=8)
        for i in range(3):
            assert (await batcher.submit(_images(i)))[0, 0] == i
        await batcher.submit(_images(1, 2))
        await batcher.close()
    assert [t is here for t in fast.threads] == [False, True, True, False]
    assert not any(t is here for t in slow.threads + gpu.threads)
    assert len(slow.threads) == len(gpu.threads) == 4


async def test_one_slow_run_does_not_move_a_fast_batch_size_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run the kernel preempted counts at most RECENT_CAP bounds in its size's mean: the
    size stays on the loop; a model that keeps taking longer still leaves it."""
    monkeypatch.setattr(instances, "INLINE_RUN_SECONDS", 0.02)
    here = threading.current_thread()
    runner = Recording()
    batcher = await _started(runner, max_batch_size=8)
    for i, seconds in enumerate([0.0, 0.0, 0.3, 0.0, 0.3, 0.3, 0.3, 0.0]):
        runner.seconds = seconds
        await batcher.submit(_images(i))
    await batcher.close()
    on_loop = [t is here for t in runner.threads]
    # first on the thread, which measures it; the one slow run leaves the size on the
    # loop; slow runs in a row move it to the thread, where the next fast one runs
    assert on_loop == [False, True, True, True, True, True, False, False]


async def test_a_run_that_fails_on_the_event_loop_fails_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(instances, "INLINE_RUN_SECONDS", 0.02)
    runner = Recording()
    batcher = await _started(runner, max_batch_size=8)
    await batcher.submit(_images(1))
    with pytest.raises(RuntimeError, match="bad input"):
        await batcher.submit(_images(-1))
    assert (await batcher.submit(_images(2)))[0, 0] == 2
    assert runner.threads[1:] == [threading.current_thread()] * 2
    await batcher.close()


async def test_one_timer_watches_every_run_of_a_version() -> None:
    """Runs shorter than the bound, back to back for longer than it, are never reported;
    the one that passes it is, once."""
    runner = SlowRunner(0.02)
    reasons: list[str] = []
    batcher = Batcher("m", "1", [runner], Batching(max_batch_size=1), Metrics(),
                      on_unhealthy=reasons.append, run_timeout=0.25)  # fmt: skip
    batcher.start()
    for i in range(20):  # 400 ms of runs of 20 ms
        await batcher.submit(_images(i))
    assert reasons == []
    runner.seconds = 0.4
    await asyncio.gather(*(batcher.submit(_images(i)) for i in range(2)))
    assert reasons == ["a session run has taken more than 0.25 s (session_run_timeout)"]
    await batcher.close()


async def test_a_wait_for_more_that_goes_on_keeps_its_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = FakeRunner()
    batcher = await _started(runner, max_batch_size=8, max_queue_delay_us=200_000)
    holds = _record_holds(batcher, monkeypatch)
    calls = []
    for i in range(3):  # each arrival looks at the queue again, within the oldest's delay
        calls.append(asyncio.create_task(batcher.submit(_images(i))))
        await asyncio.sleep(0.01)
    await asyncio.gather(*calls)
    assert runner.batches == [3]
    assert len(holds) == 1, holds
    await batcher.close()


async def test_a_run_whose_inference_thread_died_fails_as_the_batcher_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread that ends holding a run never answers it: closing fails that run's request
    (`InstanceDied`) instead of waiting for it for ever."""

    def dies(self: instances.Instance) -> None:
        self._jobs.get()  # takes the run and ends without answering

    monkeypatch.setattr(instances.Instance, "_work", dies)
    batcher = await _started(FakeRunner(), max_batch_size=8)
    call = asyncio.create_task(batcher.submit(_images(1)))
    await asyncio.sleep(0.1)
    assert not call.done()
    await asyncio.wait_for(batcher.close(), 5)
    with pytest.raises(instances.InstanceDied, match="ended before its run did"):
        await call
